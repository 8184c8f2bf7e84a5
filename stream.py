"""The stream: whole videos, frame by frame, through the model with its KV cache, as inference runs.

    videos = assemble_videos(clips)                       # a split's clips grouped into whole videos
    runner = StreamingRunner(model, renderer, cfg, device, dtype=precision.dtype)
    records = runner.run(video, video_features(video, store, I), Thresholds(0.5, 0.5))   # one FrameRecord per frame

Per frame: feed <image> x I and the user turns of that frame, read both heads at the decision position; if
p_dst > dst_threshold feed [DST] and greedy-decode the transitions; if p_speak > speak_threshold feed [ASST]
and greedy-decode the reply. Generated tokens and their EOS stay in the cache, as in training. The pieces come
from sequence.Renderer, the code that renders training sequences (docs/evaluation.md#the-per-frame-procedure).
evaluate.py scores the records; report.py draws them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from transformers import DynamicCache

from clips import (
    Clip, DataError, FrameEvents, Step, Turn, apply_transition, event_frame, format_transitions, group_turns,
    parse_transitions, state_trajectory,
)
from config import Config, ConfigError
from frames import FrameStore, RawFrameReader
from model import PreallocatedCache, cast_for_inference
from sequence import Renderer


# ----------------------------------------------------------------------------------------------------
# Whole videos from clips


@dataclass
class Video:
    video_uid: str
    dataset: str
    fps: float
    start: int  # first clip's start frame
    end: int  # last clip's end frame (exclusive)
    steps: list[Step]
    system_text: str
    initial_state: dict[str, str]
    events: dict[int, FrameEvents]  # union of the clips' events, de-duplicated
    clips: list[Clip]

    @property
    def num_frames(self) -> int:
        return self.end - self.start

    def reference_states(self) -> list[dict[str, str]]:
        """State after each frame's updates: initial + updates at earlier or equal frames (docs/sequence.md#dialogue-state)."""
        return state_trajectory(self.initial_state, (self.events.get(k, FrameEvents()).transitions
                                                     for k in range(self.start, self.end)))


def video_turns(clips: list[Clip], start: int, end: int) -> list[Turn]:
    """The clips' timed turns placed on the whole video [start, end), repeats of overlapping clips removed.

    A turn's frame is recomputed with the one event-frame rule over the whole video: inside its clip the
    turn may have been clamped to the clip's first frame, so the same turn in two clips that share a
    boundary would otherwise sit at two frames and be counted twice. A (frame, role, content) is then kept
    as many times as the clip holding it most often has it, so identical turns within one clip survive.
    """
    kept: Counter = Counter()
    turns: list[Turn] = []
    for clip in clips:
        in_clip: Counter = Counter()
        for turn in clip.turns:
            if turn.time is None:  # the leading system turn: the prompt, not an event
                continue
            placed = dataclasses.replace(turn, frame=event_frame(turn.time, clip.fps, start, end))
            key = (placed.frame, placed.role, json.dumps(placed.content))
            in_clip[key] += 1
            if in_clip[key] > kept[key]:
                kept[key] += 1
                turns.append(placed)
    # Stable: within a frame, clip order then conversation order, as the renderer groups them.
    return sorted(turns, key=lambda t: t.frame)


def assemble_videos(clips: list[Clip]) -> list[Video]:
    """Group clips by video_uid, order by clip_idx; events of the whole video, de-duplicated by (frame, role,
    content) after placing every turn on the whole video."""
    by_uid: dict[str, list[Clip]] = {}
    for clip in clips:
        by_uid.setdefault(clip.video_uid, []).append(clip)
    videos = []
    for uid, group in by_uid.items():
        group.sort(key=lambda c: (c.clip_idx, c.start))
        first = group[0]
        if min(c.start for c in group) < first.start:
            raise DataError(f"video {uid}: a clip starts before clip_idx {first.clip_idx} (frame {first.start}); "
                            f"clip_idx must follow the clips' start frames")
        if len({c.fps for c in group}) > 1:
            raise DataError(f"video {uid}: its clips disagree on fps ({sorted({c.fps for c in group})})")
        covered = set()
        for clip in group:
            covered.update(range(clip.start, clip.end))
        start, end = first.start, max(c.end for c in group)
        gaps = sorted(set(range(start, end)) - covered)
        if gaps:
            raise DataError(f"video {uid}: its clips leave frames uncovered (first: {gaps[0]}, {len(gaps)} in all)")
        events = group_turns(video_turns(group, start, end))
        videos.append(Video(uid, first.dataset, first.fps, start, end, first.steps, first.system_text,
                            first.initial_state(), events, group))
    return videos


