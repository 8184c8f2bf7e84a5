"""Data: clip parsing and validation, frame features, the sequence builder, labels, sampler, CLI.

    python data.py make-demo --out data/demo [--seed 0] [--videos N] [--raw-frames]
    python data.py validate configs/demo.yaml            # or a split file; key=value overrides allowed
    python data.py show configs/demo.yaml --split train --index 0 [--json]
    python data.py extract-features configs/smolvlm2.yaml --out features/smolvlm2   # a VLM's tower over raw frames

Everything that decides what the model is trained on lives here, once:

* `event_frame` is the one event-frame rule (SPEC §4.2); the renderer, the labels, the evaluator's
  references and the reports all call it.
* `initial_state` recomputes a clip's starting state from the schema spans (SPEC §4.3); the file's
  `initial_dst_state` is only compared against it.
* `Renderer` turns a clip into tokens piece by piece (SPEC §4.4); streaming inference feeds the same
  pieces one at a time, so training and inference see the same sequence.
* `nfs_labels` draws the negative-frame sub-sample from (seed, epoch, clip index) (SPEC §4.5).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from config import Config, ConfigError, load_config, split_files
from frames import DataError, FramePreprocessing, FrameStore, RawFrameReader

SPECIAL_TOKENS = ("<image>", "[USER]", "[DST]", "[ASST]")
PAD_TOKEN = "<pad>"
ROLES = ("system", "user", "assistant", "DST_UPDATE")
STATES = ("not_started", "in_progress", "completed")
TRANSITIONS = {"start": ("not_started", "in_progress"), "complete": ("in_progress", "completed")}
IGNORE = -100


# ----------------------------------------------------------------------------------------------------
# Errors


@dataclass
class Problem:
    level: str  # ERROR | WARNING
    file: str
    message: str
    clip_index: Optional[int] = None
    video_uid: Optional[str] = None
    turn_index: Optional[int] = None

    def __str__(self) -> str:
        where = self.file
        if self.clip_index is not None:
            where += f":clip {self.clip_index} ({self.video_uid})"
        if self.turn_index is not None:
            where += f":turn {self.turn_index}"
        return f"{self.level} {where}: {self.message}"


def clip_where(clip: "Clip", turn_index: Optional[int] = None) -> str:
    where = f"{clip.file}:clip {clip.index} ({clip.video_uid})"
    return where + (f":turn {turn_index}" if turn_index is not None else "")


# ----------------------------------------------------------------------------------------------------
# The event-frame rule (SPEC §4.2) and the dialogue state (SPEC §4.3)


def unclamped_frame(time: float, fps: float) -> int:
    """u(t): the last frame fully shown before time t (frame k shows time k / fps)."""
    return math.floor(time * fps + 1e-6) - 1


def event_frame(time: float, fps: float, start_frame_idx: int, end_frame_idx: int) -> int:
    """k(t): the frame a turn at time t is attached to. The model has seen frames up to and including k(t).

    The clamp only absorbs a turn at the very start of the clip (u = start - 1); anything further
    outside is a validation error, never silently moved.
    """
    u = unclamped_frame(time, fps)
    if not (start_frame_idx - 1 <= u <= end_frame_idx - 1):
        raise DataError(
            f"time {time} s (frame {u} at {fps} fps) is outside the clip's frames "
            f"[{start_frame_idx}, {end_frame_idx})"
        )
    return max(u, start_frame_idx)


def initial_state(steps: list["Step"], start_frame_idx: int, fps: float) -> dict[str, str]:
    """The state at the clip start, from the schema spans alone (events with u >= start - 1 are in the clip)."""
    s = start_frame_idx - 1
    state = {}
    for step in steps:
        if unclamped_frame(step.end_ts, fps) < s:
            state[step.id] = "completed"
        elif unclamped_frame(step.start_ts, fps) < s:
            state[step.id] = "in_progress"
        else:
            state[step.id] = "not_started"
    return state


def apply_transition(state: dict[str, str], step_id: str, transition: str) -> Optional[str]:
    """Apply one transition in place; returns why it is illegal (state unchanged) or None."""
    if step_id not in state:
        return f"unknown step id '{step_id}'"
    if transition not in TRANSITIONS:
        return f"unknown transition '{transition}' (start or complete)"
    before, after = TRANSITIONS[transition]
    if state[step_id] != before:
        return f"illegal transition {step_id}->{transition}: {step_id} is {state[step_id]}, not {before}"
    state[step_id] = after
    return None


def format_transitions(transitions: list[tuple[str, str]]) -> str:
    return ", ".join(f"{step_id}->{transition}" for step_id, transition in transitions)


_TRANSITION_RE = re.compile(r"^\s*(\S+?)\s*->\s*(\w+)\s*$")


def parse_transitions(text: str) -> Optional[list[tuple[str, str]]]:
    """Inverse of `format_transitions`; None if any item is unparsable."""
    items = []
    for part in text.split(","):
        match = _TRANSITION_RE.match(part)
        if match is None:
            return None
        items.append((match.group(1), match.group(2)))
    return items or None


# ----------------------------------------------------------------------------------------------------
# Clips


@dataclass
class Step:
    id: str
    name: str
    start_ts: float
    end_ts: float


@dataclass
class Turn:
    index: int  # position in the clip's conversation list
    role: str
    content: Any  # str, or a list of (step_id, transition) for DST_UPDATE
    time: Optional[float]
    frame: Optional[int]  # event_frame(time), None for the leading system turn


@dataclass
class FrameEvents:
    user_texts: list[str] = field(default_factory=list)  # user turns and later system turns (input only)
    transitions: list[tuple[str, str]] = field(default_factory=list)  # all DST_UPDATE items, in turn order
    asst_texts: list[str] = field(default_factory=list)  # assistant turns, joined with a space when rendered


@dataclass
class Clip:
    file: str  # split file it came from
    index: int  # position in the split (across all the split's files); seeds NFS
    video_uid: str
    clip_idx: int
    dataset: str
    frames_path: Path  # resolved features/frames file
    start: int  # start_frame_idx
    end: int  # end_frame_idx (exclusive)
    fps: float
    steps: list[Step]
    system_text: str
    turns: list[Turn]
    file_initial_state: Optional[dict]
    extra: dict = field(default_factory=dict)  # max_seq_len, num_tokens_per_img as written in the file

    @property
    def num_frames(self) -> int:
        return self.end - self.start

    def initial_state(self) -> dict[str, str]:
        return initial_state(self.steps, self.start, self.fps)

    def events(self) -> dict[int, FrameEvents]:
        return group_turns(self.turns)


def group_turns(turns: list[Turn]) -> dict[int, FrameEvents]:
    """Timed turns grouped by the frame they are attached to, in list order; nothing overwrites anything."""
    by_frame: dict[int, FrameEvents] = {}
    for turn in turns:
        if turn.frame is None:
            continue
        ev = by_frame.setdefault(turn.frame, FrameEvents())
        if turn.role in ("user", "system"):
            ev.user_texts.append(turn.content)
        elif turn.role == "DST_UPDATE":
            ev.transitions.extend(turn.content)
        elif turn.role == "assistant":
            ev.asst_texts.append(turn.content)
    return by_frame


def state_trajectory(initial: dict[str, str], transitions_per_frame) -> list[dict[str, str]]:
    """The state after each frame: `initial` plus the legal transitions of that frame and all before it
    (SPEC §4.3). Illegal transitions leave the state unchanged (validation rejects them in the data)."""
    state, states = dict(initial), []
    for transitions in transitions_per_frame:
        for step_id, transition in transitions:
            apply_transition(state, step_id, transition)
        states.append(dict(state))
    return states


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def resolve_frames_path(raw: dict, cfg: Config) -> Path:
    if cfg.data.features_path:
        fields = {
            "root": cfg.data.root,
            "dataset": raw.get("dataset", ""),
            "video_uid": raw.get("video_uid", ""),
            "clip_idx": raw.get("clip_idx", ""),
            "id": raw.get("id", ""),
        }
        try:
            return Path(cfg.data.features_path.format(**fields))
        except KeyError as err:
            raise ConfigError(
                f"data.features_path: unknown field {err} (fields: root, dataset, video_uid, clip_idx, id)"
            ) from None
    path = Path(raw["frames_file"])
    return path if path.is_absolute() else Path(cfg.data.root) / path


def parse_clip(raw: Any, file: str, index: int, cfg: Config) -> tuple[Optional[Clip], list[Problem]]:
    """Parse and check one clip object. Returns (clip or None, problems); reports everything in one pass."""
    problems: list[Problem] = []
    uid = raw.get("video_uid") if isinstance(raw, dict) else None

    def error(message: str, turn: Optional[int] = None) -> None:
        problems.append(Problem("ERROR", file, message, index, uid, turn))

    def warning(message: str, turn: Optional[int] = None) -> None:
        problems.append(Problem("WARNING", file, message, index, uid, turn))

    if not isinstance(raw, dict):
        error(f"clip must be a JSON object, got {type(raw).__name__}")
        return None, problems
    required = {
        "video_uid": str, "start_frame_idx": int, "end_frame_idx": int, "fps": (int, float),
        "dst": list, "conversation": list,
    }
    if not cfg.data.features_path:
        required["frames_file"] = str
    for key, tp in required.items():
        if key not in raw:
            error(f"missing required field '{key}'")
        elif not isinstance(raw[key], tp) or isinstance(raw[key], bool):
            error(f"field '{key}' must be {getattr(tp, '__name__', 'a number')}, got {type(raw[key]).__name__}")
    if problems:
        return None, problems
    start, end, fps = raw["start_frame_idx"], raw["end_frame_idx"], float(raw["fps"])
    if start < 0 or end <= start:
        error(f"frame range [{start}, {end}) is empty or negative")
    if fps <= 0:
        error(f"fps must be positive, got {fps}")
    I = raw.get("num_tokens_per_img")
    if I is not None and I != cfg.data.num_tokens_per_frame:
        warning(
            f"num_tokens_per_img is {I} in the file but data.num_tokens_per_frame is "
            f"{cfg.data.num_tokens_per_frame}; the config is used"
        )

    steps: list[Step] = []
    for s_i, step in enumerate(raw["dst"]):
        if not isinstance(step, dict) or not isinstance(step.get("id"), str) or not isinstance(step.get("name"), str):
            error(f"dst[{s_i}] must be an object with string 'id' and 'name'")
            continue
        if not _is_number(step.get("start_ts")) or not _is_number(step.get("end_ts")):
            error(f"dst[{s_i}] ({step['id']}) needs numeric start_ts and end_ts")
            continue
        if step["end_ts"] < step["start_ts"]:
            error(f"dst[{s_i}] ({step['id']}) ends before it starts ({step['start_ts']} > {step['end_ts']})")
        steps.append(Step(step["id"], step["name"], float(step["start_ts"]), float(step["end_ts"])))
    if not raw["dst"]:
        error("dst (the task's step list) is empty")
    ids = [s.id for s in steps]
    if len(set(ids)) != len(ids):
        error(f"duplicate step ids in dst: {ids}")
    if problems and any(p.level == "ERROR" for p in problems):
        return None, problems

    conversation = raw["conversation"]
    if not conversation:
        error("empty conversation")
        return None, problems
    turns: list[Turn] = []
    system_text = cfg.data.default_system_prompt
    for t_i, turn in enumerate(conversation):
        if not isinstance(turn, dict):
            error(f"turn must be an object, got {type(turn).__name__}", t_i)
            continue
        role = turn.get("role")
        if role not in ROLES:
            error(f"unknown role {role!r} (one of {', '.join(ROLES)})", t_i)
            continue
        content = turn.get("content")
        time = turn.get("time")
        leading_system = role == "system" and t_i == 0
        if leading_system:
            if not isinstance(content, str):
                error("system content must be a string", t_i)
                continue
            system_text = content
            turns.append(Turn(t_i, role, content, None, None))
            continue
        if not _is_number(time):
            error(f"turn needs a numeric 'time' in seconds, got {time!r}", t_i)
            continue
        try:
            frame = event_frame(float(time), fps, start, end)
        except DataError as err:
            error(str(err), t_i)
            continue
        if role == "DST_UPDATE":
            if not isinstance(content, list) or not content or not all(
                isinstance(c, dict) and isinstance(c.get("id"), str) and isinstance(c.get("transition"), str)
                for c in content
            ):
                error('DST_UPDATE content must be a non-empty list of {"id": "S1", "transition": "start"|"complete"}', t_i)
                continue
            items = [(c["id"], c["transition"]) for c in content]
            bad = [f"{s}->{t}" for s, t in items if t not in TRANSITIONS]
            if bad:
                error(f"unknown transition name in {', '.join(bad)} (start or complete)", t_i)
                continue
            unknown = [s for s, _ in items if s not in ids]
            if unknown:
                error(f"unknown step id {', '.join(unknown)} (the schema has {', '.join(ids)})", t_i)
                continue
            turns.append(Turn(t_i, role, items, float(time), frame))
        else:
            if not isinstance(content, str):
                error(f"{role} content must be a string, got {type(content).__name__}", t_i)
                continue
            turns.append(Turn(t_i, role, content, float(time), frame))
    if not any(t.frame is not None for t in turns) and not problems:
        error("conversation has no timed turns (nothing to learn from)")

    try:
        frames_path = resolve_frames_path(raw, cfg)
    except ConfigError as err:
        error(str(err))
        return None, problems
    clip = Clip(
        file=file, index=index, video_uid=raw["video_uid"], clip_idx=int(raw.get("clip_idx", 0)),
        dataset=str(raw.get("dataset", "")), frames_path=frames_path, start=start, end=end, fps=fps,
        steps=steps, system_text=system_text, turns=turns,
        file_initial_state=raw.get("initial_dst_state"),
        extra={k: raw[k] for k in ("max_seq_len", "num_tokens_per_img") if k in raw},
    )

    # Replay the updates in time order (turn order within a frame) from the recomputed initial state.
    state = clip.initial_state()
    for turn in sorted((t for t in turns if t.role == "DST_UPDATE"), key=lambda t: (t.frame, t.index)):
        for step_id, transition in turn.content:
            why = apply_transition(state, step_id, transition)
            if why is not None:
                error(f"{why} at frame {turn.frame} (state replayed from the clip's initial state)", turn.index)
    if isinstance(clip.file_initial_state, dict):
        computed = clip.initial_state()
        diffs = [
            f"{k}: file says {clip.file_initial_state.get(k)}, spans say {v}"
            for k, v in computed.items() if clip.file_initial_state.get(k, "not_started") != v
        ]
        if diffs:
            warning(
                f"initial_dst_state disagrees with the schema spans on {len(diffs)} step(s) "
                f"(e.g. {'; '.join(diffs[:3])}); the spans are used"
            )
    if any(p.level == "ERROR" for p in problems):
        return None, problems
    return clip, problems


def load_split(cfg: Config, split: str) -> tuple[list[Clip], list[Problem]]:
    """All clips of a split (several files allowed), indexed consecutively across files."""
    clips: list[Clip] = []
    problems: list[Problem] = []
    index = 0
    for path in split_files(cfg, split):
        raws = read_split_file(path, problems)
        for raw in raws:
            clip, clip_problems = parse_clip(raw, str(path), index, cfg)
            problems.extend(clip_problems)
            if clip is not None:
                clips.append(clip)
            index += 1
    return clips, problems


def read_split_file(path: Path, problems: list[Problem]) -> list:
    if not path.is_file():
        problems.append(Problem("ERROR", str(path), "split file not found"))
        return []
    try:
        raws = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        problems.append(Problem("ERROR", str(path), f"invalid JSON: {err}"))
        return []
    if isinstance(raws, dict):  # a single clip object, like the shared sample file
        raws = [raws]
    if not isinstance(raws, list):
        problems.append(Problem("ERROR", str(path), f"a split file holds a list of clips, got {type(raws).__name__}"))
        return []
    return raws


# ----------------------------------------------------------------------------------------------------
# Tokenizer and the sequence layout (SPEC §4.4)


def load_tokenizer(path):
    """The model directory's tokenizer with the project's special tokens added.

    A distinct <pad> is added when the tokenizer has none or when pad == eos: with pad == eos the
    collator's padding mask would also hide every real EOS, and the model would never learn to stop.
    """
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise ConfigError(f"model.path '{path}' is not a directory (it needs config.json and the tokenizer files)")
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"{path}: tokenizer has no eos token; the sequence layout needs one to end blocks")
    extra: dict[str, Any] = {"additional_special_tokens": list(SPECIAL_TOKENS)}
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        extra["pad_token"] = PAD_TOKEN
    tokenizer.add_special_tokens(extra, replace_extra_special_tokens=False)
    return tokenizer


def new_token_ids(tokenizer) -> list[int]:
    """Ids of the tokens this project adds (role/image tokens and, where added, <pad>)."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    if tokenizer.pad_token == PAD_TOKEN:
        ids.append(tokenizer.pad_token_id)
    return sorted(ids)


