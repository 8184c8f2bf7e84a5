"""Streaming evaluation: whole videos, frame by frame, with the KV cache; ProAssist speaking metrics, DST metrics.

    python evaluate.py --ckpt runs/demo/step_600                      # test split (eval.split) of the run's data
    python evaluate.py --ckpt runs/demo/step_600 --split val --max-videos 5
    python evaluate.py --ckpt runs/x/step_5000 --sweep-speak 0.2,0.3,0.4,0.5 --sweep-dst 0.3,0.5,0.7
    python evaluate.py --ckpt runs/x/step_5000 --teacher-forced       # ground-truth blocks as context
    python evaluate.py --config configs/demo.yaml --oracle            # ground truth as the model: perfect scores
    torchrun --nproc_per_node=4 evaluate.py --ckpt runs/x/step_5000   # whole videos split over 4 GPUs

Outputs go to <ckpt>/eval_<split>/ (or --out): predictions.jsonl (one line per frame per video),
metrics.json (docs/evaluation.md#metricsjson) and report.html (summary, per-video timelines of both heads, the
replies matched, missed and redundant, the DST updates and the state grid, metric definitions).

The stream itself (stream.py) feeds each frame and the blocks the heads ask for, with the same pieces
sequence.Renderer renders training sequences from; this script chooses the videos, runs the stream for each
threshold pair, scores the records and writes the outputs. Under torchrun each rank streams a share of the
whole videos (longest first, balanced by frame count) and rank 0 gathers the records, puts them back in the split's
order and writes exactly the files one process writes (docs/evaluation.md#on-several-gpus-and-nodes).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

import metrics
import nlg
from checkpoint import CheckpointError, load_for_inference, read_config, require_checkpoint
from clips import DataError, FrameEvents
from config import Config, ConfigError, load_config
from data import raw_frame_reader, usable_clips
from distributed import (
    balanced_shares, end_distributed, exit_process, first_error, gather_to_first, setup_distributed,
)
from frames import FrameStore, RawFrameReader
from logs import Progress
from model import (
    cast_for_inference, configure_attention, device_capability, inference_precision, prefer_expandable_segments,
)
from report import markdown_summary, write_report
from sequence import Renderer
from stream import (
    FrameRecord, StreamingRunner, Thresholds, Video, assemble_videos, oracle_records, predicted_states,
    raw_video_features, video_features,
)

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


@dataclass
class Split:
    """The videos one evaluation streams, and where their frames come from."""
    name: str
    videos: list[Video]
    store: FrameStore
    raw_frames: Optional[RawFrameReader]  # data.frames=raw: the model's tower encodes the videos' frames


@dataclass
class PairResult:
    """One stream over the split at one (speak, dst) threshold pair: metrics.json's content and what the report
    and predictions.jsonl are written from."""
    result: dict
    thresholds: Thresholds
    records: list[list[FrameRecord]]
    speak_matches: list

    def row(self) -> dict:
        """This pair's line of sweep.csv."""
        blocks = self.result
        return {"speak_threshold": self.thresholds.speak, "dst_threshold": self.thresholds.dst,
                "speak_f1": blocks["speak"]["f1"], "dst_f1": blocks["dst"]["f1"],
                "speak_precision": blocks["speak"]["precision"], "speak_recall": blocks["speak"]["recall"],
                "bleu4": blocks["nlg"]["bleu4"], "context_resets": blocks["context_resets"]}


def run_split(runner: Optional[StreamingRunner], split: Split, share: list[int], thresholds: Thresholds,
              show_progress: bool = True) -> list[list[FrameRecord]]:
    """Stream the videos `share` indexes (the ground truth instead with no runner: --oracle); features are read
    one video at a time (memory-mapped), never the whole split. With data.frames=raw the model's frozen vision
    tower makes them from the video's frames."""
    all_records = []
    ranks_note = f" (this rank's {len(share)} of {len(split.videos)})" if len(share) < len(split.videos) else ""
    progress = Progress(len(share), f"stream speak>{thresholds.speak} dst>{thresholds.dst}{ranks_note}", "video",
                        enabled=show_progress)
    for video in (split.videos[i] for i in share):
        if runner is None:
            all_records.append(oracle_records(video))
        else:
            feats = (video_features(video, split.store, split.store.num_tokens_per_frame) if split.raw_frames is None
                     else raw_video_features(video.clips, split.raw_frames, runner.model.vision, runner.device,
                                             runner.autocast))
            all_records.append(runner.run(video, feats, thresholds))
        progress.update()
    progress.close()
    return all_records


