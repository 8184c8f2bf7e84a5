"""The evaluation report: one self-contained HTML page (inline SVG and CSS, no script, no external assets).

    write_report(out_dir / "report.html", result, videos, all_records, speak_matches, thresholds)

evaluate.py writes it next to metrics.json and predictions.jsonl. The page holds:

* the summary of metrics.json as small metric/value tables that wrap at laptop widths, each metric name
  linking to its definition at the bottom of the page (also shown as a tooltip);
* an overview table with one row per video;
* per video, a timeline on one time axis in seconds (frame k shows time k / fps): a lane per head with its
  probability, threshold and the frames where it fired; the replies (reference above, generated below,
  coloured by the matching's outcome); the DST updates (reference above, predicted below); and the
  dialogue state of every step (reference bar above the predicted bar, red outline where they differ);
* per video, the missed and redundant replies, the matched pairs and the DST updates as tables.

Nothing here scores anything: the matches, misses and redundant replies are metrics.match_speaking's, the
windows are metrics.window_for_dataset's and the predicted states are stream.predicted_states'.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Optional

import metrics
from clips import STATES, FrameEvents, apply_transition, format_transitions
from plots import DST_COLOR, SPEAK_COLOR, format_tick, nice_ticks
from stream import FrameRecord, Thresholds, Video, predicted_states

STATE_COLORS = {"not_started": "#dedede", "in_progress": "#f5b324", "completed": "#2e9d57"}
GOOD_COLOR, WEAK_COLOR, ERROR_COLOR, MUTED_COLOR = "#2e9d57", "#e08a00", "#d62728", "#999"
START_COLOR, COMPLETE_COLOR = "#d98c00", "#2e9d57"  # DST transitions, in the colour of the state they lead to

esc = html.escape

# ----------------------------------------------------------------------------------------------------
# What each number of metrics.json means (shown at the bottom of the page, and as tooltips)

DEFINITIONS: dict[str, dict[str, str]] = {
    "speak": {
        "precision": "good / (matched + redundant): the share of generated replies that matched a reference "
                     "reply with a semantic score > 0.5.",
        "recall": "good / (matched + missed): the share of reference replies that a generated reply matched with "
                  "a semantic score > 0.5.",
        "f1": "2 · precision · recall / (precision + recall).",
        "jaccard": "good / (matched + missed + redundant).",
        "missing_rate": "missed / (matched + missed): reference replies that no generated reply was assigned to.",
        "redundant_rate": "redundant / (matched + redundant): generated replies assigned to a frame without a "
                          "reference reply.",
        "semantic_score": "Mean semantic score |cos| of the matches whose score is ≥ 0.5 (ProAssist's convention; "
                          "'good' needs > 0.5).",
        "time_diff": "Mean |generated frame − reference frame| / fps, in seconds, over the good matches.",
        "num_good": "Matches whose semantic score |cos(embedding(generated), embedding(reference))| is > 0.5.",
        "num_matched": "Generated replies assigned to a reference reply by the matching (good or not).",
        "num_missed": "Reference replies left unassigned.",
        "num_redundant": "Generated replies assigned to a frame without a reference reply.",
    },
    "nlg": {
        "bleu1": "Corpus BLEU-1 of the good matches (generated against its reference), COCO-caption definition.",
        "bleu2": "Corpus BLEU-2 of the good matches.",
        "bleu3": "Corpus BLEU-3 of the good matches.",
        "bleu4": "Corpus BLEU-4 of the good matches.",
        "cider": "CIDEr-D of the good matches (tf-idf n-gram similarity, n = 1..4, times 10).",
        "meteor": "Mean METEOR of the good matches (nltk, WordNet 3.0); empty when WordNet is not installed.",
        "rougeL": "Mean ROUGE-L F-measure of the good matches.",
        "num_pairs": "Good matches scored (those whose reference has words).",
    },
    "dst": {
        "precision": "matched / predicted (step, transition) items. A predicted item at frame i matches an equal "
                     "reference item at frame j when l ≤ j − i ≤ r (the dataset's window), one to one, minimising "
                     "the total |j − i|.",
        "recall": "matched / reference (step, transition) items.",
        "f1": "2 · precision · recall / (precision + recall) of the transition items.",
        "state_accuracy": "Mean over all frames of the fraction of steps whose predicted state equals the "
                          "reference state.",
        "joint_accuracy": "Fraction of frames where every step's predicted state equals the reference.",
        "invalid_rate": "Generated DST updates that were unparsable or illegal (e.g. completing a step that was "
                        "not in progress), over all generated updates.",
    },
    "decisions": {
        "precision": "Of the frames where the head fired (p > threshold), the share with a reference event at that "
                     "exact frame (no window): a reference reply for the speak head, a reference update for the "
                     "DST-update head.",
        "recall": "Of the frames with a reference event, the share where the head fired.",
        "f1": "2 · precision · recall / (precision + recall) of the per-frame decisions.",
        "auroc": "Area under the ROC curve of the head's probability against the per-frame labels "
                 "(threshold-free); empty when a split has only one class.",
    },
}
BLOCK_TITLES = {
    "speak": "Speaking: replies matched to the reference",
    "nlg": "Reply text (good matches)",
    "dst": "Dialogue state tracking",
    "decisions": "per-frame decisions of each head",
    "decisions.speak": "Speak head, per frame",
    "decisions.dst": "DST-update head, per frame",
}


def _definition(block: str, key: str) -> Optional[str]:
    return DEFINITIONS.get(block.split(".")[0], {}).get(key)


def _anchor(block: str, key: str) -> str:
    return f"def-{block.split('.')[0]}-{key}"


UNITS = {"time_diff": " s"}


def _fmt(value, key: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not key.startswith("num_"):
        return f"{value:.3f}{UNITS.get(key, '')}"
    return esc(str(value))


def _seconds(frame: int, fps: float) -> str:
    """Time shown by frame k: k / fps, to the precision the frame rate can resolve."""
    return f"{frame / fps:.{1 if fps <= 10 else 2}f}"


# ----------------------------------------------------------------------------------------------------
# SVG pieces


def _marker(shape: str, x: float, y: float, color: str, title: str = "", hollow: bool = False, size: float = 5) -> str:
    paint = f'fill="white" stroke="{color}" stroke-width="2"' if hollow else f'fill="{color}"'
    tip = f"<title>{esc(title)}</title>" if title else ""
    s = size
    if shape == "circle":
        return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{s - 0.5}" {paint}>{tip}</circle>'
    if shape == "down":
        d = f"M{x - s:.1f},{y - s * 0.8:.1f}h{2 * s}l{-s},{s * 1.7:.1f}z"
    elif shape == "right":
        d = f"M{x - s * 0.8:.1f},{y - s:.1f}v{2 * s}l{s * 1.7:.1f},{-s}z"
    elif shape == "square":
        d = f"M{x - s * 0.8:.1f},{y - s * 0.8:.1f}h{1.6 * s}v{1.6 * s}h{-1.6 * s}z"
    elif shape == "cross":
        d = f"M{x - s:.1f},{y - s:.1f}l{2 * s},{2 * s}m0,{-2 * s}l{-2 * s},{2 * s}"
        return f'<path d="{d}" stroke="{color}" stroke-width="2.2" fill="none">{tip}</path>'
    else:
        raise ValueError(f"unknown marker shape {shape!r}")
    return f'<path d="{d}" {paint}>{tip}</path>'


def _runs(values: list) -> list[tuple[int, int, object]]:
    """Maximal runs of equal values: [(first, end_exclusive, value)]."""
    runs, start = [], 0
    for k in range(1, len(values) + 1):
        if k == len(values) or values[k] != values[start]:
            runs.append((start, k, values[start]))
            start = k
    return runs


class _Timeline:
    """Lanes stacked top to bottom over one time axis. Frame k (0-based in the video) is centred on time
    (start + k) / fps and a run of frames [a, b) covers [a - 1/2, b - 1/2] frames."""

    width, left, right_margin = 1180, 190, 70

    def __init__(self, video: Video):
        self.fps, self.start, self.num_frames = video.fps, video.start, video.num_frames
        self.right = self.width - self.right_margin
        self.y = 6
        self.parts: list[str] = []

    def x(self, frame: float) -> float:
        """x of a 0-based frame of the video (fractions allowed: frame edges are at k ± 0.5)."""
        return self.left + (self.right - self.left) * (frame + 0.5) / max(self.num_frames, 1)

    def row_guides(self, rows) -> list[str]:
        """A small name left of the plot and a faint guide line across it, for each (name, y) row of a lane."""
        return [f'<text x="{self.left - 4}" y="{y + 3.5}" font-size="9" text-anchor="end" fill="#555">{name}</text>'
                f'<line x1="{self.left}" x2="{self.right}" y1="{y}" y2="{y}" stroke="#eee"/>' for name, y in rows]

    def span(self, first: int, end: int, y: float, height: float, attrs: str, title: str = "") -> str:
        x0, x1 = self.x(first - 0.5), self.x(end - 0.5)
        tip = f"<title>{esc(title)}</title>" if title else ""
        return (f'<rect x="{x0:.1f}" y="{y:.1f}" width="{max(x1 - x0, 1.5):.1f}" height="{height:.1f}" '
                f'{attrs}>{tip}</rect>')

    def frame_path(self, frames: list[int], y: float, height: float, color: str, opacity: float = 1.0,
                   css_class: str = "") -> str:
        """Runs of the given frames as one path (one element however many frames)."""
        frames = sorted(set(frames))
        if not frames:
            return ""
        segments, run_start = [], frames[0]
        for prev, cur in zip(frames, frames[1:] + [None]):
            if cur != prev + 1:
                x0, x1 = self.x(run_start - 0.5), self.x(prev + 0.5)
                segments.append(f"M{x0:.1f},{y:.1f}h{max(x1 - x0, 1.5):.1f}v{height:.1f}h{-max(x1 - x0, 1.5):.1f}z")
                run_start = cur
        return f'<path class="{css_class}" d="{"".join(segments)}" fill="{color}" fill-opacity="{opacity}"/>'

    def label(self, title: str, subtitle: str, y: float) -> None:
        self.parts.append(f'<text x="4" y="{y + 12:.1f}" font-size="12" font-weight="bold">{esc(title)}</text>')
        for i, line in enumerate(subtitle.split("\n")):
            self.parts.append(f'<text x="4" y="{y + 25 + 11 * i:.1f}" font-size="10" fill="#555">{esc(line)}</text>')

    def separator(self) -> None:
        self.parts.append(f'<line x1="0" x2="{self.width}" y1="{self.y - 3:.1f}" y2="{self.y - 3:.1f}" stroke="#eee"/>')

    def svg(self, description: str) -> str:
        """Close with the time axis; vertical grid lines at the ticks run through every lane."""
        t0 = (self.start - 0.5) / self.fps
        t1 = (self.start + self.num_frames - 0.5) / self.fps
        ticks = [t for t in nice_ticks(max(t0, 0.0), t1, target=12) if t0 <= t <= t1]
        axis_y = self.y + 2
        grid, axis = [], [f'<line x1="{self.left}" x2="{self.right}" y1="{axis_y}" y2="{axis_y}" stroke="#777"/>']
        for t in ticks:
            x = self.x(t * self.fps - self.start)
            grid.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="4" y2="{axis_y}" stroke="#ececec"/>')
            axis.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{axis_y}" y2="{axis_y + 5}" stroke="#777"/>'
                        f'<text x="{x:.1f}" y="{axis_y + 17}" font-size="11" text-anchor="middle" class="tick">'
                        f'{format_tick(t)}</text>')
        axis.append(f'<text x="{self.left - 8}" y="{axis_y + 17}" font-size="11" text-anchor="end" fill="#333">'
                    f'time (s)</text>')
        height = axis_y + 26
        return (f'<svg class="timeline" width="{self.width}" height="{height:.0f}" viewBox="0 0 {self.width} '
                f'{height:.0f}" font-family="sans-serif" role="img" aria-label="{esc(description)}">'
                + "".join(grid) + "".join(self.parts) + "".join(axis) + "</svg>")


def _probability_lane(tl: _Timeline, title: str, subtitle: str, probs: list[float], fired: list[int],
                      reference_frames: list[int], threshold: float, color: str, css_class: str) -> None:
    """One head: its probability on a 0..1 scale, the threshold, reference frames as bands, fired frames below."""
    top, height = tl.y, 64
    tl.label(title, subtitle, top)
    parts = [f'<g class="{css_class}">',
             f'<rect x="{tl.left}" y="{top}" width="{tl.right - tl.left}" height="{height}" fill="#fbfbfb" '
             f'stroke="#ccc"/>',
             tl.frame_path(reference_frames, top, height, color, opacity=0.16, css_class="reference")]
    for p in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = top + height * (1 - p)
        parts.append(f'<line x1="{tl.left}" x2="{tl.right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e6e6e6"/>')
        if p in (0.0, 0.5, 1.0):
            parts.append(f'<text x="{tl.left - 4}" y="{y + 3.5:.1f}" font-size="10" text-anchor="end">{p:g}</text>')
    if 0 <= threshold <= 1:
        y_thr = top + height * (1 - threshold)
        parts.append(f'<line x1="{tl.left}" x2="{tl.right}" y1="{y_thr:.1f}" y2="{y_thr:.1f}" stroke="#333" '
                     f'stroke-dasharray="5 3"/><text x="{tl.right + 4}" y="{y_thr + 3.5:.1f}" font-size="10">'
                     f'threshold {threshold:g}</text>')
    else:  # a sweep may try thresholds that never (or always) fire; say so rather than draw off the lane
        parts.append(f'<text x="{tl.right + 4}" y="{top + 10}" font-size="10">threshold {threshold:g}</text>'
                     f'<text x="{tl.right + 4}" y="{top + 22}" font-size="10">(outside 0..1)</text>')
    points = " ".join(f"{tl.x(k):.1f},{top + height * (1 - p):.1f}" for k, p in enumerate(probs))
    parts.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="1.4"/>')
    fired_y = top + height + 6
    parts.append(f'<text x="{tl.left - 4}" y="{fired_y + 7:.1f}" font-size="9" text-anchor="end" '
                 f'fill="#555">fired</text>'
                 f'<rect x="{tl.left}" y="{fired_y}" width="{tl.right - tl.left}" height="8" fill="#f3f3f3"/>'
                 + tl.frame_path(fired, fired_y, 8, color, css_class="fired"))
    parts.append("</g>")
    tl.parts.extend(parts)
    tl.y = top + height + 6 + 8 + 10


def _replies_lane(tl: _Timeline, video: Video, records: list[FrameRecord], vm) -> None:
    """Reference replies (top row) and generated ones (bottom row), coloured by the matching's outcome; a
    missed reply shows the frames where a generated reply could have matched it (the dataset's window)."""
    top, fps, base = tl.y, video.fps, video.start
    y_ref, y_gen = top + 9, top + 31
    tl.label("replies", "top: reference\nbottom: generated", top)
    parts = ['<g class="replies">', *tl.row_guides((("reference", y_ref), ("generated", y_gen)))]
    (left, right), _ = metrics.window_for_dataset(video.dataset)
    ref_texts = {k - base: " ".join(ev.asst_texts) for k, ev in video.events.items() if ev.asst_texts}
    for j in vm.missed_frames:
        # A reply at frame i matches a reference at j when left <= j - i <= right.
        first, last = max(0, j - right), min(video.num_frames - 1, j - left)
        parts.append(tl.span(first, last + 1, y_gen - 6, 12, f'fill="{ERROR_COLOR}" fill-opacity="0.12"',
                             f"a reply at {_seconds(base + first, fps)}–{_seconds(base + last, fps)} s could have "
                             f"matched the missed reply at {_seconds(base + j, fps)} s"))
    for m in vm.matches:
        color = GOOD_COLOR if m.good else WEAK_COLOR
        parts.append(f'<line x1="{tl.x(m.gen_frame):.1f}" y1="{y_gen}" x2="{tl.x(m.ref_frame):.1f}" y2="{y_ref}" '
                     f'stroke="{color}" stroke-width="1.2"/>')
    for m in vm.matches:
        color = GOOD_COLOR if m.good else WEAK_COLOR
        what = "good match" if m.good else "weak match (score ≤ 0.5)"
        parts.append(_marker("circle", tl.x(m.ref_frame), y_ref, color,
                             f"reference at {_seconds(base + m.ref_frame, fps)} s, {what}, score {m.score:.2f}: "
                             f"{m.ref_text}"))
        parts.append(_marker("down", tl.x(m.gen_frame), y_gen, color,
                             f"generated at {_seconds(base + m.gen_frame, fps)} s, {what}, score {m.score:.2f}: "
                             f"{m.gen_text}"))
    for j in vm.missed_frames:
        parts.append(_marker("circle", tl.x(j), y_ref, ERROR_COLOR,
                             f"missed reference at {_seconds(base + j, fps)} s: {ref_texts.get(j, '')}", hollow=True))
    for i in vm.redundant_frames:
        parts.append(_marker("down", tl.x(i), y_gen, ERROR_COLOR,
                             f"redundant reply at {_seconds(base + i, fps)} s: {records[i].asst_text or ''}"))
    for i, rec in enumerate(records):
        if rec.speak and not (rec.asst_text or "").strip():
            parts.append(_marker("down", tl.x(i), y_gen, MUTED_COLOR,
                                 f"speak head fired at {_seconds(rec.frame, fps)} s but the reply was empty",
                                 hollow=True, size=4))
    parts.append("</g>")
    tl.parts.extend(parts)
    tl.y = top + 46


def _dst_lane(tl: _Timeline, video: Video, records: list[FrameRecord], pred_states: list[dict]) -> None:
    """Reference updates (upper row, labels above) and predicted ones (lower row, labels below): one marker
    per transition, side by side when a frame has several; an illegal or unparsable prediction is a red cross."""
    top, fps, base = tl.y, video.fps, video.start
    y_ref, y_pred = top + 19, top + 37
    tl.label("DST updates", "upper row: reference\nlower row: predicted", top)
    parts = ['<g class="dst-lane">', *tl.row_guides((("reference", y_ref), ("predicted", y_pred)))]
    # (frame, [(step_id, transition, why it is illegal or None)], tooltip) per row
    reference, predicted = [], []
    for k, ev in sorted(video.events.items()):
        if ev.transitions and base <= k < video.end:
            reference.append((k - base, [(s, t, None) for s, t in ev.transitions],
                              f"reference update at {_seconds(k, fps)} s: {format_transitions(ev.transitions)}"))
    for i, rec in enumerate(records):
        if not rec.dst:
            continue
        if not rec.transitions:  # the head fired but the text did not parse
            predicted.append((i, [("?", "unparsable", "unparsable")],
                              f"unparsable DST update at {_seconds(rec.frame, fps)} s: {rec.dst_text!r}"))
            continue
        # Replayed on the predicted state before this frame with the one transition rule, to say which failed.
        state = dict(pred_states[i - 1] if i else video.initial_state)
        items = [(s, t, apply_transition(state, s, t)) for s, t in rec.transitions]
        why = "; ".join(reason for _, _, reason in items if reason)
        predicted.append((i, items, f"predicted update at {_seconds(rec.frame, fps)} s: {rec.dst_text}"
                          + (f" ({why})" if why else "")))
    for rows, y, label_y in ((reference, y_ref, y_ref - 9), (predicted, y_pred, y_pred + 16)):
        label_end = -1e9
        for frame, items, title in rows:
            x = tl.x(frame)
            for n, (step_id, transition, illegal) in enumerate(items):
                shape, color = ("cross", ERROR_COLOR) if illegal else (
                    ("right", START_COLOR) if transition == "start" else ("square", COMPLETE_COLOR))
                parts.append(_marker(shape, x + 10 * n, y, color, title, size=4.5))
            label = " ".join(step_id for step_id, _, _ in items)
            if x - 4 > label_end:  # labels that would overlap the previous one are left to the tooltip
                parts.append(f'<text x="{x - 4:.1f}" y="{label_y:.1f}" font-size="9" fill="#333">{esc(label)}</text>')
                label_end = x - 4 + 5.5 * len(label) + 3
    parts.append("</g>")
    tl.parts.extend(parts)
    tl.y = top + 58


def _state_grid(tl: _Timeline, video: Video, ref_states: list[dict], pred_states: list[dict]) -> int:
    """Per step: the reference state (upper bar) and the predicted one (lower bar) as merged runs, and a red
    outline over the runs where they differ. Returns the number of frames where any step differs."""
    top = tl.y
    bar, row = 7, 21
    parts = ['<g class="state-grid">',
             f'<text x="4" y="{top + 12}" font-size="12" font-weight="bold">dialogue state per step</text>'
             f'<text x="{tl.left}" y="{top + 12}" font-size="10" fill="#555">upper bar: reference, lower bar: '
             f'predicted; red outline: the predicted state differs from the reference</text>']
    x = tl.left + 560
    for state in STATES:  # the colours again, next to the grid: a long page scrolls the legend away
        parts.append(f'<rect x="{x}" y="{top + 4}" width="14" height="9" fill="{STATE_COLORS[state]}"/>'
                     f'<text x="{x + 18}" y="{top + 12}" font-size="10" fill="#555">{state}</text>')
        x += 26 + 6 * len(state)
    top += 20
    for n, step in enumerate(video.steps):
        y = top + row * n
        name = f"{step.id} {step.name}"
        short = name if len(name) <= 24 else name[:23] + "…"
        parts.append(f'<text x="{tl.left - 6}" y="{y + bar + 4:.1f}" font-size="10" text-anchor="end">'
                     f'<title>{esc(name)}</title>{esc(short)}</text>')
        ref = [state[step.id] for state in ref_states]
        pred = [state[step.id] for state in pred_states]
        for first, end, state in _runs(ref):
            parts.append(tl.span(first, end, y, bar, f'fill="{STATE_COLORS[state]}" class="ref-state"',
                                 f"{step.id} reference {state} {_seconds(tl.start + first, video.fps)}–"
                                 f"{_seconds(tl.start + end - 1, video.fps)} s"))
        for first, end, state in _runs(pred):
            parts.append(tl.span(first, end, y + bar + 2, bar, f'fill="{STATE_COLORS[state]}" class="pred-state"',
                                 f"{step.id} predicted {state} {_seconds(tl.start + first, video.fps)}–"
                                 f"{_seconds(tl.start + end - 1, video.fps)} s"))
        for first, end, differs in _runs([r != p for r, p in zip(ref, pred)]):
            if differs:
                when = f"{_seconds(tl.start + first, video.fps)}–{_seconds(tl.start + end - 1, video.fps)} s"
                parts.append(tl.span(first, end, y - 1.5, 2 * bar + 5,
                                     f'fill="none" stroke="{ERROR_COLOR}" stroke-width="1.6" class="state-differs"',
                                     f"{step.id}: predicted state differs from the reference {when}"))
    parts.append("</g>")
    tl.parts.extend(parts)
    tl.y = top + row * len(video.steps) + 2
    return sum(r != p for r, p in zip(ref_states, pred_states))


def _legend() -> str:
    """One legend for every timeline: the same markers as the lanes."""
    items = [
        ("line", SPEAK_COLOR, "speak head p_speak"), ("line", DST_COLOR, "DST-update head p_dst"),
        ("band", SPEAK_COLOR, "reference reply frame"), ("band", DST_COLOR, "reference update frame"),
        ("dash", "#333", "threshold"), ("fired", "#555", "frames where the head fired"),
        ("circle", GOOD_COLOR, "reference reply, good match"), ("circle", WEAK_COLOR, "weak match (score ≤ 0.5)"),
        ("hollow", ERROR_COLOR, "missed reference reply"), ("down", GOOD_COLOR, "generated reply, good match"),
        ("down", ERROR_COLOR, "redundant reply"), ("window", ERROR_COLOR, "where a reply would have matched"),
        ("right", START_COLOR, "step -> start"), ("square", COMPLETE_COLOR, "step -> complete"),
        ("cross", ERROR_COLOR, "unparsable / illegal update"),
    ] + [("state", STATE_COLORS[s], s) for s in STATES] + [("differs", ERROR_COLOR, "predicted state differs")]
    parts, x, y = [], 4, 14
    for kind, color, text in items:
        width = 26 + 6.3 * len(text)
        if x + width > 1176:
            x, y = 4, y + 20
        cx = x + 8
        if kind in ("line", "dash"):
            dash = ' stroke-dasharray="5 3"' if kind == "dash" else ""
            parts.append(f'<line x1="{x}" x2="{x + 16}" y1="{y}" y2="{y}" stroke="{color}" stroke-width="2"{dash}/>')
        elif kind in ("band", "window"):
            parts.append(f'<rect x="{x + 3}" y="{y - 7}" width="10" height="14" fill="{color}" fill-opacity="0.2"/>')
        elif kind == "fired":
            parts.append(f'<rect x="{x}" y="{y - 3}" width="16" height="7" fill="{color}"/>')
        elif kind == "state":
            parts.append(f'<rect x="{x}" y="{y - 4}" width="16" height="8" fill="{color}"/>')
        elif kind == "differs":
            parts.append(f'<rect x="{x}" y="{y - 5}" width="16" height="10" fill="none" stroke="{color}" '
                         f'stroke-width="1.6"/>')
        elif kind == "hollow":
            parts.append(_marker("circle", cx, y, color, hollow=True))
        else:
            parts.append(_marker(kind, cx, y, color))
        parts.append(f'<text x="{x + 21}" y="{y + 4}" font-size="11">{esc(text)}</text>')
        x += width
    height = y + 10
    return (f'<svg class="legend" width="1180" height="{height}" viewBox="0 0 1180 {height}" '
            f'font-family="sans-serif">{"".join(parts)}</svg>')


# ----------------------------------------------------------------------------------------------------
# Tables


def _table(css_class: str, header: list[str], rows: list[list[str]], empty: str) -> str:
    if not rows:
        return f'<p class="{css_class} none">{esc(empty)}</p>'
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(rows_cell for rows_cell in row) + "</tr>" for row in rows)
    return f'<table class="wide {css_class}"><tr>{head}</tr>{body}</table>'


