"""Training throughput side by side: this repository's step against the conventional Hugging Face + peft
pattern, on the same model shape and the same batches, in one process. Prints one JSON object and a table.

    python bench/make_bench_data.py --out data/bench                  # ~3.5k-token clips, 1152-d features
    python bench/bench_train.py configs/bench.yaml --setting lora --micro-batch 1
    python bench/bench_train.py configs/bench.yaml --setting lora --micro-batch 4
    python bench/bench_train.py configs/bench.yaml --setting full --micro-batch 2 --precision fp16
    python bench/bench_train.py configs/demo.yaml --shape demo --steps 3 --no-baseline   # CPU smoke run
    torchrun --nproc_per_node=2 bench/bench_train.py configs/bench.yaml --setting full --parallel ddp,fsdp,fsdp-offload
    python bench/bench_train.py configs/bench.yaml --setting lora --precision fp16 --frozen-dtype fp16,nf4

With --parallel (under torchrun) the sides are this repository's step under each listed wrapper instead of the
Hugging Face baseline: DDP replicas, FSDP2 shards, FSDP2 with CPU offload, each on every rank's own batches. A
side that runs out of GPU memory is recorded as such (what does not fit), and the next side runs. With
--frozen-dtype a,b the sides are this repository's LoRA step over a base stored in each dtype (NF4: QLoRA).

This repository's step is `train.forward_backward` + clipping + AdamW, exactly as the loop runs it. The
baseline is what a Trainer + peft script does with the same model: peft LoRA (or full fine-tuning), the
backbone's own `labels=` cross-entropy over the full vocabulary at every position, `output_hidden_states=True`,
the decision heads on every position then masked, transformers' default SDPA attention with a padding mask,
gradient checkpointing through `gradient_checkpointing_enable`. Both use AdamW (fused on CUDA), autocast in the
same dtype, the same frozen-weight dtype and the same added-token table, projector and heads.

Tokens/s counts real (unpadded) tokens. Peak memory is torch.cuda.max_memory_allocated over the timed steps,
weights and optimizer states included. MFU uses 6N + attention FLOPs per token (model.flops_per_token) against
the device's dense peak for the compute dtype. The baseline needs peft (requirements-bench.txt). Under
--parallel, tokens/s is the sum over ranks, seconds per step and peak memory the largest rank's, MFU per GPU.
"""
from __future__ import annotations

import argparse
import gc
import os
import time

from common import SHAPES, build, device_facts, emit, parse_args, run

import torch
import torch.distributed as dist
import torch.nn.functional as F

import sharding
import train
from config import ConfigError, load_config
from data import ClipDataset, collate, to_device
from distributed import end_distributed, setup_distributed
from logs import peak_flops, peak_memory_gb
from model import compile_decoder_layers, configure_attention, flops_per_token, param_groups, run_precision
from quant import frozen_bytes_by_dtype
from sequence import IGNORE, load_tokenizer

PARALLEL = ("ddp", "fsdp", "fsdp-offload")  # the wrappers --parallel compares
FROZEN_DTYPES = ("fp32", "fp16", "bf16", "nf4")  # the frozen-base storages --frozen-dtype compares
SETTINGS = {
    "lora": {"model.trainable": "lora", "train.activation_checkpointing": True},
    "full": {"model.trainable": "full", "train.activation_checkpointing": False},
}


def make_batches(dataset: ClipDataset, micro_batch: int, steps: int, rho: float, pad_to_multiple: int,
                 rank: int = 0, world_size: int = 1) -> list[dict]:
    """Micro-batches of neighbouring-length clips (what length grouping gives), one per step, on the CPU; under
    several ranks each takes its own of every step's `world_size` neighbouring micro-batches."""
    order = sorted(range(len(dataset)), key=lambda i: dataset.lengths[i])
    batches = []
    for step in range(steps):
        first = (step * world_size + rank) * micro_batch
        picks = [order[(first + i) % len(order)] for i in range(micro_batch)]
        batches.append(collate([dataset.item(i, 0, rho) for i in picks], dataset.renderer.pad_id, pad_to_multiple))
    return batches


def ours_step(model, cfg, autocast, scaler, optimizer, device):
    """The loop's step: forward_backward, unscale, clipping (of sharded gradients under FSDP), AdamW. Returns
    this rank's share of the step's loss for the record: every side must compute the same first step."""
    trainable = [p for p in model.parameters() if p.requires_grad]

    def step(batch):
        parts, _ = train.forward_backward(model, [batch], cfg, autocast, scaler)
        scaler.unscale_(optimizer)
        sharding.clip_grad_norm_(trainable, 1.0, device)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return parts[0]
    return step


