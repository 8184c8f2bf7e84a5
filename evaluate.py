"""Streaming evaluation: whole videos, frame by frame, with the KV cache; ProAssist speaking metrics, DST metrics.

    python evaluate.py --ckpt runs/demo/step_600                      # test split (eval.split) of the run's data
    python evaluate.py --ckpt runs/demo/step_600 --split val --max-videos 5
    python evaluate.py --ckpt runs/x/step_5000 --sweep-speak 0.2,0.3,0.4,0.5 --sweep-dst 0.3,0.5,0.7
    python evaluate.py --ckpt runs/x/step_5000 --teacher-forced       # ground-truth blocks as context
    python evaluate.py --config configs/demo.yaml --oracle            # ground truth as the model: perfect scores

Outputs go to <ckpt>/eval_<split>/ (or --out): predictions.jsonl (one line per frame per video),
metrics.json (docs/evaluation.md#metricsjson) and report.html (summary, per-video timelines of both heads, the
replies matched, missed and redundant, the DST updates and the state grid, metric definitions).

Per frame: feed <image> x I and the user turns of that frame, read both heads at the decision position; if
p_dst > dst_threshold feed [DST] and greedy-decode the transitions; if p_speak > speak_threshold feed
[ASST] and greedy-decode the reply. Generated tokens and their EOS stay in the cache, as in training. The
pieces come from data.Renderer, the same code that renders training sequences.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

import metrics
import nlg
from model import configure_attention, prefer_expandable_segments
from report import markdown_summary, write_report
from train import choose_precision
from checkpoint import CheckpointError, load_for_inference, read_config, require_checkpoint
from config import Config, ConfigError, load_config
from clips import (
    Clip, FrameEvents, Step, Turn, apply_transition, event_frame, format_transitions, group_turns, parse_transitions,
    state_trajectory,
)
from data import Renderer, raw_frame_reader, usable_clips
from frames import DataError, FrameStore, Progress, RawFrameReader, raw_video_features
from demo import DATASET_NAME as DEMO_DATASET

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


class StreamingRunner:
    """One video at a time, one frame at a time, KV cache on. Context pieces come from data.Renderer.

    The cache is a `model.PreallocatedCache` of `data.max_seq_len` positions, allocated once and reused for
    every video (`cache="dynamic"` uses transformers' growing DynamicCache instead; both give the same
    probabilities). A video's features are moved to the device once. Per frame there is one host sync (both
    head probabilities read together), plus one per generated token.

    `context_ids` mirrors, token for token, what the cache holds; `segments` holds the current context's frames
    in the training layout (frame tokens and user blocks, then the frame's DST and assistant blocks with their
    EOS), which is what `drop_middle` keeps when the context is full.
    """

    def __init__(self, model, renderer: Renderer, cfg: Config, device: torch.device, teacher_forced: bool = False,
                 dtype: torch.dtype = torch.float32, cache: str = "preallocated"):
        from model import PreallocatedCache

        if cache not in ("preallocated", "dynamic"):
            raise ValueError(f"cache must be 'preallocated' or 'dynamic', got {cache!r}")
        self.model = model
        self.renderer = renderer
        self.cfg = cfg
        self.device = device
        self.teacher_forced = teacher_forced
        self.budget = cfg.data.max_seq_len - cfg.eval.context_margin
        self.context_resets = 0
        num_layers = model.backbone.config.get_text_config().num_hidden_layers
        self._preallocated = PreallocatedCache(num_layers, cfg.data.max_seq_len) if cache == "preallocated" else None
        # The same compute precision as training; the heads run in fp32 inside the model regardless.
        self.autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
        if dtype != torch.float32:
            # Inference stores every weight in the compute dtype: autocast would otherwise cast each fp32 weight
            # again at every frame (its cast cache lives for one autocast region), which for a 1B model costs
            # more than the frame itself. The heads stay fp32.
            model.to(dtype)
            model.speak_head.float()
            model.dst_head.float()
        self._no_rows = torch.zeros(0, dtype=torch.long, device=device)
        self._last_row: dict[int, torch.Tensor] = {}  # piece length -> tensor([length - 1]) on the device

    # -- the cache ------------------------------------------------------------------------------------
    def _new_cache(self):
        from transformers import DynamicCache

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
        drop_middle: the prompt with the initial state plus the most recent whole frames (each with its
        generated blocks and their EOS, as in training), up to half of what the prompt and a frame leave.
        """
        strategy = self.cfg.eval.context_strategy
        self.context_resets += 1
        state = self.pred_state if strategy == "reset_with_dst" else self.video.initial_state
        prompt = self.renderer.prompt(self.video.system_text, self.video.steps, state)
        kept: list[tuple[int, list[int]]] = []
        if strategy == "drop_middle":
            # Half of what the prompt and the next frame's worst case (both blocks generated in full) leave, so a
            # reset is followed by many frames, not by another reset.
            worst_frame = self.cfg.eval.max_dst_tokens + self.cfg.eval.max_new_tokens + 6 + self.renderer.num_tokens_per_frame
            room = max(0, (self.budget - len(prompt) - worst_frame) // 2)
            for frame_index, segment in reversed(self.segments):
                if len(segment) > room:
                    break
                kept.insert(0, (frame_index, segment))
                room -= len(segment)
        self._new_cache()
        feats = [self.video_feats[i] for i, _ in kept]  # (I, F) each
        self._forward(prompt + [t for _, segment in kept for t in segment],
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
        self.segments[-1][1].extend([role_id, *generated, eos])
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
        self.segments: list[tuple[int, list[int]]] = []  # (frame index in the video, its tokens) in the context
        self.pred_state = dict(video.initial_state)
        self.pending = self.renderer.prompt(video.system_text, video.steps, self.pred_state)
        worst_frame = self.cfg.eval.max_dst_tokens + self.cfg.eval.max_new_tokens + 6 + self.renderer.num_tokens_per_frame
        if len(self.pending) + worst_frame > self.budget:
            raise ConfigError(
                f"video {video.video_uid}: its system prompt ({len(self.pending)} tokens) and one frame with both blocks "
                f"generated ({worst_frame}) do not fit data.max_seq_len - eval.context_margin = {self.budget}: "
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
            needed = len(self.pending) + len(frame_ids) + self.cfg.eval.max_dst_tokens + self.cfg.eval.max_new_tokens + 6
            if len(self.context_ids) + needed > self.budget:
                self._reset_context()
            self.segments.append((i, list(frame_ids)))
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
        length, segment_length = len(self.context_ids), len(self.segments[-1][1])
        text = self._generate(role_id, max_tokens)
        self._truncate(length)
        del self.segments[-1][1][segment_length:]
        self.pending = []
        return text

    def _teacher_forced_blocks(self, rec: FrameRecord, ev: FrameEvents) -> None:
        """Record what the model generates where a head fires, but keep only ground-truth blocks as context,
        in the training order: decision, [DST] block, [ASST] block."""
        segment = self.segments[-1][1]
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


# ----------------------------------------------------------------------------------------------------
# Metrics over a split


def compute_metrics(videos: list[Video], all_records: list[list[FrameRecord]], embed, thresholds: Thresholds,
                    zero_cost_quirk: bool) -> tuple[dict, list]:
    """The metrics.json blocks (speak, nlg, dst, decisions) and the per-video speaking matches."""
    speak_matches = []
    dst_videos = []
    speak_probs, speak_labels, dst_probs, dst_labels = [], [], [], []
    for video, records in zip(videos, all_records):
        window, _ = metrics.window_for_dataset(video.dataset)
        base = video.start
        pred = [(r.frame - base, r.asst_text or "") for r in records if r.speak]
        ref = [(k - base, " ".join(ev.asst_texts)) for k, ev in sorted(video.events.items()) if ev.asst_texts]
        speak_matches += metrics.match_speaking(
            [{"num_frames": video.num_frames, "pred": pred, "ref": ref}], embed, window, zero_cost_quirk)
        order = [s.id for s in video.steps]
        ref_states = video.reference_states()
        pred_states = predicted_states(video, records)
        dst_videos.append({
            "num_frames": video.num_frames, "window": window,
            "pred": [(r.frame - base, s, t) for r in records for s, t in r.transitions],
            "ref": [(k - base, s, t) for k, ev in sorted(video.events.items()) for s, t in ev.transitions],
            "pred_states": [[st[i] for i in order] for st in pred_states],
            "ref_states": [[st[i] for i in order] for st in ref_states],
            "num_invalid": sum(r.num_invalid for r in records),
            "num_generated": sum(len(r.transitions) if r.transitions else (1 if r.dst_text is not None else 0) for r in records),
        })
        for r in records:
            ev = video.events.get(r.frame, FrameEvents())
            speak_probs.append(r.p_speak); speak_labels.append(int(bool(ev.asst_texts)))
            dst_probs.append(r.p_dst); dst_labels.append(int(bool(ev.transitions)))
    speak = metrics.summarize_speaking(speak_matches, fps=videos[0].fps)
    text_quality = nlg.nlg_metrics(metrics.good_match_pairs(speak_matches))
    dst = metrics.dst_metrics(dst_videos)  # each video carries its dataset's window
    decisions = {
        "speak": metrics.decision_metrics(speak_probs, speak_labels, thresholds.speak),
        "dst": metrics.decision_metrics(dst_probs, dst_labels, thresholds.dst),
    }
    return {"speak": speak, "nlg": text_quality, "dst": dst, "decisions": decisions}, speak_matches


# ----------------------------------------------------------------------------------------------------
# Outputs


def prediction_lines(video: Video, records: list[FrameRecord]) -> list[dict]:
    ref_states = video.reference_states()
    pred_states = predicted_states(video, records)
    lines = []
    for rec, pred_state, ref_state in zip(records, pred_states, ref_states):
        ev = video.events.get(rec.frame, FrameEvents())
        lines.append({
            "video_uid": video.video_uid, "frame": rec.frame, "time": rec.frame / video.fps, "fps": video.fps,
            "p_speak": rec.p_speak, "p_dst": rec.p_dst, "speak": rec.speak, "dst": rec.dst,
            "asst_text": rec.asst_text, "dst_text": rec.dst_text,
            "transitions": [list(t) for t in rec.transitions], "num_invalid": rec.num_invalid,
            "pred_state": pred_state, "user_text": " ".join(ev.user_texts) or None,
            "ref_asst_text": " ".join(ev.asst_texts) or None,
            "ref_transitions": [list(t) for t in ev.transitions], "ref_state": ref_state,
        })
    return lines


# ----------------------------------------------------------------------------------------------------
# LLM-judge scores of these predictions: judge.py writes judge.json next to them; this module only reads it

JUDGE_FILE = "judge.json"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def judge_of_predictions(out_dir: Path) -> Optional[dict]:
    """out_dir/judge.json when it scores out_dir/predictions.jsonl as the file is now, else None. Scores of
    other predictions (their sha256 differs) are stale: they are left out, and stderr says so."""
    path = out_dir / JUDGE_FILE
    if not path.exists():
        return None
    try:
        judge = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({err}): delete it, or run `python judge.py {out_dir}` again")
    if judge.get("predictions_sha256") != file_sha256(out_dir / "predictions.jsonl"):
        print(f"note: {path} scores other predictions than {out_dir / 'predictions.jsonl'} (sha256 differs): its "
              f"LLM-judge scores are left out of report.html and --markdown; run `python judge.py {out_dir}` "
              f"to score these predictions", file=sys.stderr)
        return None
    return judge


# ----------------------------------------------------------------------------------------------------
# Driver


def run_split(runner: Optional[StreamingRunner], videos: list[Video], store: FrameStore, thresholds: Thresholds,
              oracle: bool, desc: str, raw_frames: Optional[RawFrameReader] = None) -> list[list[FrameRecord]]:
    """Stream every video; features are read one video at a time (memory-mapped), never the whole split.
    With data.frames=raw the model's frozen vision tower makes them from the video's frames."""
    all_records = []
    progress = Progress(len(videos), desc, "video")
    for video in videos:
        if oracle:
            all_records.append(oracle_records(video))
        else:
            feats = (video_features(video, store, store.num_tokens_per_frame) if raw_frames is None else
                     raw_video_features(video.clips, raw_frames, runner.model.vision, runner.device, runner.autocast))
            all_records.append(runner.run(video, feats, thresholds))
        progress.update()
    progress.close()
    return all_records


def parse_list(text: Optional[str]) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"threshold list '{text}' must be comma-separated numbers, e.g. 0.2,0.3,0.5") from None


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", help="checkpoint directory (runs/<name>/step_<N>)")
    parser.add_argument("--config", help="config YAML instead of a checkpoint (only with --oracle)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the checkpoint's config (e.g. eval.max_new_tokens=32)")
    parser.add_argument("--split", help="train, val or test (default: eval.split)")
    parser.add_argument("--out", help="output directory (default: <ckpt>/eval_<split>)")
    parser.add_argument("--max-videos", type=int, help="evaluate only the first N videos")
    parser.add_argument("--speak-threshold", type=float, help="speak when p_speak > this (default: eval.speak_threshold)")
    parser.add_argument("--dst-threshold", type=float, help="update when p_dst > this (default: eval.dst_threshold)")
    parser.add_argument("--sweep-speak", help="comma-separated speak thresholds; one stream per (speak, dst) pair")
    parser.add_argument("--sweep-dst", help="comma-separated dst thresholds")
    parser.add_argument("--oracle", action="store_true", help="ground truth instead of the model (perfect scores expected)")
    parser.add_argument("--teacher-forced", action="store_true", help="ground-truth DST/assistant blocks as context")
    parser.add_argument("--markdown", action="store_true", help="also print the headline figures as a Markdown table")
    parser.add_argument("--embedder", help="minilm (default), bow, or a sentence-encoder directory (eval.embedder)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"),
                        help="compute precision (default: the checkpoint's train.precision, resolved for this device "
                             "as training resolves it; auto: bf16 on compute capability >= 8.0, fp16 below, fp32 on CPU)")
    args = parser.parse_intermixed_args(argv)  # key=value overrides may sit between options
    try:
        return evaluate(args)
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def inference_precision(requested: Optional[str], trained: str, device_type: str,
                        capability: Optional[tuple[int, int]]) -> tuple[torch.dtype, str]:
    """(autocast dtype, why). By default the precision the checkpoint was trained with: its train.precision,
    resolved for this device exactly as training resolves it (an fp32-trained model stays fp32 on a GPU
    where auto would pick fp16); `requested` (--precision) overrides."""
    chosen = trained if requested is None else requested
    dtype, _, _ = choose_precision(chosen, device_type, capability)
    why = f"the checkpoint's train.precision={trained}" if requested is None else f"--precision {requested}"
    if chosen == "auto":
        where = f"compute capability {capability[0]}.{capability[1]}" if capability else device_type
        why += f", which gives {DTYPE_NAMES[dtype]} on this {where}"
    return dtype, why + ("; --precision overrides" if requested is None else "")


def evaluate(args) -> int:
    if not args.ckpt and not (args.config and args.oracle):
        raise ConfigError("give --ckpt DIR (or --config CONFIG together with --oracle)")
    prefer_expandable_segments()
    device = torch.device(args.device)
    attention = configure_attention(device)
    model = None
    if args.ckpt:
        ckpt = require_checkpoint(args.ckpt, "--ckpt ",
                                  instead="train first (python train.py CONFIG), or pass a step_<N> directory of a run")
        # Overrides apply before the model is built: model.path=... can point at a base model that moved.
        if args.oracle:
            cfg, tokenizer = read_config(ckpt, args.overrides), None
        else:
            model, tokenizer, cfg = load_for_inference(ckpt, device, args.overrides)
        source = str(ckpt)
    else:
        cfg = load_config(args.config, args.overrides)
        tokenizer = None
        source = "oracle"
    split = args.split or cfg.eval.split
    out_dir = Path(args.out) if args.out else (Path(args.ckpt) if args.ckpt else Path(cfg.run.dir)) / f"eval_{split}"
    thresholds = Thresholds(
        args.speak_threshold if args.speak_threshold is not None else cfg.eval.speak_threshold,
        args.dst_threshold if args.dst_threshold is not None else cfg.eval.dst_threshold,
    )

    # Every clip parsed and every frame row checked before hours of streaming, under data.on_invalid_clip.
    # Token budgets do not apply: the stream renders whole videos and manages its own context.
    store = FrameStore.from_config(cfg)
    raw_frames = raw_frame_reader(cfg, store) if cfg.data.frames == "raw" and not args.oracle else None
    clips, report = usable_clips(cfg, split, None, store)
    for line in report.lines():
        print(line, file=sys.stderr)
    skipped_videos = sorted({p.video_uid for problems in report.skipped.values() for p in problems})
    if skipped_videos:  # a video is evaluated whole or not at all
        clips = [c for c in clips if c.video_uid not in set(skipped_videos)]
        print(f"skipping {len(skipped_videos)} video(s) with a skipped clip: {', '.join(map(str, skipped_videos[:10]))}"
              + (" ..." if len(skipped_videos) > 10 else ""), file=sys.stderr)
    videos = assemble_videos(clips)
    for dataset in sorted({v.dataset for v in videos}):
        window, known = metrics.window_for_dataset(dataset)
        # The demo's synthetic dataset is ours and is scored with the default window by design; the warning
        # is for a real dataset the window table lacks. (Not a table entry: names match there by substring.)
        if not known and dataset != DEMO_DATASET:
            print(f"warning: unknown dataset '{dataset}': speaking/DST matching uses the default window {window}",
                  file=sys.stderr)
    if args.max_videos:
        videos = videos[:args.max_videos]
    if not videos:
        raise DataError(f"split '{split}' has no videos to evaluate")

    embedder_choice = args.embedder or cfg.eval.embedder or "minilm"
    embed = nlg.load_embedder(embedder_choice)
    runner = None
    if model is not None:
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        dtype, reason = inference_precision(args.precision, cfg.train.precision, device.type, capability)
        if dtype == torch.float32:
            model.float()  # frozen weights stored in fp16/bf16 are exact in fp32; no autocast to pair them with
        print(f"precision: {DTYPE_NAMES[dtype]} ({reason}); {attention}", file=sys.stderr)
        renderer = Renderer(tokenizer, cfg.data.num_tokens_per_frame)
        runner = StreamingRunner(model, renderer, cfg, device, teacher_forced=args.teacher_forced, dtype=dtype)

    out_dir.mkdir(parents=True, exist_ok=True)
    speak_list = parse_list(args.sweep_speak) or [thresholds.speak]
    dst_list = parse_list(args.sweep_dst) or [thresholds.dst]
    sweep_rows, best = [], None
    for s in speak_list:
        for d in dst_list:
            th = Thresholds(s, d)
            start = time.perf_counter()
            if runner:
                runner.context_resets = 0  # the runner is reused across pairs; each pair reports its own count
            all_records = run_split(runner, videos, store, th, args.oracle, f"stream speak>{s} dst>{d}", raw_frames)
            seconds = time.perf_counter() - start
            context_resets = runner.context_resets if runner else 0
            blocks, speak_matches = compute_metrics(videos, all_records, embed, th, cfg.eval.zero_cost_quirk)
            num_frames = sum(v.num_frames for v in videos)
            result = {
                "split": split, "checkpoint": source, "num_videos": len(videos), "num_frames": num_frames,
                "embedder": getattr(embed, "name", embedder_choice),
                "thresholds": {"speak": s, "dst": d}, **blocks,
                "seconds": seconds, "frames_per_second": num_frames / seconds if seconds > 0 else None,
                "zero_cost_quirk": cfg.eval.zero_cost_quirk, "mode": "oracle" if args.oracle else (
                    "teacher_forced" if args.teacher_forced else "streaming"),
                "context_strategy": cfg.eval.context_strategy,
                "context_resets": context_resets,
            }
            row = {"speak_threshold": s, "dst_threshold": d, "speak_f1": blocks["speak"]["f1"],
                   "dst_f1": blocks["dst"]["f1"], "speak_precision": blocks["speak"]["precision"],
                   "speak_recall": blocks["speak"]["recall"], "bleu4": blocks["nlg"]["bleu4"],
                   "context_resets": context_resets}
            sweep_rows.append(row)
            key = (blocks["speak"]["f1"], blocks["dst"]["f1"])
            if best is None or key > best[0]:
                best = (key, result, all_records, speak_matches, th)
    _, result, all_records, speak_matches, th = best
    if len(sweep_rows) > 1:
        result["sweep"] = sweep_rows
        result["best"] = {"speak": th.speak, "dst": th.dst, "by": "speak f1, then dst f1"}
    with open(out_dir / "predictions.jsonl", "w") as f:
        for video, records in zip(videos, all_records):
            for line in prediction_lines(video, records):
                f.write(json.dumps(line) + "\n")
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    if len(sweep_rows) > 1:
        with open(out_dir / "sweep.csv", "w") as f:  # one row per (speak, dst) threshold pair
            f.write(",".join(sweep_rows[0]) + "\n")
            f.writelines(",".join(str(v) for v in row.values()) + "\n" for row in sweep_rows)
    judge = judge_of_predictions(out_dir)
    write_report(out_dir / "report.html", result, videos, all_records, speak_matches, th,
                 sweep_rows if len(sweep_rows) > 1 else None, judge=judge)
    s, d, n = result["speak"], result["dst"], result["nlg"]
    if len(sweep_rows) > 1:
        for r in sweep_rows:
            print(f"sweep speak>{r['speak_threshold']} dst>{r['dst_threshold']}: speak F1 {r['speak_f1']:.3f} dst F1 {r['dst_f1']:.3f}")
        print(f"best: speak>{th.speak} dst>{th.dst}")
    print(
        f"{result['mode']} {split}: {result['num_videos']} videos, {result['num_frames']} frames, "
        f"{result['frames_per_second']:.1f} frames/s | speak P {s['precision']:.3f} R {s['recall']:.3f} F1 {s['f1']:.3f} | "
        f"dst P {d['precision']:.3f} R {d['recall']:.3f} F1 {d['f1']:.3f} state acc {d['state_accuracy']:.3f} | "
        f"BLEU-4 {n['bleu4']:.3f} CIDEr {n['cider']:.3f}"
    )
    print(f"wrote {out_dir}/predictions.jsonl, metrics.json, report.html" + (", sweep.csv" if len(sweep_rows) > 1 else ""))
    if args.markdown:
        print(markdown_summary(result, judge))
    return 0


if __name__ == "__main__":
    sys.exit(main())