def system_prompt_text(system_text: str, steps: list[Step], state: dict[str, str]) -> str:
    """The exact system prompt of SPEC §4.4 (pinned by a test), including the trailing newline."""
    lines = [system_text, "Task steps:"]
    lines += [f"{step.id}: {step.name}" for step in steps]
    lines.append("Current state: " + ", ".join(f"{step.id}: {state[step.id]}" for step in steps))
    return "\n".join(lines) + "\n"


@dataclass
class RenderedClip:
    input_ids: np.ndarray  # (T,) int64
    asst_targets: np.ndarray  # (T,) int64, next-token target or -100
    dst_targets: np.ndarray  # (T,) int64
    decision_positions: np.ndarray  # (num_frames,) int64: last token of frame k's input
    speak_events: np.ndarray  # (num_frames,) bool: an assistant block follows
    dst_events: np.ndarray  # (num_frames,) bool: a DST block follows
    token_frames: np.ndarray  # (T,) int64: absolute frame of each token, -1 for the prompt
    frame_texts: dict[int, FrameEvents]  # the events per absolute frame, for dumps


class Renderer:
    """Tokenises the pieces of the sequence layout. Training renders whole clips with `render`; the
    streaming evaluator calls `prompt`, `frame`, `user_block`, `dst_block`, `asst_block` one at a time.
    Each piece is tokenised on its own, so the concatenation is the same however it is fed."""

    def __init__(self, tokenizer, num_tokens_per_frame: int):
        self.tokenizer = tokenizer
        self.num_tokens_per_frame = num_tokens_per_frame
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        unknown = [t for t, i in ids.items() if i is None or i == tokenizer.unk_token_id]
        if unknown:
            raise ValueError(f"tokenizer lacks {unknown}: load it with data.load_tokenizer")
        self.image_id, self.user_id, self.dst_id, self.asst_id = (ids[t] for t in SPECIAL_TOKENS)
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id
        if self.pad_id is None or self.pad_id == self.eos_id:
            raise ValueError("pad must exist and differ from eos: load the tokenizer with data.load_tokenizer")
        # BOS only where the tokenizer itself prepends one.
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        self.bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id] else None

    def text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt(self, system_text: str, steps: list[Step], state: dict[str, str]) -> list[int]:
        bos = [self.bos_id] if self.bos_id is not None else []
        return bos + self.text(system_prompt_text(system_text, steps, state))

    def frame(self) -> list[int]:
        return [self.image_id] * self.num_tokens_per_frame

    def user_block(self, text: str) -> list[int]:
        return [self.user_id] + self.text(text) + [self.eos_id]

    def dst_block(self, transitions: list[tuple[str, str]]) -> list[int]:
        return [self.dst_id] + self.text(format_transitions(transitions)) + [self.eos_id]

    def asst_block(self, texts: list[str] | str) -> list[int]:
        text = texts if isinstance(texts, str) else " ".join(texts)
        return [self.asst_id] + self.text(text) + [self.eos_id]

    def render(self, clip: Clip) -> RenderedClip:
        ids: list[int] = self.prompt(clip.system_text, clip.steps, clip.initial_state())
        frames: list[int] = [-1] * len(ids)
        asst_targets: list[int] = [IGNORE] * len(ids)
        dst_targets: list[int] = [IGNORE] * len(ids)
        events = clip.events()
        n = clip.num_frames
        decision = np.zeros(n, dtype=np.int64)
        speak = np.zeros(n, dtype=bool)
        update = np.zeros(n, dtype=bool)

        def add(tokens: list[int], frame: int, targets: Optional[list[int]] = None) -> None:
            ids.extend(tokens)
            frames.extend([frame] * len(tokens))
            if targets is dst_targets:
                # Block [R] t1 .. tn EOS: positions of [R] .. tn predict t1 .. EOS; the EOS position predicts nothing.
                dst_targets.extend(tokens[1:] + [IGNORE])
                asst_targets.extend([IGNORE] * len(tokens))
            elif targets is asst_targets:
                asst_targets.extend(tokens[1:] + [IGNORE])
                dst_targets.extend([IGNORE] * len(tokens))
            else:
                asst_targets.extend([IGNORE] * len(tokens))
                dst_targets.extend([IGNORE] * len(tokens))

        for i, k in enumerate(range(clip.start, clip.end)):
            ev = events.get(k)
            add(self.frame(), k)
            if ev is not None:
                for text in ev.user_texts:
                    add(self.user_block(text), k)
            decision[i] = len(ids) - 1
            if ev is not None and ev.transitions:
                update[i] = True
                add(self.dst_block(ev.transitions), k, dst_targets)
            if ev is not None and ev.asst_texts:
                speak[i] = True
                add(self.asst_block(ev.asst_texts), k, asst_targets)
        return RenderedClip(
            input_ids=np.asarray(ids, dtype=np.int64),
            asst_targets=np.asarray(asst_targets, dtype=np.int64),
            dst_targets=np.asarray(dst_targets, dtype=np.int64),
            decision_positions=decision, speak_events=speak, dst_events=update,
            token_frames=np.asarray(frames, dtype=np.int64), frame_texts=events,
        )


