"""What a run shows: log lines, metrics.jsonl records, progress bars, throughput and MFU.

    logger = Logger(run_dir, enabled=rank == 0, tensorboard=False, total_steps=1000, first_step=0)
    logger.write(record, format_train_line(record, max_steps))   # one line on the console, one JSON line in the file
    progress = Progress(total, "stream", "video")                # a bar on a terminal, a plain line a minute elsewhere

Everything here is diagnostics, kept apart from the training step: nothing in this module changes what is
computed. docs/training.md#logs lists the fields of every record.
"""
from __future__ import annotations

import json
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm
from transformers.utils import logging as hf_logging

from distributed import all_reduce
from losses import COUNT_KEYS, PART_KEYS
from trackers import Trackers

# Dense peak FLOP/s per device name fragment, by compute dtype. Unknown devices report no MFU rather than a
# wrong one. Titan RTX: 130 TFLOPS fp16 tensor cores with fp32 accumulate (no bf16 tensor cores).
PEAK_FLOPS = {
    "H100": {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12},
    "H200": {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12},
    "A100": {torch.bfloat16: 312e12, torch.float16: 312e12, torch.float32: 19.5e12},
    "TITAN RTX": {torch.float16: 130e12, torch.float32: 16.3e12},
    "RTX 6000": {torch.float16: 130e12, torch.float32: 16.3e12},
    "L40S": {torch.bfloat16: 362e12, torch.float16: 362e12, torch.float32: 91.6e12},
}


def peak_flops(device: torch.device, dtype: torch.dtype) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).upper()
    for fragment, table in PEAK_FLOPS.items():
        if fragment in name:
            return table.get(dtype)
    return None


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux -> GB



# ----------------------------------------------------------------------------------------------------
# Log lines and records