# Errors a user can act on (a bad path, a bad setting, bad data): one `error: ...` line and exit status 1.
USER_ERRORS = (ConfigError, DataError, CheckpointError)


class EvaluationError(Exception):
    """A user error that ended a phase on every rank (see `together`); the message is the failing rank's."""


@contextmanager
def together(world_size: int):
    """A phase that all ranks end together: a user error on any rank ends it on every rank with that error's
    message (an EvaluationError), so that no rank waits in a later collective for one that gave up. One process:
    the error itself, as an EvaluationError with its message."""
    error = None
    try:
        yield
    except USER_ERRORS as err:
        error = str(err)
    agreed = first_error(error, world_size)
    if agreed is not None:
        end_distributed(world_size)  # every rank is here: leave the process group cleanly before exiting
        raise EvaluationError(agreed)


@dataclass
class Evaluation:
    """An evaluation set up on this rank: the stream (None for --oracle), the split, the threshold pairs, what
    scores and names the results (rank 0), and the videos this rank streams."""
    cfg: Config
    split: Split
    runner: Optional[StreamingRunner]
    embed: object  # only rank 0 scores: None on the other ranks
    header: dict  # metrics.json's fields that do not depend on the pair (split, checkpoint, embedder, mode)
    out_dir: Path
    pairs: list[Thresholds]
    share: list[int]  # indices into split.videos
    rank: int = 0
    world_size: int = 1


def in_split_order(gathered: list[tuple[list[int], list, int]], num_videos: int) -> list[list[FrameRecord]]:
    """Every rank's (share, records, context resets), as gathered, back in the split's video order."""
    records: list = [None] * num_videos
    for share, share_records, _ in gathered:
        for index, video_records in zip(share, share_records):
            records[index] = video_records
    return records


def stream_pair(ev: Evaluation, thresholds: Thresholds) -> Optional[PairResult]:
    """Stream the split at `thresholds` (each rank its share) and score it on rank 0; None on the other ranks.
    The seconds are rank 0's wall clock from the start of the stream until every rank's records are in."""
    start = time.perf_counter()
    if ev.runner is not None:
        ev.runner.context_resets = 0  # the runner is reused across pairs; each pair reports its own count
    with together(ev.world_size):
        mine = run_split(ev.runner, ev.split, ev.share, thresholds, show_progress=ev.rank == 0)
    resets = ev.runner.context_resets if ev.runner is not None else 0
    gathered = gather_to_first((ev.share, mine, resets), ev.world_size)
    if gathered is None:
        return None
    records = in_split_order(gathered, len(ev.split.videos))
    seconds = time.perf_counter() - start
    blocks, speak_matches = compute_metrics(ev.split.videos, records, ev.embed, thresholds, ev.cfg.eval.zero_cost_quirk)
    num_frames = sum(v.num_frames for v in ev.split.videos)
    result = {
        **ev.header, "num_videos": len(ev.split.videos), "num_frames": num_frames,
        "thresholds": {"speak": thresholds.speak, "dst": thresholds.dst}, **blocks,
        "seconds": seconds, "frames_per_second": num_frames / seconds if seconds > 0 else None,
        "zero_cost_quirk": ev.cfg.eval.zero_cost_quirk, "context_strategy": ev.cfg.eval.context_strategy,
        "context_resets": sum(rank_resets for _, _, rank_resets in gathered),
    }
    return PairResult(result, thresholds, records, speak_matches)


def parse_list(text: Optional[str]) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"threshold list '{text}' must be comma-separated numbers, e.g. 0.2,0.3,0.5") from None


def load_split_videos(cfg: Config, split_name: str, oracle: bool, max_videos: Optional[int],
                      announce: bool = True) -> Split:
    """The split's whole videos. Every clip parsed and every frame row checked before hours of streaming, under
    data.on_invalid_clip; a video with a skipped clip is left out whole. Token budgets do not apply: the stream
    renders whole videos and manages its own context. `announce`: print what was skipped and why (one rank)."""
    store = FrameStore.from_config(cfg)
    raw_frames = raw_frame_reader(cfg, store) if cfg.data.frames == "raw" and not oracle else None
    clips, report = usable_clips(cfg, split_name, None, store)
    for line in report.lines() if announce else []:
        print(line, file=sys.stderr)
    # A skipped clip without a usable video_uid belongs to no video: nothing else to leave out for it.
    skipped_videos = sorted({p.video_uid for problems in report.skipped.values() for p in problems
                             if p.video_uid is not None}, key=str)
    if skipped_videos:
        clips = [c for c in clips if c.video_uid not in set(skipped_videos)]
    if skipped_videos and announce:
        print(f"skipping {len(skipped_videos)} video(s) with a skipped clip: {', '.join(map(str, skipped_videos[:10]))}"
              + (" ..." if len(skipped_videos) > 10 else ""), file=sys.stderr)
    videos = assemble_videos(clips)
    for dataset in sorted({v.dataset for v in videos}):
        window, known = metrics.window_for_dataset(dataset)
        if not known and announce:
            print(f"warning: unknown dataset '{dataset}': speaking/DST matching uses the default window {window}",
                  file=sys.stderr)
    videos = videos[:max_videos] if max_videos else videos
    if not videos:
        raise DataError(f"split '{split_name}' has no videos to evaluate")
    return Split(split_name, videos, store, raw_frames)


