"""Training curves as a self-contained HTML page of inline SVG charts (no plotting library, no assets).

    python plots.py runs/demo          # writes runs/demo/curves.html from runs/demo/metrics.jsonl

train.py rewrites curves.html after every validation and at the end of a run. Each loss chart puts the
training curve (line) and the validation curve (line with dots) on the same axes, so that a validation loss
rising while the training loss falls is visible at a glance; checkpoints are dashed vertical lines.

metrics.jsonl holds one record per line, told apart by "kind": "train" (every log interval), "val" (every
validation: losses plus per-head precision/recall/F1/AUROC under "speak" and "dst") and "checkpoint"
(every saved step_<N>). The tick helpers here (nice_ticks, format_tick) also draw report.py's axes.
"""
from __future__ import annotations

import html
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

TRAIN_COLOR, VAL_COLOR = "#1f77b4", "#e6550d"
SPEAK_COLOR, DST_COLOR = "#1f77b4", "#8e44ad"  # the speak head and the DST-update head, here and in report.py
CHECKPOINT_COLOR = "#888"
LOSS_COMPONENTS = (
    ("loss", "total loss", "nats"),
    ("asst_ce", "asst_ce: assistant-reply cross-entropy", "nats / token"),
    ("dst_ce", "dst_ce: DST-update text cross-entropy", "nats / token"),
    ("speak_bce", "speak_bce: speak head BCE", "BCE / frame"),
    ("dst_bce", "dst_bce: DST-update head BCE", "BCE / frame"),
)


# ----------------------------------------------------------------------------------------------------
# Ticks