class Logger:
    """Rank 0: a short fixed-shape line per log interval, every field in metrics.jsonl (docs/training.md), and the
    same records to the trackers asked for (trackers.py: TensorBoard, W&B). The progress bar only draws on a
    terminal: redirected to a file, the log lines are the progress and no carriage returns pile up."""

    def __init__(self, run_dir: Path, enabled: bool, trackers: Trackers, total_steps: int, first_step: int):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.trackers = trackers
        self.bar = tqdm(total=total_steps, initial=first_step, desc="train", dynamic_ncols=True,
                        disable=not (enabled and sys.stderr.isatty()))

    def print(self, line: str) -> None:
        if self.enabled:
            tqdm.write(line) if not self.bar.disable else print(line, flush=True)

    def write(self, record: dict, line: Optional[str] = None) -> None:
        if not self.enabled:
            return
        if line:
            self.print(line)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.trackers.log(record)

    def close(self, exit_code: int) -> None:
        """Close the bar and finish the trackers with the run's exit status (75: stopped, will resume)."""
        self.bar.close()
        self.trackers.finish(exit_code)


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _per_second(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"


def _loss_parts(r: dict) -> str:
    """`loss 1.2345 (asst_ce 0.123 dst_ce ...)`: the loss and its components, in losses.PART_KEYS order."""
    total, *components = PART_KEYS
    return f"{total} {r[total]:.4f} (" + " ".join(f"{k} {r[k]:.3f}" for k in components) + ")"


def format_train_line(r: dict, max_steps: int) -> str:
    """One line of at most ~150 characters; the target counts, rho and the rest are in metrics.jsonl."""
    mfu = f" mfu {100 * r['mfu']:.0f}%" if r["mfu"] is not None else ""
    skipped = f" | skipped {r['skipped_steps']}" if r["skipped_steps"] else ""
    return (
        f"step {r['step']}/{max_steps} {_loss_parts(r)} lr {r['lr']:.1e} gnorm {r['grad_norm']:.2f} | "
        f"{_per_second(r['tokens_per_s'])} tok/s{mfu} mem {r['peak_mem_gb']:.1f}G | eta {_duration(r['eta_s'])}{skipped}"
    )


def format_val_line(step: int, v: dict) -> str:
    def head(name: str, h: dict) -> str:
        auroc = f"{h['auroc']:.3f}" if h["auroc"] is not None else "-"
        return f"{name} F1 {h['f1']:.3f} (P {h['precision']:.3f} R {h['recall']:.3f}) AUROC {auroc}"
    return f"val  {step} {_loss_parts(v)} | {head('speak head', v['speak'])} | {head('dst head', v['dst'])}"


class Window:
    """On-device sums over the steps since the last log line: no host sync until the log interval."""

    def __init__(self, device: torch.device):
        self.parts = torch.zeros(len(PART_KEYS), dtype=torch.float64, device=device)
        self.counts = torch.zeros(len(COUNT_KEYS), dtype=torch.float64, device=device)
        self.io = torch.zeros(2, dtype=torch.float64, device=device)  # tokens, frames
        self.grad_norm = torch.zeros((), dtype=torch.float64, device=device)
        self.steps = self.good = 0
        self.start = time.perf_counter()

    def add(self, micro_batches: list[dict], counts: torch.Tensor) -> None:
        """A step's batches and target counts, whether or not the step was applied."""
        for mb in micro_batches:
            self.io += torch.stack([mb["attention_mask"].sum(), mb["decision_mask"].sum()]).double()
        self.counts += counts
        self.steps += 1

    def add_good(self, step_parts: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """The losses and gradient norm of an applied step."""
        self.parts += step_parts
        # fp16 overflow steps (skipped by the GradScaler) would put inf into the mean.
        self.grad_norm += torch.where(torch.isfinite(grad_norm), grad_norm, 0).double()
        self.good += 1

    def totals(self, world_size: int) -> dict:
        """The window's fields of a train record (the log interval's host sync): mean losses over the applied
        steps, global targets per step, tokens and frames (all ranks) and their rates."""
        all_reduce(self.parts, world_size)  # each rank's parts are its share of the global means: sum them
        all_reduce(self.io, world_size)
        elapsed, good = time.perf_counter() - self.start, max(self.good, 1)
        tokens, frames = self.io.tolist()
        return {
            **dict(zip(PART_KEYS, (self.parts / good).tolist())),
            **{f"n_{k}": round(c / self.steps) for k, c in zip(COUNT_KEYS, self.counts.tolist())},
            "grad_norm": float(self.grad_norm) / good, "tokens": tokens, "frames": frames,
            "tokens_per_s": tokens / elapsed, "frames_per_s": frames / elapsed,
            "tokens_per_step": tokens / self.steps, "frames_per_step": frames / self.steps,
        }


class Progress:
    """A progress bar on a terminal; elsewhere (output redirected to a file, a scheduler's log) a plain line
    every `every_s` seconds instead of carriage-return updates. `update(n)`, `close()`."""

    def __init__(self, total: int, desc: str, unit: str, enabled: bool = True, every_s: float = 60.0):
        self.on_terminal = enabled and sys.stderr.isatty()
        self.plain = enabled and not self.on_terminal
        self.bar = tqdm(total=total, desc=desc, unit=unit, disable=not self.on_terminal, dynamic_ncols=True)
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.done, self.start = 0, time.perf_counter()
        self.last = self.start

    def update(self, n: int = 1) -> None:
        self.bar.update(n)
        self.done += n
        now = time.perf_counter()
        if self.plain and now - self.last >= self.every_s and self.done < self.total:
            self.last = now
            rate = self.done / (now - self.start)
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            print(f"{self.desc}: {self.done}/{self.total} {self.unit}s ({100 * self.done / self.total:.0f}%), "
                  f"{rate:.2f} {self.unit}/s, eta {eta / 60:.0f} min", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()


@contextmanager
def no_transformers_progress_bars():
    """Hide transformers' own "Loading weights" bar while we load; its warnings (e.g. a base model with
    missing weights) still show. The previous setting is restored afterwards."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
