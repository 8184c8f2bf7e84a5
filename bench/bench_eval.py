"""Streaming-evaluation speed: frames per second through the KV-cached stream, and the real-time factor
(the video plays at `fps` frames per second).

    python bench/bench_eval.py --ckpt runs/demo/step_600                   # a trained checkpoint
    python bench/bench_eval.py --config configs/demo.yaml --shape llama1b  # random Llama-1B-shaped model (GPU)

Heads fire where the model says so (a trained checkpoint), or with --always-fire at every frame (the
worst case: a DST block and a reply generated at every frame).
"""
from __future__ import annotations

import argparse
import time

from common import build, device_facts, emit

import torch

import evaluate
from checkpoint import load_for_inference
from config import load_config
from data import FrameStore, Renderer, load_split, load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt")
    parser.add_argument("--config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--shape", default="demo", choices=("demo", "llama1b"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-videos", type=int, default=5)
    parser.add_argument("--always-fire", action="store_true")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.ckpt:
        model, tokenizer, cfg = load_for_inference(args.ckpt, device)
    else:
        cfg = load_config(args.config, args.overrides)
        tokenizer = load_tokenizer(cfg.model.path)
        model = build(cfg, tokenizer, args.shape).to(device).eval()
    clips, _ = load_split(cfg, args.split)
    videos = evaluate.assemble_videos(clips)[:args.max_videos]
    store = FrameStore(cfg.data.num_tokens_per_frame, cfg.data.feature_dim)
    features = [evaluate.video_features(v, store, cfg.data.num_tokens_per_frame) for v in videos]
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.precision]
    if dtype == torch.float32:
        model.float()
    runner = evaluate.StreamingRunner(model, Renderer(tokenizer, cfg.data.num_tokens_per_frame), cfg, device, dtype=dtype)
    thresholds = evaluate.Thresholds(-1.0, -1.0) if args.always_fire else evaluate.Thresholds(
        cfg.eval.speak_threshold, cfg.eval.dst_threshold)
    start = time.perf_counter()
    records = [runner.run(v, f, thresholds) for v, f in zip(videos, features)]
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    frames = sum(len(r) for r in records)
    fired = sum(r.speak + r.dst for rs in records for r in rs)
    fps = frames / seconds
    emit({
        "benchmark": "streaming_eval", **device_facts(device), "shape": "checkpoint" if args.ckpt else args.shape,
        "precision": args.precision, "videos": len(videos), "frames": frames, "head_firings": fired,
        "seconds": seconds, "frames_per_s": fps, "real_time_factor": fps / videos[0].fps,
        "context_resets": runner.context_resets,
    }, args.out)


if __name__ == "__main__":
    main()