# ----------------------------------------------------------------------------------------------------
# Labels and negative-frame sub-sampling (SPEC §4.5)


def nfs_keep(speak_events: np.ndarray, dst_events: np.ndarray, rho: float, seed: int, epoch: int, clip_index: int) -> np.ndarray:
    """Frames whose head labels are kept: all event frames plus a seeded sample of the silent ones.

    Positives of one head are always-kept ("hard") negatives of the other. The silent sample depends only
    on (seed, epoch, clip index), so every rank, resume and re-run draws the same frames.
    """
    keep = speak_events | dst_events
    silent = np.flatnonzero(~keep)
    if len(silent) and rho < 1.0:
        n_keep = max(1, int(math.floor(rho * len(silent) + 0.5)))  # round half up, the same on every platform
        rng = np.random.default_rng([seed, epoch, clip_index])
        keep = keep.copy()
        keep[rng.choice(silent, size=min(n_keep, len(silent)), replace=False)] = True
    elif len(silent):
        keep = np.ones_like(keep)
    return keep


def head_labels(rendered: RenderedClip, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(speak_labels, dst_labels), each (T,): 0/1 at kept decision positions, -100 elsewhere."""
    T = len(rendered.input_ids)
    speak = np.full(T, IGNORE, dtype=np.int64)
    update = np.full(T, IGNORE, dtype=np.int64)
    positions = rendered.decision_positions[keep]
    speak[positions] = rendered.speak_events[keep]
    update[positions] = rendered.dst_events[keep]
    return speak, update


def rho_at(cfg: Config, step: int) -> float:
    """The NFS rate at an optimizer step: constant, or linear from nfs_rho_start to nfs_rho_end."""
    if cfg.data.nfs_schedule == "constant":
        return cfg.data.nfs_rho
    frac = min(max(step / max(cfg.train.max_steps, 1), 0.0), 1.0)
    return cfg.data.nfs_rho_start + frac * (cfg.data.nfs_rho_end - cfg.data.nfs_rho_start)


# ----------------------------------------------------------------------------------------------------
# Dataset, sampler, collate (SPEC §4.6)


@dataclass(frozen=True)
class ItemKey:
    """What the sampler hands the dataset: which clip, and the (epoch, rho) its labels are drawn with."""
    clip: int  # position in the dataset's clip list
    epoch: int
    rho: float
    cursor: int  # micro-batches of this epoch consumed once this item's batch is done (for resume)


def raw_frame_reader(cfg: Config, store: FrameStore) -> RawFrameReader:
    """data.frames=raw: decoding and resizing as the image processor of the VLM whose tower encodes the frames."""
    return RawFrameReader(store, FramePreprocessing.from_model_dir(cfg.model.vision_path or cfg.model.path))


class ClipDataset:
    """A split's validated clips; items are rendered and labelled on demand (features read per clip)."""

    def __init__(self, cfg: Config, split: str, tokenizer, full_frame_check: bool = False):
        self.cfg = cfg
        self.split = split
        clips, problems = load_split(cfg, split)
        errors = [p for p in problems if p.level == "ERROR"]
        if errors:
            shown = "\n".join(str(p) for p in errors[:20])
            more = f"\n... and {len(errors) - 20} more" if len(errors) > 20 else ""
            raise DataError(
                f"split '{split}' has {len(errors)} error(s); run `python data.py validate` for the full list:\n{shown}{more}"
            )
        if not clips:
            raise DataError(f"split '{split}' ({', '.join(map(str, split_files(cfg, split)))}) has no clips")
        self.renderer = Renderer(tokenizer, cfg.data.num_tokens_per_frame)
        self.store = FrameStore(cfg.data.num_tokens_per_frame, cfg.data.feature_dim)
        self.raw_frames = raw_frame_reader(cfg, self.store) if cfg.data.frames == "raw" else None
        self.lengths = [len(self.renderer.render(c).input_ids) for c in clips]
        over = [(c, n) for c, n in zip(clips, self.lengths) if n > cfg.data.max_seq_len]
        self.dropped = []
        if over:
            listing = "; ".join(f"{clip_where(c)}: {n} tokens" for c, n in over[:10])
            if cfg.data.on_overlength == "error":
                raise DataError(
                    f"split '{split}': {len(over)} clip(s) exceed data.max_seq_len={cfg.data.max_seq_len} "
                    f"({listing}). Set data.on_overlength=drop to train without them."
                )
            self.dropped = [c for c, _ in over]
            keep = [i for i, n in enumerate(self.lengths) if n <= cfg.data.max_seq_len]
            clips = [clips[i] for i in keep]
            self.lengths = [self.lengths[i] for i in keep]
        self.clips = clips
        # Every clip's frames file is opened once now (layout, rows, columns, dim), not discovered broken
        # hours into training; `full_frame_check` also reads every value (what `data.py validate` does).
        problems = []
        for clip in clips:
            try:
                if self.raw_frames is not None:
                    self.raw_frames.verify(clip) if full_frame_check else self.raw_frames.check(clip)
                else:
                    self.store.features(clip) if full_frame_check else self.store.check(clip)
            except DataError as err:
                problems.append(str(err))
        if problems:
            more = f"\n... and {len(problems) - 10} more" if len(problems) > 10 else ""
            raise DataError(f"split '{split}': {len(problems)} clip(s) with unusable frames:\n"
                            + "\n".join(problems[:10]) + more)

    def __len__(self) -> int:
        return len(self.clips)

    def item(self, index: int, epoch: int = 0, rho: float = 1.0, with_features: bool = True) -> dict:
        """One clip rendered and labelled; `with_features=False` skips the frame read (label counting)."""
        clip = self.clips[index]
        rendered = self.renderer.render(clip)
        keep = nfs_keep(rendered.speak_events, rendered.dst_events, rho, self.cfg.train.seed, epoch, clip.index)
        speak, update = head_labels(rendered, keep)
        n_images = int((rendered.input_ids == self.renderer.image_id).sum())
        frame_inputs = {}
        if with_features and self.raw_frames is not None:
            # data.frames=raw: uint8 frames; the model's frozen vision tower makes the features on the device
            frame_inputs["frame_pixels"] = self.raw_frames.pixels(clip)  # (num_frames, S, S, 3)
            assert len(frame_inputs["frame_pixels"]) * self.renderer.num_tokens_per_frame == n_images, clip_where(clip)
            features = None
        elif with_features:
            features = self.store.features(clip)
            assert features.shape[0] == n_images, (clip_where(clip), features.shape, n_images)
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


class ClipBatchSampler:
    """Deterministic distributed batch sampler with a resumable cursor.

    Each epoch: a permutation seeded by (seed, epoch), optionally sorted by length within mega-batches
    (less padding, same content), cut into global micro-batches of micro_batch * world_size clips; rank r
    takes its slice of each. The incomplete last global micro-batch is dropped so every rank runs the same
    number of steps. The iterator is endless (epoch after epoch); `start(epoch, cursor)` makes the next
    iteration begin at micro-batch `cursor` of `epoch`, which is how a checkpoint resumes.
    `rho_for_cursor(epoch, cursor)` gives the NFS rate for the micro-batch (the loop's step schedule).
    """

    def __init__(self, lengths: list[int], micro_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 length_grouping: bool = True, rho_fn=None, mega_batch_factor: int = 32):
        self.lengths = list(lengths)
        self.micro_batch = micro_batch
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.length_grouping = length_grouping
        self.rho_fn = rho_fn or (lambda epoch, cursor: 1.0)
        self.mega = micro_batch * world_size * mega_batch_factor
        self.global_batch = micro_batch * world_size
        if len(self.lengths) < self.global_batch:
            raise DataError(
                f"{len(self.lengths)} clips cannot fill one micro-batch of {micro_batch} on {world_size} rank(s)"
            )
        self.batches_per_epoch = len(self.lengths) // self.global_batch
        self.epoch, self.cursor = 0, 0

    def start(self, epoch: int, cursor: int) -> None:
        self.epoch, self.cursor = epoch, cursor

    def epoch_order(self, epoch: int) -> list[int]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths)).tolist()
        if self.length_grouping:
            chunks = [order[i:i + self.mega] for i in range(0, len(order), self.mega)]
            order = [i for chunk in chunks for i in sorted(chunk, key=lambda j: -self.lengths[j])]
        return order

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches (lists of clip positions) of one epoch."""
        order = self.epoch_order(epoch)
        batches = []
        for b in range(self.batches_per_epoch):
            group = order[b * self.global_batch:(b + 1) * self.global_batch]
            batches.append(group[self.rank * self.micro_batch:(self.rank + 1) * self.micro_batch])
        if self.length_grouping:
            # Sorting put the longest batches first in every mega-batch; shuffle batch order (same on all ranks).
            perm = np.random.default_rng([self.seed, epoch, 1]).permutation(len(batches))
            batches = [batches[i] for i in perm]
        return batches

    def __iter__(self) -> Iterator[list[ItemKey]]:
        epoch, cursor = self.epoch, self.cursor
        while True:
            batches = self.epoch_batches(epoch)
            while cursor < len(batches):
                rho = self.rho_fn(epoch, cursor)
                yield [ItemKey(i, epoch, rho, cursor + 1) for i in batches[cursor]]
                cursor += 1
            epoch, cursor = epoch + 1, 0

    def __len__(self) -> int:
        return self.batches_per_epoch


def collate(items: list[dict], pad_id: int) -> dict:
    """Right-pad with the distinct pad id; frame features concatenated in row-major (b, t) order."""
    import torch

    T = max(len(it["input_ids"]) for it in items)
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
    batch["head_rows"] = torch.from_numpy(np.flatnonzero(heads.numpy().reshape(-1)))
    batch["decision_rows"] = torch.from_numpy(np.flatnonzero(batch["decision_mask"].numpy().reshape(-1)))
    batch["has_padding"] = bool((attention == 0).any())
    if "epoch" in items[0]:
        batch["epoch"] = items[0]["epoch"]
        batch["cursor"] = items[0]["cursor"]
    return batch


class Collator:
    """Picklable collate_fn for DataLoader workers."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict]) -> dict:
        return collate(items, self.pad_id)


