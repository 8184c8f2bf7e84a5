"""Train the proactive, state-tracking video assistant.

    python train.py configs/demo.yaml                          # one process (CPU or one GPU)
    python train.py configs/demo.yaml train.max_steps=50       # dotted key=value overrides
    torchrun --nproc_per_node=2 train.py configs/base.yaml     # DDP: NCCL on GPUs, gloo on CPU
    ./run_2gpu.sh configs/base.yaml                            # the same with the NCCL/OMP settings

Re-running the same command resumes from the newest complete checkpoint in the run directory
(train.resume=auto), exactly. Ctrl-C or SIGTERM (how schedulers preempt jobs) finishes the current optimizer
step, writes a checkpoint, prints the command that resumes, and exits with status 75 (EX_TEMPFAIL: try again);
a second signal aborts at once. Exit status: 0 done, 1 bad config, data or checkpoint, 75 interrupted after
saving. The file reads top to bottom: setup, model, data, optimizer, the loop, the end. docs/training.md
explains the losses, precision, checkpoints and the metrics.jsonl records.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import inspect
import json
import math
import os
import resource
import shlex
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import NoReturn, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

import losses
from checkpoint import (
    CheckpointError, discard_unfinished_saves, find_resume, list_checkpoints, load_model_tensors,
    load_optimizer_state, load_rng_state, no_transformers_progress_bars, read_trainer_state, rng_state,
    save_checkpoint,
)
from config import Config, ConfigError, OptimConfig, load_config, to_yaml
from data import ClipBatchSampler, ClipDataset, Collator, DataError, collate, load_tokenizer, rho_at
from model import (
    build_model, compile_decoder_layers, configure_attention, describe,
    flops_per_token, load_model_state, model_state_for_checkpoint, param_groups, prefer_expandable_segments,
)
from plots import write_training_curves

EXIT_INTERRUPTED = 75  # a signal stopped the run after a checkpoint; re-running the command continues it

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


PART_KEYS = ("loss", "asst_ce", "dst_ce", "speak_bce", "dst_bce")  # the logged loss components
HIST_BINS = 1000  # probability bins for the validation AUROC (all-reducible histograms)

# ----------------------------------------------------------------------------------------------------
# Small pure helpers the loop calls


def choose_precision(requested: str, device_type: str, capability: Optional[tuple[int, int]]) -> tuple[torch.dtype, bool, str]:
    """(autocast dtype, use GradScaler, reason). bf16 only on compute capability >= 8.0: Turing (7.5)
    reports bf16 as "supported" through slow emulation, so torch.cuda.is_bf16_supported() is not used."""
    if requested == "auto":
        if device_type != "cuda":
            return torch.float32, False, "auto: no GPU, fp32"
        if capability is not None and capability >= (8, 0):
            return torch.bfloat16, False, f"auto: compute capability {capability[0]}.{capability[1]} >= 8.0 has bf16 tensor cores"
        cc = f"{capability[0]}.{capability[1]}" if capability else "unknown"
        return torch.float16, True, f"auto: compute capability {cc} < 8.0 has no native bf16; fp16 with a GradScaler"
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[requested]
    use_scaler = dtype == torch.float16  # fp16 gradients underflow without loss scaling, on any device
    return dtype, use_scaler, f"train.precision={requested}" + (" with a GradScaler" if use_scaler else "")


def get_lr(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Linear warmup to optim.lr, then cosine down to optim.lr * min_lr_ratio at max_steps."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    floor = optim.lr * optim.min_lr_ratio
    progress = min((step - optim.warmup_steps) / max(max_steps - optim.warmup_steps, 1), 1.0)
    return floor + 0.5 * (optim.lr - floor) * (1.0 + math.cos(math.pi * progress))


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


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def model_inputs(batch: dict, all_frames: bool = False) -> dict:
    """The model's view of a batch: which positions need the LM head and which need the decision heads.

    The positions come as flat row indices precomputed by the collator (no host sync in the forward), and
    the text targets with them, so the model fuses the LM head with the cross-entropy. Right padding needs no
    attention mask (attention is causal). `all_frames` reads the heads at every decision position
    (validation, streaming comparisons)."""
    return dict(
        input_ids=batch["input_ids"], frame_features=batch["frame_features"], frame_pixels=batch.get("frame_pixels"),
        text_rows=batch["text_rows"],
        head_rows=batch["decision_rows"] if all_frames else batch["head_rows"], text_targets=batch["text_targets"],
    )


def all_reduce(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def forward_backward(model, micro_batches: list[dict], cfg: Config, world_size: int, autocast, scaler):
    """Accumulate one optimizer step's gradients. Returns (the step's loss parts on this rank, global counts).

    Targets are counted over all micro-batches and ranks first; each micro-batch's summed loss is divided by
    those global counts, so the gradient does not depend on how the step is split (docs/training.md#losses).
    """
    counts = torch.stack([losses.count_targets(mb) for mb in micro_batches]).sum(0)
    all_reduce(counts, world_size)
    step_parts = torch.zeros(len(PART_KEYS), dtype=torch.float64, device=counts.device)
    for i, mb in enumerate(micro_batches):
        # Gradients are all-reduced only on the last micro-step; the others accumulate locally.
        sync = i == len(micro_batches) - 1 or world_size == 1
        with (contextlib.nullcontext() if sync else model.no_sync()):
            with autocast:
                outputs = model(**model_inputs(mb))
            loss, parts = losses.compute_loss(outputs, mb, counts, cfg.loss)
            # DDP averages gradients over ranks; the loss is already a global mean, so undo the average.
            scaler.scale(loss * world_size).backward()
        step_parts += torch.stack([parts[k].double() for k in PART_KEYS])
    return step_parts, counts


def search_micro_batch(fits, limit: int) -> int:
    """The largest divisor of `limit` for which `fits(micro_batch)` holds, probing the divisors in increasing
    order and stopping at the first failure (memory only grows with the micro-batch). Divisors only, so that
    micro_batch x grad_accum (the clips per rank per step) stays what the config says."""
    best = 0
    for candidate in (d for d in range(1, limit + 1) if limit % d == 0):
        if not fits(candidate):
            break
        best = candidate
    return best


def auto_micro_batch(model, dataset: ClipDataset, cfg: Config, device, autocast) -> tuple[int, int]:
    """train.auto_batch: the largest micro-batch whose forward + backward on the longest clips, plus the fp32
    AdamW states, stays under 90% of device memory; the clips per step stay the same."""
    total = torch.cuda.get_device_properties(device).total_memory
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer_bytes = 2 * 4 * trainable  # exp_avg + exp_avg_sq in fp32, allocated at the first step
    longest = sorted(range(len(dataset)), key=lambda i: -dataset.lengths[i])
    scaler = torch.amp.GradScaler(device.type, enabled=False)

    def fits(micro_batch: int) -> bool:
        picks = [longest[i % len(longest)] for i in range(micro_batch)]
        batch = to_device(collate([dataset.item(i, 0, 1.0) for i in picks], dataset.renderer.pad_id,
                                  cfg.data.pad_to_multiple), device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            forward_backward(model, [batch], cfg, 1, autocast, scaler)
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) + optimizer_bytes
        except torch.OutOfMemoryError:
            peak = float("inf")
        model.zero_grad(set_to_none=True)
        return peak < 0.9 * total

    per_rank = cfg.train.micro_batch * cfg.train.grad_accum
    micro_batch = search_micro_batch(fits, per_rank)
    if micro_batch == 0:
        raise RuntimeError("train.auto_batch: even one clip of the longest length does not fit in 90% of the GPU")
    return micro_batch, per_rank // micro_batch


# ----------------------------------------------------------------------------------------------------
# Validation: losses at rho = 1 and per-head decision quality, from counts all-reduced over ranks


def validation_subset(lengths: list[int], max_clips: int, seed: int) -> list[int]:
    """The validation clips: all of them, or (train.eval_max_clips) a fixed, seeded, length-stratified subset:
    the clips sorted by length are cut into `max_clips` equal strata and one clip is drawn from each. It
    depends only on the data and the seed, never on the number of ranks or the micro-batch."""
    if not max_clips or max_clips >= len(lengths):
        return list(range(len(lengths)))
    by_length = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    rng = np.random.default_rng([seed, 2])
    return sorted(int(rng.choice(stratum)) for stratum in np.array_split(by_length, max_clips))


@torch.no_grad()
def evaluate_loss(model, dataset: ClipDataset, cfg: Config, device, dtype, rank: int, world_size: int) -> dict:
    """Globally normalised validation losses (every frame labelled) and per-head P/R/F1 at 0.5 and AUROC.

    Every rank takes its share of the same subset; sums and counts are all-reduced, so the result does not
    depend on the number of ranks or the micro-batch."""
    model.eval()
    subset = validation_subset(dataset.lengths, cfg.train.eval_max_clips, cfg.train.seed)
    mine = sorted(subset[rank::world_size], key=lambda i: dataset.lengths[i])  # similar lengths per batch
    mb = cfg.train.micro_batch
    batches = [mine[i:i + mb] for i in range(0, len(mine), mb)]
    pad_id, multiple = dataset.renderer.pad_id, cfg.data.pad_to_multiple
    # Pass 1: target counts from the labels alone (no features read), so the losses are global means.
    counts = torch.zeros(len(losses.COUNT_KEYS), dtype=torch.float64, device=device)
    for indices in batches:
        labels_only = collate([dataset.item(i, with_features=False) for i in indices], pad_id, multiple)
        counts += losses.count_targets(to_device(labels_only, device))
    all_reduce(counts, world_size)
    parts_sum = torch.zeros(len(PART_KEYS), dtype=torch.float64, device=device)
    hists = {h: torch.zeros(2, HIST_BINS, dtype=torch.float64, device=device) for h in ("speak", "dst")}
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    for indices in batches:
        batch = to_device(collate([dataset.item(i) for i in indices], pad_id, multiple), device)
        with autocast:
            outputs = model(**model_inputs(batch))
        _, parts = losses.compute_loss(outputs, batch, counts, cfg.loss)
        parts_sum += torch.stack([parts[k].double() for k in PART_KEYS])
        speak_labels, dst_labels = losses.head_labels(batch, outputs["speak_logits"].shape[0])
        hists["speak"] += losses.head_histograms(outputs["speak_logits"], speak_labels, HIST_BINS)
        hists["dst"] += losses.head_histograms(outputs["dst_logits"], dst_labels, HIST_BINS)
    # Every rank runs the same collectives, also one that had no validation batch.
    all_reduce(parts_sum, world_size)
    for h in hists.values():
        all_reduce(h, world_size)
    model.train()
    result = dict(zip(PART_KEYS, parts_sum.tolist()))
    result.update({f"n_{k}": int(v) for k, v in zip(losses.COUNT_KEYS, counts.tolist())})
    result["clips"] = len(subset)
    for head, hist in hists.items():  # "dst" here is the DST-update head
        result[head] = losses.head_scores(hist, threshold=0.5)
    return result


# ----------------------------------------------------------------------------------------------------
# Logging


class Logger:
    """Rank 0: a short fixed-shape line per log interval, every field in metrics.jsonl (docs/training.md), and
    TensorBoard scalars when asked for and installed. The progress bar only draws on a terminal: redirected to
    a file, the log lines are the progress and no carriage returns pile up."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, total_steps: int, first_step: int):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.bar = tqdm(total=total_steps, initial=first_step, desc="train", dynamic_ncols=True,
                        disable=not (enabled and sys.stderr.isatty()))
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("train.tensorboard=true but tensorboard is not installed; logging to metrics.jsonl only")
            else:
                self.tb = SummaryWriter(str(run_dir / "tb"))

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
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(f"{record['kind']}/{key}", value, record["step"])
            for head in ("speak", "dst"):
                for key, value in (record.get(head) or {}).items():
                    if isinstance(value, (int, float)):
                        self.tb.add_scalar(f"{record['kind']}/{head}_{key}", value, record["step"])

    def close(self) -> None:
        self.bar.close()
        if self.tb is not None:
            self.tb.close()


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _per_second(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"


def format_train_line(r: dict, max_steps: int) -> str:
    """One line of at most ~150 characters; the target counts, rho and the rest are in metrics.jsonl."""
    mfu = f" mfu {100 * r['mfu']:.0f}%" if r["mfu"] is not None else ""
    skipped = f" | skipped {r['skipped_steps']}" if r["skipped_steps"] else ""
    return (
        f"step {r['step']}/{max_steps} loss {r['loss']:.4f} (asst_ce {r['asst_ce']:.3f} dst_ce {r['dst_ce']:.3f} "
        f"speak_bce {r['speak_bce']:.3f} dst_bce {r['dst_bce']:.3f}) lr {r['lr']:.1e} gnorm {r['grad_norm']:.2f} | "
        f"{_per_second(r['tokens_per_s'])} tok/s{mfu} mem {r['peak_mem_gb']:.1f}G | eta {_duration(r['eta_s'])}{skipped}"
    )


def format_val_line(step: int, v: dict) -> str:
    def head(name: str, h: dict) -> str:
        auroc = f"{h['auroc']:.3f}" if h["auroc"] is not None else "-"
        return f"{name} F1 {h['f1']:.3f} (P {h['precision']:.3f} R {h['recall']:.3f}) AUROC {auroc}"
    return (
        f"val  {step} loss {v['loss']:.4f} (asst_ce {v['asst_ce']:.3f} dst_ce {v['dst_ce']:.3f} "
        f"speak_bce {v['speak_bce']:.3f} dst_bce {v['dst_bce']:.3f}) | {head('speak head', v['speak'])} | "
        f"{head('dst head', v['dst'])}"
    )


# ----------------------------------------------------------------------------------------------------
# Interrupts and process lifetime


class GracefulStop:
    """SIGTERM / SIGINT: finish the current optimizer step, save, exit with EXIT_INTERRUPTED.

    The handler only sets a flag; the loop all-reduces it with the per-step finite check (no extra sync), so
    every rank stops after the same step. A repeat within `same_request_s` is the same request: torchrun
    forwards the signal it gets to its workers, so a Ctrl-C in a terminal reaches each rank twice at once.
    A later second signal aborts at once, without a checkpoint.
    """

    def __init__(self, same_request_s: float = 2.0):
        self.signum: Optional[int] = None
        self.first_at = 0.0
        self.same_request_s = same_request_s
        self.previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only; a caller in another thread keeps its own
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum, self.first_at = signum, now
            # os.write, not print: a handler may interrupt a print of the main thread.
            os.write(2, f"\n{name}: finishing this optimizer step, then saving a checkpoint "
                        f"(send it again to abort without one)\n".encode())
        elif now - self.first_at > self.same_request_s:
            os.write(2, f"\n{name} again: aborting without a checkpoint\n".encode())
            os._exit(128 + signum)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker init: Ctrl-C reaches the whole process group, workers included; the main process
    decides when to stop, and its workers keep serving the step in flight until then."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def die_with_launcher() -> None:
    """Ask Linux to send this process SIGTERM when its parent (the torchrun launcher) dies: a worker whose
    launcher was killed then saves and exits instead of running or waiting on without it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # not Linux; the process-group timeout still ends a rank whose peers died
    if os.getppid() == 1:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def setup_distributed(timeout_s: int) -> tuple[int, int, int, torch.device]:
    """(rank, local_rank, world_size, device). torchrun sets RANK/WORLD_SIZE; NCCL on GPU, gloo on CPU.

    A collective that waits longer than `timeout_s` (train.dist_timeout_s) fails and ends the rank: a rank
    whose peers died must not wait for them for hours."""
    if "RANK" not in os.environ:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return 0, 0, 1, device
    rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    die_with_launcher()
    timeout = datetime.timedelta(seconds=timeout_s)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device, timeout=timeout)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    return rank, local_rank, world_size, device


def end_distributed(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End a torchrun worker without interpreter finalization, after flushing its output.

    gloo's worker threads let go of a finished collective's tensors only after waking the caller. If the
    interpreter is already finalizing when such a thread drops the last reference to a tensor that Python
    created, the thread needs the GIL, is ended inside a C++ destructor, and the process aborts ("terminate
    called without an active exception", SIGABRT) although everything succeeded. Skipping finalization leaves
    no such window; the run's files are closed by then.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def resume_command() -> str:
    """The command line that re-runs (and so resumes) this run; under torchrun, the launcher's own flags and
    environment (run_2gpu.sh's, say) are not visible here and must be given again as before."""
    args = " ".join(shlex.quote(a) for a in sys.argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        return (f"torchrun [your launcher flags] --nproc_per_node={int(os.environ.get('LOCAL_WORLD_SIZE', world_size))} "
                f"{args} (or the script that launched it)")
    return f"python {args}"


# ----------------------------------------------------------------------------------------------------
# The run


def train(cfg: Config) -> dict:
    """Run (or resume) training as configured. Returns a summary (final step, last records, checkpoint, and
    `interrupted`: the signal's name when a signal stopped it)."""
    prefer_expandable_segments()
    rank, local_rank, world_size, device = setup_distributed(cfg.train.dist_timeout_s)
    master = rank == 0
    run_dir = Path(cfg.run.dir)
    attention = configure_attention(device)
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    dtype, use_scaler, precision_reason = choose_precision(cfg.train.precision, device.type, capability)
    if cfg.model.frozen_dtype != "fp32" and dtype == torch.float32:
        raise ConfigError(
            f"model.frozen_dtype={cfg.model.frozen_dtype} needs fp16/bf16 compute, but train.precision="
            f"{cfg.train.precision} gives fp32 here ({precision_reason}); set model.frozen_dtype=fp32 on this device"
        )
    resume_from = find_resume(cfg)
    if cfg.train.resume == "never" and list_checkpoints(run_dir):
        raise ConfigError(
            f"train.resume=never but {run_dir} already holds checkpoints; a fresh run there would rotate them "
            f"away. Choose another run.name (or run.dir), or resume with train.resume=auto"
        )
    saved = read_trainer_state(resume_from) if resume_from is not None else None
    if saved is not None and saved["step"] >= cfg.train.max_steps:
        if master:
            print(f"nothing to do: {resume_from} is at step {saved['step']} >= train.max_steps={cfg.train.max_steps}")
        end_distributed(world_size)
        return {"step": saved["step"], "checkpoint": str(resume_from), "interrupted": None}

    # -- model: the same initial weights on every rank (DDP also broadcasts rank 0's at wrap time)
    torch.manual_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model.path)
    with no_transformers_progress_bars():
        model = build_model(cfg, tokenizer).to(device)

    # -- data
    train_set = ClipDataset(cfg, "train", tokenizer, announce=master)
    val_set = ClipDataset(cfg, "val", tokenizer, announce=master) if cfg.train.eval_every else None
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    auto_batch_note = ""
    if cfg.train.auto_batch:
        if device.type != "cuda":
            auto_batch_note = "train.auto_batch is for GPUs; on CPU the configured micro-batch is used"
        else:
            model.train()
            mb, acc = auto_micro_batch(model, train_set, cfg, device, autocast)
            auto_batch_note = (f"train.auto_batch: micro_batch {cfg.train.micro_batch} -> {mb}, grad_accum "
                               f"{cfg.train.grad_accum} -> {acc} (largest under 90% of GPU memory on the longest clips)")
            cfg.train.micro_batch, cfg.train.grad_accum = mb, acc
    accum = cfg.train.grad_accum
    sampler = ClipBatchSampler(
        train_set.lengths, cfg.train.micro_batch, accum, rank, world_size, cfg.train.seed, cfg.data.length_grouping,
    )
    # The NFS rate of a step follows from the step's position in the data stream, not from the loop's counter:
    # loader prefetching must not change which rho a batch gets (exact resume).
    sampler.rho_fn = lambda epoch, step: rho_at(cfg, epoch * sampler.steps_per_epoch + step)

    # -- optimizer: trainable weights and AdamW states are fp32 whatever the compute precision
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in trainable), "trainable parameters must be fp32"
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
        eps=cfg.optim.eps, fused=device.type == "cuda",
    )
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)

    # -- resume: weights, optimizer, loop state; RNG last, right before the loop
    state = {"step": 0, "epoch": 0, "cursor": 0, "tokens_seen": 0, "frames_seen": 0, "best_val_loss": None,
             "skipped_steps": 0, "max_steps": cfg.train.max_steps}
    notes = [auto_batch_note] if auto_batch_note else []
    if saved is not None:
        load_model_state(model, load_model_tensors(resume_from), cfg)
        load_optimizer_state(resume_from, optimizer, device)
        notes += check_resumable(saved, resume_from, cfg, world_size, accum)
        state.update({k: saved[k] for k in state if k in saved})
        state["max_steps"] = cfg.train.max_steps
        if saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        sampler.start(state["epoch"], state["cursor"])

    if cfg.train.compile:
        compile_decoder_layers(model)
    raw_model = model
    if world_size > 1:
        # No buffer broadcast (the buffers are derived from the tokenizer, identical on every rank); gradients
        # live in the all-reduce buckets instead of being copied into them.
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                          else {"broadcast_buffers": False})  # the argument's name since torch 2.13
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None, gradient_as_bucket_view=True,
                    **no_buffer_sync)

    loader = DataLoader(
        train_set, batch_sampler=sampler, collate_fn=Collator(train_set.renderer.pad_id, cfg.data.pad_to_multiple),
        num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0,
        pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals,
        # A private generator: worker seeding must not consume the global RNG, or a resumed run would
        # draw different dropout masks from an uninterrupted one.
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )

    # -- startup report; the run directory is created only now, once everything above worked
    if master:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        global_clips = cfg.train.micro_batch * accum * world_size
        print(f"run: {run_dir} (resolved config in {run_dir / 'config.yaml'})")
        print(f"precision: {str(dtype).removeprefix('torch.')} ({precision_reason}); {attention}"
              + ("; train.compile: decoder layers compiled" if cfg.train.compile else ""))
        print(describe(raw_model))
        print(f"batch: {cfg.train.micro_batch} clip(s) per micro-batch x {accum} accumulation step(s) x {world_size} "
              f"rank(s) = {global_clips} clips per optimizer step (tokens and frames per step are logged)")
        report = train_set.report
        print(f"data: {len(train_set)} train clips ({len(report.skipped)} skipped as invalid, {len(report.dropped)} "
              f"dropped as over-length, {len(report.split_clips)} split into sub-clips), {sampler.steps_per_epoch} "
              f"steps per epoch; {len(val_set) if val_set else 0} val clips")
        for note in notes:
            print(note)
        for unfinished in discard_unfinished_saves(run_dir):
            print(f"deleted {unfinished}: a checkpoint save that never finished (the run stopped while writing it)")
        if resume_from is not None:
            print(f"resumed from {resume_from} at step {state['step']} (epoch {state['epoch']}, step {state['cursor']} of it)")

    logger = Logger(run_dir, master, cfg.train.tensorboard, cfg.train.max_steps, state["step"])
    peak = peak_flops(device, dtype)
    mean_len = sum(train_set.lengths) / len(train_set.lengths)
    flops_token = flops_per_token(raw_model, int(mean_len))
    # Resume puts the RNG exactly where the interrupted run had it (dropout masks continue identically).
    if resume_from is not None and (resume_from / f"rng_rank{rank}.json").is_file():
        load_rng_state(resume_from, rank)
    else:
        if resume_from is not None:
            warnings.warn(f"{resume_from} has no RNG state for rank {rank} (it was saved with fewer ranks): "
                          f"seeded afresh, so dropout masks differ from an uninterrupted run")
        torch.manual_seed(cfg.train.seed + 1000 * rank + state["step"])  # different dropout masks per rank

    stop = GracefulStop()
    stop.install()
    try:
        summary = run_loop(cfg, model, raw_model, loader, optimizer, scaler, autocast, state, logger, stop,
                           val_set, tokenizer, run_dir, device, dtype, use_scaler, trainable, accum, world_size, rank,
                           peak, flops_token)
    finally:
        stop.restore()
        logger.close()
    if master:
        print(f"training curves: {write_training_curves(run_dir)}")
        if stop.requested:
            print(f"interrupted by {stop.name} after step {state['step']}; saved {summary['checkpoint']}.\n"
                  f"resume with the same command: {resume_command()}")
    end_distributed(world_size)
    return summary


