"""Training curves as a self-contained HTML page of inline SVG charts (no plotting library, no assets).

    python plots.py runs/demo          # writes runs/demo/curves.html from runs/demo/metrics.jsonl

train.py rewrites curves.html after every validation and at the end of a run.
"""
from __future__ import annotations

import html
import json
import math
import sys
from pathlib import Path

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")


def line_chart(title: str, series: dict[str, list[tuple[float, float]]], log_y: bool = False,
               width: int = 520, height: int = 240) -> str:
    """One SVG chart: a polyline per named series of (x, y) points, axes labelled with their ranges."""
    pad_l, pad_r, pad_t, pad_b = 56, 12, 28, 34
    points = [(x, y) for pts in series.values() for x, y in pts if y is not None and math.isfinite(y) and (y > 0 or not log_y)]
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">',
           f'<text x="{pad_l}" y="16" font-size="13" font-weight="bold">{html.escape(title)}</text>']
    if not points:
        svg.append(f'<text x="{pad_l}" y="{height // 2}" font-size="12">no data yet</text></svg>')
        return "".join(svg)
    fy = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(fy(p[1]) for p in points), max(fy(p[1]) for p in points)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y1 = y0 + 1
    plot_w, plot_h = width - pad_l - pad_r, height - pad_t - pad_b

    def sx(x):
        return pad_l + plot_w * (x - x0) / (x1 - x0)

    def sy(y):
        return pad_t + plot_h * (1 - (fy(y) - y0) / (y1 - y0))

    svg.append(f'<rect x="{pad_l}" y="{pad_t}" width="{plot_w}" height="{plot_h}" fill="#fafafa" stroke="#ccc"/>')
    top, bottom = (10 ** y1, 10 ** y0) if log_y else (y1, y0)
    svg.append(f'<text x="{pad_l - 4}" y="{pad_t + 10}" font-size="10" text-anchor="end">{top:.3g}</text>')
    svg.append(f'<text x="{pad_l - 4}" y="{pad_t + plot_h}" font-size="10" text-anchor="end">{bottom:.3g}</text>')
    svg.append(f'<text x="{pad_l}" y="{height - 18}" font-size="10">{x0:g}</text>')
    svg.append(f'<text x="{pad_l + plot_w}" y="{height - 18}" font-size="10" text-anchor="end">{x1:g}</text>')
    legend_x = pad_l
    for (name, pts), color in zip(series.items(), COLORS):
        pts = [(x, y) for x, y in pts if y is not None and math.isfinite(y) and (y > 0 or not log_y)]
        if pts:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            svg.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        svg.append(f'<text x="{legend_x}" y="{height - 4}" font-size="11" fill="{color}">{html.escape(name)}</text>')
        legend_x += 9 * len(name) + 18
    svg.append("</svg>")
    return "".join(svg)


def write_training_curves(run_dir: str | Path) -> Path:
    """curves.html next to metrics.jsonl: losses (log scale), learning rate, validation losses and head F1."""
    run_dir = Path(run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    # A resumed run re-logs steps after its checkpoint: the last record of each step wins.
    train = {r["step"]: r for r in records if r["kind"] == "train"}
    val = {r["step"]: r for r in records if r["kind"] == "val"}
    train_steps, val_steps = sorted(train), sorted(val)

    def curve(rows, steps, key, sub=None):
        return [(s, rows[s][key][sub] if sub else rows[s][key]) for s in steps]

    components = ("loss", "asst_ce", "dst_ce", "speak_bce", "dst_bce")
    charts = [
        line_chart("training losses (log scale)", {k: curve(train, train_steps, k) for k in components}, log_y=True),
        line_chart("learning rate", {"lr": curve(train, train_steps, "lr")}),
        line_chart("validation losses (log scale, rho = 1)", {k: curve(val, val_steps, k) for k in components}, log_y=True),
        line_chart("validation head F1 at 0.5", {"speak": curve(val, val_steps, "speak", "f1"),
                                                 "dst": curve(val, val_steps, "dst", "f1")}),
        line_chart("throughput (tokens/s)", {"tokens/s": curve(train, train_steps, "tokens_per_s")}),
        line_chart("gradient norm (before clipping)", {"grad norm": curve(train, train_steps, "grad_norm")}),
    ]
    page = (f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(run_dir.name)}: training curves'
            f'</title><style>body{{font-family:sans-serif;margin:2em}} svg{{margin:0 12px 12px 0}}</style></head>'
            f'<body><h1>{html.escape(str(run_dir))}</h1><p>{len(train_steps)} train log lines, '
            f'{len(val_steps)} validations, last step {train_steps[-1] if train_steps else 0}</p>'
            + "".join(charts) + "</body></html>")
    out = run_dir / "curves.html"
    out.write_text(page)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2 or not (Path(sys.argv[1]) / "metrics.jsonl").is_file():
        print("usage: python plots.py RUN_DIR   (a directory with metrics.jsonl)", file=sys.stderr)
        sys.exit(1)
    print(write_training_curves(sys.argv[1]))