def load_run(args, device: torch.device) -> tuple[Config, Optional[torch.nn.Module], object, str]:
    """(config, model or None for --oracle, tokenizer, what metrics.json names as the checkpoint). Overrides apply
    before the model is built: model.path=... can point at a base model that moved."""
    if not args.ckpt:
        if not (args.config and args.oracle):
            raise ConfigError("give --ckpt DIR (or --config CONFIG together with --oracle)")
        return load_config(args.config, args.overrides), None, None, "oracle"
    ckpt = require_checkpoint(args.ckpt, "--ckpt ",
                              instead="train first (python train.py CONFIG), or pass a step_<N> directory of a run")
    if args.oracle:
        return read_config(ckpt, args.overrides), None, None, str(ckpt)
    model, tokenizer, cfg = load_for_inference(ckpt, device, args.overrides)
    trained = read_config(ckpt).model.frozen_dtype
    if cfg.model.frozen_dtype != trained:
        print(f"note: the base is evaluated with model.frozen_dtype={cfg.model.frozen_dtype}, trained with {trained}: "
              f"the adapters were trained against other base weights", file=sys.stderr)
    return cfg, model, tokenizer, str(ckpt)


def write_outputs(out_dir: Path, best: PairResult, split: Split, sweep_rows: Optional[list[dict]]) -> Optional[dict]:
    """predictions.jsonl and metrics.json of the best pair, sweep.csv when there were several pairs, report.html
    (with an LLM judge's scores when out_dir holds them for exactly these predictions). Returns those scores."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "predictions.jsonl", "w") as f:
        for video, records in zip(split.videos, best.records):
            for line in prediction_lines(video, records):
                f.write(json.dumps(line) + "\n")
    (out_dir / "metrics.json").write_text(json.dumps(best.result, indent=2))
    if sweep_rows:
        with open(out_dir / "sweep.csv", "w") as f:  # one row per (speak, dst) threshold pair
            f.write(",".join(sweep_rows[0]) + "\n")
            f.writelines(",".join(str(v) for v in row.values()) + "\n" for row in sweep_rows)
    judge = judge_of_predictions(out_dir)
    write_report(out_dir / "report.html", best.result, split.videos, best.records, best.speak_matches,
                 best.thresholds, sweep_rows, judge=judge)
    return judge


def print_summary(result: dict, out_dir: Path, sweep_rows: Optional[list[dict]], markdown: bool,
                  judge: Optional[dict] = None) -> None:
    s, d, n = result["speak"], result["dst"], result["nlg"]
    for r in sweep_rows or []:
        print(f"sweep speak>{r['speak_threshold']} dst>{r['dst_threshold']}: speak F1 {r['speak_f1']:.3f} "
              f"dst F1 {r['dst_f1']:.3f}")
    if sweep_rows:
        print(f"best: speak>{result['thresholds']['speak']} dst>{result['thresholds']['dst']}")
    print(
        f"{result['mode']} {result['split']}: {result['num_videos']} videos, {result['num_frames']} frames, "
        f"{result['frames_per_second']:.1f} frames/s | speak P {s['precision']:.3f} R {s['recall']:.3f} F1 {s['f1']:.3f} | "
        f"dst P {d['precision']:.3f} R {d['recall']:.3f} F1 {d['f1']:.3f} state acc {d['state_accuracy']:.3f} | "
        f"BLEU-4 {n['bleu4']:.3f} CIDEr {n['cider']:.3f}"
    )
    print(f"wrote {out_dir}/predictions.jsonl, metrics.json, report.html" + (", sweep.csv" if sweep_rows else ""))
    if markdown:
        print(markdown_summary(result, judge))


def load_embedder(choice: str):
    """The sentence embedder, or a user error naming the fix (the package to install, the directory to pass)."""
    try:
        return nlg.load_embedder(choice)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from None


def set_up(args, rank: int, world_size: int, device: torch.device) -> Evaluation:
    """Config, model and runner, the split's videos and this rank's share of them; on rank 0 also the embedder
    (only rank 0 scores) and the start-up lines."""
    attention = configure_attention(device)
    cfg, model, tokenizer, source = load_run(args, device)
    split = load_split_videos(cfg, args.split or cfg.eval.split, args.oracle, args.max_videos, announce=rank == 0)
    out_dir = Path(args.out) if args.out else (Path(args.ckpt) if args.ckpt else Path(cfg.run.dir)) / f"eval_{split.name}"
    embedder_choice = args.embedder or cfg.eval.embedder or "minilm"
    embed = load_embedder(embedder_choice) if rank == 0 else None
    runner = None
    if model is not None:
        precision = inference_precision(args.precision, cfg.train.precision, device.type, device_capability(device))
        if precision.dtype == torch.float32:
            cast_for_inference(model, precision.dtype)  # frozen weights stored in fp16/bf16 are exact in fp32
        if rank == 0:
            print(f"precision: {precision.name} ({precision.reason}); {attention}", file=sys.stderr)
        renderer = Renderer(tokenizer, cfg.data.num_tokens_per_frame)
        runner = StreamingRunner(model, renderer, cfg, device, teacher_forced=args.teacher_forced, dtype=precision.dtype)

    header = {"split": split.name, "checkpoint": source, "embedder": getattr(embed, "name", embedder_choice),
              "mode": "oracle" if args.oracle else ("teacher_forced" if args.teacher_forced else "streaming")}
    speak = args.speak_threshold if args.speak_threshold is not None else cfg.eval.speak_threshold
    dst = args.dst_threshold if args.dst_threshold is not None else cfg.eval.dst_threshold
    pairs = [Thresholds(s, d) for s in parse_list(args.sweep_speak) or [speak] for d in parse_list(args.sweep_dst) or [dst]]
    share = balanced_shares([video.num_frames for video in split.videos], world_size)[rank]
    return Evaluation(cfg, split, runner, embed, header, out_dir, pairs, share, rank, world_size)


def finish(ev: Evaluation, results: list[PairResult], markdown: bool) -> None:
    """Rank 0: the best pair, the output files and the console summary."""
    # The best pair by speaking F1, then DST F1; the first of equals.
    best = max(results, key=lambda r: (r.result["speak"]["f1"], r.result["dst"]["f1"]))
    sweep_rows = [r.row() for r in results] if len(results) > 1 else None
    if sweep_rows:
        best.result["sweep"] = sweep_rows
        best.result["best"] = {"speak": best.thresholds.speak, "dst": best.thresholds.dst, "by": "speak f1, then dst f1"}
    judge = write_outputs(ev.out_dir, best, ev.split, sweep_rows)
    print_summary(best.result, ev.out_dir, sweep_rows, markdown, judge)


def evaluate(args) -> int:
    """One process, or one rank of a torchrun launch: every rank sets up the same way and streams its share of the
    videos; rank 0 gathers, scores and writes. A user error on any rank ends every rank (EvaluationError)."""
    prefer_expandable_segments()
    rank, _, world_size, rank_device = setup_distributed(args.dist_timeout_s)
    device = torch.device(args.device) if args.device else rank_device
    with together(world_size):
        ev = set_up(args, rank, world_size, device)
    results = [stream_pair(ev, thresholds) for thresholds in ev.pairs]
    with together(world_size):
        if rank == 0:
            finish(ev, results, args.markdown)
    end_distributed(world_size)
    return 0


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
    parser.add_argument("--device", help="cuda if available (under torchrun: the rank's GPU), else cpu")
    parser.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"),
                        help="compute precision (default: the checkpoint's train.precision, resolved for this device "
                             "as training resolves it; auto: bf16 on compute capability >= 8.0, fp16 below, fp32 on CPU)")
    parser.add_argument("--dist-timeout-s", type=int, default=3600,
                        help="under torchrun: how long a rank waits in a collective, e.g. a rank that finished its "
                             "videos for the slowest one (default 3600; raise it when one video streams for longer)")
    args = parser.parse_intermixed_args(argv)  # key=value overrides may sit between options
    rank = os.environ.get("RANK", "0")
    try:
        return evaluate(args)
    except EvaluationError as err:
        if rank == "0":  # every rank has the same message: print it once
            print(f"error: {err}", file=sys.stderr)
        return 1
    except dist.DistBackendError as err:
        print(f"error: rank {rank}: a collective failed (did a peer or the launcher die?): {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_process(code)  # gloo workers end without interpreter finalization (see distributed.exit_process)
    sys.exit(code)