def raw_video_features(clips: list, reader: RawFrameReader, encoder, device, autocast=None) -> np.ndarray:
    """(num_frames, I, F) float32 features of a whole video (its clips in order, consecutive or overlapping)
    from raw frames through the model's frozen tower, clip by clip: what video_features reads from
    feature files, for data.frames=raw. Pass the stream's autocast so the tower computes as in training."""
    start, end = min(c.start for c in clips), max(c.end for c in clips)
    out = np.zeros((end - start, encoder.num_tokens_per_frame, encoder.output_dim), dtype=np.float32)
    for clip in clips:
        pixels = torch.from_numpy(reader.pixels(clip)).to(device)  # (n, S, S, 3) uint8
        with autocast if autocast is not None else contextlib.nullcontext():
            rows = encoder(pixels)  # (n * I, F)
        out[clip.start - start:clip.end - start] = rows.cpu().numpy().reshape(clip.num_frames, encoder.num_tokens_per_frame, -1)
    return out


def video_features(video: Video, store: FrameStore, num_tokens_per_frame: int) -> np.ndarray:
    """(num_frames, I, F) features over the whole video, each frame read from a clip that covers it."""
    out: Optional[np.ndarray] = None
    for clip in video.clips:
        feats = store.features(clip).reshape(clip.num_frames, num_tokens_per_frame, -1)
        if out is None:
            out = np.zeros((video.num_frames, num_tokens_per_frame, feats.shape[-1]), dtype=np.float32)
        out[clip.start - video.start:clip.end - video.start] = feats
    return out


# ----------------------------------------------------------------------------------------------------
# Streaming inference


@dataclass
class FrameRecord:
    frame: int
    p_speak: float
    p_dst: float
    speak: bool
    dst: bool
    asst_text: Optional[str] = None
    dst_text: Optional[str] = None
    transitions: list = field(default_factory=list)  # parsed (step, transition), legal or not
    num_invalid: int = 0


@dataclass
class Thresholds:
    speak: float
    dst: float


@dataclass
class Segment:
    """One frame of the stream's current context in the training layout: its frame tokens and user blocks, then
    the DST and assistant blocks fed after its decision, each closed by its EOS. `state` is the tracked state when
    the frame began: the state a prompt placed right before this frame must show."""
    frame_index: int  # in the video
    tokens: list[int]
    state: dict[str, str]