def hf_pattern(model, cfg, setting: str):
    """Turn a freshly built VideoAssistant (trainable=frozen, transformers' sdpa) into the HF + peft pattern.
    Returns (forward_loss(batch) -> loss, parameters to train)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise SystemExit("the HF + peft baseline needs peft: pip install -r requirements-bench.txt "
                         "(or run with --no-baseline)") from None
    backbone = model.backbone
    if setting == "lora":
        backbone = get_peft_model(backbone, LoraConfig(
            r=cfg.model.lora_rank, lora_alpha=cfg.model.lora_alpha, lora_dropout=cfg.model.lora_dropout,
            target_modules=list(cfg.model.lora_targets)))
    else:
        backbone.requires_grad_(True)
    if cfg.train.activation_checkpointing:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    backbone.train()
    extra = [*model.new_token_embed.parameters(), *model.projector.parameters(), *model.speak_head.parameters(),
             *model.dst_head.parameters()]
    for p in extra:
        p.requires_grad_(True)

    def bce(logits, labels):  # class-balanced BCE over the labelled positions, as the losses here
        pos, neg = labels == 1, labels == 0
        per = F.binary_cross_entropy_with_logits(logits, pos.float(), reduction="none")
        return 0.5 * (per[pos].mean() + per[neg].mean())

    def forward_loss(batch):
        ids = batch["input_ids"]
        embeds = model.embed(ids)  # the same added-token rows as ours
        image = ids == model.image_token_id
        projected = model.projector(batch["frame_features"].to(model.projector[0].weight.dtype))
        embeds = embeds.masked_scatter(image.unsqueeze(-1), projected.to(embeds.dtype))
        targets = torch.where(batch["asst_targets"] != IGNORE, batch["asst_targets"], batch["dst_targets"])
        labels = torch.full_like(ids, IGNORE)
        labels[:, 1:] = targets[:, :-1]  # transformers shifts labels left by one inside the loss
        out = backbone(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=labels,
                       output_hidden_states=True)
        hidden = out.hidden_states[-1].float()  # (B, T, H)
        speak = model.speak_head(hidden).squeeze(-1)  # heads on every position, then masked
        update = model.dst_head(hidden).squeeze(-1)
        return out.loss + bce(speak, batch["speak_labels"]) + bce(update, batch["dst_labels"])

    trainable = [p for p in backbone.parameters() if p.requires_grad] + extra
    return forward_loss, trainable


def over_ranks(values: list[float], op, world_size: int, device) -> list[float]:
    if world_size == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def measure(step_fn, batches, device, warmup: int, world_size: int = 1) -> dict:
    first_loss = None
    for batch in batches[:warmup]:
        loss = step_fn(to_device(batch, device))
        first_loss = float(loss) if first_loss is None and loss is not None else first_loss
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    tokens = frames = 0
    start = time.perf_counter()
    for batch in batches[warmup:]:
        step_fn(to_device(batch, device))
        tokens += int(batch["attention_mask"].sum())
        frames += int(batch["decision_mask"].sum())
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    steps = len(batches) - warmup
    tokens, frames = over_ranks([tokens, frames], dist.ReduceOp.SUM if world_size > 1 else None, world_size, device)
    seconds, peak = over_ranks([seconds, peak_memory_gb(device)], dist.ReduceOp.MAX if world_size > 1 else None,
                               world_size, device)
    return {"seconds_per_step": seconds / steps, "tokens_per_s": tokens / seconds, "frames_per_s": frames / seconds,
            "peak_memory_gb": peak, "tokens_per_step": tokens / steps, "first_loss": first_loss}


def run_side(side: str, args, cfg, tokenizer, batches, device, precision, world_size: int = 1) -> dict:
    """One side: "ours" or "hf" in one process, this repository's step under a --parallel wrapper, or with one
    --frozen-dtype ("frozen-nf4")."""
    torch.manual_seed(cfg.train.seed)
    if device.type == "cuda":
        # Ours: the kernels configure_attention picked. The baseline: torch's defaults (cuDNN attention on),
        # as a Trainer script runs, unless --baseline-no-cudnn gives it our choice too.
        torch.backends.cuda.enable_cudnn_sdp(side == "hf" and not args.baseline_no_cudnn)
    if side == "hf":
        cfg.model.attn_implementation = "sdpa"
        trainable_setting, cfg.model.trainable = cfg.model.trainable, "frozen"
    if side.startswith("frozen-"):
        cfg.model.frozen_dtype = side.removeprefix("frozen-")
    with torch.device("cpu" if side.startswith("fsdp") else device):  # shard_model places the shards
        model = build(cfg, tokenizer, args.shape, device)
    model.train()
    autocast, scaler = precision.autocast(device.type), precision.scaler(device.type)
    if side != "hf":  # this repository's step: single process, or under one of the --parallel wrappers
        if args.compile:
            compile_decoder_layers(model)
        if side in ("fsdp", "fsdp-offload"):
            model = sharding.shard_model(model, precision.dtype, cpu_offload=side == "fsdp-offload")
        optimizer = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-5, fused=device.type == "cuda")
        step_fn = ours_step(sharding.replicate(model, device) if side == "ddp" else model, cfg, autocast, scaler,
                            optimizer, device)
    else:
        cfg.model.trainable = trainable_setting
        forward_loss, trainable = hf_pattern(model, cfg, trainable_setting)
        optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=device.type == "cuda")

        def step_fn(batch):
            with autocast:
                loss = forward_loss(batch)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()
    result = measure(step_fn, batches, device, args.warmup, world_size)
    mean_len = result["tokens_per_step"] / args.micro_batch / world_size
    peak = peak_flops(device, precision.dtype)
    result["mfu"] = (result["tokens_per_s"] / world_size * flops_per_token(model, int(mean_len)) / peak
                     if peak else None)
    result["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result["frozen_bytes"] = frozen_bytes_by_dtype(model)  # by storage: what the frozen base costs
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="run config (configs/bench.yaml: the real-shape benchmark data)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    parser.add_argument("--shape", default="llama1b", choices=tuple(SHAPES),
                        help="llama1b, llama3b: Llama-3.2-1B's or -3B's architecture, random weights; demo: the config's model.path")
    parser.add_argument("--setting", default="lora", choices=tuple(SETTINGS),
                        help="lora: LoRA + activation checkpointing; full: full fine-tuning without checkpointing")
    parser.add_argument("--micro-batch", type=int, default=1, help="clips per step")
    parser.add_argument("--precision", default="bf16", choices=("fp32", "fp16", "bf16"),
                        help="autocast dtype (fp16 adds a GradScaler); frozen weights are stored in it for lora")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--compile", action="store_true", help="this repository's side with train.compile")
    parser.add_argument("--pad-to-multiple", type=int, default=1, help="data.pad_to_multiple for both sides")
    parser.add_argument("--no-baseline", action="store_true", help="only this repository's side (no peft needed)")
    parser.add_argument("--baseline-no-cudnn", action="store_true",
                        help="switch cuDNN attention off for the baseline too (default: torch's defaults)")
    parser.add_argument("--parallel", default=None,
                        help=f"comma-separated wrappers to compare under torchrun, each a side: {', '.join(PARALLEL)} "
                             "(replaces the baseline)")
    parser.add_argument("--frozen-dtype", default=None,
                        help="lora: the frozen base's storage (default: the --precision dtype); comma-separated to "
                             "compare, each a side, e.g. fp16,nf4 (NF4 needs requirements-quant.txt; a list or nf4 "
                             "replaces the baseline)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parse_args(parser)
    sides = choose_sides(args)
    rank, _, world_size, device = setup_distributed(1800)
    if world_size > 1 and not args.parallel:
        raise ConfigError("under torchrun give --parallel (e.g. --parallel ddp,fsdp): the baseline runs in one process")
    overrides = [f"{k}={v}" for k, v in SETTINGS[args.setting].items()] + [f"train.micro_batch={args.micro_batch}",
                                                                           f"train.precision={args.precision}"]
    if args.setting == "lora" and args.precision != "fp32":
        overrides.append(f"model.frozen_dtype={args.precision}")
    if args.frozen_dtype and len(frozen_dtypes(args.frozen_dtype)) == 1:
        overrides.append(f"model.frozen_dtype={frozen_dtypes(args.frozen_dtype)[0]}")
    cfg = load_config(args.config, overrides + args.overrides)
    attention = configure_attention(device)
    precision = run_precision(cfg, device)  # train.py's precision and its start-up check
    tokenizer = load_tokenizer(cfg.model.path)
    dataset = ClipDataset(cfg, "train", tokenizer)
    batches = make_batches(dataset, args.micro_batch, args.warmup + args.steps, cfg.data.nfs_rho, args.pad_to_multiple,
                           rank, world_size)
    results = {}
    for side in sides:
        side_cfg = load_config(args.config, overrides + args.overrides)
        try:
            results[side] = run_side(side, args, side_cfg, tokenizer, batches, device, precision, world_size)
        except torch.OutOfMemoryError:  # what does not fit is a result too (every rank runs out alike)
            results[side] = {"out_of_memory": True}
        gc.collect()  # the side's model and optimizer are gone once run_side returns; free their memory
        if device.type == "cuda":
            torch.cuda.empty_cache()
    record = {"benchmark": "train_step_side_by_side", **device_facts(device), "world_size": world_size,
              "shape": args.shape,
              "setting": args.setting, "micro_batch": args.micro_batch, "precision": args.precision,
              "precision_reason": precision.reason, "attention": attention, "compile": args.compile,
              "baseline_cudnn_attention": not args.baseline_no_cudnn,
              "activation_checkpointing": cfg.train.activation_checkpointing, "steps": args.steps,
              "mean_clip_tokens": sum(len(dataset.item(i, with_features=False)["input_ids"]) for i in range(len(dataset))) / len(dataset),
              **{side: r for side, r in results.items()}}
    first, last = results[sides[0]], results[sides[-1]]
    if len(sides) > 1 and not (first.get("out_of_memory") or last.get("out_of_memory")):
        # ours / hf; under --parallel the last wrapper / the first (e.g. fsdp / ddp)
        top, bottom = (first, last) if "hf" in results else (last, first)
        record["speedup_tokens_per_s"] = top["tokens_per_s"] / bottom["tokens_per_s"]
        record["memory_ratio"] = top["peak_memory_gb"] / bottom["peak_memory_gb"] if bottom["peak_memory_gb"] else None
    if rank == 0:
        print_results(record, results, args.out)
    end_distributed(world_size)


def frozen_dtypes(text: str) -> list[str]:
    return [dtype.strip() for dtype in text.split(",") if dtype.strip()]


def choose_sides(args) -> list[str]:
    """ours and hf; or the --parallel wrappers; or one side per --frozen-dtype (with nf4 or several)."""
    if args.frozen_dtype:
        if args.setting != "lora":
            raise ConfigError("--frozen-dtype is for --setting lora (full fine-tuning has no frozen base)")
        dtypes = frozen_dtypes(args.frozen_dtype)
        unknown = [dtype for dtype in dtypes if dtype not in FROZEN_DTYPES]
        if unknown or not dtypes:
            raise ConfigError(f"--frozen-dtype {args.frozen_dtype}: give dtypes from {', '.join(FROZEN_DTYPES)}")
        if args.parallel and len(dtypes) > 1:
            raise ConfigError("compare either wrappers (--parallel) or frozen dtypes (--frozen-dtype a,b), one per run")
        if len(dtypes) > 1 or dtypes == ["nf4"]:
            return [f"frozen-{dtype}" for dtype in dtypes]
    if args.parallel:
        return parallel_sides(args.parallel)
    return ["ours"] + ([] if args.no_baseline else ["hf"])


def parallel_sides(text: str) -> list[str]:
    sides = [side.strip() for side in text.split(",") if side.strip()]
    unknown = [side for side in sides if side not in PARALLEL]
    if unknown or not sides:
        raise ConfigError(f"--parallel {text}: give wrappers from {', '.join(PARALLEL)}, comma-separated")
    if "RANK" not in os.environ:
        raise ConfigError(f"--parallel runs under torchrun: torchrun --nproc_per_node=N bench/bench_train.py ... "
                          f"--parallel {text}")
    return sides


def print_results(record: dict, results: dict, out) -> None:
    emit(record, out)
    for side, r in results.items():
        if r.get("out_of_memory"):
            print(f"{side:>12}: out of memory")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"{side:>12}: {r['tokens_per_s']:>9.0f} tok/s  {r['seconds_per_step']:.3f} s/step  "
              f"{r['peak_memory_gb']:6.2f} GB  MFU {mfu}")
    if "speedup_tokens_per_s" in record:
        memory = f", {record['memory_ratio']:.2f}x memory" if record["memory_ratio"] is not None else ""
        print(f"ratio: {record['speedup_tokens_per_s']:.2f}x tokens/s{memory}")


if __name__ == "__main__":
    run(main)
