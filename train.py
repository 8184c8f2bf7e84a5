"""Train the proactive, state-tracking video assistant.

    python train.py configs/demo.yaml                          # one process (CPU or one GPU)
    python train.py configs/demo.yaml train.max_steps=50       # dotted key=value overrides
    torchrun --nproc_per_node=2 train.py configs/base.yaml     # DDP: NCCL on GPUs, gloo on CPU
    ./run_2gpu.sh configs/base.yaml                            # the same with the NCCL/OMP settings

Re-running the same command resumes from the newest complete checkpoint in the run directory
(train.resume=auto), exactly. Ctrl-C or SIGTERM (how schedulers preempt jobs) finishes the current optimizer
step, writes a checkpoint, prints the command that resumes, and exits with status 75 (EX_TEMPFAIL: try again);
a second signal aborts at once. A frame that cannot be read mid-run (a corrupt JPEG) stops every rank the same
way after the last complete step, naming the file, clip and frame, with status 65 (EX_DATAERR).
Exit status: 0 done, 1 bad config, data or checkpoint at start-up, 65 unreadable data mid-run (saved), 75
interrupted (saved).

The file reads top to bottom: the step (forward, backward, clipping), validation, set-up (`setup` returns one
`Run`), the loop (`train_loop`), the end. docs/training.md explains the losses, precision, checkpoints and the
metrics.jsonl records; docs/architecture.md shows where to edit for a new loss term, head or backbone.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

import losses
from checkpoint import (
    BEST_LINK, CheckpointError, CheckpointMeta, TrainState, agreed_resume, discard_unfinished_saves, list_checkpoints,
    load_training_state, mark_best, read_trainer_state, rng_state, save_checkpoint, save_sharded_checkpoint, seed_rank,
)
from clips import DataError
from config import BEST_METRICS, Config, ConfigError, OptimConfig, load_config, to_dict, to_yaml
from data import (
    BatchPlan, ClipDataset, collate, make_loader, model_inputs, search_micro_batch, to_device,
)
from distributed import (
    EXIT_DATA_ERROR, EXIT_INTERRUPTED, GracefulStop, all_reduce, end_distributed, exit_process, min_over_ranks,
    resume_command, setup_distributed,
)
from logs import (
    Logger, Window, format_train_line, format_val_line, no_transformers_progress_bars, peak_flops, peak_memory_gb,
)
from model import (
    Precision, VideoAssistant, build_model, compile_decoder_layers, configure_attention, describe, flops_per_token,
    model_state_for_checkpoint, param_groups, prefer_expandable_segments, run_precision,
)
from plots import write_training_curves
from sequence import load_tokenizer, rho_at
from sharding import backward_scale, clip_grad_norm_, replicate, shard_model
from trackers import TrackerOptions, Trackers, check_installed, scalars
from validation import evaluate_loss

# ----------------------------------------------------------------------------------------------------
# The step


def get_lr(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Linear warmup to optim.lr, then cosine down to optim.lr * min_lr_ratio at max_steps."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    floor = optim.lr * optim.min_lr_ratio
    progress = min((step - optim.warmup_steps) / max(max_steps - optim.warmup_steps, 1), 1.0)
    return floor + 0.5 * (optim.lr - floor) * (1.0 + math.cos(math.pi * progress))


def forward_backward(model, micro_batches: list[dict], cfg: Config, autocast, scaler) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate one optimizer step's gradients. Returns (the step's loss parts on this rank, global counts).

    Targets are counted over all micro-batches and ranks first; each micro-batch's summed loss is divided by
    those global counts, so the gradient does not depend on how the step is split (docs/training.md#losses).
    """
    counts = losses.global_target_counts(micro_batches)
    step_parts = torch.zeros(len(losses.PART_KEYS), dtype=torch.float64, device=counts.device)
    for i, mb in enumerate(micro_batches):
        # Under DDP gradients are all-reduced only on the last micro-step; the others accumulate locally.
        last = i == len(micro_batches) - 1
        with (model.no_sync() if isinstance(model, DDP) and not last else contextlib.nullcontext()):
            with autocast:
                outputs = model(**model_inputs(mb))
            loss, parts = losses.compute_loss(outputs, mb, counts, cfg.loss)
            # The loss is already this rank's share of the global mean: the step's gradient is the sum over ranks,
            # which DDP's average needs multiplied back (FSDP is set to sum). Under FSDP every micro-batch is
            # reduce-scattered (no no_sync): unsharded gradients would cost a whole model's memory.
            scaler.scale(loss * backward_scale(model)).backward()
        step_parts += losses.stack_parts(parts)
    return step_parts, counts