def _num(value: str) -> str:
    return f'<td class="num">{value}</td>'


def _text(value: Optional[str]) -> str:
    return f'<td class="text">{esc(value or "")}</td>'


def _video_tables(video: Video, records: list[FrameRecord], vm) -> str:
    fps, base = video.fps, video.start
    ref_texts = {k - base: " ".join(ev.asst_texts) for k, ev in video.events.items() if ev.asst_texts}
    missed = [[_num(_seconds(base + j, fps)), _num(str(base + j)), _num(f"{records[j].p_speak:.2f}"),
               _text(ref_texts.get(j))] for j in sorted(vm.missed_frames)]
    redundant = [[_num(_seconds(base + i, fps)), _num(str(base + i)), _num(f"{records[i].p_speak:.2f}"),
                  _text(records[i].asst_text)] for i in sorted(vm.redundant_frames)]
    matched = [[_num(_seconds(base + m.gen_frame, fps)), _num(_seconds(base + m.ref_frame, fps)),
                _num(f"{(m.gen_frame - m.ref_frame) / fps:+.1f}"),
                f'<td class="num {"good" if m.good else "weak"}">{m.score:.2f}{"" if m.good else " weak"}</td>',
                _text(m.gen_text), _text(m.ref_text)] for m in sorted(vm.matches, key=lambda m: m.ref_frame)]
    num_good = sum(m.good for m in vm.matches)
    dst_rows = []
    for i, rec in enumerate(records):
        ev = video.events.get(rec.frame, FrameEvents())
        if ev.transitions or rec.dst:
            generated = rec.dst_text if rec.dst_text is not None else ""
            invalid = f'<td class="num bad">{rec.num_invalid}</td>' if rec.num_invalid else _num("0")
            dst_rows.append([_num(_seconds(rec.frame, fps)), _num(str(rec.frame)), _num(f"{rec.p_dst:.2f}"),
                             _text(", ".join(f"{s}->{t}" for s, t in ev.transitions)),
                             _text(generated if rec.dst else "(head did not fire)"), invalid])
    return (
        f'<h4>Missed replies ({len(missed)})</h4>'
        + _table("missed", ["time (s)", "frame", "p_speak at that frame", "reference reply"], missed,
                 "No missed replies.")
        + f'<h4>Redundant replies ({len(redundant)})</h4>'
        + _table("redundant", ["time (s)", "frame", "p_speak", "generated reply"], redundant,
                 "No redundant replies.")
        + f'<details><summary>Matched replies ({len(matched)}, {num_good} good)</summary>'
        + _table("matched", ["generated (s)", "reference (s)", "Δt (s)", "score", "generated reply",
                             "reference reply"], matched, "No matched replies.") + "</details>"
        + f'<details><summary>DST updates ({len(dst_rows)} frames with a reference update or a fired DST-update '
          f'head)</summary>'
        + _table("dst-updates", ["time (s)", "frame", "p_dst", "reference", "generated", "invalid"], dst_rows,
                 "No DST updates.") + "</details>"
    )


