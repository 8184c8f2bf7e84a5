"""Training throughput: tokens/s, frames/s, step time, peak memory and MFU of the real training step.

    python bench/bench_train.py configs/demo.yaml                                  # CPU, the demo model
    python bench/bench_train.py configs/demo.yaml --shape llama1b --precision bf16 # GPU, Llama-1B-shaped
    python bench/bench_train.py configs/demo.yaml --shape llama1b --precision fp16 train.micro_batch=4

Uses the demo data (or the config's data), `train.forward_backward` and an AdamW step, exactly as the
loop does, minus logging and checkpoints. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import time

from common import build, device_facts, emit

import torch

import train
from config import load_config
from data import ClipDataset, collate, load_tokenizer
from model import flops_per_token, param_groups, set_activation_checkpointing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--shape", default="demo", choices=("demo", "llama1b"))
    parser.add_argument("--precision", default=None, help="fp32 | fp16 | bf16 | auto (default: train.precision)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps (after 2 warm-up steps)")
    parser.add_argument("--checkpointing", choices=("on", "off"), default=None)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    dtype, use_scaler, reason = train.choose_precision(args.precision or cfg.train.precision, device.type, capability)
    tokenizer = load_tokenizer(cfg.model.path)
    model = build(cfg, tokenizer, args.shape).to(device)
    if args.checkpointing:
        set_activation_checkpointing(model, args.checkpointing == "on")
    model.train()
    dataset = ClipDataset(cfg, "train", tokenizer)
    optimizer = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-5, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    mb, accum = cfg.train.micro_batch, cfg.train.grad_accum
    order = list(range(len(dataset)))

    def step_batches(step: int):
        start = step * mb * accum
        picks = [order[(start + i) % len(order)] for i in range(mb * accum)]
        return [train.to_device(collate([dataset.item(j, 0, cfg.data.nfs_rho) for j in picks[k * mb:(k + 1) * mb]],
                                        dataset.renderer.pad_id), device) for k in range(accum)]

    def one_step(batches):
        train.forward_backward(model, batches, cfg, 1, autocast, scaler)
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    all_batches = [step_batches(s) for s in range(args.steps + 2)]  # loaded up front: time the model only
    for batches in all_batches[:2]:
        one_step(batches)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    tokens = frames = 0
    start = time.perf_counter()
    for batches in all_batches[2:]:
        one_step(batches)
        tokens += sum(int(b["attention_mask"].sum()) for b in batches)
        frames += sum(int(b["decision_mask"].sum()) for b in batches)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    mean_len = tokens / (args.steps * mb * accum)
    peak = train.peak_flops(device, dtype)
    tokens_per_s = tokens / seconds
    emit({
        "benchmark": "train_step", **device_facts(device), "shape": args.shape, "precision": str(dtype),
        "precision_reason": reason, "activation_checkpointing": bool(model.backbone.is_activation_checkpointing)
        if hasattr(model.backbone, "is_activation_checkpointing") else None,
        "micro_batch": mb, "grad_accum": accum, "mean_clip_tokens": mean_len, "steps": args.steps,
        "seconds_per_step": seconds / args.steps, "tokens_per_s": tokens_per_s, "frames_per_s": frames / seconds,
        "mfu": tokens_per_s * flops_per_token(model, int(mean_len)) / peak if peak else None,
        "peak_memory_gb": train.peak_memory_gb(device),
        "parameters": sum(p.numel() for p in model.parameters()),
    }, args.out)


if __name__ == "__main__":
    main()