def fetch_step(batches, plan: BatchPlan, device: torch.device) -> tuple[Optional[list[dict]], Optional[str]]:
    """The next optimizer step's micro-batches on the device, or, when a clip's frames cannot be read (a file
    changed since the start-up check, a corrupt JPEG mid-clip), the error naming file, clip and frame."""
    try:
        return [to_device(next(batches), device) for _ in range(plan.grad_accum)], None
    except DataError as err:
        text = str(err).strip()
        # A loader worker's error arrives wrapped in the worker's traceback; its last line is the error itself.
        last = text.splitlines()[-1] if "Original Traceback" in text else ""
        return None, last.split("DataError: ", 1)[1] if "DataError: " in last else text


def largest_micro_batch(model, dataset: ClipDataset, cfg: Config, device, autocast, limit: int) -> Optional[int]:
    """This rank's largest micro-batch (a divisor of `limit`) whose forward + backward on the longest clips, plus
    the fp32 AdamW states, stays under 90% of its GPU's memory; None where there is no GPU memory to measure."""
    if device.type != "cuda":
        return None
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
            forward_backward(model, [batch], cfg, autocast, scaler)
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) + optimizer_bytes
        except torch.OutOfMemoryError:
            peak = float("inf")
        model.zero_grad(set_to_none=True)
        # Every rank probes the same micro-batches (the step's collectives must match): one fits where all fit.
        return bool(min_over_ranks(int(peak < 0.9 * total), device))

    return search_micro_batch(fits, limit)


def auto_batch_plan(model, dataset: ClipDataset, cfg: Config, plan: BatchPlan, device, autocast) -> tuple[BatchPlan, str]:
    """train.auto_batch: the micro-batch every rank can afford (the smallest over ranks of each rank's largest:
    a GPU with less free memory decides), the clips per step unchanged. Returns the plan and a start-up note."""
    local = largest_micro_batch(model, dataset, cfg, device, autocast, plan.clips_per_rank)
    if local is None:
        return plan, "train.auto_batch is for GPUs; on CPU the configured micro-batch is used"
    agreed = min_over_ranks(local, device)
    if agreed == 0:
        raise RuntimeError("train.auto_batch: even one clip of the longest length does not fit in 90% of the GPU")
    chosen = plan.with_micro_batch(agreed)
    ranks = f"; rank {dist.get_rank()} alone could take {local}" if plan.world_size > 1 else ""
    return chosen, (f"train.auto_batch: micro_batch {plan.micro_batch} -> {chosen.micro_batch}, grad_accum "
                    f"{plan.grad_accum} -> {chosen.grad_accum} (largest under 90% of GPU memory on the longest clips, "
                    f"the smallest over ranks{ranks})")


# ----------------------------------------------------------------------------------------------------
# Set-up: everything the loop needs, in one object


@dataclass
class Run:
    """One training run, set up: what the loop reads and updates."""
    cfg: Config
    rank: int
    device: torch.device
    precision: Precision
    plan: BatchPlan
    model: torch.nn.Module  # what the step calls: the DDP wrapper under several ranks, else the model itself
    raw_model: VideoAssistant
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loader: DataLoader
    val_set: Optional[ClipDataset]
    tokenizer: object
    state: TrainState = field(default_factory=TrainState)
    flops_per_token: int = 0  # training FLOPs per token at the mean clip length, for MFU

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run.dir)


def check_resumable(saved: dict, ckpt: Path, cfg: Config, plan: BatchPlan) -> list[str]:
    """The checkpoint's data position counts optimizer steps of a fixed number of clips: any plan with the same
    clips per step continues with the same data (the sampler assigns clips per step, the loss is globally
    normalised), another number does not. Returns notes for the startup report."""
    saved_plan = BatchPlan(saved["micro_batch"], saved["grad_accum"], saved["world_size"])
    if saved_plan.clips_per_step != plan.clips_per_step:
        raise ConfigError(
            f"{ckpt}: saved with {saved_plan.clips_per_step} clips per optimizer step (ranks x micro_batch x "
            f"grad_accum = {saved_plan}), now {plan.clips_per_step} ({plan}); its data position counts steps of "
            f"{saved_plan.clips_per_step} clips. Resume with {saved_plan.clips_per_step} clips per step in any split, "
            f"or start a new run (another run.name)"
        )
    notes = []
    if saved_plan != plan:
        notes.append(f"resume: batch split {saved_plan} -> {plan}, the same {plan.clips_per_step} clips per step")
    old_max = saved.get("max_steps", cfg.train.max_steps)
    if old_max != cfg.train.max_steps:
        step = saved["step"]
        before, after = get_lr(step, cfg.optim, old_max), get_lr(step, cfg.optim, cfg.train.max_steps)
        notes.append(f"train.max_steps changed from {old_max} to {cfg.train.max_steps}: the cosine schedule is "
                     f"recomputed for {cfg.train.max_steps} steps, so the learning rate at step {step} goes from "
                     f"{before:.2e} to {after:.2e}")
    return notes


