"""Running on imperfect real data without hiding anything: the start-up check of every frame row, the
data.on_invalid_clip and data.on_overlength policies (`usable_clips`, `split_clip`), the `validate` CLI
for a split file given alone, and the per-video / per-clip layout question."""
from __future__ import annotations

import copy
import json
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import clips
from clips import DataError
import data
from config import load_config
from conftest import write_proassist_features
import frames
import sequence

UID = "assembly_nusar-2021_action_both_9011-c03f_9011_user_id_2021-02-01_160239__HMC_84355350_mono10bit"


def write_cls(path: Path, values: np.ndarray, null_rows: tuple[int, ...] = ()) -> None:
    """A cls-only features file, (rows, dim) float16 as list<list<float16>> cells; `null_rows` are missing."""
    cells = [None if i in null_rows else [row.tolist()] for i, row in enumerate(values.astype(np.float16))]
    table = pa.table({"cls": pa.array(cells, type=pa.list_(pa.list_(pa.float16())))})
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.ipc.new_file(str(path), table.schema) as writer:
        writer.write_table(table)


def split_config(tmp_path: Path, clips: list[dict], tokenizer_dir: Path, *overrides: str):
    """Clips as a split file; each video gets a 460-row, 16-d features file unless one exists already."""
    (tmp_path / "split.json").write_text(json.dumps(clips))
    for uid in {c["video_uid"] for c in clips}:
        path = tmp_path / "feat" / f"{uid}.arrow"
        if not path.exists():
            write_proassist_features(path, 460, dim=16)
    return load_config(None, [
        f"data.root={tmp_path}", "data.train=split.json", "data.feature_dim=16",
        "data.features_path={root}/feat/{video_uid}.arrow", f"model.path={tokenizer_dir}", *overrides,
    ])


def with_uid(clip: dict, uid: str) -> dict:
    clip = copy.deepcopy(clip)
    clip["video_uid"] = uid
    return clip


# ---------------------------------------------------------------------------------------------------
# 1. Every frame row is checked before the first step


@pytest.fixture()
def bad_frames_split(tmp_path, sample_clip, tokenizer_dir):
    """clip 0 good; clip 1 has a NaN at frame 300 and clip 2 a missing row at frame 320 (rows past the first)."""
    values = np.random.default_rng(0).standard_normal((460, 16))
    nan_values = values.copy()
    nan_values[300, 5] = np.nan
    nan_values[310, 0] = np.inf
    write_cls(tmp_path / "feat" / "nan_late.arrow", nan_values)
    write_cls(tmp_path / "feat" / "null_late.arrow", values, null_rows=(320, 330))
    clips = [sample_clip, with_uid(sample_clip, "nan_late"), with_uid(sample_clip, "null_late")]
    return tmp_path, clips


def test_bad_values_later_in_a_clip_refuse_the_run_before_it_starts(bad_frames_split, tokenizer_dir):
    tmp_path, clips = bad_frames_split
    cfg = split_config(tmp_path, clips, tokenizer_dir)
    tokenizer = sequence.load_tokenizer(tokenizer_dir)
    with pytest.raises(DataError) as caught:
        data.ClipDataset(cfg, "train", tokenizer)
    message = str(caught.value)
    # Every bad clip in one message, each with file, clip index, video_uid and its first bad frame.
    assert "2 invalid clip(s)" in message and "data.on_invalid_clip=skip" in message
    assert f"{tmp_path / 'split.json'}:clip 1 (nan_late)" in message
    assert "non-finite feature values at frame 300 (2 frames affected)" in message
    assert f"{tmp_path / 'split.json'}:clip 2 (null_late)" in message
    assert "missing (null) feature values at frame 320 (2 frames affected)" in message