# ----------------------------------------------------------------------------------------------------
# Validation (SPEC §4.7, §13)


def validate(cfg: Config, splits: list[str], tokenizer=None) -> list[Problem]:
    """Every problem of the given splits, in one pass: schema, roles, times, transitions, frames, tokens."""
    problems: list[Problem] = []
    store = FrameStore(cfg.data.num_tokens_per_frame, cfg.data.feature_dim)
    raw_frames = raw_frame_reader(cfg, store) if cfg.data.frames == "raw" else None
    renderer = Renderer(tokenizer, cfg.data.num_tokens_per_frame) if tokenizer is not None else None
    for split in splits:
        clips, split_problems = load_split(cfg, split)
        problems.extend(split_problems)
        for clip in clips:
            try:
                raw_frames.verify(clip) if raw_frames is not None else store.features(clip)
            except DataError as err:
                problems.append(Problem("ERROR", clip.file, str(err), clip.index, clip.video_uid))
            if renderer is not None:
                n = len(renderer.render(clip).input_ids)
                if n > cfg.data.max_seq_len:
                    problems.append(Problem(
                        "ERROR", clip.file, f"clip renders to {n} tokens, over data.max_seq_len={cfg.data.max_seq_len}",
                        clip.index, clip.video_uid,
                    ))
    return problems