def check_resumable(saved: dict, ckpt: Path, cfg: Config, world_size: int, accum: int) -> list[str]:
    """The checkpoint's data position counts optimizer steps of a fixed number of clips: any split of the same
    clips per step continues with the same data (the sampler assigns clips per step, the loss is globally
    normalised), another number does not. Returns notes for the startup report."""
    saved_clips = saved["world_size"] * saved["micro_batch"] * saved["grad_accum"]
    clips = world_size * cfg.train.micro_batch * accum
    split = f"{world_size}x{cfg.train.micro_batch}x{accum}"
    saved_split = f"{saved['world_size']}x{saved['micro_batch']}x{saved['grad_accum']}"
    if saved_clips != clips:
        raise ConfigError(
            f"{ckpt}: saved with {saved_clips} clips per optimizer step (ranks x micro_batch x grad_accum = "
            f"{saved_split}), now {clips} ({split}); its data position counts steps of {saved_clips} clips. "
            f"Resume with {saved_clips} clips per step in any split, or start a new run (another run.name)"
        )
    notes = []
    if saved_split != split:
        notes.append(f"resume: batch split {saved_split} -> {split}, the same {clips} clips per step")
    old_max = saved.get("max_steps", cfg.train.max_steps)
    if old_max != cfg.train.max_steps:
        step = saved["step"]
        before, after = get_lr(step, cfg.optim, old_max), get_lr(step, cfg.optim, cfg.train.max_steps)
        notes.append(f"train.max_steps changed from {old_max} to {cfg.train.max_steps}: the cosine schedule is "
                     f"recomputed for {cfg.train.max_steps} steps, so the learning rate at step {step} goes from "
                     f"{before:.2e} to {after:.2e}")
    return notes