def nice_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    """Round tick values (1, 2, 2.5 or 5 times a power of ten) covering [lo, hi]: the step nearest to
    (hi - lo) / (target - 1), so about `target` ticks."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"tick range must be finite, got [{lo}, {hi}]")
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(target - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = min((m * magnitude for m in (1, 2, 2.5, 5, 10)), key=lambda step: abs(math.log(step / raw)))
    first = math.floor(lo / step + 1e-9) * step
    ticks, k = [], 0
    while True:
        value = first + k * step
        ticks.append(round(value, 12))
        if value >= hi - step * 1e-9:
            return ticks
        k += 1


def log_ticks(lo: float, hi: float) -> list[float]:
    """Tick values for a log axis over [lo, hi] (both > 0): decades, or 1-2-5 within them when few decades."""
    if not 0 < lo <= hi:
        raise ValueError(f"log axis needs 0 < lo <= hi, got [{lo}, {hi}]")
    for mantissas in ((1,), (1, 2, 5), (1, 1.5, 2, 3, 4, 5, 6, 8)):
        ticks = [round(m * 10.0 ** e, 12) for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
                 for m in mantissas]
        inside = [t for t in ticks if lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9)]
        if len(inside) >= 3:
            return inside
    return [t for t in nice_ticks(lo, hi, 4) if lo <= t <= hi] or [lo, hi]


def format_tick(value: float) -> str:
    """Short tick label: 0.5, 12, 0.00025, 1e-05, 12k."""
    if abs(value) >= 1e4:
        return f"{value / 1000:g}k" if abs(value) < 1e6 else f"{value:.2g}"
    return f"{value:.4g}"


# ----------------------------------------------------------------------------------------------------
# One chart


@dataclass
class Series:
    name: str
    points: list[tuple[float, float]]  # (step, value); None or non-finite values are gaps
    color: str
    dots: bool = False  # validation: few points, each one a dot with its value as a tooltip
    dashed: bool = False


def line_chart(title: str, series: list[Series], y_title: str, x_title: str = "step", log_y: bool = False,
               y_range: Optional[tuple[float, float]] = None, marks: tuple[float, ...] = (),
               note: str = "", chart_id: str = "chart", width: int = 600, height: int = 300) -> str:
    """One SVG chart: ticked and titled axes, light grid, a legend, and dashed vertical lines at `marks`."""
    pad_l, pad_r, pad_t, pad_b = 64, 16, 50, 44
    plot_w, plot_h = width - pad_l - pad_r, height - pad_t - pad_b
    esc = html.escape
    svg = [f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" class="chart" '
           f'id="chart-{esc(chart_id)}" font-family="sans-serif">',
           f'<text x="{pad_l}" y="16" font-size="14" font-weight="bold">{esc(title)}</text>']
    # Legend row under the title: a line sample per series, then the checkpoint mark.
    legend_x = pad_l
    for s in series + ([Series("checkpoint", [], CHECKPOINT_COLOR, dashed=True)] if marks else []):
        dash = ' stroke-dasharray="5 3"' if s.dashed else ""
        svg.append(f'<line x1="{legend_x}" x2="{legend_x + 18}" y1="31" y2="31" stroke="{s.color}" '
                   f'stroke-width="2"{dash}/>')
        if s.dots:
            svg.append(f'<circle cx="{legend_x + 9}" cy="31" r="3" fill="{s.color}"/>')
        svg.append(f'<text x="{legend_x + 22}" y="35" font-size="11">{esc(s.name)}</text>')
        legend_x += 30 + 6.2 * len(s.name)

    def usable(y) -> bool:
        return y is not None and isinstance(y, (int, float)) and math.isfinite(y) and (y > 0 or not log_y)

    points = [(x, y) for s in series for x, y in s.points if usable(y)]
    if not points:
        svg.append(f'<text x="{pad_l}" y="{pad_t + plot_h // 2}" font-size="12" fill="#666">no data yet</text></svg>')
        return "".join(svg)

    xs = [x for x, _ in points] + list(marks)
    x_ticks = nice_ticks(min(0.0, min(xs)), max(xs))
    x0, x1 = x_ticks[0], x_ticks[-1]
    if y_range is not None:
        y_ticks = nice_ticks(*y_range, target=6)
        y0, y1 = y_range
    elif log_y:
        lo, hi = min(y for _, y in points), max(y for _, y in points)
        lo, hi = (lo / 1.5, hi * 1.5) if lo == hi else (lo / 1.1, hi * 1.1)
        y_ticks = log_ticks(lo, hi)
        y0, y1 = math.log10(lo), math.log10(hi)
    else:
        y_ticks = nice_ticks(min(y for _, y in points), max(y for _, y in points))
        y0, y1 = y_ticks[0], y_ticks[-1]

    def sx(x: float) -> float:
        return pad_l + plot_w * (x - x0) / (x1 - x0)

    def sy(y: float) -> float:
        v = math.log10(y) if log_y else y
        return pad_t + plot_h * (1 - (v - y0) / (y1 - y0))

    svg.append(f'<rect x="{pad_l}" y="{pad_t}" width="{plot_w}" height="{plot_h}" fill="#fcfcfc" stroke="#bbb"/>')
    for t in y_ticks:
        y = sy(t)
        svg.append(f'<line x1="{pad_l}" x2="{pad_l + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e4e4e4"/>'
                   f'<line x1="{pad_l - 4}" x2="{pad_l}" y1="{y:.1f}" y2="{y:.1f}" stroke="#777"/>'
                   f'<text x="{pad_l - 6}" y="{y + 3.5:.1f}" font-size="10" text-anchor="end" class="y-tick">'
                   f'{format_tick(t)}</text>')
    for t in x_ticks:
        x = sx(t)
        svg.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{pad_t}" y2="{pad_t + plot_h}" stroke="#e4e4e4"/>'
                   f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{pad_t + plot_h}" y2="{pad_t + plot_h + 4}" stroke="#777"/>'
                   f'<text x="{x:.1f}" y="{pad_t + plot_h + 15}" font-size="10" text-anchor="middle" '
                   f'class="x-tick">{format_tick(t)}</text>')
    svg.append(f'<text x="{pad_l + plot_w / 2:.0f}" y="{height - 8}" font-size="11" text-anchor="middle" '
               f'fill="#333" class="x-title">{esc(x_title)}</text>')
    svg.append(f'<text transform="translate(14 {pad_t + plot_h / 2:.0f}) rotate(-90)" font-size="11" '
               f'text-anchor="middle" fill="#333" class="y-title">'
               f'{esc(y_title + (" (log scale)" if log_y else ""))}</text>')
    for step in marks:
        x = sx(step)
        svg.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{pad_t}" y2="{pad_t + plot_h}" stroke="{CHECKPOINT_COLOR}" '
                   f'stroke-dasharray="5 3" class="checkpoint"><title>checkpoint step_{step:g}</title></line>')
    for s in series:
        dash = ' stroke-dasharray="5 3"' if s.dashed else ""
        svg.append(f'<g class="series" data-series="{esc(s.name)}">')
        # A gap (a missing value) ends one polyline and starts the next.
        runs, run = [], []
        for x, y in s.points:
            if usable(y):
                run.append((x, y))
            elif run:
                runs.append(run)
                run = []
        runs.append(run)
        for run in runs:
            if len(run) > 1:
                path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in run)
                svg.append(f'<polyline points="{path}" fill="none" stroke="{s.color}" stroke-width="1.6"{dash}/>')
            if s.dots or len(run) == 1:
                svg.extend(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{s.color}">'
                           f'<title>{esc(s.name)} at step {x:g}: {y:.4g}</title></circle>' for x, y in run)
        svg.append("</g>")
    if note:
        svg.append(f'<text x="{pad_l + plot_w}" y="{pad_t - 4}" font-size="10" text-anchor="end" fill="#666">'
                   f'{esc(note)}</text>')
    svg.append("</svg>")
    return "".join(svg)


# ----------------------------------------------------------------------------------------------------
# The page


def read_records(path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not a JSON record ({err.msg}); the line starts {line[:60]!r}") from None
    return records


def _value(record: dict, key: str, sub: Optional[str] = None):
    """record[key] (or record[key][sub]) if it is a number, else None: older runs lack some fields."""
    value = record.get(key)
    if sub is not None:
        value = value.get(sub) if isinstance(value, dict) else None
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _divergence_note(train: dict[int, dict], val: dict[int, dict]) -> str:
    """A sentence when the last validation loss is well above its minimum (overfitting, or a bad LR)."""
    val_loss = [(step, _value(r, "loss")) for step, r in sorted(val.items()) if _value(r, "loss") is not None]
    if len(val_loss) < 2:
        return ""
    best_step, best = min(val_loss, key=lambda p: p[1])
    last_step, last = val_loss[-1]
    if last <= 1.1 * best:
        return ""
    train_at = {step: _value(r, "loss") for step, r in train.items()}
    near = [s for s in sorted(train_at) if train_at[s] is not None]

    def train_loss(step: int) -> str:
        closest = min(near, key=lambda s: abs(s - step)) if near else None
        return f"{train_at[closest]:.4g}" if closest is not None else "–"

    return (f"Validation loss rose from its minimum {best:.4g} (step {best_step}) to {last:.4g} (step {last_step}), "
            f"{last / best:.2f}x, while the training loss went from {train_loss(best_step)} to "
            f"{train_loss(last_step)}.")


def write_training_curves(run_dir: str | Path) -> Path:
    """curves.html next to metrics.jsonl: train vs validation losses, head F1/AUROC, optimiser diagnostics."""
    run_dir = Path(run_dir)
    records = read_records(run_dir / "metrics.jsonl")
    # A resumed run re-logs steps after its checkpoint: the last record of each step wins.
    train = {r["step"]: r for r in records if r.get("kind") == "train"}
    val = {r["step"]: r for r in records if r.get("kind") == "val"}
    checkpoints = {r["step"]: r.get("path", "") for r in records if r.get("kind") == "checkpoint"}
    marks = tuple(sorted(checkpoints))

    def curve(rows: dict[int, dict], key: str, sub: Optional[str] = None) -> list[tuple[float, float]]:
        return [(step, _value(rows[step], key, sub)) for step in sorted(rows)]

    rho = _value(train[max(train)], "rho") if train else None
    bce_note = (f"train: silent frames kept at rho = {rho:g}; validation: every frame" if rho is not None
                else "validation: every frame labelled (rho = 1)")
    loss_charts = [
        line_chart(title, [Series(f"train {key}", curve(train, key), TRAIN_COLOR),
                           Series(f"validation {key}", curve(val, key), VAL_COLOR, dots=True)],
                   y_title=unit, log_y=True, marks=marks, note=bce_note if key.endswith("_bce") else "", chart_id=key)
        for key, title, unit in LOSS_COMPONENTS
    ]
    head_series = []
    for head, label, color in (("speak", "speak head", SPEAK_COLOR), ("dst", "DST-update head", DST_COLOR)):
        head_series.append(Series(f"{label} F1", curve(val, head, "f1"), color, dots=True))
        head_series.append(Series(f"{label} AUROC", curve(val, head, "auroc"), color, dots=True, dashed=True))
    head_chart = line_chart("decision heads on validation: F1 at p > 0.5 and AUROC", head_series,
                            y_title="F1, AUROC", y_range=(0.0, 1.0), marks=marks, chart_id="heads")
    optimiser_charts = [
        line_chart("learning rate", [Series("lr", curve(train, "lr"), TRAIN_COLOR)], y_title="lr", marks=marks,
                   chart_id="lr"),
        line_chart("gradient norm (before clipping)", [Series("grad_norm", curve(train, "grad_norm"), TRAIN_COLOR)],
                   y_title="L2 norm", marks=marks, chart_id="grad_norm"),
        line_chart("throughput", [Series("tokens_per_s", curve(train, "tokens_per_s"), TRAIN_COLOR)],
                   y_title="tokens / s", marks=marks, chart_id="tokens_per_s"),
        line_chart("peak accelerator memory", [Series("peak_mem_gb", curve(train, "peak_mem_gb"), TRAIN_COLOR)],
                   y_title="GB", marks=marks, chart_id="peak_mem_gb"),
    ]
    esc = html.escape
    last_step = max(train) if train else 0
    divergence = _divergence_note(train, val)
    checkpoint_list = ", ".join(f'<span title="{esc(str(path))}">{step}</span>'
                                for step, path in sorted(checkpoints.items()))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{esc(run_dir.name)}: training curves</title>
<style>body{{font-family:sans-serif;margin:16px auto;max-width:1300px;padding:0 16px;color:#222}}
.charts{{display:flex;flex-wrap:wrap;gap:8px 16px}} svg.chart{{max-width:100%;height:auto}}
h2{{margin:18px 0 6px;font-size:18px}} p{{margin:4px 0}} .warn{{color:#b00;font-weight:bold}}</style></head>
<body><h1>Training curves: {esc(str(run_dir))}</h1>
<p>{len(train)} train log lines, {len(val)} validations, last step {last_step}; checkpoints at steps:
{checkpoint_list + " (dashed vertical lines)" if checkpoint_list else "none logged"}.</p>
{f'<p class="warn">{esc(divergence)}</p>' if divergence else ""}
<h2>Losses: training losses (line) and validation losses (line with dots) on the same axes</h2>
<div class="charts">{"".join(loss_charts)}</div>
<h2>Decision heads (validation)</h2><div class="charts">{head_chart}</div>
<h2>Optimisation</h2><div class="charts">{"".join(optimiser_charts)}</div>
</body></html>"""
    out = run_dir / "curves.html"
    out.write_text(page)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2 or not (Path(sys.argv[1]) / "metrics.jsonl").is_file():
        print("usage: python plots.py RUN_DIR   (a directory with metrics.jsonl)", file=sys.stderr)
        sys.exit(1)
    print(write_training_curves(sys.argv[1]))
