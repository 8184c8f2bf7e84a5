"""The evaluation report (report.py) and the training curves (plots.py), read back as a browser would parse them:
each head in its own lane with a 0..1 scale, fired frames, the replies and DST updates of both sides, the state
grid, the missed/redundant/matched tables with times in seconds, the metric definitions; and curves with train
and validation on one chart, ticked and titled axes, checkpoint marks and the heads' F1/AUROC."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

import evaluate
import metrics
import nlg
from config import load_config
from conftest import ROOT, Node, parse, table_rows
from clips import FrameEvents, Step, load_split
from plots import format_tick, log_ticks, nice_ticks, write_training_curves
from report import DEFINITIONS, write_report
import stream

def polyline_points(node: Node) -> list[tuple[float, float]]:
    (line,) = node.find_all("polyline")
    return [tuple(map(float, p.split(","))) for p in line.attrs["points"].split()]


# ----------------------------------------------------------------------------------------------------
# Report inputs: the demo's test videos with perturbed oracle predictions, or long synthetic videos


def demo_videos(demo_dir: Path) -> list[stream.Video]:
    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"data.root={demo_dir}", f"model.path={demo_dir / 'model'}"])
    clips, _ = load_split(cfg, "test")
    return stream.assemble_videos(clips)[:2]


def scored(videos, all_records, thresholds=stream.Thresholds(0.5, 0.5)) -> tuple[dict, list]:
    """metrics.json and the speaking matches exactly as evaluate.py computes them."""
    blocks, matches = evaluate.compute_metrics(videos, all_records, nlg.BagOfWordsEmbedder(), thresholds, False)
    result = {"split": "test", "checkpoint": "hand-built", "num_videos": len(videos),
              "num_frames": sum(v.num_frames for v in videos), "embedder": "bag-of-words-4096",
              "thresholds": {"speak": thresholds.speak, "dst": thresholds.dst}, **blocks,
              "seconds": 1.0, "frames_per_second": 100.0, "mode": "streaming"}
    return result, matches


def perturbed_demo(demo_dir: Path):
    """Oracle predictions with one reply dropped (missed), one unrelated reply at a silent frame (redundant), the
    second reference update not predicted (states differ) and one illegal update."""
    videos = demo_videos(demo_dir)
    all_records = [stream.oracle_records(v) for v in videos]
    video, records = videos[0], all_records[0]
    base = video.start
    reply_frames = [k for k, ev in sorted(video.events.items()) if ev.asst_texts]
    update_frames = [k for k, ev in sorted(video.events.items()) if ev.transitions]
    missed = reply_frames[1]
    (left, right), _ = metrics.window_for_dataset(video.dataset)
    # frames with no reference reply inside their window: a reply there can only be redundant
    silent = [k for k in range(base, video.end) if k not in video.events
              and not any(left <= j - k <= right for j in reply_frames)]
    redundant = silent[len(silent) // 2]
    illegal_at = next(k for k in range(base, video.end) if k not in video.events and k > update_frames[0])
    dropped_update = update_frames[1]
    last_step = video.steps[-1].id
    for rec in records:
        if rec.frame == missed:
            rec.speak, rec.asst_text, rec.p_speak = False, None, 0.3
        elif rec.frame == redundant:
            rec.speak, rec.asst_text, rec.p_speak = True, "Unrelated chatter about the weather.", 0.8
        elif rec.frame == dropped_update:
            rec.dst, rec.dst_text, rec.transitions, rec.p_dst = False, None, [], 0.1
        elif rec.frame == illegal_at:
            rec.dst, rec.p_dst = True, 0.7
            rec.dst_text, rec.transitions, rec.num_invalid = f"{last_step}->complete", [(last_step, "complete")], 1
    return videos, all_records, dict(missed=missed, redundant=redundant, illegal_at=illegal_at,
                                     dropped_update=dropped_update)


def long_video(uid: str, num_frames: int = 2000, num_steps: int = 20, fps: float = 2.0) -> stream.Video:
    steps = [Step(f"S{n + 1}", f"Step {n + 1}: a long description of what the user does here", 0.0, 0.0)
             for n in range(num_steps)]
    events: dict[int, FrameEvents] = {}
    span = num_frames // num_steps
    for n, step in enumerate(steps):
        events.setdefault(n * span + 3, FrameEvents()).transitions.append((step.id, "start"))
        events.setdefault(n * span + span - 5, FrameEvents()).transitions.append((step.id, "complete"))
    for k in range(10, num_frames, 20):
        events.setdefault(k, FrameEvents()).asst_texts.append(f"Now do part {k} of the task, carefully and slowly.")
    return stream.Video(uid, "assembly101", fps, 0, num_frames, steps, "", {s.id: "not_started" for s in steps},
                          events, [])


def noisy_records(video: stream.Video, seed: int) -> list[stream.FrameRecord]:
    """A plausible model: late or missing replies and updates, some chatter, some illegal updates."""
    rng = random.Random(seed)
    records = [stream.FrameRecord(k, rng.random() * 0.3, rng.random() * 0.3, False, False)
               for k in range(video.start, video.end)]
    for k, ev in sorted(video.events.items()):
        if ev.asst_texts and rng.random() < 0.85:
            rec = records[min(k + rng.choice([-1, 0, 1, 2]), video.end - 1)]
            rec.speak, rec.p_speak = True, 0.6 + 0.4 * rng.random()
            rec.asst_text = ev.asst_texts[0] if rng.random() < 0.7 else "Something else entirely."
        if ev.transitions and rng.random() < 0.85:
            rec = records[min(k + rng.choice([0, 1, 3]), video.end - 1)]
            rec.dst, rec.p_dst = True, 0.6 + 0.4 * rng.random()
            rec.transitions = list(rec.transitions) + list(ev.transitions)
            rec.dst_text = ", ".join(f"{s}->{t}" for s, t in rec.transitions)
    for _ in range(30):
        rec = records[rng.randrange(video.num_frames)]
        if not rec.speak:
            rec.speak, rec.p_speak, rec.asst_text = True, 0.55, "Chatter nobody asked for."
    for _ in range(5):
        rec = records[rng.randrange(video.num_frames)]
        if not rec.dst:
            rec.dst, rec.p_dst, rec.dst_text, rec.num_invalid = True, 0.6, "S1->complete", 1
            rec.transitions = [("S1", "complete")]
    return records


# ----------------------------------------------------------------------------------------------------
# The report


def test_report_of_demo_run_shows_both_heads_dst_and_definitions(demo_dir, tmp_path, capsys):
    """The real evaluate.py on the demo (--oracle): every lane, the state grid and a definition per metric."""
    out = tmp_path / "oracle"
    assert evaluate.main(["--config", str(ROOT / "configs" / "demo.yaml"), f"data.root={demo_dir}",
                          f"model.path={demo_dir / 'model'}", "--oracle", "--embedder", "bow", "--max-videos", "2",
                          "--out", str(out)]) == 0, capsys.readouterr().err
    result = json.loads((out / "metrics.json").read_text())
    page = (out / "report.html").read_text()
    dom = parse(page)
    assert "<script" not in page and "http" not in page  # self-contained
    sections = dom.find_all("section", "video")
    assert len(sections) == 2
    videos = demo_videos(demo_dir)
    for video, section in zip(videos, sections):
        (speak_lane,) = section.find_all("g", "lane-speak")
        (dst_lane,) = section.find_all("g", "lane-dst")
        for lane in (speak_lane, dst_lane):
            assert len(polyline_points(lane)) == video.num_frames  # one point per frame, in its own lane
            assert {t.text() for t in lane.find_all("text")} >= {"0", "0.5", "1", "threshold 0.5", "fired"}
            assert lane.find_all("path", "fired")  # the oracle fires at every reference event
        # the two lanes do not overlap: the DST lane's points lie below every point of the speak lane
        assert min(y for _, y in polyline_points(dst_lane)) > max(y for _, y in polyline_points(speak_lane))
        (dst_updates,) = section.find_all("g", "dst-lane")
        num_ref_updates = sum(len(ev.transitions) for ev in video.events.values())
        markers = [p for p in dst_updates.find_all("path") if p.find_all("title")]
        assert len(markers) == 2 * num_ref_updates  # reference row and (oracle) predicted row
        (grid,) = section.find_all("g", "state-grid")
        assert len(grid.find_all("rect", "ref-state")) >= len(video.steps)
        assert len(grid.find_all("rect", "pred-state")) >= len(video.steps)
        assert not grid.find_all("rect", "state-differs")
        ticks = [float(t.text()) for t in section.find_all("text", "tick")]
        assert len(ticks) >= 5 and ticks[-1] <= video.end / video.fps  # seconds, not frames
        assert "time (s)" in section.text()
    for block in ("speak", "nlg", "dst"):
        for key in result[block]:
            assert f'id="def-{block}-{key}"' in page, (block, key)
            assert f'href="#def-{block}-{key}"' in page
    for key in result["decisions"]["speak"]:
        assert f'id="def-decisions-{key}"' in page
    assert "precision = good / (matched + redundant)" in page and "recall = good / (matched + missed)" in page
    assert "semantic score is &gt; 0.5" in page
    windows = table_rows(dom.find_all("table", "windows")[0])
    assert ["assembly101", "(-4, 8)", "-2 s to +4 s at 2 fps"] in windows


def test_report_tables_show_missed_redundant_and_matched_replies_in_seconds(demo_dir, tmp_path):
    videos, all_records, where = perturbed_demo(demo_dir)
    result, matches = scored(videos, all_records)
    assert result["speak"]["num_missed"] == 1 and result["speak"]["num_redundant"] == 1
    sweep_rows = [{"speak_threshold": s, "dst_threshold": 0.5, "speak_f1": f1, "dst_f1": 0.9} for s, f1 in
                  ((0.3, 0.7), (0.5, 0.8))]
    write_report(tmp_path / "report.html", result, videos, all_records, matches, stream.Thresholds(0.5, 0.5),
                 sweep_rows)
    dom = parse((tmp_path / "report.html").read_text())
    (sweep,) = dom.find_all("table", "sweep")
    assert [tr.attrs.get("class") for tr in sweep.find_all("tr")[1:]] == ["", "best"]
    video, section = videos[0], dom.find_all("section", "video")[0]
    fps = video.fps

    (missed,) = section.find_all("table", "missed")
    assert table_rows(missed) == [[f"{where['missed'] / fps:.1f}", str(where["missed"]), "0.30",
                                   " ".join(video.events[where["missed"]].asst_texts)]]
    (redundant,) = section.find_all("table", "redundant")
    assert table_rows(redundant) == [[f"{where['redundant'] / fps:.1f}", str(where["redundant"]), "0.80",
                                      "Unrelated chatter about the weather."]]
    (matched,) = section.find_all("table", "matched")
    rows = table_rows(matched)
    assert len(rows) == len(matches[0].matches)
    first = min(matches[0].matches, key=lambda m: m.ref_frame)
    assert rows[0][:4] == [f"{(video.start + first.gen_frame) / fps:.1f}",
                           f"{(video.start + first.ref_frame) / fps:.1f}", "+0.0", f"{first.score:.2f}"]
    # In the timeline: a hollow red circle for the missed reference and a red triangle for the redundant reply.
    (replies,) = section.find_all("g", "replies")
    tips = [t.text() for t in replies.find_all("title")]
    assert any(t.startswith(f"missed reference at {where['missed'] / fps:.1f} s") for t in tips)
    assert any(t.startswith(f"redundant reply at {where['redundant'] / fps:.1f} s") for t in tips)
    assert any("could have matched the missed reply" in t for t in tips)  # the metric's own window, shaded

    # DST: the illegal update is a red cross with the reason; the dropped update leaves the states differing.
    (dst_lane,) = section.find_all("g", "dst-lane")
    illegal = [t.text() for t in dst_lane.find_all("title") if "illegal transition" in t.text()]
    assert illegal and illegal[0].startswith(f"predicted update at {where['illegal_at'] / fps:.1f} s")
    (grid,) = section.find_all("g", "state-grid")
    assert grid.find_all("rect", "state-differs")
    (dst_table,) = section.find_all("table", "dst-updates")
    dropped = [r for r in table_rows(dst_table) if r[1] == str(where["dropped_update"])]
    assert dropped and dropped[0][4] == "(head did not fire)"
    # The overview row of this video repeats the counts.
    overview = table_rows(dom.find_all("table", "overview")[0])
    assert overview[0][0] == video.video_uid and overview[0][5:7] == ["1", "1"]


def test_report_of_long_videos_merges_runs_and_stays_small(tmp_path):
    """10 videos x 2,000 frames x 20 steps: state runs are merged rectangles, the page stays a few MB at most."""
    videos = [long_video(f"long_{n}") for n in range(10)]
    all_records = [noisy_records(v, seed=n) for n, v in enumerate(videos)]
    result, matches = scored(videos, all_records)
    path = tmp_path / "report.html"
    write_report(path, result, videos, all_records, matches, stream.Thresholds(0.5, 0.5))
    size = path.stat().st_size
    assert size < 3_000_000, f"{size / 1e6:.1f} MB"
    dom = parse(path.read_text())
    sections = dom.find_all("section", "video")
    assert len(sections) == len(videos)
    for video, records, section in zip(videos, all_records, sections):
        (grid,) = section.find_all("g", "state-grid")
        # Each step goes not_started -> in_progress -> completed once: three runs per bar, not 2,000 cells.
        assert len(grid.find_all("rect", "ref-state")) == 3 * len(video.steps)
        assert len(grid.find_all("rect", "pred-state")) <= 3 * len(video.steps)
        (fired,) = section.find_all("g", "lane-speak")[0].find_all("path", "fired")
        assert fired.attrs["d"].count("M") <= sum(r.speak for r in records)  # one path, a subpath per run
        ticks = [float(t.text()) for t in section.find_all("text", "tick")]
        assert ticks == [0, 100, 200, 300, 400, 500, 600, 700, 800, 900]  # 2,000 frames at 2 fps, in seconds


def test_every_metric_of_metrics_json_has_a_definition():
    blocks = {"speak": metrics.summarize_speaking([]), "nlg": nlg.nlg_metrics([]),
              "dst": metrics.dst_metrics([]), "decisions": metrics.decision_metrics([0.2, 0.8], [0, 1], 0.5)}
    for block, values in blocks.items():
        assert set(values) == set(DEFINITIONS[block]), block


# ----------------------------------------------------------------------------------------------------
# The training curves


def write_metrics(run_dir: Path, val_format: str = "new") -> None:
    """A 600-step run: training loss falls, validation loss doubles from step 300 to 600."""
    records = []
    for step in range(20, 601, 20):
        f = 2.0 ** (-step / 60)
        records.append({"kind": "train", "step": step, "loss": 0.3 + 10 * f, "asst_ce": 0.2 + 5 * f,
                        "dst_ce": 0.01 + 4 * f, "speak_bce": 0.05 + 0.6 * f, "dst_bce": 0.04 + 0.6 * f, "n_asst": 500,
                        "n_dst": 270, "n_speak_pos": 47, "n_speak_neg": 43, "n_dst_pos": 32, "n_dst_neg": 58,
                        "lr": 3e-3, "grad_norm": 1 + 5 * f, "tokens_per_s": 7000.0, "frames_per_s": 1450.0,
                        "tokens_per_step": 2300.0, "frames_per_step": 470.0, "mfu": None, "peak_mem_gb": 0.7,
                        "rho": 0.1, "epoch": step // 10, "skipped_steps": 0})
        if step % 100 == 0:
            v = {100: 0.9, 200: 0.5, 300: 0.42, 400: 0.56, 500: 0.7, 600: 0.84}[step]
            head = {"precision": 0.9, "recall": 0.8, "f1": 0.85, "auroc": 0.97, "num_pos": 98, "num_neg": 856}
            val = {"kind": "val", "step": step, "loss": v, "asst_ce": 0.8 * v, "dst_ce": 0.02 * v,
                   "speak_bce": 0.1 * v, "dst_bce": 0.08 * v, "speak": head, "dst": dict(head, f1=0.7)}
            if val_format == "new":
                val.update(n_asst=999, n_dst=400, n_speak_pos=98, n_speak_neg=856, n_dst_pos=63, n_dst_neg=891)
            else:  # older runs: counts under bare keys, one of them clashing with a head's dict
                val.update(asst=999, speak_pos=98, speak_neg=856, dst_pos=63, dst_neg=891)
                val["dst"] = {k: v for k, v in head.items() if k != "auroc"}
            records.append(val)
        if step % 200 == 0:
            records.append({"kind": "checkpoint", "step": step, "path": f"runs/demo/step_{step}"})
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def chart(dom: Node, chart_id: str) -> Node:
    (svg,) = [n for n in dom.find_all("svg", "chart") if n.attrs.get("id") == f"chart-{chart_id}"]
    return svg


def series(svg: Node) -> dict[str, Node]:
    return {g.attrs["data-series"]: g for g in svg.find_all("g", "series")}


def test_curves_put_train_and_validation_on_one_ticked_titled_chart(tmp_path):
    write_metrics(tmp_path)
    page = write_training_curves(tmp_path).read_text()
    dom = parse(page)
    for key in ("loss", "asst_ce", "dst_ce", "speak_bce", "dst_bce"):
        svg = chart(dom, key)
        lines = series(svg)
        assert set(lines) == {f"train {key}", f"validation {key}"}
        assert len(polyline_points(lines[f"train {key}"])) == 30
        assert len(lines[f"validation {key}"].find_all("circle")) == 6
        x_ticks = [float(t.text()) for t in svg.find_all("text", "x-tick")]
        assert x_ticks == [0, 100, 200, 300, 400, 500, 600]  # labels between the extremes, round values
        assert len(svg.find_all("text", "y-tick")) >= 3
        assert svg.find_all("text", "x-title")[0].text() == "step"
        assert "log scale" in svg.find_all("text", "y-title")[0].text()
        assert len(svg.find_all("line", "checkpoint")) == 3  # steps 200, 400, 600
    # Both curves share one y scale: the rising validation loss ends above the falling training loss.
    lines = series(chart(dom, "loss"))
    val_y = [float(c.attrs["cy"]) for c in lines["validation loss"].find_all("circle")]
    assert val_y[-1] < val_y[2]  # svg y grows downwards: step 600 is higher than step 300
    assert "Validation loss rose from its minimum 0.42 (step 300) to 0.84 (step 600), 2.00x" in page

    heads = series(chart(dom, "heads"))
    assert set(heads) == {"speak head F1", "speak head AUROC", "DST-update head F1", "DST-update head AUROC"}
    for line in heads.values():
        assert len(line.find_all("circle")) == 6
    assert [t.text() for t in chart(dom, "heads").find_all("text", "y-tick")] == ["0", "0.2", "0.4", "0.6", "0.8", "1"]


def test_curves_read_old_val_records(tmp_path):
    write_metrics(tmp_path, val_format="old")
    dom = parse(write_training_curves(tmp_path).read_text())
    assert len(series(chart(dom, "loss"))["validation loss"].find_all("circle")) == 6
    heads = series(chart(dom, "heads"))
    assert len(heads["DST-update head F1"].find_all("circle")) == 6
    assert not heads["DST-update head AUROC"].find_all("circle")  # not logged by that run: nothing drawn


def test_curves_name_a_broken_line(tmp_path):
    write_metrics(tmp_path)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 620, "loss"\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:40: not a JSON record"):
        write_training_curves(tmp_path)


def test_ticks_are_round_and_cover_the_range():
    assert nice_ticks(0, 600) == [0, 100, 200, 300, 400, 500, 600]
    assert nice_ticks(0, 61.75, target=12) == [0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 60, 65]
    assert nice_ticks(0.0, 1.0) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert log_ticks(0.3, 11) == [0.5, 1, 2, 5, 10]
    assert log_ticks(0.4, 0.9) == [0.4, 0.5, 0.6, 0.8]
    assert [format_tick(v) for v in (0, 0.5, 2.5e-4, 1e-5, 12000, 3)] == ["0", "0.5", "0.00025", "1e-05", "12k", "3"]
    for lo, hi in ((0.013, 0.77), (3, 17), (-2.5, 9.1)):
        ticks = nice_ticks(lo, hi)
        assert ticks[0] <= lo and ticks[-1] >= hi and 3 <= len(ticks) <= 8
        assert all(re.fullmatch(r"-?\d+(\.\d{1,3})?", f"{t:g}") for t in ticks)
