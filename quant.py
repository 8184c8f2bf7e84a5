"""4-bit NormalFloat (NF4) frozen decoder weights, as in QLoRA, through torchao's NF4 tensor.

    quantize_frozen_linears(model, device=device)  # after add_lora / set_trainable / cast_frozen; returns a count
    print(format_frozen_bytes(frozen_bytes_by_dtype(model)))   # "frozen weights: fp32 113.4 MB, nf4 54.8 MB"

Each frozen nn.Linear of the decoder named q/k/v/o_proj or gate/up/down_proj (the `.base` of a LoRA layer
included) becomes an `NF4Linear`: its weight is stored as NF4 codes (two per byte) in blocks of 64 values, each
block's absmax scale quantised again to int8 in blocks of 256 scales (double quantisation), about 0.52 bytes per
weight instead of 2 (fp16). Its bias, and every other weight (embeddings, norms, LM head, LoRA, projector, heads),
stays as it was. The forward dequantises the weight into the compute dtype (the autocast dtype under
fp16/bf16 autocast, else the input's), so LoRA adapters train in fp32 on top of an NF4 base exactly as on a
16-bit one; the weight gets no gradient and is never saved (see `check_nf4_settings`).

torchao is optional (requirements-quant.txt) and imported only here, when the first layer is quantised.
"""
from __future__ import annotations

import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

QUANT_REQUIREMENTS = "requirements-quant.txt"
NF4_BLOCK_SIZE = 64  # values per absmax scale (QLoRA)
NF4_SCALER_BLOCK_SIZE = 256  # scales per second-level (double-quantisation) scale (QLoRA)
DECODER_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Short names of storage dtypes, as the configs spell them.
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def require_torchao():
    """The torchao module, or a ModuleNotFoundError that says how to install it."""
    try:
        import torchao
        import torchao.quantization  # noqa: F401  (NF4Tensor, to_nf4)
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"model.frozen_dtype=nf4 needs torchao, which is not installed ({err}): "
            f"pip install --no-deps -r {QUANT_REQUIREMENTS}"
        ) from err
    if not hasattr(torchao.quantization, "NF4Tensor"):
        raise ModuleNotFoundError(
            f"torchao {torchao.__version__} has no torchao.quantization.NF4Tensor: install the pinned version with "
            f"pip install --no-deps -r {QUANT_REQUIREMENTS}"
        )
    return torchao