def _summary(result: dict) -> str:
    """metrics.json as metric/value cards that wrap; the speaking card spells out its arithmetic."""
    blocks = [(name, result[name]) for name in ("speak", "nlg", "dst")]
    blocks += [(f"decisions.{head}", values) for head, values in result["decisions"].items()]
    cards = []
    for name, values in blocks:
        rows = []
        for key, value in values.items():
            definition = _definition(name, key) or "not documented in this report"
            rows.append(f'<tr><th><a href="#{_anchor(name, key)}" title="{esc(definition)}">{esc(key)}</a></th>'
                        f'<td class="num">{_fmt(value, key)}</td></tr>')
        cards.append(f'<div class="card"><h3>{esc(BLOCK_TITLES.get(name, name))}</h3>'
                     f'<table class="metrics">{"".join(rows)}</table></div>')
    s = result["speak"]
    arithmetic = (
        f'<p class="formula">Speaking: a match is <b>good</b> when its semantic score is &gt; 0.5. '
        f'precision = good / (matched + redundant) = {s["num_good"]} / ({s["num_matched"]} + {s["num_redundant"]}) '
        f'= {s["precision"]:.3f}; recall = good / (matched + missed) = {s["num_good"]} / ({s["num_matched"]} + '
        f'{s["num_missed"]}) = {s["recall"]:.3f}. Matching windows per dataset: '
        f'<a href="#definitions">definitions</a>.</p>')
    return f'<div class="cards">{"".join(cards)}</div>{arithmetic}'