def test_skip_runs_on_the_rest_and_lists_each_skipped_clip(bad_frames_split, tokenizer_dir, capsys):
    tmp_path, clips = bad_frames_split
    cfg = split_config(tmp_path, clips, tokenizer_dir, "data.on_invalid_clip=skip")
    dataset = data.ClipDataset(cfg, "train", sequence.load_tokenizer(tokenizer_dir))
    assert [c.video_uid for c in dataset.clips] == [UID] and len(dataset.lengths) == 1
    out = capsys.readouterr().out
    assert f"skipped {tmp_path / 'split.json'}:clip 1 (nan_late): " in out and "frame 300" in out
    assert f"skipped {tmp_path / 'split.json'}:clip 2 (null_late): " in out and "frame 320" in out
    assert "split 'train': 2 invalid clip(s) skipped (data.on_invalid_clip=skip)" in out
    assert sorted(dataset.report.skipped) == [1, 2]
    # Every item of what remains reads cleanly.
    assert np.isfinite(dataset.item(0)["frame_features"]).all()
    # Validation is not a policy: it still reports everything and fails.
    code = data.main(["validate", str(tmp_path / "split.json"), f"data.root={tmp_path}", "data.feature_dim=16",
                      "data.features_path={root}/feat/{video_uid}.arrow", f"model.path={tokenizer_dir}",
                      "data.on_invalid_clip=skip"])
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("ERROR")]
    assert code == 1 and len(lines) == 2
    assert "clip 1 (nan_late)" in lines[0] and "clip 2 (null_late)" in lines[1]


def test_a_read_that_fails_later_names_the_clip(tmp_path, sample_clip, tokenizer_dir):
    cfg = split_config(tmp_path, [sample_clip], tokenizer_dir)
    dataset = data.ClipDataset(cfg, "train", sequence.load_tokenizer(tokenizer_dir))
    # The file changes under the run (rewritten by another job): the error says which clip, not just pyarrow's words.
    (tmp_path / "feat" / f"{UID}.arrow").write_bytes(b"not arrow at all")
    dataset.store._tables.clear()
    with pytest.raises(DataError, match=rf"clip 0 {UID}\): not an Arrow IPC file"):
        dataset.item(0)
    (tmp_path / "feat" / f"{UID}.arrow").unlink()
    with pytest.raises(DataError, match=rf"clip 0 {UID}\): frames file not found"):
        dataset.item(0)


def test_frame_check_reads_without_float32_copies(tmp_path, sample_clip):
    """The start-up check reduces over the memory-mapped float16 buffer; it never allocates a float32
    (or even a float16) copy of the clip's rows in numpy."""
    rows, dim = 2000, 1152
    write_cls(tmp_path / "f" / f"{UID}.arrow", np.ones((rows, dim)))
    raw = {**sample_clip, "start_frame_idx": 0, "end_frame_idx": rows, "frames_file": f"f/{UID}.arrow"}
    cfg = load_config(None, [f"data.root={tmp_path}", f"data.feature_dim={dim}"])
    clip, problems = clips.parse_clip(raw, "x.json", 0, cfg)
    assert clip is not None, problems
    store = frames.FrameStore.from_config(cfg)
    store.table(clip.frames_path)  # opening the file is not what is measured
    tracemalloc.start()
    store.check(clip)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < rows * dim * 2 / 8, peak  # far below even a float16 copy (4.6 MB)
    assert store.features(clip).shape == (rows, dim)


# ---------------------------------------------------------------------------------------------------
# 3. data.on_overlength=split


def sample_parsed(sample_clip, mutate=None) -> clips.Clip:
    raw = copy.deepcopy(sample_clip)
    if mutate:
        mutate(raw)
    clip, problems = clips.parse_clip(raw, "x.json", 0, load_config(None, ["data.root=/nonexistent"]))
    assert clip is not None, problems
    return clip