def is_nf4(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a torchao NF4 tensor (False whenever torchao was never imported: none can exist)."""
    quantization = sys.modules.get("torchao.quantization")
    nf4_type = getattr(quantization, "NF4Tensor", None)
    return nf4_type is not None and isinstance(tensor, nf4_type)


def scaler_block_size_for(numel: int, block_size: int = NF4_BLOCK_SIZE) -> int:
    """Scales per double-quantisation block: 256 as QLoRA where the number of scales allows, else the largest
    power of two that divides it (torchao needs an exact division). SmolLM2-135M's k_proj (192 x 576) has 1728
    scales, not a multiple of 256: its scales are double-quantised in blocks of 64."""
    if numel % block_size:
        raise ValueError(f"{numel} weights are not a whole number of NF4 blocks of {block_size}")
    n_blocks = numel // block_size
    size = NF4_SCALER_BLOCK_SIZE
    while n_blocks % size:
        size //= 2
    return size


def to_nf4_weight(weight: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """An NF4 copy of a 2-D weight on `device` (default: its own), quantised from fp32.

    Quantising from fp32 keeps the scales and their second-level scales in fp32: fp16 scales can overflow
    (256 / (2 * absmax) exceeds 65504 when a block of scales varies by less than 0.002), and the dequantised
    weight is then the same whatever the frozen dtype was before.
    """
    require_torchao()
    from torchao.quantization import to_nf4

    source = weight.detach().to(device=device if device is not None else weight.device, dtype=torch.float32)
    return to_nf4(source.contiguous(), NF4_BLOCK_SIZE, scaler_block_size_for(source.numel()))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on `x` runs in here: autocast's when it is on for x's device, else x's own."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


class NF4Linear(nn.Linear):
    """A frozen nn.Linear whose weight is an NF4 tensor; y = x W^T + b in the compute dtype.

    The matmul goes through torchao's NF4 `F.linear` (an autograd function that dequantises the weight into the
    input's dtype in the forward and again in the backward, keeping only the 4-bit weight between them). The
    input is cast to the compute dtype first, so under autocast the dense weight is made in fp16/bf16 (torchao
    computes it in fp32, the NF4 tensor's own dtype, and casts it before the matmul) even when the input arrives
    in fp32 (an fp32 norm weight promotes it). The weight gets no gradient; the input does, so LoRA adapters and
    earlier layers train through it.
    """

    def __init__(self, linear: nn.Linear, device: torch.device | str | None = None):
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a full-precision weight
        if linear.weight.requires_grad:
            raise ValueError("NF4Linear stores a frozen weight; this nn.Linear's weight requires grad")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(to_nf4_weight(linear.weight, device), requires_grad=False)
        bias = linear.bias
        if bias is not None and device is not None:
            bias = nn.Parameter(bias.detach().to(device), requires_grad=bias.requires_grad)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        out = F.linear(x.to(dtype), self.weight)  # (..., out) in dtype; torchao dequantises W into dtype
        if self.bias is not None:
            out = out + self.bias.to(dtype)
        return out

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(out, in) dense weight in `dtype`: the values every forward computes with."""
        return self.weight.get_original_weight().to(dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 block {self.weight.block_size}, scaler block {self.weight.scaler_block_size}")


def _quantizable(module: nn.Module) -> bool:
    return type(module) is nn.Linear and not module.weight.requires_grad


def quantize_frozen_linears(root: nn.Module, names: tuple[str, ...] = DECODER_LINEAR_NAMES,
                            device: torch.device | str | None = None) -> int:
    """Replace each frozen nn.Linear named in `names` (or the frozen `.base` nn.Linear of a LoRA layer so named)
    by an NF4Linear; returns how many. Trainable linears and every other module stay as they are.

    `device`: where the NF4 weights (and those layers' biases) are built. On 2 CPU cores quantising takes
    0.3-0.5 s per million weights (28 s for SmolLM2-135M's 106M; 8B would take most of an hour), so pass the
    GPU for large models. The rest of the model moves with the usual `model.to(device)` afterwards, which
    keeps NF4 weights NF4.
    """
    replaced = 0
    for module in list(root.modules()):
        for name, child in list(module.named_children()):
            if name not in names:
                continue
            if _quantizable(child):
                setattr(module, name, NF4Linear(child, device))
                replaced += 1
            elif _quantizable(getattr(child, "base", None)):  # a LoRA layer: y = base(x) + adapters
                child.base = NF4Linear(child.base, device)
                replaced += 1
    return replaced


def nf4_parameter_names(model: nn.Module) -> list[str]:
    """State-dict names of the NF4 weights (never saved: they are rebuilt from model.path)."""
    return [name for name, param in model.named_parameters() if is_nf4(param)]


def check_nf4_settings(trainable: str, init: str) -> None:
    """Refuse combinations whose checkpoints would have to hold the quantised base.

    A checkpoint holds only what trains when the backbone is pretrained and trainable is lora or frozen; the
    NF4 base is then rebuilt by quantising model.path again, identically (quantisation is deterministic).
    """
    if trainable not in ("lora", "frozen"):
        raise ValueError(
            f"model.frozen_dtype=nf4 stores a frozen base in 4 bits, but model.trainable={trainable} trains the "
            f"base: use model.trainable=lora (QLoRA) or frozen, or another model.frozen_dtype (fp32, fp16, bf16)"
        )
    if init != "pretrained":
        raise ValueError(
            f"model.frozen_dtype=nf4 needs model.init=pretrained: with model.init={init} the random base would "
            f"have to be saved in every checkpoint, and re-quantising saved NF4 weights does not reproduce them. "
            f"Save the backbone as a model directory first (save_pretrained) and point model.path at it"
        )


def ddp_ignore_nf4(model: nn.Module) -> int:
    """Keep DDP's start-up broadcast away from the NF4 weights (call before wrapping); returns how many.

    DDP copies rank 0's parameters into every rank's when it wraps a model; copying dense values into an NF4
    weight quantises them again, and NF4 of a dequantised NF4 weight has other scales (about 0.3% off), so the
    base would silently differ from the one a checkpoint is later evaluated with. Every rank quantised the same
    model.path deterministically: the NF4 weights are already equal everywhere.
    """
    from torch.nn.parallel import DistributedDataParallel

    names = nf4_parameter_names(model)
    if names:
        ignored = list(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored + names)
    return len(names)


def nf4_unshardable(model: nn.Module, world_size: int) -> list[str]:
    """NF4 weights that FSDP2 (`fully_shard`) cannot split into `world_size` row shards, one line each.

    torchao shards an NF4 weight by splitting its rows, its codes, its scales and its second-level scales into
    equal parts; each count must divide by the world size (torchao otherwise fails inside fully_shard with
    "quantization_factor.numel() not divisible by N"). An empty list: FSDP2 can shard them all.
    """
    problems = []
    for name, param in model.named_parameters():
        if not is_nf4(param):
            continue
        counts = {"rows": param.shape[0], "scales": param.n_blocks,
                  "second-level scales": param.quantization_factor.numel()}
        uneven = [f"{count} {what}" for what, count in counts.items() if count % world_size]
        if uneven:
            problems.append(f"{name} ({param.shape[0]} x {param.shape[1]}): {', '.join(uneven)} do not split "
                            f"into {world_size} equal shards")
    return problems


def check_no_nf4(state: dict[str, torch.Tensor]) -> None:
    """Raise if a state about to be saved holds an NF4 tensor (they are rebuilt from model.path, never saved)."""
    found = sorted(name for name, tensor in state.items() if is_nf4(tensor))
    if found:
        raise RuntimeError(
            f"{len(found)} NF4 weights in a checkpoint state (e.g. {found[0]}): an NF4 base is rebuilt from "
            f"model.path and must not be saved; see quant.check_nf4_settings"
        )


# ----------------------------------------------------------------------------------------------------------
# Storage accounting and dtype changes that keep NF4 weights as they are


def nf4_storage_bytes(tensor: torch.Tensor) -> int:
    """Real bytes of an NF4 tensor: 4-bit codes, int8 scales, their fp32 scales and mean, the 16-entry table."""
    inner_names, _ = tensor.__tensor_flatten__()
    return sum(getattr(tensor, name).nbytes for name in inner_names)


def frozen_bytes_by_dtype(model: nn.Module) -> dict[str, int]:
    """Bytes of frozen parameters (tied weights once) by storage type: "nf4", "fp32", "bf16", ..."""
    totals: dict[str, int] = {}
    for param in model.parameters():
        if param.requires_grad:
            continue
        if is_nf4(param):
            key, size = "nf4", nf4_storage_bytes(param)
        else:
            key, size = DTYPE_NAMES.get(param.dtype, str(param.dtype).removeprefix("torch.")), param.nbytes
        totals[key] = totals.get(key, 0) + size
    return totals


def format_frozen_bytes(bytes_by_dtype: dict[str, int]) -> str:
    """The start-up line, largest first: "frozen weights: nf4 54.8 MB, fp32 113.3 MB" (MB = 1e6 bytes)."""
    if not bytes_by_dtype:
        return "frozen weights: none"
    parts = [f"{key} {size / 1e6:.1f} MB" for key, size in sorted(bytes_by_dtype.items(), key=lambda kv: -kv[1])]
    return "frozen weights: " + ", ".join(parts)