def _definitions(videos: list[Video]) -> str:
    sections = []
    for block, entries in DEFINITIONS.items():
        rows = "".join(f'<tr id="def-{block}-{key}"><th>{esc(key)}</th><td>{esc(text)}</td></tr>'
                       for key, text in entries.items())
        title = "decisions.speak, decisions.dst" if block == "decisions" else block
        sections.append(f'<div><h3>{title}: {esc(BLOCK_TITLES[block])}</h3>'
                        f'<table class="defs">{rows}</table></div>')
    fps_by_dataset: dict[str, set] = {}
    for video in videos:
        fps_by_dataset.setdefault(video.dataset, set()).add(video.fps)
    rows = []
    here = {name: metrics.window_for_dataset(name) for name in fps_by_dataset}
    for dataset, ((left, right), known) in sorted(here.items()):
        seconds = ", ".join(f"{left / f:+g} s to {right / f:+g} s at {f:g} fps"
                            for f in sorted(fps_by_dataset[dataset]))
        rows.append(f"<tr><td>{esc(dataset)}{'' if known else ' (unknown: default window)'}</td>"
                    f'<td class="num">({left}, {right})</td><td>{seconds} (in this evaluation)</td></tr>')
    for dataset, (left, right) in list(metrics.DATASET_WINDOWS.items()) + [("default", metrics.DEFAULT_WINDOW)]:
        if dataset not in here:
            rows.append(f'<tr><td>{esc(dataset)}</td><td class="num">({left}, {right})</td>'
                        f"<td>{left / 2:+g} s to {right / 2:+g} s at 2 fps</td></tr>")
    return (
        '<section id="definitions"><h2>Metric definitions</h2>'
        "<p>Replies are matched ProAssist's way: a one-to-one assignment of every generated reply to a frame "
        "within the dataset's window (l, r), minimising 1 − |cos| of the two texts' sentence embeddings plus a "
        "distance cost. A generated reply assigned to a frame with a reference reply is a <b>match</b>; its "
        "<b>semantic score</b> is |cos|, and it is <b>good</b> when the score is &gt; 0.5. One assigned to a "
        "silent frame is <b>redundant</b>; a reference reply left unassigned is <b>missed</b>. Counts are "
        "summed over videos before dividing, and a ratio with a zero denominator is 0.</p>"
        "<p>Time window in frames: a generated event at frame i can match a reference event at frame j when "
        "l ≤ j − i ≤ r (speaking and DST updates alike). Datasets are recognised by name.</p>"
        '<table class="windows"><tr><th>dataset</th><th>(l, r) frames</th><th>in seconds</th></tr>'
        + "".join(rows) + '</table><div class="defs-grid">' + "".join(sections) + "</div></section>"
    )


