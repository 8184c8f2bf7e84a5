"""Streaming-evaluation speed: frames/s with the heads forced off (ingesting frames only), generated tokens/s
with the heads forced on (short generation caps), and frames/s against the cache length; the preallocated
cache side by side with transformers' DynamicCache. Prints one JSON object and a table.

    python bench/make_bench_data.py --out data/bench
    python bench/bench_eval.py configs/bench.yaml                          # Llama-3.2-1B shape, random weights
    python bench/bench_eval.py configs/demo.yaml --shape demo --frames 200 # CPU smoke run
    python bench/bench_eval.py --ckpt runs/demo/step_600 --frames 300      # a trained checkpoint

A video plays at `fps` frames per second (2 for ProAssist data), so frames/s over 2 is the real-time factor.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

from common import SHAPES, build, device_facts, emit, parse_args, run

import numpy as np
import torch

from checkpoint import load_for_inference
from clips import load_split
from config import load_config
from frames import FrameStore
from model import cast_for_inference, choose_precision, configure_attention
from sequence import Renderer, load_tokenizer
from stream import StreamingRunner, Thresholds, assemble_videos, video_features

CACHE_BINS = 512  # frames/s is reported per bin of this many cached positions


class TimedRunner(StreamingRunner):
    """The evaluator's runner, recording the wall time of every frame and the cache length before it (the
    per-frame host sync makes the wall time the device time)."""

    def run(self, video, feats, thresholds):
        self.frame_times: list[tuple[int, float]] = []
        original_forward = self._forward

        def timed_forward(ids, frame_feats, want_heads, want_text):
            start, length = time.perf_counter(), len(self.context_ids)
            out = original_forward(ids, frame_feats, want_heads, want_text)
            if want_heads:
                torch.sigmoid(out["speak_logits"][-1]).item()  # the sync the runner makes right after
                self.frame_times.append((length, time.perf_counter() - start))
            return out

        self._forward = timed_forward
        try:
            return super().run(video, feats, thresholds)
        finally:
            del self._forward


def stream(model, tokenizer, cfg, device, dtype, video, feats, thresholds, cache: str) -> dict:
    runner = TimedRunner(model, Renderer(tokenizer, cfg.data.num_tokens_per_frame), cfg, device, dtype=dtype, cache=cache)
    runner.run(dataclasses.replace(video, end=video.start + 4), feats[:4], thresholds)  # warm-up: allocations, kernels
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    records = runner.run(video, feats, thresholds)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    generated = sum(len(tokenizer(r.asst_text or "", add_special_tokens=False)["input_ids"]) +
                    len(tokenizer(r.dst_text or "", add_special_tokens=False)["input_ids"]) for r in records)
    bins: dict[int, list[float]] = {}
    for length, dt in runner.frame_times:
        bins.setdefault(length // CACHE_BINS * CACHE_BINS, []).append(dt)
    return {"frames": len(records), "seconds": seconds, "frames_per_s": len(records) / seconds,
            "head_firings": sum(r.speak + r.dst for r in records), "generated_tokens": generated,
            "context_resets": runner.context_resets,
            "frames_per_s_by_cache_length": {f"{lo}-{lo + CACHE_BINS}": len(v) / sum(v) for lo, v in sorted(bins.items())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="run config (configs/bench.yaml: real shapes)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    parser.add_argument("--ckpt", help="a trained checkpoint instead of random weights")
    parser.add_argument("--shape", default="llama1b", choices=tuple(SHAPES),
                        help="random weights of this shape (without --ckpt): llama1b, llama3b, or the config's model.path")
    parser.add_argument("--split", default="test", help="split whose first video is streamed")
    parser.add_argument("--frames", type=int, default=2000, help="frames of the video to stream (at most)")
    parser.add_argument("--generation-frames", type=int, default=200, help="frames streamed with the heads on")
    parser.add_argument("--precision", default="bf16", choices=("fp32", "fp16", "bf16"), help="autocast dtype on a GPU")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parse_args(parser)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    attention = configure_attention(device)
    if args.ckpt:
        model, tokenizer, cfg = load_for_inference(args.ckpt, device)
    else:
        cfg = load_config(args.config, args.overrides)
        tokenizer = load_tokenizer(cfg.model.path)
        with torch.device(device):
            model = build(cfg, tokenizer, args.shape)
        model.eval()
    dtype = choose_precision(args.precision if device.type == "cuda" else "fp32", device.type, None).dtype
    if dtype == torch.float32:
        cast_for_inference(model, dtype)  # the runner stores the weights in the compute dtype itself when it is fp16/bf16
    clips, _ = load_split(cfg, args.split)
    video = max(assemble_videos(clips), key=lambda v: v.num_frames)
    store = FrameStore.from_config(cfg)
    feats = video_features(video, store, cfg.data.num_tokens_per_frame)
    frames = min(args.frames, video.num_frames)
    video = dataclasses.replace(video, end=video.start + frames)
    off, on = Thresholds(2.0, 2.0), Thresholds(-1.0, -1.0)
    results = {}
    for cache in ("preallocated", "dynamic"):
        results[f"ingest_{cache}"] = stream(model, tokenizer, cfg, device, dtype, video, feats[:frames], off, cache)
    gen_video = dataclasses.replace(video, end=video.start + min(args.generation_frames, frames))
    results["generate_preallocated"] = stream(model, tokenizer, cfg, device, dtype, gen_video,
                                              feats[:gen_video.num_frames], on, "preallocated")
    gen = results["generate_preallocated"]
    gen["generated_tokens_per_s"] = gen["generated_tokens"] / gen["seconds"]
    emit({"benchmark": "streaming_eval", **device_facts(device), "attention": attention,
          "shape": "checkpoint" if args.ckpt else args.shape, "precision": str(dtype), "fps": video.fps,
          "max_new_tokens": cfg.eval.max_new_tokens, "max_dst_tokens": cfg.eval.max_dst_tokens, **results}, args.out)
    for name, r in results.items():
        print(f"{name:>22}: {r['frames_per_s']:8.1f} frames/s ({r['frames_per_s'] / video.fps:6.1f}x real time), "
              f"{r['context_resets']} resets" + (f", {r['generated_tokens_per_s']:.0f} generated tok/s"
                                                 if "generated_tokens_per_s" in r else ""))
    print("ingest frames/s by cache length:", {k: round(v, 1) for k, v in
                                              results["ingest_preallocated"]["frames_per_s_by_cache_length"].items()})


if __name__ == "__main__":
    np.seterr(all="ignore")
    run(main)