def restore(run: Run, ckpt: Path, saved: dict) -> list[str]:
    """Weights, optimizer, scaler and loop state from a checkpoint; the sampler then starts where it stopped."""
    run.state = load_training_state(ckpt, run.raw_model, run.optimizer, run.scaler, run.cfg)
    notes = check_resumable(saved, ckpt, run.cfg, run.plan)
    run.state.max_steps = run.cfg.train.max_steps
    run.loader.batch_sampler.start(run.state.epoch, run.state.cursor)
    return notes


def setup(cfg: Config, rank: int, world_size: int, device: torch.device, resume_from: Optional[Path]) -> Run:
    """Model, data, batch plan, optimizer and resumed state, on this rank; prints the start-up report on rank 0.
    The run directory is created only once all of it worked."""
    precision = run_precision(cfg, device)
    attention = configure_attention(device)
    # -- model: the same initial weights on every rank (DDP also broadcasts rank 0's at wrap time); activation
    # checkpointing (set at build) -> compile -> shard, in that order
    torch.manual_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model.path)
    with no_transformers_progress_bars():
        model = build_model(cfg, tokenizer, device)
    if cfg.train.compile:
        compile_decoder_layers(model)
    sharded = cfg.train.parallel == "fsdp" and world_size > 1
    model = shard_model(model, precision.dtype, cfg.train.fsdp_cpu_offload) if sharded else model.to(device)
    # -- data and the batch plan
    train_set = ClipDataset(cfg, "train", tokenizer, announce=rank == 0)
    val_set = ClipDataset(cfg, "val", tokenizer, announce=rank == 0) if cfg.train.eval_every else None
    plan, notes = BatchPlan.from_config(cfg, world_size), []
    if cfg.train.auto_batch:
        plan, note = auto_batch_plan(model.train(), train_set, cfg, plan, device, precision.autocast(device.type))
        notes.append(note)
    loader, sampler = make_loader(train_set, plan, cfg, rank, pin_memory=device.type == "cuda")
    # -- optimizer: trainable weights and AdamW states are fp32 whatever the compute precision
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
        eps=cfg.optim.eps, fused=device.type == "cuda",
    )
    run = Run(cfg, rank, device, precision, plan, model, model, optimizer, precision.scaler(device.type), loader,
              val_set, tokenizer, TrainState(max_steps=cfg.train.max_steps),
              flops_per_token(model, int(sum(train_set.lengths) / len(train_set.lengths))))
    if resume_from is not None:
        notes += restore(run, resume_from, read_trainer_state(resume_from))
    if world_size > 1 and not sharded:
        run.model = replicate(model, device)
    if run.master:
        report = train_set.report
        report_start(run, [
            f"precision: {precision.name} ({precision.reason}); {attention}"
            + ("; train.compile: decoder layers compiled" if cfg.train.compile else "")
            + (f"; FSDP over {world_size} ranks{' with CPU offload' if cfg.train.fsdp_cpu_offload else ''}"
               if sharded else ""),
            describe(model), f"batch: {plan.describe()} (tokens and frames per step are logged)",
            f"data: {len(train_set)} train clips ({len(report.skipped)} skipped as invalid, {len(report.dropped)} "
            f"dropped as over-length, {len(report.split_clips)} split into sub-clips), {sampler.steps_per_epoch} "
            f"steps per epoch; {len(val_set) if val_set else 0} val clips", *notes], resume_from)
    return run