def assert_proper_pieces(clip: clips.Clip, pieces: list[clips.Clip], renderer: sequence.Renderer, max_len: int) -> None:
    """Pieces tile the clip, each fits, each is a proper clip, and no turn is lost or duplicated."""
    assert [p.start for p in pieces] == [clip.start] + [p.end for p in pieces[:-1]] and pieces[-1].end == clip.end
    assert [p.part for p in pieces] == list(range(len(pieces)))
    assert {p.video_uid for p in pieces} == {clip.video_uid} and {p.index for p in pieces} == {clip.index}
    original = {t.index: t.frame for t in clip.turns if t.frame is not None}
    seen = [(t.index, t.frame) for p in pieces for t in p.turns if t.frame is not None]
    assert sorted(seen) == sorted(original.items())  # every timed turn once, at its own frame
    events = clip.events()
    replayed = clips.state_trajectory(clip.initial_state(), [
        events[k].transitions if k in events else [] for k in range(clip.start, clip.end)])
    whole = renderer.render(clip)
    for piece in pieces[1:]:
        assert piece.start - 1 not in events  # nothing attached to the frame just before a cut
        # The prompt's state (recomputed from the spans) is where the clip's own updates had got to.
        assert piece.initial_state() == clips.initial_state(clip.steps, piece.start, clip.fps)
        assert piece.initial_state() == replayed[piece.start - 1 - clip.start]
    for piece in pieces:
        # A proper clip: its turns attach by the one event-frame rule within its own frames.
        for turn in piece.turns:
            if turn.frame is not None:
                assert clips.event_frame(turn.time, piece.fps, piece.start, piece.end) == turn.frame
        rendered = renderer.render(piece)
        assert len(rendered.input_ids) <= max_len
        i, j = piece.start - clip.start, piece.end - clip.start
        assert (rendered.speak_events == whole.speak_events[i:j]).all()
        assert (rendered.dst_events == whole.dst_events[i:j]).all()


@pytest.mark.parametrize("max_len", [380, 400, 451, 500, 700, 1100])
def test_split_pieces_are_proper_clips(sample_clip, tokenizer_dir, max_len):
    renderer = sequence.Renderer(sequence.load_tokenizer(tokenizer_dir), 1)
    clip = sample_parsed(sample_clip)
    pieces = data.split_clip(clip, renderer, max_len)
    assert len(pieces) >= 2
    assert_proper_pieces(clip, pieces, renderer, max_len)


def test_split_never_cuts_right_after_a_turn(sample_clip, tokenizer_dir):
    renderer = sequence.Renderer(sequence.load_tokenizer(tokenizer_dir), 1)
    clip = sample_parsed(sample_clip)
    rendered = renderer.render(clip)
    # A budget where frames [193, 213) fit exactly: the furthest cut would be at 213, right after frame 212,
    # which holds S1->complete, S2->start and a reply. A sub-clip starting at 213 would clamp them onto its
    # first frame and both pieces would train on them; the cut moves back to 212.
    max_len = int((rendered.token_frames < 213).sum())
    assert 212 in clip.events()
    bounds = data.piece_bounds(clip, renderer, max_len)
    assert bounds[0] == (193, 212)
    assert_proper_pieces(clip, data.clip_pieces(clip, bounds), renderer, max_len)


def test_split_never_cuts_where_spans_and_updates_disagree(sample_clip, tokenizer_dir):
    """S2's span says it starts at 110.0 s (frame 219), its DST_UPDATE says 106.8 s (frame 212). Between them
    a prompt state from the spans (S2 not_started) would contradict the stream (S2 started): no cut there."""
    renderer = sequence.Renderer(sequence.load_tokenizer(tokenizer_dir), 1)
    clip = sample_parsed(sample_clip, lambda raw: raw["dst"][1].update(start_ts=110.0))
    max_len = int((renderer.render(clip).token_frames < 217).sum())  # the furthest cut would be at 217
    bounds = data.piece_bounds(clip, renderer, max_len)
    assert bounds[0] == (193, 212)
    assert_proper_pieces(clip, data.clip_pieces(clip, bounds), renderer, max_len)


def long_reply_clip(sample_clip) -> dict:
    clip = copy.deepcopy(sample_clip)
    clip["conversation"].append({"role": "assistant", "content": "Take the cabin window and secure it. " * 40,
                                 "time": 150.2})  # frame 299
    return clip