class StreamingRunner:
    """One video at a time, one frame at a time, KV cache on. Context pieces come from sequence.Renderer.

    The cache is a `model.PreallocatedCache` of `data.max_seq_len` positions, allocated once and reused for
    every video (`cache="dynamic"` uses transformers' growing DynamicCache instead; both give the same
    probabilities). A video's features are moved to the device once. Per frame there is one host sync (both
    head probabilities read together), plus one per generated token.

    `context_ids` mirrors, token for token, what the cache holds; `segments` holds the current context's frames
    as `Segment`s, which is what `drop_middle` keeps when the context is full.
    """

    def __init__(self, model, renderer: Renderer, cfg: Config, device: torch.device, teacher_forced: bool = False,
                 dtype: torch.dtype = torch.float32, cache: str = "preallocated"):
        if cache not in ("preallocated", "dynamic"):
            raise ValueError(f"cache must be 'preallocated' or 'dynamic', got {cache!r}")
        self.model = model
        self.renderer = renderer
        self.cfg = cfg
        self.device = device
        self.teacher_forced = teacher_forced
        self.budget = cfg.data.max_seq_len - cfg.eval.context_margin
        self.blocks_budget = renderer.generated_blocks_budget(cfg.eval.max_dst_tokens, cfg.eval.max_new_tokens)
        self.worst_frame = renderer.num_tokens_per_frame + self.blocks_budget  # a frame without user turns, both blocks full
        self.context_resets = 0
        num_layers = model.backbone.config.get_text_config().num_hidden_layers
        self._preallocated = PreallocatedCache(num_layers, cfg.data.max_seq_len) if cache == "preallocated" else None
        # The same compute precision as training; the heads run in fp32 inside the model regardless.
        self.autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
        if dtype != torch.float32:
            # Inference stores every weight in the compute dtype: autocast would otherwise cast each fp32 weight
            # again at every frame (its cast cache lives for one autocast region), which for a 1B model costs
            # more than the frame itself. The heads stay fp32 and buffers (rotary frequencies) as in training.
            cast_for_inference(model, dtype)
        self._no_rows = torch.zeros(0, dtype=torch.long, device=device)
        self._last_row: dict[int, torch.Tensor] = {}  # piece length -> tensor([length - 1]) on the device

    # -- the cache ------------------------------------------------------------------------------------
    def _new_cache(self):
        if self._preallocated is None:
            self.cache = DynamicCache()
        else:
            self._preallocated.truncate(0)
            self.cache = self._preallocated
        self.context_ids: list[int] = []

    def _truncate(self, length: int) -> None:
        if self._preallocated is None:
            self.cache.crop(length - len(self.context_ids))  # DynamicCache: a negative count of positions to drop
        else:
            self.cache.truncate(length)
        del self.context_ids[length:]

    # -- the model calls -----------------------------------------------------------------------------
    def _forward(self, ids: list[int], feats: Optional[torch.Tensor], want_heads: bool, want_text: bool):
        """Feed `ids` (with `feats`, one row per <image> among them) and read the outputs at the last position."""
        if len(self.context_ids) + len(ids) > self.cfg.data.max_seq_len:
            raise RuntimeError(f"context grew past data.max_seq_len={self.cfg.data.max_seq_len}; raise eval.context_margin")
        input_ids = torch.tensor([ids], dtype=torch.long).to(self.device, non_blocking=True)  # (1, T)
        last = self._last_row.get(len(ids))
        if last is None:
            last = self._last_row[len(ids)] = torch.tensor([len(ids) - 1], device=self.device)
        with self.autocast:
            out = self.model(
                input_ids=input_ids, frame_features=feats, past_key_values=self.cache, use_cache=True,
                text_rows=last if want_text else self._no_rows, head_rows=last if want_heads else self._no_rows,
            )
        self.cache = out["past_key_values"]
        self.context_ids.extend(ids)
        return out

    def _reset_context(self) -> None:
        """Apply eval.context_strategy: a fresh context starting from the system prompt.

        reset_with_dst: the prompt carries the *predicted* current state (the model's own DST is its memory);
        drop_all: the prompt with the video's initial state, nothing else;
        drop_middle: the most recent whole frames (each with its generated blocks and their EOS, as in training),
        up to half of what the prompt and a frame leave, after a prompt carrying the predicted state at the first
        kept frame: the context a training clip starting at that frame would show.
        """
        strategy = self.cfg.eval.context_strategy
        self.context_resets += 1
        kept: list[Segment] = []
        if strategy == "drop_middle":
            # Half of what the prompt and the next frame's worst case (both blocks generated in full) leave, so a
            # reset is followed by many frames, not by another reset. The prompt's length does not depend on
            # the state it shows (state names are fixed words), so the current one measures it.
            prompt_length = len(self.renderer.prompt(self.video.system_text, self.video.steps, self.pred_state))
            room = max(0, (self.budget - prompt_length - self.worst_frame) // 2)
            for segment in reversed(self.segments):
                if len(segment.tokens) > room:
                    break
                kept.insert(0, segment)
                room -= len(segment.tokens)
        state = {"reset_with_dst": self.pred_state, "drop_all": self.video.initial_state}.get(
            strategy, kept[0].state if kept else self.pred_state)
        prompt = self.renderer.prompt(self.video.system_text, self.video.steps, state)
        self._new_cache()
        feats = [self.video_feats[segment.frame_index] for segment in kept]  # (I, F) each
        self._forward(prompt + [t for segment in kept for t in segment.tokens],
                      torch.cat(feats) if feats else None, False, False)
        self.segments = kept
        self.pending = []  # any pending EOS closed a block that is either gone or already in a kept segment

    def _generate(self, role_id: int, max_tokens: int) -> str:
        """Feed the role token (plus any pending EOS), greedy-decode to EOS; the EOS ends up in the cache
        with the next piece, exactly as training has it. Returns the text; the block's tokens (role, text,
        EOS) are appended to the current frame's segment."""
        eos = self.renderer.eos_id
        ids = self.pending + [role_id]
        self.pending = []
        generated: list[int] = []
        out = self._forward(ids, None, want_heads=False, want_text=True)
        guard = self.cfg.eval.repetition_guard
        while True:
            token = int(out["text_logits"][-1].argmax())  # one host sync per generated token
            if token == eos or len(generated) >= max_tokens or self._repeats(generated + [token], guard):
                break
            generated.append(token)
            out = self._forward([token], None, want_heads=False, want_text=True)
        self.pending = [eos]
        self.segments[-1].tokens.extend([role_id, *generated, eos])
        return self.renderer.tokenizer.decode(generated, skip_special_tokens=True).strip()

    @staticmethod
    def _repeats(tokens: list[int], n: int) -> bool:
        """The last n-gram already occurred: greedy decoding has entered a loop."""
        if n <= 0 or len(tokens) < 2 * n:
            return False
        tail = tokens[-n:]
        return any(tokens[i:i + n] == tail for i in range(len(tokens) - 2 * n + 1))

    # -- the stream -----------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, video: Video, feats: np.ndarray, thresholds: Thresholds) -> list[FrameRecord]:
        self.video = video
        # (num_frames, I, F) on the device once; each frame's rows are a view of it.
        self.video_feats = torch.from_numpy(np.ascontiguousarray(feats)).to(self.device)
        self._new_cache()
        self.segments: list[Segment] = []  # the frames in the context
        self.pred_state = dict(video.initial_state)
        self.pending = self.renderer.prompt(video.system_text, video.steps, self.pred_state)
        if len(self.pending) + self.worst_frame > self.budget:
            raise ConfigError(
                f"video {video.video_uid}: its system prompt ({len(self.pending)} tokens) and one frame with both blocks "
                f"generated ({self.worst_frame}) do not fit data.max_seq_len - eval.context_margin = {self.budget}: "
                f"raise data.max_seq_len or lower eval.context_margin, eval.max_new_tokens, eval.max_dst_tokens"
            )
        records = []
        for i, k in enumerate(range(video.start, video.end)):
            ev = video.events.get(k, FrameEvents())
            frame_ids = self.renderer.frame()
            for text in ev.user_texts:
                frame_ids += self.renderer.user_block(text)
            # Room for this frame and both blocks it may generate; otherwise apply the context strategy now,
            # at a frame boundary, so a generation never straddles a reset.
            needed = len(self.pending) + len(frame_ids) + self.blocks_budget
            if len(self.context_ids) + needed > self.budget:
                self._reset_context()
            self.segments.append(Segment(i, list(frame_ids), dict(self.pred_state)))
            out = self._forward(self.pending + frame_ids, self.video_feats[i], want_heads=True, want_text=False)
            self.pending = []
            p_speak, p_dst = torch.sigmoid(torch.stack([out["speak_logits"][-1], out["dst_logits"][-1]])).tolist()
            rec = FrameRecord(k, p_speak, p_dst, p_speak > thresholds.speak, p_dst > thresholds.dst)
            if self.teacher_forced:
                self._teacher_forced_blocks(rec, ev)
            else:
                if rec.dst:
                    rec.dst_text = self._generate(self.renderer.dst_id, self.cfg.eval.max_dst_tokens)
                    self._apply_generated_updates(rec)
                if rec.speak:
                    rec.asst_text = self._generate(self.renderer.asst_id, self.cfg.eval.max_new_tokens)
            records.append(rec)
        return records

    def _apply_generated_updates(self, rec: FrameRecord, track: bool = True) -> None:
        """Parse the generated DST text; apply the legal transitions to the tracked state (if `track`)."""
        parsed = parse_transitions(rec.dst_text or "")
        if parsed is None:
            rec.num_invalid = 1
            return
        rec.transitions = parsed
        check = self.pred_state if track else dict(self.pred_state)
        for step_id, transition in parsed:
            if apply_transition(check, step_id, transition) is not None:
                rec.num_invalid += 1

    def _generate_and_roll_back(self, role_id: int, max_tokens: int) -> str:
        if self.pending:
            self._forward(self.pending, None, False, False)
            self.pending = []
        length, segment_length = len(self.context_ids), len(self.segments[-1].tokens)
        text = self._generate(role_id, max_tokens)
        self._truncate(length)
        del self.segments[-1].tokens[segment_length:]
        self.pending = []
        return text

    def _teacher_forced_blocks(self, rec: FrameRecord, ev: FrameEvents) -> None:
        """Record what the model generates where a head fires, but keep only ground-truth blocks as context,
        in the training order: decision, [DST] block, [ASST] block."""
        segment = self.segments[-1].tokens
        if rec.dst:
            rec.dst_text = self._generate_and_roll_back(self.renderer.dst_id, self.cfg.eval.max_dst_tokens)
            self._apply_generated_updates(rec, track=False)
        if ev.transitions:
            block = self.renderer.dst_block(ev.transitions)
            self.pending = block
            segment.extend(block)
            for step_id, transition in ev.transitions:
                apply_transition(self.pred_state, step_id, transition)  # the context carries the reference
        if rec.speak:
            rec.asst_text = self._generate_and_roll_back(self.renderer.asst_id, self.cfg.eval.max_new_tokens)
        if ev.asst_texts:
            block = self.renderer.asst_block(ev.asst_texts)
            self.pending = self.pending + block
            segment.extend(block)


def oracle_records(video: Video) -> list[FrameRecord]:
    """The ground truth as predictions: checks that the metric pipeline scores it perfectly."""
    records = []
    for k in range(video.start, video.end):
        ev = video.events.get(k, FrameEvents())
        speak, update = bool(ev.asst_texts), bool(ev.transitions)
        records.append(FrameRecord(
            k, float(speak), float(update), speak, update,
            asst_text=" ".join(ev.asst_texts) if speak else None,
            dst_text=format_transitions(ev.transitions) if update else None,
            transitions=list(ev.transitions),
        ))
    return records


def predicted_states(video: Video, records: list[FrameRecord]) -> list[dict[str, str]]:
    """The state the stream tracked, after each frame (only legal generated updates applied)."""
    return state_trajectory(video.initial_state, (rec.transitions for rec in records))
