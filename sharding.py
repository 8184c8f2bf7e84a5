"""How the model is spread over ranks: DDP replicas (`train.parallel: ddp`, replicate) or FSDP2 shards
(`train.parallel: fsdp`, shard_model), and the gradient rules that keep the loss's global normalisation exact
under either (docs/training.md#sharded-training-fsdp).

    model = build_model(cfg, tokenizer)                 # on the CPU; activation checkpointing already set
    compile_decoder_layers(model)                       # train.compile, before sharding
    model = shard_model(model, dtype, cpu_offload)      # every rank, after init_process_group
    scaler.scale(loss * backward_scale(model)).backward()                # FSDP sums, DDP averages
    grad_norm = clip_grad_norm_(trainable, max_norm, device)              # the norm of the unsharded gradient

Checkpoints of a sharded model are Distributed Checkpoints (checkpoint.save_sharded_checkpoint), which resume
on any number of ranks.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers.modeling_layers import GradientCheckpointingLayer

from config import ConfigError
from losses import ddp_loss_scale
from quant import ddp_ignore_nf4, nf4_unshardable
from model import VideoAssistant

# FSDP2 warns when a sharded module returns a view; the assistant's outputs are views (squeezed logits), and
# nothing modifies them in place (the losses only read them), so the pre-backward hook is never dropped.
VIEW_OUTPUT_WARNING = "FSDP2-wrapped module .* returned a view tensor"


# ----------------------------------------------------------------------------------------------------------
# Replicas (DDP)


def replicate(model: nn.Module, device: torch.device) -> DDP:
    """Wrap `model` (already on `device`, equal on every rank) in DDP for `train.parallel: ddp`."""
    # No buffer broadcast (the buffers are derived from the tokenizer, identical on every rank); gradients
    # live in the all-reduce buckets instead of being copied into them.
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                      else {"broadcast_buffers": False})  # the argument's name since torch 2.13
    # DDP's start-up broadcast would quantise the NF4 weights again (other scales); every rank quantised the
    # same model.path, so they are equal already.
    ddp_ignore_nf4(model)
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True,
               **no_buffer_sync)


# ----------------------------------------------------------------------------------------------------------
# Sharding


def decoder_layers(model: VideoAssistant) -> list[nn.Module]:
    """The backbone's decoder layers (transformers' GradientCheckpointingLayer modules), in order."""
    layers = [m for m in model.backbone.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise RuntimeError(f"{type(model.backbone).__name__} has no GradientCheckpointingLayer decoder layers to shard")
    return layers


def precision_policy(compute_dtype: torch.dtype) -> MixedPrecisionPolicy:
    """Gathered weights in the compute dtype, gradients reduced in fp32; the sharded fp32 weights and the
    AdamW states they carry never leave fp32."""
    param_dtype = None if compute_dtype == torch.float32 else compute_dtype
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def check_shardable(model: VideoAssistant, cpu_offload: bool) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "train.parallel=fsdp shards over a process group, and none is initialised: launch with torchrun "
            "(e.g. torchrun --nproc_per_node=2 train.py CONFIG), or use train.parallel=ddp for one process"
        )
    if cpu_offload and not torch.cuda.is_available():
        raise ConfigError(
            "train.fsdp_cpu_offload=true moves shards between a GPU and the CPU, and this machine has no CUDA GPU "
            "(on the CPU the weights already live in CPU memory); set train.fsdp_cpu_offload=false"
        )
    uneven = nf4_unshardable(model, dist.get_world_size())
    if uneven:
        raise ConfigError(
            f"model.frozen_dtype=nf4 under train.parallel=fsdp: FSDP splits each NF4 weight's rows, scales and "
            f"second-level scales into {dist.get_world_size()} equal shards, and these do not split: "
            f"{'; '.join(uneven[:3])}{' ...' if len(uneven) > 3 else ''}. Use another number of ranks, "
            f"train.parallel=ddp, or model.frozen_dtype=bf16/fp16"
        )
    not_fp32 = [name for name, p in model.named_parameters() if p.requires_grad and p.dtype != torch.float32]
    if not_fp32:
        # FSDP2 needs one dtype for the trainable parameters of a unit; this project's is fp32 everywhere.
        raise ValueError(f"trainable parameters must be fp32 to be sharded (FSDP reduces one dtype per unit): {not_fp32}")


def shard_model(model: VideoAssistant, compute_dtype: torch.dtype, cpu_offload: bool = False) -> VideoAssistant:
    """Shard `model` in place with FSDP2 over the default process group and return it.

    Units, innermost first: each decoder layer; the two decision heads together (they stay fp32: the heads
    run outside autocast on fp32 hidden states); the frozen vision tower of data.frames=raw (in its storage
    dtype); then the root: embedding table, (tied) LM head, final norm, new_token_embed and projector.
    Activation checkpointing and train.compile must already be applied (checkpointing -> compile -> shard).
    The weights must be equal on every rank before this call (the same seed or the same pretrained files):
    FSDP keeps each rank's slice and does not broadcast. Gradients are summed over ranks, not averaged
    (backward_scale). The shards end up on the current CUDA device, or on the CPU with cpu_offload (gathered
    onto the GPU for each unit's forward and backward), or on the CPU without a GPU.
    """
    check_shardable(model, cpu_offload)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    offload: OffloadPolicy = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    policy = precision_policy(compute_dtype)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy, offload_policy=offload)
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    fully_shard([model.speak_head, model.dst_head], mesh=mesh, mp_policy=fp32, offload_policy=offload)
    if model.vision is not None:
        fully_shard(model.vision, mesh=mesh, mp_policy=MixedPrecisionPolicy(), offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=policy, offload_policy=offload)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # Each rank's loss is its share of the global mean, so the gradient of the step is the SUM over
            # ranks. A divide factor of 1 asks for that sum; forcing SUM collectives avoids PREMUL_SUM, which
            # gloo lacks (NCCL's SUM is as fast).
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    warnings.filterwarnings("ignore", message=VIEW_OUTPUT_WARNING)
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def reshard(model: nn.Module) -> None:
    """Put every unit back to its shards after forward passes without a backward (validation): the root unit
    keeps its gathered weights after a forward for the backward it expects, and a state dict or optimizer
    state read then would see other parameter objects than the optimizer holds."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def backward_scale(model: nn.Module) -> int:
    """Factor for the loss before backward(): DDP averages gradients over ranks, so the globally normalised
    loss is multiplied by the world size (losses.ddp_loss_scale); a sharded model (shard_model) sums them, so it
    is used as it is."""
    return 1 if is_sharded(model) else ddp_loss_scale()


def clip_grad_norm_(parameters: Sequence[nn.Parameter], max_norm: float, device: torch.device) -> torch.Tensor:
    """Clip the gradients to a global norm of `max_norm` (inf = no clipping) and return the norm before
    clipping as a plain 0-dim tensor on `device`, for sharded (DTensor) and ordinary gradients alike.

    The norm of sharded gradients is the norm of the whole gradient: each rank's shard norms are combined
    across ranks (DTensor's partial reduction). With CPU offload the gradients, and so the norm, live on the
    CPU; the caller's all-reduces need it on the compute device."""
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return norm.to(device, non_blocking=True)


def even_batches(batches: list, filler: Any, device: torch.device) -> list[tuple[Any, bool]]:
    """This rank's `batches` as (batch, True), then (filler, False) up to the largest count of any rank.

    Every forward pass of a sharded model is a collective (each unit gathers its weights from all ranks), so all
    ranks must run the same number of them; a rank whose share of the validation clips is smaller (or empty)
    runs `filler` and discards the result. Without a process group the batches come back as they are."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [(batch, True) for batch in batches]
    count = torch.tensor([len(batches)], device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return [(batch, True) for batch in batches] + [(filler, False)] * (int(count.item()) - len(batches))