def run_loop(cfg, model, raw_model, loader, optimizer, scaler, autocast, state, logger, stop, val_set, tokenizer,
             run_dir, device, dtype, use_scaler, trainable, accum, world_size, rank, peak, flops_token) -> dict:
    batches = iter(loader)
    # On-device accumulators between log lines: no host sync until the log interval.
    window_parts = torch.zeros(len(PART_KEYS), dtype=torch.float64, device=device)
    window_counts = torch.zeros(len(losses.COUNT_KEYS), dtype=torch.float64, device=device)
    window_io = torch.zeros(2, dtype=torch.float64, device=device)  # tokens, frames
    window_norm = torch.zeros((), dtype=torch.float64, device=device)
    window_steps, window_good, window_start = 0, 0, time.perf_counter()
    run_start, start_step = time.perf_counter(), state["step"]
    bad_in_a_row = 0
    last_record: dict = {}
    last_ckpt: Optional[Path] = None
    stopping = False
    model.train()

    while state["step"] < cfg.train.max_steps and not stopping:
        step = state["step"]
        lr = get_lr(step, cfg.optim, cfg.train.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # Fetch the step's micro-batches first: the losses are normalised by the step's global target counts.
        micro_batches = [to_device(next(batches), device) for _ in range(accum)]
        step_parts, counts = forward_backward(model, micro_batches, cfg, world_size, autocast, scaler)
        for mb in micro_batches:
            window_io += torch.stack([mb["attention_mask"].sum(), mb["decision_mask"].sum()]).double()
        state["epoch"], state["cursor"] = micro_batches[-1]["epoch"], micro_batches[-1]["cursor"]

        scaler.unscale_(optimizer)
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm)
        # One host sync per optimizer step: a skipped step must not touch weights or optimizer state, and that
        # decision needs the host; a stop request rides along, so all ranks stop after the same step. (With fp16
        # the GradScaler makes the same sync for overflows, which it handles itself: those are routine and not
        # counted as bad steps.)
        stop_vote = torch.tensor(float(stop.requested), dtype=torch.float64).to(device, non_blocking=True)
        flags = torch.stack([step_parts[0], grad_norm.double(), stop_vote])
        loss_sum, norm_sum, stop_votes = all_reduce(flags, world_size).tolist()
        stopping = stop_votes > 0
        bad = not math.isfinite(loss_sum) or (not use_scaler and not math.isfinite(norm_sum))
        if bad:
            bad_in_a_row += 1
            state["skipped_steps"] += 1
            warnings.warn(f"step {step}: non-finite loss or gradient; step skipped ({bad_in_a_row} in a row)")
            if bad_in_a_row >= cfg.train.max_bad_steps:
                raise RuntimeError(
                    f"{bad_in_a_row} non-finite steps in a row (train.max_bad_steps={cfg.train.max_bad_steps}) at "
                    f"step {step}: lower optim.lr, check the data with `python data.py validate`, or try fp32"
                )
            if use_scaler:
                scaler.update()
        else:
            bad_in_a_row = 0
            scaler.step(optimizer)
            scaler.update()
            window_parts += step_parts
            # fp16 overflow steps (skipped by the GradScaler) would put inf into the mean.
            window_norm += torch.where(torch.isfinite(grad_norm), grad_norm, 0).double()
            window_good += 1
        optimizer.zero_grad(set_to_none=True)
        window_counts += counts
        window_steps += 1
        state["step"] = step + 1
        logger.bar.update(1)

        # -- diagnostics (the only host syncs besides the one above). A log line also closes every
        # checkpoint interval, so a resumed run logs the same windows as an uninterrupted one.
        done = state["step"] >= cfg.train.max_steps
        saving = state["step"] % cfg.train.save_every == 0 or done or stopping
        if state["step"] % cfg.train.log_every == 0 or saving:
            # Each rank's parts are its share of the global mean (normalised by global counts): sum them.
            all_reduce(window_parts, world_size)
            all_reduce(window_io, world_size)
            elapsed = time.perf_counter() - window_start
            good = max(window_good, 1)
            parts_mean = (window_parts / good).tolist()
            tokens, frames = window_io.tolist()
            counts_list = [round(c / window_steps) for c in window_counts.tolist()]  # global targets per step
            state["tokens_seen"] += int(tokens)
            state["frames_seen"] += int(frames)
            tokens_per_s = tokens / elapsed
            seconds_per_step = (time.perf_counter() - run_start) / (state["step"] - start_step)
            record = {
                "kind": "train", "step": state["step"], **dict(zip(PART_KEYS, parts_mean)),
                **{f"n_{k}": c for k, c in zip(losses.COUNT_KEYS, counts_list)},
                "lr": lr, "grad_norm": float(window_norm) / good, "tokens_per_s": tokens_per_s,
                "frames_per_s": frames / elapsed, "tokens_per_step": tokens / window_steps,
                "frames_per_step": frames / window_steps,
                "mfu": (tokens_per_s * flops_token / (peak * world_size)) if peak else None,
                "peak_mem_gb": peak_memory_gb(device), "rho": rho_at(cfg, step), "epoch": state["epoch"],
                "skipped_steps": state["skipped_steps"],
                "eta_s": seconds_per_step * (cfg.train.max_steps - state["step"]),
            }
            logger.write(record, format_train_line(record, cfg.train.max_steps))
            logger.bar.set_postfix(loss=f"{record['loss']:.3f}")
            last_record = record
            window_parts.zero_(); window_counts.zero_(); window_io.zero_(); window_norm.zero_()
            window_steps, window_good, window_start = 0, 0, time.perf_counter()

        validating = val_set is not None and (state["step"] % cfg.train.eval_every == 0 or done)
        if validating:
            val = evaluate_loss(raw_model, val_set, cfg, device, dtype, rank, world_size)
            if state["best_val_loss"] is None or val["loss"] < state["best_val_loss"]:
                state["best_val_loss"] = val["loss"]
            logger.write({"kind": "val", "step": state["step"], **val}, format_val_line(state["step"], val))
            last_record = {**last_record, "val": val}
            if rank == 0:
                write_training_curves(run_dir)

        if saving:
            last_ckpt = save(cfg, run_dir, raw_model, optimizer, scaler, state, tokenizer, world_size, rank,
                             cfg.train.micro_batch, accum)
            logger.write({"kind": "checkpoint", "step": state["step"], "path": str(last_ckpt)}, f"saved {last_ckpt}")
            if rank == 0:
                write_training_curves(run_dir)  # with this checkpoint's mark
        if validating or saving:  # the next throughput window measures training, not validation or saving
            window_start = time.perf_counter()
    return {"step": state["step"], "checkpoint": str(last_ckpt) if last_ckpt else None, "last": last_record,
            "interrupted": stop.name if stopping else None}


def save(cfg, run_dir, model, optimizer, scaler, state, tokenizer, world_size, rank, micro_batch, accum) -> Path:
    """Gather every rank's RNG state, let rank 0 write the checkpoint, and wait for it."""
    local = rng_state()
    if world_size > 1:
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, local)
    else:
        gathered = [local]
    path = Path(run_dir) / f"step_{state['step']}"
    if rank == 0:
        trainer_state = {
            **state, "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "world_size": world_size, "micro_batch": micro_batch, "grad_accum": accum,
        }
        path = save_checkpoint(
            run_dir, state["step"], model_state_for_checkpoint(model, cfg), optimizer, trainer_state, cfg,
            tokenizer, model.backbone.config, gathered, cfg.train.keep_last,
        )
    if world_size > 1:
        dist.barrier()
    return path


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="run config YAML (e.g. configs/demo.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=200 optim.lr=1e-4")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        summary = train(cfg)
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except dist.DistBackendError as err:
        rank = os.environ.get("RANK", "?")
        print(f"error: rank {rank}: a collective failed (did a peer or the launcher die?): {err}", file=sys.stderr)
        return 1
    return EXIT_INTERRUPTED if summary.get("interrupted") else 0


if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_process(code)
    sys.exit(code)
