"""Data pipeline cost against the model's step: how long reading + rendering + labelling + collating one
micro-batch takes in one loader process, next to the forward+backward of the same micro-batch.

    python bench/bench_data.py configs/demo.yaml [--batches 30]

The pipeline must stay well under the step time (DataLoader workers then hide it completely).
"""
from __future__ import annotations

import argparse
import time

from common import build, device_facts, emit, parse_args, run

import torch

import train
from config import load_config
from data import ClipDataset, collate, to_device
from model import run_precision
from sequence import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="run config (configs/demo.yaml, or configs/bench.yaml for real shapes)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    parser.add_argument("--batches", type=int, default=30, help="micro-batches to read and time")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parse_args(parser)
    cfg = load_config(args.config, args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = run_precision(cfg, device)  # train.py's check: frozen half-precision weights need half compute
    tokenizer = load_tokenizer(cfg.model.path)
    dataset = ClipDataset(cfg, "train", tokenizer)
    mb = cfg.train.micro_batch
    groups = [[(b * mb + i) % len(dataset) for i in range(mb)] for b in range(args.batches)]

    start = time.perf_counter()
    items_seconds = 0.0
    batches = []
    for group in groups:
        t = time.perf_counter()
        items = [dataset.item(i, 0, cfg.data.nfs_rho) for i in group]
        items_seconds += time.perf_counter() - t
        batches.append(collate(items, dataset.renderer.pad_id, cfg.data.pad_to_multiple))
    pipeline = (time.perf_counter() - start) / args.batches

    model = build(cfg, tokenizer, "demo").to(device).train()
    autocast, scaler = precision.autocast(device.type), precision.scaler(device.type)
    step_times = []
    for batch in batches:
        batch = to_device(batch, device)
        t = time.perf_counter()
        train.forward_backward(model, [batch], cfg, autocast, scaler)
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_times.append(time.perf_counter() - t)
    step = sum(step_times[2:]) / max(len(step_times) - 2, 1)
    emit({
        "benchmark": "data_pipeline", **device_facts(device), "precision": precision.name, "micro_batch": mb, "batches": args.batches,
        "pipeline_ms_per_micro_batch": 1000 * pipeline,
        "features_render_labels_ms": 1000 * items_seconds / args.batches,
        "collate_ms": 1000 * (pipeline - items_seconds / args.batches),
        "model_forward_backward_ms": 1000 * step, "pipeline_over_step": pipeline / step,
    }, args.out)


if __name__ == "__main__":
    run(main)