def _sweep(sweep_rows: list[dict], thresholds: Thresholds) -> str:
    head = "".join(f"<th>{esc(k)}</th>" for k in sweep_rows[0])
    body = []
    for row in sweep_rows:
        best = row.get("speak_threshold") == thresholds.speak and row.get("dst_threshold") == thresholds.dst
        cells = "".join(f'<td class="num">{_fmt(v)}</td>' for v in row.values())
        body.append(f'<tr class="{"best" if best else ""}">{cells}</tr>')
    return (f"<h2>Threshold sweep</h2><p>One stream per threshold pair; the highlighted row (best speaking F1, then "
            f"DST F1) is the one shown in this report.</p>"
            f'<table class="sweep"><tr>{head}</tr>{"".join(body)}</table>')


# ----------------------------------------------------------------------------------------------------
# LLM-judge scores (judge.json, written by judge.py). The page keeps a marked place for them, so judge.py can
# put them into a report written before it ran.

JUDGE_BEGIN, JUDGE_END = "<!-- judge-section -->", "<!-- /judge-section -->"
JUDGE_ASPECTS = {
    "correctness": "Is each instruction or piece of feedback correct and relevant, given the context and the "
                   "reference dialogue?",
    "promptness": "Does the assistant speak at the right time, not too early or too late?",
    "efficiency": "Is the information given concisely, without repetition or redundant information?",
    "overall": "The overall helpfulness and quality of the assistant's turns.",
    "state_tracking": "Do the generated state updates name the right steps at the right times, without missed "
                      "or spurious updates (judge.py --with-dst)?",
}


