"""Clips: what a clip of the user's data is, and the rules that place its events and define its state.

    clips, problems = load_split(cfg, "train")     # parsed, checked clips of a split, every problem in one pass
    k = event_frame(t, fps, start, end)            # the frame a turn at time t is attached to
    state = clip.initial_state()                   # recomputed from the step spans, never taken from the file

`event_frame` is the one event-frame rule (docs/sequence.md#the-event-frame-rule): the renderer, the labels, the
evaluator's references and the reports all call it. `initial_state` recomputes a clip's starting state from the
schema spans (docs/sequence.md#dialogue-state); the file's `initial_dst_state` is only compared against it.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from config import Config, ConfigError, split_files

ROLES = ("system", "user", "assistant", "DST_UPDATE")
STATES = ("not_started", "in_progress", "completed")
TRANSITIONS = {"start": ("not_started", "in_progress"), "complete": ("in_progress", "completed")}

# ----------------------------------------------------------------------------------------------------
# Errors


class DataError(ValueError):
    """Bad input data; the message names the file, clip and turn (or frame) and what to do."""


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
    if clip.part is not None:
        where += f":part {clip.part} (frames [{clip.start}, {clip.end}))"
    return where + (f":turn {turn_index}" if turn_index is not None else "")


# ----------------------------------------------------------------------------------------------------
# The event-frame rule and the dialogue state


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
    part: Optional[int] = None  # sub-clip number (0, 1, ...) when data.on_overlength=split cut the clip, else None

    @property
    def num_frames(self) -> int:
        return self.end - self.start

    @property
    def nfs_key(self) -> list[int]:
        """What seeds this clip's NFS draw besides (seed, epoch): its position in the split file(s), so skipping
        or dropping other clips changes nothing, plus part + 1 for a sub-clip (numpy seed sequences ignore
        trailing zeros: [index, 0] would draw exactly what [index] draws)."""
        return [self.index] if self.part is None else [self.index, self.part + 1]

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
    """The state after each frame: `initial` plus the legal transitions of that frame and all before it.
    Illegal transitions leave the state unchanged (validation rejects them in the data)."""
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