def test_a_frame_over_the_budget_on_its_own_is_named(tmp_path, sample_clip, tokenizer_dir, capsys):
    short = copy.deepcopy(sample_clip)
    short.update(end_frame_idx=213, clip_idx=1)
    short["conversation"] = [t for t in short["conversation"] if "time" not in t or t["time"] < 106]
    cfg = split_config(tmp_path, [long_reply_clip(sample_clip), short], tokenizer_dir,
                       "data.max_seq_len=500", "data.on_overlength=split")
    tokenizer = sequence.load_tokenizer(tokenizer_dir)
    with pytest.raises(DataError, match=r"clip 0 \(.*\): renders to \d+ tokens, over data.max_seq_len=500, "
                                             r"and data.on_overlength=split cannot cut it: frame 299 alone"):
        data.ClipDataset(cfg, "train", tokenizer)
    with pytest.raises(DataError, match=r"split.json:clip 0 \([^)]*\): frame 299 alone renders to \d+ prompt \+ \d+ frame tokens"):
        data.split_clip(clips.load_split(cfg, "train")[0][0], sequence.Renderer(tokenizer, 1), 500)
    # Under skip the run proceeds on the other clip and says why clip 0 is out.
    cfg.data.on_invalid_clip = "skip"
    dataset = data.ClipDataset(cfg, "train", tokenizer)
    assert [c.index for c in dataset.clips] == [1]
    assert "frame 299 alone renders to" in capsys.readouterr().out
    # validate: an error for the clip that cannot be cut, nothing for the one that fits.
    problems = data.validate(cfg, ["train"], tokenizer)
    assert [(p.level, p.clip_index) for p in problems] == [("ERROR", 0)]


def test_validate_warns_where_split_cuts_and_errs_where_it_cannot(tmp_path, sample_clip, tokenizer_dir):
    cfg = split_config(tmp_path, [sample_clip, with_uid(long_reply_clip(sample_clip), "long")], tokenizer_dir,
                       "data.max_seq_len=500")
    tokenizer = sequence.load_tokenizer(tokenizer_dir)
    assert [(p.level, p.clip_index) for p in data.validate(cfg, ["train"], tokenizer)] == [("ERROR", 0), ("ERROR", 1)]
    cfg.data.on_overlength = "split"
    problems = data.validate(cfg, ["train"], tokenizer)
    assert [(p.level, p.clip_index) for p in problems] == [("WARNING", 0), ("ERROR", 1)]
    assert "data.on_overlength=split cuts it into 5 sub-clips" in problems[0].message
    assert "frame 299 alone" in problems[1].message


def test_split_sub_clips_train_with_stable_nfs_draws(tmp_path, sample_clip, tokenizer_dir, capsys):
    tokenizer = sequence.load_tokenizer(tokenizer_dir)
    broken = with_uid(sample_clip, "broken")
    broken["conversation"][2]["role"] = "narrator"
    cfg = split_config(tmp_path, [broken, sample_clip], tokenizer_dir, "data.max_seq_len=500",
                       "data.on_overlength=split", "data.on_invalid_clip=skip")
    dataset = data.ClipDataset(cfg, "train", tokenizer)
    assert "1 over-length clip(s) cut into 5 sub-clips" in capsys.readouterr().out
    assert [(c.index, c.part) for c in dataset.clips] == [(1, p) for p in range(5)]
    assert len({tuple(c.nfs_key) for c in dataset.clips}) == 5
    # Each sub-clip draws from its own stable key; the same key draws the same frames every time.
    for position, clip in enumerate(dataset.clips):
        item = dataset.item(position, epoch=3, rho=0.2)
        rendered = dataset.renderer.render(clip)
        keep = sequence.nfs_keep(rendered.speak_events, rendered.dst_events, 0.2, cfg.train.seed, 3, [1, clip.part + 1])
        assert (item["speak_labels"] == sequence.head_labels(rendered, keep)[0]).all()
        assert item["frame_features"].shape == (clip.num_frames, 16)
    # Another rank or a resume builds the dataset again: every sub-clip draws the same frames.
    again = data.ClipDataset(cfg, "train", tokenizer, announce=False)
    assert capsys.readouterr().out == ""
    for position in range(5):
        assert (again.item(position, 3, 0.2)["dst_labels"] == dataset.item(position, 3, 0.2)["dst_labels"]).all()