# ----------------------------------------------------------------------------------------------------
# CLI


def _config_for(target: str, overrides: list[str]) -> tuple[Config, list[str]]:
    """A config file gives its splits; a split file is validated alone, its directory as data.root."""
    if target.endswith((".yaml", ".yml")):
        return load_config(target, overrides), ["train", "val", "test"]
    path = Path(target)
    cfg = load_config(None, [f"data.train={json.dumps(str(path.resolve()))}"] + overrides)
    if not any(o.startswith("data.root=") for o in overrides):
        cfg.data.root = str(path.resolve().parent)
    return cfg, ["train"]


def cmd_validate(args) -> int:
    problems: list[Problem] = []
    clips_checked = 0
    for target in args.targets:
        cfg, splits = _config_for(target, args.overrides)
        tokenizer = None
        if Path(cfg.model.path).is_dir():
            tokenizer = load_tokenizer(cfg.model.path)
        else:
            print(f"note: model.path '{cfg.model.path}' not found; token lengths are not checked", file=sys.stderr)
        if splits != ["train"]:
            splits = [s for s in splits if getattr(cfg.data, s)]
        found = validate(cfg, splits, tokenizer)
        problems.extend(found)
        for split in splits:
            for path in split_files(cfg, split):
                if path.is_file():
                    raws = read_split_file(path, [])
                    clips_checked += len(raws)
    for p in problems:
        print(p)
    errors = sum(p.level == "ERROR" for p in problems)
    warnings = sum(p.level == "WARNING" for p in problems)
    print(f"validated {clips_checked} clip(s): {errors} error(s), {warnings} warning(s)")
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
    import demo

    summary = demo.make_demo(args.out, seed=args.seed, num_videos=args.videos, raw_frames=args.raw_frames,
                             frame_size=args.frame_size)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_extract_features(args) -> int:
    from frames import extract_features

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
    p.add_argument("targets", nargs="+", help="config YAML or split JSON files, then optional key=value overrides")
    p = sub.add_parser("show", help="print one clip's rendered sequence with every label stream")
    p.add_argument("config", help="config YAML")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument("--split", default="train", choices=("train", "val", "test"))
    p.add_argument("--index", type=int, default=0, help="clip position in the split")
    p.add_argument("--json", action="store_true", help="one JSON object with per-frame labels and texts")
    args = parser.parse_args(argv)
    try:
        if args.command == "validate":
            args.overrides = [t for t in args.targets if "=" in t and not t.endswith((".json", ".yaml", ".yml"))]
            args.targets = [t for t in args.targets if t not in args.overrides]
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
