"""Data: from clips to batches: the invalid-clip and over-length policies, the dataset, the sampler, the batch
plan, collate, and the data command line.

    python data.py make-demo --out data/demo [--seed 0] [--videos N] [--raw-frames]
    python data.py validate configs/demo.yaml            # key=value overrides allowed
    python data.py validate SPLIT.json data.root=DIR model.path=DIR data.feature_dim=F   # a split file alone
    python data.py show configs/demo.yaml --split train --index 0 [--json]
    python data.py extract-features configs/smolvlm2.yaml --out features/smolvlm2   # a VLM's tower over raw frames

What a clip is (the event-frame rule, the dialogue state) lives in clips.py, how it becomes tokens and labels in
sequence.py; this module decides which clips a run uses and how they are batched:

* `usable_clips` applies data.on_invalid_clip and data.on_overlength to a split, once, for the trainer and the
  evaluator alike (`fit_clip` is the over-length rule, shared with `validate`; `split_clip` cuts a clip into
  sub-clips that fit).
* `ClipDataset` renders and labels clips on demand; `ClipBatchSampler` hands out optimizer steps of
  `BatchPlan.clips_per_step` clips, resumable; `collate` pads and precomputes the gather rows.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

import demo
from clips import (
    Clip, DataError, FrameEvents, Problem, clip_where, event_frame, format_transitions, initial_state, load_split,
    read_split_file, state_trajectory,
)
from config import Config, ConfigError, load_config, split_files
from distributed import ignore_stop_signals
from extract import extract_features
from frames import FeatureDimError, FramePreprocessing, FrameStore, RawFrameReader
from sequence import IGNORE, Renderer, head_labels, load_tokenizer, nfs_keep, rho_at

# ----------------------------------------------------------------------------------------------------
# Usable clips: the invalid-clip and over-length policies (data.on_invalid_clip, data.on_overlength)


def frame_problem(check, clip: Clip, dim_hint: str = "") -> Optional[Problem]:
    """A frame check of one clip as a Problem, or None. `check(clip)` raises a DataError: FrameStore.check
    (every feature row read once, no copies), RawFrameReader.check (file, rows, the first frame decodes) or
    RawFrameReader.verify (every frame decodes). `dim_hint` is added to a feature-dimension mismatch (the CLI
    says there which default it used)."""
    try:
        check(clip)
    except FeatureDimError as err:
        hint = dim_hint.format(found=err.found) if dim_hint else ""
        return Problem("ERROR", clip.file, f"{err}{hint}", clip.index, clip.video_uid)
    except DataError as err:
        return Problem("ERROR", clip.file, str(err), clip.index, clip.video_uid)
    return None


def piece_bounds(clip: Clip, renderer: Renderer, max_seq_len: int) -> list[tuple[int, int]]:
    """Frame ranges [a, b) that cut `clip` into sub-clips of at most `max_seq_len` tokens each.

    Every piece repeats the prompt (with the state at its own first frame) and carries its frames' own tokens
    unchanged, so a piece's length is its prompt plus the sum of its frames' tokens. A cut before frame a
    is allowed only where
    * no turn is attached to frame a - 1: the event-frame rule clamps a turn at u = a - 1 onto the first
      frame of the piece that starts at a, so it would be attached in both pieces;
    * the state the step spans give at a (`initial_state`, which the next piece's prompt shows) equals the
      state replayed from the clip's own updates through frame a - 1, so that prompt agrees with the stream.
    Pieces are taken greedily, each as long as fits. Raises DataError (naming the frame) where no allowed cut
    fits, e.g. a single frame whose own events exceed the budget.
    """
    rendered = renderer.render(clip)
    in_frames = rendered.token_frames >= 0
    frame_tokens = np.bincount(rendered.token_frames[in_frames] - clip.start, minlength=clip.num_frames)  # (n,)
    tokens_before = np.concatenate([[0], np.cumsum(frame_tokens)])  # (n + 1,): tokens of frames [start, start + i)
    events = clip.events()
    replayed = state_trajectory(clip.initial_state(), [
        events[k].transitions if k in events else [] for k in range(clip.start, clip.end)
    ])  # state after each frame

    prompt_lengths: dict[tuple, int] = {}

    def prompt_length(first_frame: int) -> int:
        state = initial_state(clip.steps, first_frame, clip.fps)
        key = tuple(state.values())
        if key not in prompt_lengths:
            prompt_lengths[key] = len(renderer.prompt(clip.system_text, clip.steps, state))
        return prompt_lengths[key]

    def can_cut(a: int) -> bool:
        return a - 1 not in events and initial_state(clip.steps, a, clip.fps) == replayed[a - 1 - clip.start]

    bounds = []
    a = clip.start
    while a < clip.end:
        i = a - clip.start
        budget = max_seq_len - prompt_length(a)
        # The furthest boundary b such that frames [a, b) fit next to the prompt.
        last_fit = a + int(np.searchsorted(tokens_before[i + 1:] - tokens_before[i], budget, side="right"))
        if last_fit == a:
            raise DataError(
                f"frame {a} alone renders to {prompt_length(a)} prompt + {int(frame_tokens[i])} frame tokens, over "
                f"data.max_seq_len={max_seq_len}: no cut can make it fit (shorten the turns attached to frame {a}, "
                f"or raise data.max_seq_len)"
            )
        b = last_fit
        while clip.start < b < clip.end and b > a and not can_cut(b):
            b -= 1
        if b == a:
            raise DataError(
                f"no cut fits between frame {a} and frame {last_fit}: every frame boundary there follows a frame with "
                f"turns attached (a cut would attach them to both sub-clips) or a frame where the step spans disagree "
                f"with the replayed updates; raise data.max_seq_len or drop this clip (data.on_overlength=drop)"
            )
        bounds.append((a, b))
        a = b
    return bounds


def clip_pieces(clip: Clip, bounds: list[tuple[int, int]]) -> list[Clip]:
    """The sub-clips of `clip` over `bounds` (from `piece_bounds`): each a clip of its own whose initial state
    comes from the step spans at its first frame (`Clip.initial_state`) and whose turns are attached by the
    event-frame rule within its own frames. Every timed turn lands in exactly one piece, at its frame."""
    pieces = []
    for part, (a, b) in enumerate(bounds):
        turns = [t for t in clip.turns if t.frame is None]  # the leading system turn: every piece's prompt
        for turn in clip.turns:
            if turn.frame is not None and a <= turn.frame < b:
                frame = event_frame(turn.time, clip.fps, a, b)
                assert frame == turn.frame, (clip_where(clip, turn.index), a, b, frame, turn.frame)
                turns.append(dataclasses.replace(turn, frame=frame))
        pieces.append(dataclasses.replace(
            clip, start=a, end=b, turns=turns, part=part,
            file_initial_state=clip.file_initial_state if part == 0 else None,
        ))
    return pieces


def fit_clip(clip: Clip, renderer: Renderer, cfg: Config) -> tuple[int, Optional[list[Clip]], Optional[str]]:
    """What data.on_overlength makes of one clip: (its rendered tokens, the clips to train on, why there are none).

    A clip within data.max_seq_len is used as it is. Over it: under `split` its sub-clips (`piece_bounds`,
    `clip_pieces`), or why no cut fits; under `error` and `drop` none, with the reason (the caller refuses or
    drops). The one over-length rule of the trainer, the evaluator and `validate`."""
    n = len(renderer.render(clip).input_ids)
    max_len = cfg.data.max_seq_len
    if n <= max_len:
        return n, [clip], None
    over = f"renders to {n} tokens, over data.max_seq_len={max_len}"
    if cfg.data.on_overlength != "split":
        return n, None, over
    try:
        return n, clip_pieces(clip, piece_bounds(clip, renderer, max_len)), None
    except DataError as err:
        return n, None, f"{over}, and data.on_overlength=split cannot cut it: {err}"


def split_clip(clip: Clip, renderer: Renderer, max_seq_len: int) -> list[Clip]:
    """Cut an over-length clip at frame boundaries into sub-clips of at most `max_seq_len` tokens each
    (`piece_bounds`, `clip_pieces`). They keep the clip's file, index and video_uid; `part` numbers them."""
    try:
        return clip_pieces(clip, piece_bounds(clip, renderer, max_seq_len))
    except DataError as err:
        raise DataError(f"{clip_where(clip)}: {err}") from None


@dataclass
class SplitReport:
    """What `usable_clips` left out of a split or changed, so that the startup log hides nothing."""
    split: str
    # rendered tokens of each usable clip, in order (empty without a tokenizer)
    lengths: list[int] = field(default_factory=list)
    # data.on_invalid_clip=skip: clip index -> its errors
    skipped: dict[int, list[Problem]] = field(default_factory=dict)
    # data.on_overlength=drop: (clip, tokens)
    dropped: list[tuple[Clip, int]] = field(default_factory=list)
    # data.on_overlength=split: (clip, tokens, number of sub-clips)
    split_clips: list[tuple[Clip, int, int]] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = []
        for errors in self.skipped.values():
            first = errors[0]
            reasons = "; ".join(
                (f"turn {p.turn_index}: " if p.turn_index is not None else "") + p.message for p in errors
            )
            out.append(f"skipped {first.file}:clip {first.clip_index} ({first.video_uid}): {reasons}")
        if self.skipped:
            out.append(f"split '{self.split}': {len(self.skipped)} invalid clip(s) skipped (data.on_invalid_clip=skip)")
        for clip, n in self.dropped:
            out.append(f"dropped {clip_where(clip)}: renders to {n} tokens, over data.max_seq_len")
        if self.dropped:
            out.append(f"split '{self.split}': {len(self.dropped)} over-length clip(s) dropped (data.on_overlength=drop)")
        if self.split_clips:
            pieces = sum(n for _, _, n in self.split_clips)
            out.append(f"split '{self.split}': {len(self.split_clips)} over-length clip(s) cut into {pieces} sub-clips "
                       f"(data.on_overlength=split)")
        return out


def usable_clips(cfg: Config, split: str, tokenizer=None,
                 store: Optional[FrameStore] = None) -> tuple[list[Clip], SplitReport]:
    """The clips of a split that a run can use, after data.on_invalid_clip and data.on_overlength.

    Every clip is parsed and checked (schema, turns, transitions, and every row of its frames), and, with a
    tokenizer, rendered and measured. Under the `error` policies any invalid or over-length clip refuses the
    run: one DataError lists them all. `skip` leaves invalid clips out, `drop` over-length ones, `split` cuts
    over-length ones into sub-clips (`split_clip`); the report says which, for the startup log. Without a
    tokenizer the token budget is not checked. A problem with a split file itself (missing, invalid JSON)
    always refuses.
    """
    store = store if store is not None else FrameStore.from_config(cfg)
    # Raw JPEG frames are decoded when read (a clip's first frame now); feature rows are all checked now.
    start_up_check = raw_frame_reader(cfg, store).check if cfg.data.frames == "raw" else store.check
    renderer = Renderer(tokenizer, cfg.data.num_tokens_per_frame) if tokenizer is not None else None
    clips, problems = load_split(cfg, split)
    for clip in clips:
        problem = frame_problem(start_up_check, clip)
        if problem is not None:
            problems.append(problem)
    errors = [p for p in problems if p.level == "ERROR"]
    file_errors = [p for p in errors if p.clip_index is None]
    invalid: dict[int, list[Problem]] = {}  # clip index -> its errors, in clip order
    for p in sorted((p for p in errors if p.clip_index is not None), key=lambda p: p.clip_index):
        invalid.setdefault(p.clip_index, []).append(p)
    skip = cfg.data.on_invalid_clip == "skip"

    report = SplitReport(split)
    usable: list[Clip] = []
    over: list[tuple[Clip, int]] = []
    for clip in clips:
        if skip and clip.index in invalid:
            continue
        if renderer is None:
            usable.append(clip)
            continue
        n, pieces, why_not = fit_clip(clip, renderer, cfg)
        if pieces == [clip]:
            usable.append(clip)
            report.lengths.append(n)
        elif pieces is not None:
            report.split_clips.append((clip, n, len(pieces)))
            usable.extend(pieces)
            report.lengths.extend(len(renderer.render(piece).input_ids) for piece in pieces)
        elif cfg.data.on_overlength == "error":
            over.append((clip, n))
        elif cfg.data.on_overlength == "drop":
            report.dropped.append((clip, n))
        else:  # split found no cut: an invalid clip like any other, refused, or skipped under skip
            invalid.setdefault(clip.index, []).append(Problem("ERROR", clip.file, why_not, clip.index, clip.video_uid))

    refusals = []
    if file_errors:
        refusals.append("\n".join(str(p) for p in file_errors))
    if invalid and not skip:
        shown = [str(p) for ps in list(invalid.values())[:20] for p in ps]
        more = f"\n... and {len(invalid) - 20} more clip(s)" if len(invalid) > 20 else ""
        refusals.append(
            f"{len(invalid)} invalid clip(s); fix them, or set data.on_invalid_clip=skip to run on the rest:\n"
            + "\n".join(shown) + more
        )
    if over:
        listing = "; ".join(f"{clip_where(c)}: {n} tokens" for c, n in over[:10])
        more = f"; ... and {len(over) - 10} more" if len(over) > 10 else ""
        refusals.append(
            f"{len(over)} clip(s) exceed data.max_seq_len={cfg.data.max_seq_len} ({listing}{more}). Set data.on_overlength=split "
            f"to cut them into sub-clips that fit, or data.on_overlength=drop to run without them."
        )
    files = ", ".join(map(str, split_files(cfg, split)))
    if refusals:
        raise DataError(f"split '{split}' ({files}): " + "\n".join(refusals)
                        + "\n`python data.py validate CONFIG` lists every problem.")
    if skip:
        report.skipped = invalid
    if not usable:
        left_out = report.lines()
        raise DataError(f"split '{split}' ({files}) has no usable clips" + (":\n" + "\n".join(left_out) if left_out else ""))
    return usable, report


# ----------------------------------------------------------------------------------------------------
# Dataset, sampler, collate


@dataclass(frozen=True)
class ItemKey:
    """What the sampler hands the dataset: which clip, and the (epoch, rho) its labels are drawn with."""
    clip: int  # position in the dataset's clip list
    epoch: int
    rho: float
    cursor: int  # optimizer steps of this epoch done once this item's step is done (for resume)


def raw_frame_reader(cfg: Config, store: FrameStore) -> RawFrameReader:
    """data.frames=raw: decoding and resizing as the image processor of the VLM whose tower encodes the frames."""
    return RawFrameReader(store, FramePreprocessing.from_model_dir(cfg.model.vision_path or cfg.model.path))


class ClipDataset:
    """A split's usable clips (`usable_clips`: every clip and every frame row checked before the first step,
    invalid and over-length clips handled by data.on_invalid_clip and data.on_overlength); items are rendered
    and labelled on demand, features read per clip. `announce` prints what was skipped, dropped or split
    (pass False on all but one rank)."""

    def __init__(self, cfg: Config, split: str, tokenizer, announce: bool = True):
        self.cfg = cfg
        self.split = split
        self.renderer = Renderer(tokenizer, cfg.data.num_tokens_per_frame)
        self.store = FrameStore.from_config(cfg)
        self.raw_frames = raw_frame_reader(cfg, self.store) if cfg.data.frames == "raw" else None
        self.clips, self.report = usable_clips(cfg, split, tokenizer, self.store)
        self.lengths = self.report.lengths
        self.dropped = [clip for clip, _ in self.report.dropped]
        if announce:
            for line in self.report.lines():
                print(line)

    def __len__(self) -> int:
        return len(self.clips)

    def item(self, index: int, epoch: int = 0, rho: float = 1.0, with_features: bool = True) -> dict:
        """One clip rendered and labelled; `with_features=False` skips the frame read (label counting)."""
        clip = self.clips[index]
        rendered = self.renderer.render(clip)
        keep = nfs_keep(rendered.speak_events, rendered.dst_events, rho, self.cfg.train.seed, epoch, clip.nfs_key)
        speak, update = head_labels(rendered, keep)
        n_images = int((rendered.input_ids == self.renderer.image_id).sum())
        frame_inputs = {}
        if with_features and self.raw_frames is not None:
            # data.frames=raw: uint8 frames; the model's frozen vision tower makes the features on the device
            frame_inputs["frame_pixels"] = self.raw_frames.pixels(clip)  # (num_frames, S, S, 3)
            if len(frame_inputs["frame_pixels"]) * self.renderer.num_tokens_per_frame != n_images:
                raise DataError(f"{clip_where(clip)}: {len(frame_inputs['frame_pixels'])} frames for {n_images} <image> tokens")
            features = None
        elif with_features:
            # Checked at start-up; a failure now (a file changed since) raises a DataError naming the clip.
            features = self.store.features(clip)
            if features.shape[0] != n_images:
                raise DataError(f"{clip_where(clip)}: {features.shape[0]} feature rows for {n_images} <image> tokens")
        else:
            features = np.zeros((n_images, 0), dtype=np.float32)
        decision_mask = np.zeros(len(rendered.input_ids), dtype=bool)
        decision_mask[rendered.decision_positions] = True
        return {
            "input_ids": rendered.input_ids, "asst_targets": rendered.asst_targets,
            "dst_targets": rendered.dst_targets, "speak_labels": speak, "dst_labels": update,
            "decision_mask": decision_mask, "frame_features": features, "clip_index": index, **frame_inputs,
        }

    def __getitem__(self, key: ItemKey | int) -> dict:
        if isinstance(key, ItemKey):
            item = self.item(key.clip, key.epoch, key.rho)
            item["epoch"], item["cursor"] = key.epoch, key.cursor
            return item
        return self.item(key)


@dataclass(frozen=True)
class BatchPlan:
    """How an optimizer step's clips are split: `micro_batch` clips per forward pass, `grad_accum` passes per rank,
    `world_size` ranks. Their product, `clips_per_step`, is the global batch: the sampler cuts the data into steps
    of that many clips, the loss is normalised over all of them, and a checkpoint's data position counts such
    steps, so any plan with the same clips per step computes and resumes the same thing."""
    micro_batch: int
    grad_accum: int
    world_size: int = 1

    @classmethod
    def from_config(cls, cfg: Config, world_size: int) -> BatchPlan:
        return cls(cfg.train.micro_batch, cfg.train.grad_accum, world_size)

    @property
    def clips_per_rank(self) -> int:
        return self.micro_batch * self.grad_accum

    @property
    def clips_per_step(self) -> int:
        return self.world_size * self.clips_per_rank

    def with_micro_batch(self, micro_batch: int) -> BatchPlan:
        """The same clips per rank and step in micro-batches of `micro_batch` (a divisor of clips_per_rank)."""
        if self.clips_per_rank % micro_batch:
            raise ValueError(f"micro_batch {micro_batch} does not divide {self.clips_per_rank} clips per rank")
        return dataclasses.replace(self, micro_batch=micro_batch, grad_accum=self.clips_per_rank // micro_batch)

    def __str__(self) -> str:
        return f"{self.world_size}x{self.micro_batch}x{self.grad_accum}"

    def describe(self) -> str:
        return (f"{self.micro_batch} clip(s) per micro-batch x {self.grad_accum} accumulation step(s) x {self.world_size} "
                f"rank(s) = {self.clips_per_step} clips per optimizer step")


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


class ClipBatchSampler:
    """Deterministic distributed batch sampler whose position is counted in optimizer steps.

    Each epoch: a permutation seeded by (seed, epoch), optionally sorted by length within mega-batches (less
    padding, same content), cut into optimizer steps of `plan.clips_per_step` clips; with length grouping the
    steps are shuffled again (seeded) and each step's clips are sorted by length. Clip j of a step goes to
    micro-step j // (world_size x micro_batch) on rank (j // micro_batch) % world_size. Which clips make up each
    step depends only on (seed, epoch, clips_per_step), never on how a step is split over ranks and
    micro-batches: a checkpoint's position (epoch, steps done) names the same data under any plan with the same
    clips per step, and with the globally normalised loss the step is the same computation. The incomplete last
    step of an epoch is dropped, so every rank runs the same number of steps. The iterator is endless (epoch
    after epoch) and yields this rank's micro-batches; `start(epoch, cursor)` makes it begin at step `cursor` of
    `epoch` (how a checkpoint resumes). `rho_fn(epoch, step_in_epoch)` gives the NFS rate of a step's
    micro-batches.
    """

    def __init__(self, lengths: list[int], plan: BatchPlan, rank: int = 0, seed: int = 0,
                 length_grouping: bool = True, rho_fn=None, mega_batch_factor: int = 32):
        self.lengths = list(lengths)
        self.plan = plan
        self.rank = rank
        self.seed = seed
        self.length_grouping = length_grouping
        self.rho_fn = rho_fn or (lambda epoch, step: 1.0)
        self.mega = plan.clips_per_step * mega_batch_factor
        if len(self.lengths) < plan.clips_per_step:
            raise DataError(
                f"{len(self.lengths)} clips cannot fill one optimizer step of {plan.clips_per_step} clips "
                f"({plan.world_size} rank(s) x micro_batch {plan.micro_batch} x grad_accum {plan.grad_accum})"
            )
        self.steps_per_epoch = len(self.lengths) // plan.clips_per_step
        self.epoch, self.cursor = 0, 0

    def start(self, epoch: int, cursor: int) -> None:
        self.epoch, self.cursor = epoch, cursor

    def epoch_steps(self, epoch: int) -> list[list[int]]:
        """The epoch's optimizer steps, each the list of its `clips_per_step` clip positions (all ranks)."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.lengths)).tolist()
        if self.length_grouping:
            chunks = [order[i:i + self.mega] for i in range(0, len(order), self.mega)]
            order = [i for chunk in chunks for i in sorted(chunk, key=lambda j: -self.lengths[j])]
        n = self.plan.clips_per_step
        steps = [order[s * n:(s + 1) * n] for s in range(self.steps_per_epoch)]
        if self.length_grouping:
            # Sorting put the longest steps first in every mega-batch; shuffle the steps (same on all ranks).
            perm = np.random.default_rng([self.seed, epoch, 1]).permutation(len(steps))
            steps = [sorted(steps[i], key=lambda j: -self.lengths[j]) for i in perm]
        return steps

    def step_micro_batches(self, step: list[int]) -> list[list[int]]:
        """This rank's micro-batches of one step, in micro-step order."""
        mb, world = self.plan.micro_batch, self.plan.world_size
        return [step[(i * world + self.rank) * mb:(i * world + self.rank + 1) * mb] for i in range(self.plan.grad_accum)]

    def __iter__(self) -> Iterator[list[ItemKey]]:
        epoch, cursor = self.epoch, self.cursor
        while True:
            steps = self.epoch_steps(epoch)
            while cursor < len(steps):
                rho = self.rho_fn(epoch, cursor)
                for micro_batch in self.step_micro_batches(steps[cursor]):
                    yield [ItemKey(i, epoch, rho, cursor + 1) for i in micro_batch]
                cursor += 1
            epoch, cursor = epoch + 1, 0

    def __len__(self) -> int:
        return self.steps_per_epoch * self.plan.grad_accum


def collate(items: list[dict], pad_id: int, pad_to_multiple: int = 1) -> dict:
    """Right-pad with the distinct pad id (up to a multiple of `pad_to_multiple`: fewer distinct shapes for a
    compiled model); frame features concatenated in row-major (b, t) order."""
    longest = max(len(it["input_ids"]) for it in items)
    T = -(-longest // pad_to_multiple) * pad_to_multiple
    B = len(items)

    def pad(key: str, value: int, dtype) -> torch.Tensor:
        out = np.full((B, T), value, dtype=dtype)
        for b, it in enumerate(items):
            out[b, :len(it[key])] = it[key]
        return torch.from_numpy(out)

    attention = np.zeros((B, T), dtype=np.int64)
    for b, it in enumerate(items):
        attention[b, :len(it["input_ids"])] = 1
    batch = {
        "input_ids": pad("input_ids", pad_id, np.int64),
        "attention_mask": torch.from_numpy(attention),
        "asst_targets": pad("asst_targets", IGNORE, np.int64),
        "dst_targets": pad("dst_targets", IGNORE, np.int64),
        "speak_labels": pad("speak_labels", IGNORE, np.int64),
        "dst_labels": pad("dst_labels", IGNORE, np.int64),
        "decision_mask": pad("decision_mask", False, bool),
        "frame_features": (torch.from_numpy(np.concatenate([it["frame_features"] for it in items], axis=0))
                           if items[0]["frame_features"] is not None else None),
        "clip_index": torch.tensor([it["clip_index"] for it in items], dtype=torch.int64),
    }
    if "frame_pixels" in items[0]:  # data.frames=raw: (total frames, S, S, 3) uint8 in (b, frame) order
        batch["frame_pixels"] = torch.from_numpy(np.concatenate([it["frame_pixels"] for it in items], axis=0))
    # Flat (b * T + t) positions of text targets, head labels and decision positions, ascending (the order
    # of boolean-mask indexing). Computed here, on the CPU in a loader worker, so the model can gather
    # hidden states without asking the GPU how many positions there are (a host sync per micro-step).
    text = (batch["asst_targets"] != IGNORE) | (batch["dst_targets"] != IGNORE)
    heads = (batch["speak_labels"] != IGNORE) | (batch["dst_labels"] != IGNORE)
    batch["text_rows"] = torch.from_numpy(np.flatnonzero(text.numpy().reshape(-1)))
    # The next-token target of each text row (a row is in an assistant block or a DST block, never both).
    combined = torch.where(batch["asst_targets"] != IGNORE, batch["asst_targets"], batch["dst_targets"])
    batch["text_targets"] = combined.reshape(-1)[batch["text_rows"]]  # (n_text,)
    batch["head_rows"] = torch.from_numpy(np.flatnonzero(heads.numpy().reshape(-1)))
    batch["decision_rows"] = torch.from_numpy(np.flatnonzero(batch["decision_mask"].numpy().reshape(-1)))
    if "epoch" in items[0]:
        batch["epoch"] = items[0]["epoch"]
        batch["cursor"] = items[0]["cursor"]
    return batch


def make_loader(train_set: ClipDataset, plan: BatchPlan, cfg: Config, rank: int,
                pin_memory: bool) -> tuple[DataLoader, ClipBatchSampler]:
    """The training DataLoader of this rank: the resumable step sampler, collate in `data.num_workers` workers."""
    sampler = ClipBatchSampler(train_set.lengths, plan, rank, cfg.train.seed, cfg.data.length_grouping)
    # The NFS rate of a step follows from the step's position in the data stream, not from the loop's counter:
    # loader prefetching must not change which rho a batch gets (exact resume).
    sampler.rho_fn = lambda epoch, step: rho_at(cfg, epoch * sampler.steps_per_epoch + step)
    loader = DataLoader(
        train_set, batch_sampler=sampler, collate_fn=Collator(train_set.renderer.pad_id, cfg.data.pad_to_multiple),
        num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0,
        pin_memory=pin_memory, worker_init_fn=ignore_stop_signals,
        # A private generator: worker seeding must not consume the global RNG, or a resumed run would
        # draw different dropout masks from an uninterrupted one.
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )
    return loader, sampler


def model_inputs(batch: dict, all_frames: bool = False) -> dict:
    """The model's view of a collated batch: which positions need the LM head and which the decision heads.

    The positions come as flat row indices precomputed by `collate` (no host sync in the forward), and the text
    targets with them, so the model fuses the LM head with the cross-entropy. Right padding needs no attention
    mask (attention is causal). `all_frames` reads the heads at every decision position (validation, streaming
    comparisons) instead of the NFS-kept ones."""
    return dict(
        input_ids=batch["input_ids"], frame_features=batch["frame_features"], frame_pixels=batch.get("frame_pixels"),
        text_rows=batch["text_rows"],
        head_rows=batch["decision_rows"] if all_frames else batch["head_rows"], text_targets=batch["text_targets"],
    )


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class Collator:
    """Picklable collate_fn for DataLoader workers."""

    def __init__(self, pad_id: int, pad_to_multiple: int = 1):
        self.pad_id = pad_id
        self.pad_to_multiple = pad_to_multiple

    def __call__(self, items: list[dict]) -> dict:
        return collate(items, self.pad_id, self.pad_to_multiple)


# ----------------------------------------------------------------------------------------------------
# Validation


def validate(cfg: Config, splits: list[str], tokenizer=None, check_frames: bool = True,
             dim_hint: str = "") -> list[Problem]:
    """Every problem of the given splits, in one pass: schema, roles, times, transitions, frames (every row),
    tokens. data.on_invalid_clip does not apply here: every invalid clip is reported, so the exit status says
    whether the data is clean. An over-length clip is an error, unless data.on_overlength=split can cut it
    (then a warning saying into how many sub-clips)."""
    problems: list[Problem] = []
    store = FrameStore.from_config(cfg)
    raw_frames = raw_frame_reader(cfg, store) if cfg.data.frames == "raw" else None
    # Validation reads everything: every feature row, or every raw frame decoded.
    check = raw_frames.verify if raw_frames is not None else store.check
    renderer = Renderer(tokenizer, cfg.data.num_tokens_per_frame) if tokenizer is not None else None
    for split in splits:
        clips, split_problems = load_split(cfg, split)
        problems.extend(split_problems)
        for clip in clips:
            problem = frame_problem(check, clip, dim_hint) if check_frames else None
            if problem is not None:
                problems.append(problem)
            if renderer is None:
                continue
            n, pieces, why_not = fit_clip(clip, renderer, cfg)
            if pieces is None:
                problems.append(Problem("ERROR", clip.file, f"clip {why_not}", clip.index, clip.video_uid))
            elif pieces != [clip]:
                problems.append(Problem("WARNING", clip.file, f"clip renders to {n} tokens, over data.max_seq_len="
                                        f"{cfg.data.max_seq_len}; data.on_overlength=split cuts it into {len(pieces)} "
                                        f"sub-clips", clip.index, clip.video_uid))
    return problems


# ----------------------------------------------------------------------------------------------------
# CLI


@dataclass
class ValidationTarget:
    """What `data.py validate` checks for one command-line target, and what it could not check and why."""
    cfg: Config
    splits: list[str]
    notes: list[str]  # printed to stderr: defaults used, checks skipped and the fix
    check_frames: bool = True
    check_tokens: bool = True
    dim_hint: str = ""  # added to a feature-dimension error when data.feature_dim is a default nobody chose


def validation_target(target: str, overrides: list[str]) -> ValidationTarget:
    """A config file gives its splits. A split file is validated alone: data.root, model.path and
    data.feature_dim come from the command line; otherwise the defaults are used where they exist, and the
    notes say which were used, or what could not be checked and how to fix it."""
    given = {o.split("=", 1)[0].strip() for o in overrides}
    if target.endswith((".yaml", ".yml")):
        cfg = load_config(target, overrides)
        found = ValidationTarget(cfg, [s for s in ("train", "val", "test") if getattr(cfg.data, s)], [])
    else:
        defaults = Config()
        cfg = load_config(None, [f"data.train={json.dumps(str(Path(target).resolve()))}", *overrides])
        found = ValidationTarget(cfg, ["train"], [])
        needs_root = "data.features_path" not in given or "{root}" in cfg.data.features_path
        if needs_root and "data.root" not in given:
            if Path(defaults.data.root).is_dir():
                found.notes.append(f"{target}: data.root not given; frames resolved against the default "
                                   f"data.root={defaults.data.root}")
            else:
                found.check_frames = False
                found.notes.append(f"{target}: frames not checked: data.root not given and the default "
                                   f"'{defaults.data.root}' does not exist; pass data.root=DIR (frames_file paths "
                                   f"are relative to it)")
        if "model.path" not in given:
            if Path(defaults.model.path).is_dir():
                found.notes.append(f"{target}: model.path not given; token lengths measured with the default "
                                   f"model.path={defaults.model.path} (the demo tokenizer); pass model.path=DIR "
                                   f"to measure them with your model's tokenizer")
            else:
                found.check_tokens = False
                found.notes.append(f"{target}: token lengths not checked: model.path not given and the default "
                                   f"'{defaults.model.path}' does not exist; pass model.path=DIR (the model's "
                                   f"tokenizer directory)")
        if "data.feature_dim" not in given:
            found.dim_hint = (f" (data.feature_dim={defaults.data.feature_dim} is the default, as no config was "
                              f"given: pass data.feature_dim={{found}}, or validate with the run's config file)")
    if found.check_tokens and not Path(cfg.model.path).is_dir():
        found.check_tokens = False
        found.notes.append(f"{target}: token lengths not checked: model.path '{cfg.model.path}' is not a "
                           f"directory; pass model.path=DIR (the model's tokenizer directory)")
    return found


def cmd_validate(args) -> int:
    problems: list[Problem] = []
    clips_checked = 0
    unchecked: set[str] = set()
    for target in args.targets:
        found = validation_target(target, args.overrides)
        for note in found.notes:
            print(f"note: {note}", file=sys.stderr)
        tokenizer = load_tokenizer(found.cfg.model.path) if found.check_tokens else None
        if not found.check_frames:
            unchecked.add("frames")
        if not found.check_tokens:
            unchecked.add("token lengths")
        problems.extend(validate(found.cfg, found.splits, tokenizer, found.check_frames, found.dim_hint))
        for split in found.splits:
            for path in split_files(found.cfg, split):
                if path.is_file():
                    raws = read_split_file(path, [])
                    clips_checked += len(raws)
    for p in problems:
        print(p)
    errors = sum(p.level == "ERROR" for p in problems)
    warnings = sum(p.level == "WARNING" for p in problems)
    not_checked = f"; not checked: {', '.join(sorted(unchecked))} (see the notes above)" if unchecked else ""
    print(f"validated {clips_checked} clip(s): {errors} error(s), {warnings} warning(s){not_checked}")
    return 1 if errors else 0


def cmd_show(args) -> int:
    cfg = load_config(args.config, args.overrides)
    tokenizer = load_tokenizer(cfg.model.path)
    clips, problems = load_split(cfg, args.split)
    errors = [p for p in problems if p.level == "ERROR"]
    for p in errors:
        print(p, file=sys.stderr)
    if not 0 <= args.index < len(clips):
        print(f"--index {args.index} is out of range: split '{args.split}' has {len(clips)} valid clips", file=sys.stderr)
        return 1
    clip = clips[args.index]
    renderer = Renderer(tokenizer, cfg.data.num_tokens_per_frame)
    rendered = renderer.render(clip)
    speak, update = head_labels(rendered, np.ones(clip.num_frames, dtype=bool))
    if args.json:
        frames = []
        for i, k in enumerate(range(clip.start, clip.end)):
            ev = rendered.frame_texts.get(k, FrameEvents())
            frames.append({
                "frame": k, "time": k / clip.fps, "decision_position": int(rendered.decision_positions[i]),
                "speak_label": int(rendered.speak_events[i]), "dst_label": int(rendered.dst_events[i]),
                "user_text": " ".join(ev.user_texts) if ev.user_texts else None,
                "dst_text": format_transitions(ev.transitions) if ev.transitions else None,
                "asst_text": " ".join(ev.asst_texts) if ev.asst_texts else None,
            })
        print(json.dumps({"num_tokens": int(len(rendered.input_ids)), "frames": frames}))
        return 0
    print(f"# {clip_where(clip)}  frames [{clip.start}, {clip.end})  {len(rendered.input_ids)} tokens")
    print(f"# initial state: {clip.initial_state()}")
    print(f"{'pos':>6} {'frame':>6} {'token':<24} {'speak':>5} {'dst':>4}  target")
    for pos, tok in enumerate(rendered.input_ids.tolist()):
        target = rendered.asst_targets[pos] if rendered.asst_targets[pos] != IGNORE else rendered.dst_targets[pos]
        kind = "asst" if rendered.asst_targets[pos] != IGNORE else ("dst" if rendered.dst_targets[pos] != IGNORE else "")
        target_text = f"{kind}:{tokenizer.decode([int(target)])!r}" if kind else ""
        s = "" if speak[pos] == IGNORE else str(speak[pos])
        d = "" if update[pos] == IGNORE else str(update[pos])
        frame = "" if rendered.token_frames[pos] < 0 else str(rendered.token_frames[pos])
        print(f"{pos:>6} {frame:>6} {tokenizer.decode([tok])!r:<24} {s:>5} {d:>4}  {target_text}")
    return 0


def cmd_make_demo(args) -> int:
    summary = demo.make_demo(args.out, seed=args.seed, num_videos=args.videos, raw_frames=args.raw_frames,
                             frame_size=args.frame_size)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_extract_features(args) -> int:
    cfg = load_config(args.config, args.overrides)
    summary = extract_features(cfg, args.out, frames_path=args.frames, device=args.device, num_workers=args.workers)
    print(json.dumps(summary, indent=2))
    print(f"train on them with: data.frames=features data.features_path={summary['features_path']} "
          f"data.feature_dim={summary['feature_dim']}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make-demo", help="write the demo dataset, tokenizer and tiny model config")
    p.add_argument("--out", default="data/demo", help="output directory (default data/demo)")
    p.add_argument("--seed", type=int, default=0, help="generation seed (same seed, same bytes)")
    p.add_argument("--videos", type=int, default=None, help="number of training videos (val/test scale with it)")
    p.add_argument("--raw-frames", action="store_true",
                   help="also write the frames as base64 JPEG rows (frames/<video_uid>.arrow, needs Pillow) and point "
                        "frames_file at them; the features stay in features/ (data.features_path)")
    p.add_argument("--frame-size", type=int, default=32, help="side of the --raw-frames images in pixels (default 32)")
    p = sub.add_parser("extract-features", help="encode every clip's raw frames with a VLM's frozen vision tower "
                                                "into per-video feature files (resumable)")
    p.add_argument("config", help="config YAML: its splits, model.vision_path or model.path (the VLM), train.precision")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument("--out", required=True, help="output directory; files go to OUT/<dataset>/<video_uid>.arrow")
    p.add_argument("--frames", default="", help="template of the raw-frame files, with data.features_path's fields "
                                                "(default: each clip's frames_file)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--workers", type=int, default=2, help="JPEG decoding worker processes (default 2)")
    p = sub.add_parser("validate", help="check clips; one line per problem; exit 1 on any error")
    p.add_argument("targets", nargs="+", help="config YAML or split JSON files and key=value overrides (anything "
                   "with '='); a split file alone takes data.root, model.path and data.feature_dim from them")
    p = sub.add_parser("show", help="print one clip's rendered sequence with every label stream")
    p.add_argument("config", help="config YAML")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument("--split", default="train", choices=("train", "val", "test"))
    p.add_argument("--index", type=int, default=0, help="clip position in the split")
    p.add_argument("--json", action="store_true", help="one JSON object with per-frame labels and texts")
    args = parser.parse_args(argv)
    try:
        if args.command == "validate":
            # key=value is an override whatever it ends with (data.train=foo.json); the rest are files.
            args.overrides = [t for t in args.targets if "=" in t]
            args.targets = [t for t in args.targets if "=" not in t]
            return cmd_validate(args)
        if args.command == "show":
            return cmd_show(args)
        if args.command == "extract-features":
            return cmd_extract_features(args)
        return cmd_make_demo(args)
    except (ConfigError, DataError, ModuleNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `python data.py show ... | head` ends quietly
    sys.exit(main())