# ---------------------------------------------------------------------------------------------------
# 2. `data.py validate` with a split file given alone


def test_overrides_are_whatever_holds_an_equals_sign(tmp_path, sample_clip, tokenizer_dir, capsys):
    cfg_path = tmp_path / "run.yaml"
    split_config(tmp_path, [sample_clip], tokenizer_dir)
    cfg_path.write_text(json.dumps({"data": {
        "root": str(tmp_path), "train": "split.json", "val": "split.json", "test": "split.json",
        "feature_dim": 16, "features_path": "{root}/feat/{video_uid}.arrow"}, "model": {"path": str(tokenizer_dir)}}))
    bad = copy.deepcopy(sample_clip)
    bad["conversation"][2]["role"] = "narrator"
    (tmp_path / "other.json").write_text(json.dumps([bad]))
    code = data.main(["validate", str(cfg_path), "data.train=other.json"])
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("ERROR")]
    assert code == 1
    # The override replaced the config's train split (resolved against data.root), not validated as a file.
    assert lines == [f"ERROR {tmp_path / 'other.json'}:clip 0 ({UID}):turn 2: unknown role 'narrator' "
                     f"(one of system, user, assistant, DST_UPDATE)"]


@pytest.fixture()
def demo_cwd(tmp_path, demo_dir, monkeypatch):
    """A working directory whose data/demo is the demo dataset (the config defaults point there)."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "demo").symlink_to(demo_dir, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_split_alone_uses_the_default_root_and_says_so(demo_cwd, capsys):
    """data/demo/val.json alone: frames resolve against the default data.root (not the split's folder), the
    token lengths use the default model.path, and both are said; the wrong default feature_dim is named
    with its fix."""
    shutil.copy(demo_cwd / "data" / "demo" / "val.json", demo_cwd / "elsewhere.json")  # not next to its frames
    for split_file in ("data/demo/val.json", "elsewhere.json"):
        code = data.main(["validate", split_file])
        captured = capsys.readouterr()
        errors = [l for l in captured.out.splitlines() if l.startswith("ERROR")]
        assert code == 1 and errors
        assert all("feature dim 64, data.feature_dim is 1152 (data.feature_dim=1152 is the default, as no config "
                   "was given: pass data.feature_dim=64, or validate with the run's config file)" in l for l in errors)
        assert "data.root not given; frames resolved against the default data.root=data/demo" in captured.err
        assert "model.path not given; token lengths measured with the default model.path=data/demo/model" in captured.err
        assert data.main(["validate", split_file, "data.feature_dim=64"]) == 0
        assert "0 error(s)" in capsys.readouterr().out


def test_split_alone_without_defaults_says_what_it_cannot_check(tmp_path, sample_clip, tokenizer_dir, monkeypatch,
                                                                 capsys):
    split_dir = tmp_path / "splits"
    split_dir.mkdir()
    (split_dir / "val.json").write_text(json.dumps([sample_clip]))
    # The frames live under the data root, not next to the split file.
    write_proassist_features(tmp_path / "root" / sample_clip["frames_file"], 460, dim=16)
    monkeypatch.chdir(tmp_path)  # no data/demo here
    code = data.main(["validate", str(split_dir / "val.json"), "data.feature_dim=16"])
    captured = capsys.readouterr()
    assert code == 0
    assert "frames not checked: data.root not given and the default 'data/demo' does not exist; pass data.root=DIR" in captured.err
    assert "token lengths not checked: model.path not given and the default 'data/demo/model' does not exist; " \
           "pass model.path=DIR" in captured.err
    assert captured.out.splitlines()[-1].endswith("not checked: frames, token lengths (see the notes above)")
    # Given on the command line, both are used as given: the frames are found under data.root.
    code = data.main(["validate", str(split_dir / "val.json"), "data.feature_dim=16", f"data.root={tmp_path / 'root'}",
                      f"model.path={tokenizer_dir}", "data.max_seq_len=1000"])
    captured = capsys.readouterr()
    assert code == 1 and captured.err == ""
    assert [l.split(": ", 1)[1] for l in captured.out.splitlines() if l.startswith("ERROR")] == [
        "clip renders to 1178 tokens, over data.max_seq_len=1000"]


# ---------------------------------------------------------------------------------------------------
# 5. Per-video or per-clip: never a silent shift


def layout_clip(tmp_path, sample_clip, file_name: str, rows: int, *overrides: str, columns=("cls",)):
    values = write_proassist_features(tmp_path / file_name, rows, dim=4, columns=columns)
    raw = copy.deepcopy(sample_clip)
    raw.update(start_frame_idx=10, end_frame_idx=20, frames_file=file_name)
    raw["conversation"] = [raw["conversation"][0], {"role": "assistant", "content": "Hi.", "time": 6.0}]
    cfg = load_config(None, [f"data.root={tmp_path}", "data.feature_dim=4", *overrides])
    clip, problems = clips.parse_clip(raw, "x.json", 0, cfg)
    assert clip is not None, problems
    return clip, frames.FrameStore.from_config(cfg), values.astype(np.float32)


def test_per_clip_file_with_extra_rows_is_not_read_shifted(tmp_path, sample_clip):
    # Clip [10, 20) with its own 25-row file: per clip it is rows 0..9, per video rows 10..19.
    clip, store, values = layout_clip(tmp_path, sample_clip, "clip_0003.arrow", 25)
    with pytest.raises(DataError) as caught:
        store.features(clip)
    message = str(caught.value)
    assert f"{tmp_path / 'clip_0003.arrow'} (clip 0 {UID})" in message
    assert "per video (row k = frame k, rows 10..19)" in message
    assert "per clip with 15 extra rows (row i = frame 10 + i, rows 0..9)" in message
    assert "data.frames_layout=per_video" in message and "data.frames_layout=per_clip" in message
    with pytest.raises(DataError, match="both readings fit"):
        store.check(clip)  # refused at start-up, not when the first batch is read
    clip, store, values = layout_clip(tmp_path, sample_clip, "clip_0003.arrow", 25, "data.frames_layout=per_clip")
    assert store.layout(clip) == ("per_clip", 0)
    np.testing.assert_array_equal(store.features(clip), values[0:10])
    clip, store, values = layout_clip(tmp_path, sample_clip, "clip_0003.arrow", 25, "data.frames_layout=per_video")
    np.testing.assert_array_equal(store.features(clip), values[10:20])


def test_auto_layout_where_the_file_tells(tmp_path, sample_clip):
    # Named after the video (ProAssist's <video_uid>.arrow): a video's file.
    clip, store, values = layout_clip(tmp_path, sample_clip, f"{UID}.arrow", 25)
    assert store.layout(clip) == ("proassist", 10)
    np.testing.assert_array_equal(store.features(clip), values[10:20])
    # Patch columns exist only in the per-video layout.
    clip, store, _ = layout_clip(tmp_path, sample_clip, "v.arrow", 25, columns=("cls", "2x2"))
    assert store.layout(clip) == ("proassist", 10)
    # Exactly the clip's frame count and too short for a video's file: a clip's file.
    clip, store, values = layout_clip(tmp_path, sample_clip, "c.arrow", 10)
    assert store.layout(clip) == ("per_clip", 0)
    # Too short for a video's file, too long for a clip's: the fix is named.
    clip, store, _ = layout_clip(tmp_path, sample_clip, "c.arrow", 12)
    with pytest.raises(DataError, match="2 extra rows at the end, set data.frames_layout=per_clip"):
        store.check(clip)
    # An explicit layout that does not fit is an error too.
    clip, store, _ = layout_clip(tmp_path, sample_clip, "c.arrow", 12, "data.frames_layout=per_video")
    with pytest.raises(DataError, match=r"needs frame 19 but the file has 12 rows \(data.frames_layout=per_video"):
        store.check(clip)