def _judge_facts(judge: dict) -> str:
    who = " · ".join(f"{esc(str(k))} <code>{esc(str(v))}</code>" for k, v in judge["judge"].items())
    s = judge["sampling"]
    prompt = judge["prompt"]
    return (f'<p class="meta">judge: {who}</p><p class="meta">{s["samples"]} samples per video at temperature '
            f'{s["temperature"]:g}, top-p {s["top_p"]:g}, seed {esc(str(s["seed"]))}, at most {s["max_new_tokens"]} '
            f'new tokens · system prompt {esc(prompt["system"])}, user prompt {esc(prompt["user"])} · '
            f'{"with" if judge["with_dst"] else "without"} state lines · seconds per video '
            f'{_fmt(judge.get("seconds_per_video"))}</p>')


def _judge_cards(judge: dict) -> str:
    n = judge["num_videos"]
    rows = "".join(
        f'<tr><th title="{esc(JUDGE_ASPECTS.get(a, ""))}">{esc(a.replace("_", " "))}</th>'
        f'<td class="num">{_fmt(judge["scores"][a])}</td><td class="num">{judge["videos_scored"][a]} / {n}</td></tr>'
        for a in judge["aspects"])
    samples = judge["samples"]
    counts = [("samples", samples["total"]), ("valid", samples["valid"]), ("invalid", samples["invalid"])]
    counts += [(f"valid for {a.replace('_', ' ')}", samples["valid_per_aspect"][a]) for a in judge["aspects"]]
    count_rows = "".join(f'<tr><th>{esc(name)}</th><td class="num{" bad" if name == "invalid" and value else ""}">'
                         f'{value}</td></tr>' for name, value in counts)
    return (f'<div class="cards"><div class="card"><h3>Scores (1–5)</h3><table class="metrics"><tr><th>aspect</th>'
            f'<th>mean</th><th>videos</th></tr>{rows}</table></div><div class="card"><h3>Judge answers</h3>'
            f'<table class="metrics">{count_rows}</table></div></div>')