def report_start(run: Run, lines: list[str], resume_from: Optional[Path]) -> None:
    """The run directory with its config.yaml, and the start-up report (rank 0)."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    (run.run_dir / "config.yaml").write_text(to_yaml(run.cfg))
    print(f"run: {run.run_dir} (resolved config in {run.run_dir / 'config.yaml'})")
    print("\n".join(lines))
    for unfinished in discard_unfinished_saves(run.run_dir):
        print(f"deleted {unfinished}: a checkpoint save that never finished (the run stopped while writing it)")
    if resume_from is not None:
        s = run.state
        print(f"resumed from {resume_from} at step {s.step} (epoch {s.epoch}, step {s.cursor} of it)")


# ----------------------------------------------------------------------------------------------------
# The loop


def train_record(run: Run, window: Window, lr: float, seconds_per_step: float) -> dict:
    """The train record of a log line (docs/training.md#train-records); counts the window's tokens as seen."""
    totals, state = window.totals(run.plan.world_size), run.state
    state.tokens_seen += int(totals.pop("tokens"))
    state.frames_seen += int(totals.pop("frames"))
    peak = peak_flops(run.device, run.precision.dtype)
    return {
        "kind": "train", "step": state.step, **totals, "lr": lr,
        "mfu": totals["tokens_per_s"] * run.flops_per_token / (peak * run.plan.world_size) if peak else None,
        "peak_mem_gb": peak_memory_gb(run.device), "rho": rho_at(run.cfg, state.step - 1), "epoch": state.epoch,
        "skipped_steps": state.skipped_steps, "eta_s": seconds_per_step * (run.cfg.train.max_steps - state.step),
    }


def vote(run: Run, loss_sum: torch.Tensor, grad_norm: torch.Tensor, stop: bool, data_error: Optional[str]) -> list:
    """The one host sync per optimizer step: [loss, grad norm, stop requests, unreadable next steps], summed over
    ranks. A skipped step must not touch weights or optimizer state, and that decision needs the host; a stop
    request and a failed read of the next step ride along, so every rank stops after the same step."""
    flags = torch.stack([loss_sum.double(), grad_norm.double().reshape(()),
                         torch.tensor(float(stop), dtype=torch.float64).to(run.device, non_blocking=True),
                         torch.tensor(float(data_error is not None), dtype=torch.float64).to(run.device, non_blocking=True)])
    return all_reduce(flags, run.plan.world_size).tolist()


def optimizer_step(run: Run, loss_sum: float, norm_sum: float, bad_in_a_row: int) -> int:
    """Step (or skip a non-finite step: weights and optimizer state untouched); returns the bad steps in a row."""
    cfg, step = run.cfg, run.state.step
    bad = not math.isfinite(loss_sum) or (not run.precision.use_scaler and not math.isfinite(norm_sum))
    if bad:
        bad_in_a_row += 1
        run.state.skipped_steps += 1
        warnings.warn(f"step {step}: non-finite loss or gradient; step skipped ({bad_in_a_row} in a row)")
        if bad_in_a_row >= cfg.train.max_bad_steps:
            raise RuntimeError(
                f"{bad_in_a_row} non-finite steps in a row (train.max_bad_steps={cfg.train.max_bad_steps}) at "
                f"step {step}: lower optim.lr, check the data with `python data.py validate`, or try fp32"
            )
        if run.precision.use_scaler:
            run.scaler.update()
    else:
        # (With fp16 the GradScaler skips overflow steps itself: routine, and not counted as bad steps.)
        run.scaler.step(run.optimizer)
        run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return 0 if not bad else bad_in_a_row


def train_loop(run: Run, logger: Logger, stop: GracefulStop) -> dict:
    """Optimizer steps until train.max_steps, a signal or an unreadable batch; returns the summary. Each step:
    forward + backward of its micro-batches, clipping, the next step's batches read, the one host sync, the
    optimizer step; then, at their cadences, the log line, validation and a checkpoint."""
    cfg, state = run.cfg, run.state
    batches = iter(run.loader)
    trainable = [p for p in run.raw_model.parameters() if p.requires_grad]
    window, run_start, start_step = Window(run.device), time.perf_counter(), state.step
    bad_in_a_row, last, checkpoint, stopped = 0, {}, None, None
    micro_batches, data_error = fetch_step(batches, run.plan, run.device)
    no_loss = torch.zeros((), device=run.device)
    if vote(run, no_loss, no_loss, False, data_error)[3]:  # the first step's read, agreed like every later one
        stopped = "data"
    run.model.train()
    while state.step < cfg.train.max_steps and stopped is None:
        lr = get_lr(state.step, cfg.optim, cfg.train.max_steps)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        step_parts, counts = forward_backward(run.model, micro_batches, cfg, run.precision.autocast(run.device.type),
                                              run.scaler)
        window.add(micro_batches, counts)
        state.epoch, state.cursor = micro_batches[-1]["epoch"], micro_batches[-1]["cursor"]
        run.scaler.unscale_(run.optimizer)
        grad_norm = clip_grad_norm_(trainable, cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf, run.device)
        # Read the next step's batches before the sync: a frame that cannot be read stops every rank after this
        # step, with its checkpoint, instead of one rank dying and the others waiting on a collective.
        done = state.step + 1 >= cfg.train.max_steps
        micro_batches, data_error = (None, None) if done else fetch_step(batches, run.plan, run.device)
        loss_sum, norm_sum, stop_votes, data_votes = vote(run, step_parts[0], grad_norm, stop.requested, data_error)
        bad_in_a_row = optimizer_step(run, loss_sum, norm_sum, bad_in_a_row)
        if bad_in_a_row == 0:
            window.add_good(step_parts, grad_norm)
        state.step += 1
        logger.bar.update(1)
        stopped = "data" if data_votes else ("signal" if stop_votes else None)
        saving = state.step % cfg.train.save_every == 0 or done or stopped is not None
        # A log line also closes every checkpoint interval, so a resumed run logs the same windows.
        if state.step % cfg.train.log_every == 0 or saving:
            last = train_record(run, window, lr, (time.perf_counter() - run_start) / (state.step - start_step))
            logger.write(last, format_train_line(last, cfg.train.max_steps))
            logger.bar.set_postfix(loss=f"{last['loss']:.3f}")
            window = Window(run.device)
        validating = run.val_set is not None and (state.step % cfg.train.eval_every == 0 or done)
        improved = False
        if validating:
            val, improved = validate(run, logger)
            last = {**last, "val": val}
            if "data_error" in val:
                data_error, stopped, saving = val["data_error"], "data", True
            elif 0 < cfg.train.early_stop_patience <= state.stale_evals:
                stopped, saving = "early", True
        if saving or improved:  # the best step gets a checkpoint for runs/<name>/best to name
            checkpoint = save(run)
            logger.write({"kind": "checkpoint", "step": state.step, "path": str(checkpoint)}, f"saved {checkpoint}")
            if run.master:
                if improved:
                    mark_best(checkpoint)
                write_training_curves(run.run_dir)  # with this checkpoint's mark
        if validating or saving:
            window.start = time.perf_counter()  # the next throughput window measures training only
    return {"step": state.step, "checkpoint": str(checkpoint) if checkpoint else None, "last": last,
            "interrupted": stop.name if stopped == "signal" else None, "stopped": stopped, "data_error": data_error}


def validate(run: Run, logger: Logger) -> tuple[dict, bool]:
    """Validation losses and head scores at this step, logged; (the record, whether train.best_metric improved:
    the best value, its step and the validations since are kept in the state)."""
    val = evaluate_loss(run.raw_model, run.val_set, run.cfg, run.precision, run.rank, run.plan.world_size)
    if "data_error" in val:
        return val, False
    record, metric = {"kind": "val", "step": run.state.step, **val}, run.cfg.train.best_metric
    improved = run.state.record_validation(scalars(record)[metric], BEST_METRICS[metric] == "min")
    logger.write(record, format_val_line(run.state.step, val))
    if run.master:
        write_training_curves(run.run_dir)
    return val, improved


def save(run: Run) -> Path:
    """Gather every rank's RNG state, let rank 0 write the checkpoint, and wait for it."""
    local = rng_state()
    gathered: list = [local]
    if run.plan.world_size > 1:
        gathered = [None] * run.plan.world_size
        dist.all_gather_object(gathered, local)
    trainer_state = {
        **dataclasses.asdict(run.state), "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
        "world_size": run.plan.world_size, "micro_batch": run.plan.micro_batch, "grad_accum": run.plan.grad_accum,
    }
    meta = CheckpointMeta(trainer_state, run.tokenizer, run.raw_model.backbone.config, gathered)
    if run.cfg.train.parallel == "fsdp":  # every rank writes its shards
        return save_sharded_checkpoint(run.run_dir, run.state.step, run.raw_model, run.optimizer, run.cfg, meta,
                                       run.cfg.train.keep_last)
    path = run.run_dir / f"step_{run.state.step}"
    if run.master:
        path = save_checkpoint(run.run_dir, run.state.step, model_state_for_checkpoint(run.raw_model, run.cfg),
                               run.optimizer, run.cfg, meta, run.cfg.train.keep_last)
    if run.plan.world_size > 1:
        dist.barrier()
    return path


# ----------------------------------------------------------------------------------------------------
# The run


def train(cfg: Config) -> dict:
    """Run (or resume) training as configured. Returns a summary (final step, last records, checkpoint, and
    `interrupted`: the signal's name when a signal stopped it; `stopped`: "signal", "data" or None)."""
    prefer_expandable_segments()
    rank, _, world_size, device = setup_distributed(cfg.train.dist_timeout_s, cfg.train.fsdp_cpu_offload)
    resume_from = agreed_resume(cfg, world_size)  # the same checkpoint on every rank (and node)
    if cfg.train.resume == "never" and list_checkpoints(cfg.run.dir):
        raise ConfigError(
            f"train.resume=never but {cfg.run.dir} already holds checkpoints; a fresh run there would rotate them "
            f"away. Choose another run.name (or run.dir), or resume with train.resume=auto"
        )
    saved_step = read_trainer_state(resume_from)["step"] if resume_from is not None else 0
    if saved_step >= cfg.train.max_steps:
        if rank == 0:
            print(f"nothing to do: {resume_from} is at step {saved_step} >= train.max_steps={cfg.train.max_steps}")
        end_distributed(world_size)
        return {"step": saved_step, "checkpoint": str(resume_from), "interrupted": None, "stopped": None}

    options = TrackerOptions(cfg.train.wandb_project, cfg.train.wandb_mode, cfg.train.wandb_run_name,
                             cfg.train.tensorboard)
    check_installed(options)  # before the run directory exists
    run = setup(cfg, rank, world_size, device, resume_from)
    trackers = Trackers(run.run_dir, options, to_dict(cfg), enabled=run.master)
    if run.master and trackers.describe():
        print(trackers.describe())
    logger = Logger(run.run_dir, run.master, trackers, cfg.train.max_steps, run.state.step)
    seed_rank(cfg.train.seed, run.rank, run.state.step, resume_from)
    stop, exit_code = GracefulStop(), 1
    stop.install()
    try:
        summary = train_loop(run, logger, stop)
        exit_code = exit_status(summary)
    finally:
        stop.restore()
        logger.close(exit_code)  # the trackers learn how the run ended, also when it failed
    if summary["data_error"] is not None:
        print(f"error: rank {rank}: {summary['data_error']}", file=sys.stderr)
    if run.master:
        print(f"training curves: {write_training_curves(run.run_dir)}")
        if summary["stopped"] == "signal":
            print(f"interrupted by {stop.name} after step {run.state.step}; saved {summary['checkpoint']}.\n"
                  f"resume with the same command: {resume_command()}")
        elif summary["stopped"] == "data":
            print(f"stopped after step {run.state.step}: a frame could not be read (the error above names the file, "
                  f"clip and frame); saved {summary['checkpoint']}. Fix or replace that frame (`python data.py "
                  f"validate CONFIG` decodes every frame), then resume with the same command: {resume_command()}")
        elif summary["stopped"] == "early":
            print(f"early stop after step {run.state.step}: {cfg.train.best_metric} has not improved for "
                  f"{run.state.stale_evals} validations (train.early_stop_patience={cfg.train.early_stop_patience})")
        if run.state.best_step is not None:
            print(f"best: step {run.state.best_step}, {cfg.train.best_metric} {run.state.best_value:.4f} "
                  f"({run.run_dir / BEST_LINK})")
    end_distributed(world_size)
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="run config YAML (e.g. configs/demo.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=200 optim.lr=1e-4")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        summary = train(cfg)
    except (ConfigError, DataError, CheckpointError, ModuleNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except dist.DistBackendError as err:
        rank = os.environ.get("RANK", "?")
        print(f"error: rank {rank}: a collective failed (did a peer or the launcher die?): {err}", file=sys.stderr)
        return 1
    return exit_status(summary)


def exit_status(summary: dict) -> int:
    """0 done (an early stop included), 75 stopped by a signal (saved), 65 unreadable data (saved)."""
    return {"signal": EXIT_INTERRUPTED, "data": EXIT_DATA_ERROR}.get(summary.get("stopped"), 0)


if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_process(code)
    sys.exit(code)
