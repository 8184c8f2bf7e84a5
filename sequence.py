"""The sequence: what a clip looks like as tokens, and its labels.

    tokenizer = load_tokenizer(cfg.model.path)              # the model's tokenizer + <image> [USER] [DST] [ASST] (+ <pad>)
    renderer = Renderer(tokenizer, cfg.data.num_tokens_per_frame)
    rendered = renderer.render(clip)                        # input ids, text targets, decision positions, events
    keep = nfs_keep(rendered.speak_events, rendered.dst_events, rho, seed, epoch, clip.nfs_key)
    speak_labels, dst_labels = head_labels(rendered, keep)

`Renderer` is the one prompt builder and sequence layout (docs/sequence.md#sequence-layout): training renders
whole clips with it, and the streaming evaluator feeds the same pieces (`prompt`, `frame`, `user_block`,
`dst_block`, `asst_block`) one at a time, so training and inference see the same sequence. It also owns the
token budget of a frame's generated blocks in a streamed context (`generated_blocks_budget`).
`nfs_keep` draws the negative-frame sub-sample from (seed, epoch, clip key) (docs/sequence.md#negative-frame-sub-sampling).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from transformers import AutoTokenizer

from clips import Clip, FrameEvents, Step, format_transitions
from config import Config, ConfigError

SPECIAL_TOKENS = ("<image>", "[USER]", "[DST]", "[ASST]")
PAD_TOKEN = "<pad>"
IGNORE = -100  # a position without a target or label (the cross-entropy ignore index)


# ----------------------------------------------------------------------------------------------------
# Tokenizer and the sequence layout


def load_tokenizer(path):
    """The model directory's tokenizer with the project's special tokens added.

    A distinct <pad> is added when the tokenizer has none or when pad == eos: with pad == eos, anything that
    tells padding by its id (labels masked where input_ids == pad, as common collators do) also hides every
    real EOS, and the model never learns to stop. A distinct <pad> keeps the two apart everywhere.
    """
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
    """The exact system prompt (pinned by a test), including the trailing newline."""
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
            raise ValueError(f"tokenizer lacks {unknown}: load it with sequence.load_tokenizer")
        self.image_id, self.user_id, self.dst_id, self.asst_id = (ids[t] for t in SPECIAL_TOKENS)
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id
        if self.pad_id is None or self.pad_id == self.eos_id:
            raise ValueError("pad must exist and differ from eos: load the tokenizer with sequence.load_tokenizer")
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

    def generated_blocks_budget(self, max_dst_tokens: int, max_new_tokens: int) -> int:
        """The most tokens a frame's generated blocks can add to a streamed context: a [DST] and an [ASST] block
        of at most `max_dst_tokens` / `max_new_tokens` generated tokens, each with its role token and its EOS
        (4), plus 2 tokens of slack. Where the stream decides whether a frame still fits, this is the room it
        keeps free beyond the frame's own tokens."""
        return max_dst_tokens + max_new_tokens + 6

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
# Labels and negative-frame sub-sampling


def nfs_keep(speak_events: np.ndarray, dst_events: np.ndarray, rho: float, seed: int, epoch: int,
             clip_key: int | list[int]) -> np.ndarray:
    """Frames whose head labels are kept: all event frames plus a seeded sample of the silent ones.

    Positives of one head are always-kept ("hard") negatives of the other. The silent sample depends only
    on (seed, epoch, clip key), so every rank, resume and re-run draws the same frames. The key is the clip
    index, or `Clip.nfs_key` (index and part) for a sub-clip.
    """
    keep = speak_events | dst_events
    silent = np.flatnonzero(~keep)
    if len(silent) and rho < 1.0:
        n_keep = max(1, int(math.floor(rho * len(silent) + 0.5)))  # round half up, the same on every platform
        rng = np.random.default_rng([seed, epoch, *np.atleast_1d(clip_key).tolist()])
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
