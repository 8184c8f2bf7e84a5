"""The evaluation report: one self-contained HTML page (inline SVG, no external assets) per evaluation.

    write_report(out_dir / "report.html", result, videos, all_records, speak_matches, thresholds)

evaluate.py writes it next to metrics.json and predictions.jsonl.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from data import FrameEvents

if TYPE_CHECKING:
    from evaluate import FrameRecord, Thresholds, Video


def _svg_timeline(video: Video, records: list[FrameRecord], thresholds: Thresholds, width: int = 900) -> str:
    """Both heads' probabilities over the video, reference events as ticks, thresholds as dashed lines."""
    n = max(len(records), 2)
    height, pad = 150, 30
    plot_w, plot_h = width - 2 * pad, height - 2 * pad

    def x(i):
        return pad + plot_w * i / (n - 1)

    def y(p):
        return pad + plot_h * (1 - p)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" class="timeline">',
             f'<rect x="{pad}" y="{pad}" width="{plot_w}" height="{plot_h}" fill="#fafafa" stroke="#ccc"/>']
    for i, rec in enumerate(records):
        ev = video.events.get(rec.frame, FrameEvents())
        if ev.asst_texts:
            parts.append(f'<line x1="{x(i):.1f}" x2="{x(i):.1f}" y1="{pad}" y2="{pad + plot_h}" stroke="#1f77b4" stroke-opacity="0.35" stroke-width="3"/>')
        if ev.transitions:
            parts.append(f'<line x1="{x(i):.1f}" x2="{x(i):.1f}" y1="{pad + plot_h - 10}" y2="{pad + plot_h}" stroke="#d62728" stroke-width="3"/>')
    for value, color in ((thresholds.speak, "#1f77b4"), (thresholds.dst, "#d62728")):
        parts.append(f'<line x1="{pad}" x2="{pad + plot_w}" y1="{y(value):.1f}" y2="{y(value):.1f}" stroke="{color}" stroke-dasharray="4 3"/>')
    for attr, color in (("p_speak", "#1f77b4"), ("p_dst", "#d62728")):
        points = " ".join(f"{x(i):.1f},{y(getattr(r, attr)):.1f}" for i, r in enumerate(records))
        parts.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="1.5"/>')
    parts.append(f'<text x="{pad}" y="{pad - 8}" font-size="12">frames {video.start}–{video.end - 1} · '
                 f'<tspan fill="#1f77b4">p_speak (band: reference reply)</tspan> · '
                 f'<tspan fill="#d62728">p_dst (tick: reference update)</tspan> · dashed: thresholds</text>')
    parts.append(f'<text x="{pad}" y="{height - 8}" font-size="11">{video.start}</text>')
    parts.append(f'<text x="{pad + plot_w - 30}" y="{height - 8}" font-size="11">{video.end - 1}</text>')
    parts.append("</svg>")
    return "".join(parts)


def write_report(path: Path, result: dict, videos: list[Video], all_records: list[list[FrameRecord]],
                 speak_matches: list, thresholds: Thresholds, sweep_rows: Optional[list[dict]] = None) -> None:
    esc = html.escape

    def fmt(v):
        if v is None:
            return "–"
        return f"{v:.4f}" if isinstance(v, float) else esc(str(v))

    blocks = [(name, result[name]) for name in ("speak", "nlg", "dst")]
    blocks += [(f"decisions.{head}", values) for head, values in result["decisions"].items()]
    # One small table per block: metric names as the header row, values below.
    summary = "".join(
        f"<h3>{esc(name)}</h3><table><tr>{''.join(f'<th>{esc(k)}</th>' for k in values)}</tr>"
        f"<tr>{''.join(f'<td>{fmt(v)}</td>' for v in values.values())}</tr></table>"
        for name, values in blocks
    )
    sections = []
    for video, records, vm in zip(videos, all_records, speak_matches):
        pairs = "".join(
            f"<tr><td>{m.gen_frame + video.start}</td><td>{m.ref_frame + video.start}</td><td>{m.score:.2f}</td>"
            f"<td>{esc(m.gen_text)}</td><td>{esc(m.ref_text)}</td></tr>" for m in vm.matches
        )
        sections.append(
            f"<h3>{esc(video.video_uid)} <small>({esc(video.dataset)}, {video.num_frames} frames, "
            f"{len(vm.matches)} matched, {len(vm.missed_frames)} missed, {len(vm.redundant_frames)} redundant)</small></h3>"
            + _svg_timeline(video, records, thresholds)
            + "<details><summary>matched utterances</summary><table><tr><th>gen frame</th><th>ref frame</th>"
            + f"<th>score</th><th>generated</th><th>reference</th></tr>{pairs}</table></details>"
        )
    sweep = ""
    if sweep_rows:
        head = "".join(f"<th>{esc(k)}</th>" for k in sweep_rows[0])
        body = "".join("<tr>" + "".join(f"<td>{fmt(v)}</td>" for v in r.values()) + "</tr>" for r in sweep_rows)
        sweep = f"<h2>Threshold sweep</h2><table><tr>{head}</tr>{body}</table>"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Evaluation: {esc(result['split'])}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1000px}}table{{border-collapse:collapse;margin:.5em 0}}
td,th{{border:1px solid #ddd;padding:2px 8px;font-size:13px;text-align:left}}small{{color:#666;font-weight:normal}}</style>
</head><body><h1>Streaming evaluation</h1>
<p>checkpoint <code>{esc(result['checkpoint'])}</code> · split <b>{esc(result['split'])}</b> · {result['num_videos']} videos ·
{result['num_frames']} frames · thresholds speak {thresholds.speak} / dst {thresholds.dst} · embedder {esc(result['embedder'])} ·
{result['frames_per_second']:.1f} frames/s</p>
<h2>Summary</h2>{summary}{sweep}
<h2>Videos</h2>{''.join(sections)}</body></html>"""
    path.write_text(page)