def _judge_videos(judge: dict) -> str:
    aspects = judge["aspects"]
    rows = [[_text(uid)] + [_num(_fmt(v["scores"][a])) for a in aspects] + [_num(f'{v["valid"]} / {v["samples"]}')]
            for uid, v in judge["per_video"].items()]
    header = ["video"] + [a.replace("_", " ") for a in aspects] + ["valid samples"]
    return (f'<details><summary>Per video ({len(rows)})</summary>'
            + _table("judge-videos", header, rows, "No videos judged.") + "</details>")


def judge_section(judge: dict) -> str:
    """The LLM-judge scores of a judge.json as a report section: the judge and its settings, the mean score per
    aspect with the number of videos that have one, the sample counts, and the scores per video."""
    return (
        '<section id="judge"><h2>LLM judge</h2>' + _judge_facts(judge) + _judge_cards(judge)
        + '<p class="formula">Each video\'s whole generated dialogue is scored against its reference dialogue, 1 '
          '(very poor) to 5 (excellent) per aspect; a video\'s score is the mean over its valid samples, the '
          'split\'s the mean over the videos that have one. Scores compare only under the same judge, prompt and '
          'sampling settings. Prompts and raw answers: <code>judge_outputs.jsonl</code>.</p>'
        + _judge_videos(judge) + "</section>")


def with_judge_section(page: str, judge: dict) -> Optional[str]:
    """`page` with its judge section replaced by `judge`'s; None when the page has no place marked for it."""
    begin, end = page.find(JUDGE_BEGIN), page.find(JUDGE_END)
    if begin < 0 or end < begin:
        return None
    return page[:begin + len(JUDGE_BEGIN)] + judge_section(judge) + page[end:]


# ----------------------------------------------------------------------------------------------------
# The page

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;font-size:14px;color:#222;max-width:1200px;
  margin:0 auto;padding:10px 16px 40px}
h1{font-size:22px;margin:8px 0 4px} h2{font-size:18px;margin:26px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:14px;margin:0 0 4px} h4{font-size:13px;margin:10px 0 2px}
section.video{border-top:3px solid #ccc;margin-top:22px;padding-top:4px} section.video h3{font-size:16px;margin:6px 0}
.meta{color:#444;margin:2px 0} .meta b{color:#222}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(215px,1fr));gap:10px;align-items:start}
.card{border:1px solid #ddd;border-radius:4px;padding:6px 10px;background:#fafafa}
.card th{font-weight:normal} .card a{color:#1a4f8b;text-decoration:none;border-bottom:1px dotted #1a4f8b}
p.formula{font-size:13px;color:#333;margin:8px 0 0}
table{border-collapse:collapse;margin:2px 0 6px}
td,th{border:1px solid #ddd;padding:2px 6px;font-size:13px;text-align:left;vertical-align:top}
th{background:#f4f4f4} td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
table.wide td.num{width:1%} table.wide th{white-space:nowrap}
table.wide{width:100%} td.text{overflow-wrap:anywhere}
td.weak,td.bad{color:#b00} td.good{color:#1d7a41} tr.best td{background:#fff6d6}
p.none{color:#666;margin:2px 0}
details{margin:6px 0} summary{cursor:pointer;font-weight:bold;font-size:13px}
svg.timeline,svg.legend{max-width:100%;height:auto;display:block}
.defs-grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:4px 20px;margin-top:10px}
table.defs th{background:none;white-space:nowrap;width:1%}
table.defs tr:target td,table.defs tr:target th{background:#fff3b0}
"""


def write_report(path: Path, result: dict, videos: list[Video], all_records: list[list[FrameRecord]],
                 speak_matches: list, thresholds: Thresholds, sweep_rows: Optional[list[dict]] = None,
                 judge: Optional[dict] = None) -> None:
    """`judge`: a judge.json of these predictions (evaluate.judge_of_predictions), shown after the summary."""
    sections, overview = [], []
    for index, (video, records, vm) in enumerate(zip(videos, all_records, speak_matches)):
        fps, base = video.fps, video.start
        tl = _Timeline(video)
        speak_refs = [k - base for k, ev in video.events.items() if ev.asst_texts and base <= k < video.end]
        dst_refs = [k - base for k, ev in video.events.items() if ev.transitions and base <= k < video.end]
        _probability_lane(tl, "speak head", "p_speak; bands: frames\nwith a reference reply",
                          [r.p_speak for r in records], [i for i, r in enumerate(records) if r.speak], speak_refs,
                          thresholds.speak, SPEAK_COLOR, "lane-speak")
        tl.separator()
        _replies_lane(tl, video, records, vm)
        tl.separator()
        _probability_lane(tl, "DST-update head", "p_dst; bands: frames\nwith a reference update",
                          [r.p_dst for r in records], [i for i, r in enumerate(records) if r.dst], dst_refs,
                          thresholds.dst, DST_COLOR, "lane-dst")
        tl.separator()
        pred_states = predicted_states(video, records)
        _dst_lane(tl, video, records, pred_states)
        tl.separator()
        differing = _state_grid(tl, video, video.reference_states(), pred_states)
        num_good = sum(m.good for m in vm.matches)
        num_ref_updates = sum(len(video.events[base + k].transitions) for k in dst_refs)
        num_pred_updates = sum(len(r.transitions) for r in records)
        num_invalid = sum(r.num_invalid for r in records)
        duration = f"{video.num_frames / fps:.1f} s"
        (left, right), _ = metrics.window_for_dataset(video.dataset)
        sections.append(
            f'<section class="video" id="video-{index}"><h3>{esc(video.video_uid)}</h3>'
            f'<p class="meta">{esc(video.dataset)} · {duration} ({video.num_frames} frames {base}–{video.end - 1} at '
            f'{fps:g} fps) · matching window ({left}, {right}) frames · {len(video.steps)} steps</p>'
            f'<p class="meta">replies: <b>{len(vm.matches)}</b> matched (<b>{num_good}</b> good), '
            f'<b>{len(vm.missed_frames)}</b> missed, <b>{len(vm.redundant_frames)}</b> redundant · DST: '
            f'<b>{num_pred_updates}</b> predicted / <b>{num_ref_updates}</b> reference transitions, '
            f'<b>{num_invalid}</b> invalid · predicted state differs on <b>{differing}</b> of {video.num_frames} '
            f'frames</p>'
            + tl.svg(f"timeline of {video.video_uid}") + _video_tables(video, records, vm) + "</section>")
        def problem(count: int, text: str) -> str:  # a non-zero error count in red
            return f'<td class="num{" bad" if count else ""}">{text}</td>'

        overview.append(
            f'<tr><td><a href="#video-{index}">{esc(video.video_uid)}</a></td><td>{esc(video.dataset)}</td>'
            f'<td class="num">{duration}</td><td class="num">{len(vm.matches) + len(vm.missed_frames)}</td>'
            f'<td class="num">{len(vm.matches)} ({num_good})</td>'
            + problem(len(vm.missed_frames), str(len(vm.missed_frames)))
            + problem(len(vm.redundant_frames), str(len(vm.redundant_frames)))
            + f'<td class="num">{num_ref_updates}</td><td class="num">{num_pred_updates}</td>'
            + problem(num_invalid, str(num_invalid)) + problem(differing, f"{differing} / {video.num_frames}")
            + "</tr>")
    overview_table = (
        '<table class="overview"><tr><th>video</th><th>dataset</th><th>duration</th><th>reference replies</th>'
        '<th>matched (good)</th><th>missed</th><th>redundant</th><th>reference transitions</th>'
        '<th>predicted transitions</th><th>invalid updates</th><th>frames with a wrong state</th></tr>'
        + "".join(overview) + "</table>")
    fps_text = f"{result['frames_per_second']:.1f} frames/s" if result.get("frames_per_second") else ""
    run_facts = [f"checkpoint <code>{esc(str(result['checkpoint']))}</code>", f"split <b>{esc(result['split'])}</b>",
                 f"mode {esc(str(result.get('mode', 'streaming')))}", f"{result['num_videos']} videos",
                 f"{result['num_frames']} frames", f"thresholds: speak p &gt; {thresholds.speak:g}, "
                 f"DST update p &gt; {thresholds.dst:g}", f"embedder {esc(str(result['embedder']))}", fps_text]
    if result.get("context_resets"):
        run_facts.append(f"{result['context_resets']} context resets ({esc(str(result.get('context_strategy')))})")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Evaluation: {esc(result['split'])}</title>
<style>{CSS}</style></head><body><h1>Streaming evaluation</h1>
<p class="meta">{" · ".join(f for f in run_facts if f)}</p>
<h2>Summary</h2><p class="meta">Click a metric name for its definition (<a href="#definitions">all definitions</a>).</p>
{_summary(result)}{_sweep(sweep_rows, thresholds) if sweep_rows else ""}
{JUDGE_BEGIN}{judge_section(judge) if judge else ""}{JUDGE_END}
<h2>Videos</h2>{overview_table}
<p class="meta">Each timeline below shares one time axis in seconds; hover a marker for its time and text.</p>
{_legend()}{"".join(sections)}
{_definitions(videos)}</body></html>"""
    path.write_text(page)


MARKDOWN_COLUMNS = ("split", "videos", "frames", "speak P / R / F1", "DST P / R / F1", "state acc", "BLEU-4",
                    "CIDEr", "METEOR", "ROUGE-L", "decision F1 speak / dst")


def markdown_summary(result: dict, judge: Optional[dict] = None) -> str:
    """The headline figures of a metrics.json as a two-line Markdown table (`evaluate.py --markdown`), with one
    more column for the LLM-judge scores of a judge.json of the same predictions."""
    s, d, n, dec = result["speak"], result["dst"], result["nlg"], result["decisions"]

    def f(x) -> str:
        return "-" if x is None else f"{x:.3f}"

    columns = list(MARKDOWN_COLUMNS)
    row = [result["split"], str(result["num_videos"]), str(result["num_frames"]),
           f"{f(s['precision'])} / {f(s['recall'])} / {f(s['f1'])}",
           f"{f(d['precision'])} / {f(d['recall'])} / {f(d['f1'])}", f(d["state_accuracy"]), f(n["bleu4"]),
           f(n["cider"]), f(n["meteor"]), f(n["rougeL"]), f"{f(dec['speak']['f1'])} / {f(dec['dst']['f1'])}"]
    if judge is not None:
        columns.append("judge " + " / ".join(a.replace("_", " ") for a in judge["aspects"]))
        row.append(" / ".join(f(judge["scores"][a]) for a in judge["aspects"]))
    return "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n| " + " | ".join(row) + " |"
