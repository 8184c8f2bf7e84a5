"""Data path tests: the event-frame rule, state, sequence layout and labels on the user's sample clip,
the three frame layouts, NFS, the sampler's resume cursor, validation of every bad-input class, the CLI."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import clips
from clips import DataError
import data
from config import ConfigError, load_config
from conftest import ROOT, write_proassist_features
import frames
import sequence

SPEAK_FRAMES = [193, 212, 224, 260, 303, 369, 394, 423]
DST_FRAMES = [193, 212, 303, 369, 394, 423, 449]


def make_split(tmp_path: Path, clips: list[dict], tokenizer_dir: Path, rows: int = 460, dim: int = 1152,
               extra: list[str] = ()) -> "data.Config":
    """Write clips as a split file with ProAssist-layout features for each video; return its config."""
    (tmp_path / "split.json").write_text(json.dumps(clips))
    for uid in {c["video_uid"] for c in clips if isinstance(c, dict) and "video_uid" in c}:
        path = tmp_path / "feat" / f"{uid}.arrow"
        if not path.exists():
            write_proassist_features(path, rows, dim=dim)
    return load_config(None, [
        f"data.root={tmp_path}", "data.train=split.json", f"data.feature_dim={dim}",
        "data.features_path={root}/feat/{video_uid}.arrow", f"model.path={tokenizer_dir}", *extra,
    ])


@pytest.fixture()
def sample_setup(tmp_path, sample_clip, tokenizer_dir):
    cfg = make_split(tmp_path, [sample_clip], tokenizer_dir)
    tokenizer = sequence.load_tokenizer(tokenizer_dir)
    dataset = data.ClipDataset(cfg, "train", tokenizer)
    return cfg, tokenizer, dataset


# ---------------------------------------------------------------------------------------------------
# The event-frame rule and state


def test_event_frame_rule_examples():
    # The S1 start at 97.2 s is attached to frame 193 (frames up to 193 seen: 193/2 = 96.5 s).
    assert clips.event_frame(97.2, 2, 193, 451) == 193
    assert clips.event_frame(225.2, 2, 193, 451) == 449
    # A turn exactly on a frame boundary: t = 100.0 -> floor(200) - 1 = 199 (float noise absorbed by 1e-6).
    assert clips.event_frame(100.0, 2, 0, 1000) == 199
    assert clips.event_frame(0.1 * 3 * 10 / 3, 2, 0, 100) == 1  # 1.0000000000000002 s -> frame 1
    # Clip starting mid-video: a turn right at its start (u = start - 1) is clamped onto the first frame...
    assert clips.event_frame(50.0, 2, 100, 200) == 100  # u = 99
    # ... and the last frame takes a turn at end / fps.
    assert clips.event_frame(100.0, 2, 100, 200) == 199
    # Anything further outside is an error, never silently moved.
    with pytest.raises(DataError):
        clips.event_frame(49.5, 2, 100, 200)  # u = 98
    with pytest.raises(DataError):
        clips.event_frame(100.5, 2, 100, 200)  # u = 200


def test_initial_state_mid_video_clip():
    steps = [clips.Step("S1", "a", 10.0, 20.0), clips.Step("S2", "b", 20.0, 60.0), clips.Step("S3", "c", 60.0, 80.0)]
    # Clip 1 starts at frame 80 (40 s): S1 ended before it, S2 is running, S3 is in the future.
    assert clips.initial_state(steps, 80, 2) == {"S1": "completed", "S2": "in_progress", "S3": "not_started"}
    # An event at u = start - 1 belongs to the clip: a step starting exactly there is not_started at the start.
    assert clips.initial_state(steps, 41, 2)["S2"] == "in_progress"
    assert clips.initial_state(steps, 40, 2)["S2"] == "not_started"  # u(20.0) = 39 = start - 1


def test_parse_and_format_transitions():
    assert clips.format_transitions([("S1", "complete"), ("S2", "start")]) == "S1->complete, S2->start"
    assert clips.parse_transitions("S1->complete, S2->start") == [("S1", "complete"), ("S2", "start")]
    assert clips.parse_transitions("S1 complete") is None
    state = {"S1": "not_started"}
    assert "illegal" in clips.apply_transition(state, "S1", "complete")
    assert clips.apply_transition(state, "S1", "start") is None and state["S1"] == "in_progress"


# ---------------------------------------------------------------------------------------------------
# Sequence layout and labels on the sample clip


def test_sample_clip_labels(sample_setup):
    cfg, tokenizer, dataset = sample_setup
    clip = dataset.clips[0]
    rendered = dataset.renderer.render(clip)
    frames = np.arange(clip.start, clip.end)
    assert frames[rendered.speak_events].tolist() == SPEAK_FRAMES
    assert frames[rendered.dst_events].tolist() == DST_FRAMES
    # rho = 1: every decision position labelled, labels equal the events.
    item = dataset.item(0, rho=1.0)
    positions = rendered.decision_positions
    assert (item["speak_labels"][positions] == rendered.speak_events).all()
    assert (item["dst_labels"][positions] == rendered.dst_events).all()
    assert (item["speak_labels"] != sequence.IGNORE).sum() == clip.num_frames
    assert item["frame_features"].shape == (clip.num_frames, 1152)


def test_sample_clip_blocks(sample_setup):
    cfg, tokenizer, dataset = sample_setup
    clip = dataset.clips[0]
    r = dataset.renderer.render(clip)
    ids = r.input_ids
    R = dataset.renderer
    i212 = 212 - clip.start
    pos = r.decision_positions[i212]
    # The DST block of frame 212 holds both transitions in turn order, then the assistant block.
    assert ids[pos + 1] == R.dst_id
    dst_end = pos + 1 + list(ids[pos + 1:]).index(R.eos_id)
    assert tokenizer.decode(ids[pos + 2:dst_end]) == "S1->complete, S2->start"
    assert ids[dst_end + 1] == R.asst_id
    # Targets: [DST] predicts the first text token ... the last text token predicts EOS; the role token
    # itself (predicted from the decision position) is never a target.
    assert r.dst_targets[pos] == sequence.IGNORE and r.asst_targets[pos] == sequence.IGNORE
    assert list(r.dst_targets[pos + 1:dst_end]) == list(ids[pos + 2:dst_end + 1])
    assert r.dst_targets[dst_end - 1] == R.eos_id
    assert r.dst_targets[dst_end] == sequence.IGNORE  # EOS predicts [ASST]: not a target
    # The user turn at 193 comes before frame 193's decision position, after its <image>.
    i193 = 193 - clip.start
    p193 = r.decision_positions[i193]
    frame_start = int(np.flatnonzero(r.token_frames == 193)[0])
    assert ids[frame_start] == R.image_id and ids[frame_start + 1] == R.user_id
    assert ids[p193] == R.eos_id and frame_start + 1 < p193
    # Every block's EOS is a target: one per DST block and one per assistant block.
    n_eos_targets = int((r.asst_targets == R.eos_id).sum() + (r.dst_targets == R.eos_id).sum())
    assert n_eos_targets == len(SPEAK_FRAMES) + len(DST_FRAMES)
    # pad != eos, so padding can never hide an EOS.
    assert R.pad_id != R.eos_id
    # Frames with no event: the decision position is the <image> token itself.
    assert ids[r.decision_positions[1]] == R.image_id


def test_system_prompt_pinned(sample_clip):
    steps = [clips.Step(s["id"], s["name"], s["start_ts"], s["end_ts"]) for s in sample_clip["dst"]]
    state = clips.initial_state(steps, 193, 2)
    text = sequence.system_prompt_text(sample_clip["conversation"][0]["content"], steps, state)
    assert text == (
        "You are a helpful and proactive assistant. Always be ready to assist and provide useful information ahead of time.\n"
        "Task steps:\n"
        "S1: Assemble the chassis by attaching and screwing the chassis parts together.\n"
        "S2: Attach wheels to the chassis.\n"
        "S3: Assemble the arm and attach it to the chassis.\n"
        "S4: Attach the body to the chassis.\n"
        "S5: Add the cabin window to the chassis.\n"
        "S6: Finalize the assembly and demonstrate the toy's functionality.\n"
        "Current state: S1: not_started, S2: not_started, S3: not_started, S4: not_started, S5: not_started, S6: not_started\n"
    )


def test_later_clip_prompt_never_leaks_future_state(tmp_path, sample_clip, tokenizer_dir):
    """Split the sample video at frame 300 into two clips; clip 1's prompt holds the state at frame 300 only."""
    clip0, clip1 = copy.deepcopy(sample_clip), copy.deepcopy(sample_clip)
    clip0["end_frame_idx"] = 300
    clip1.update(start_frame_idx=300, clip_idx=1)
    # The builder's (wrong) end-of-clip state in the file must not be used.
    clip1["initial_dst_state"] = {f"S{i}": "completed" for i in range(1, 7)}
    convo = clip0["conversation"]
    clip0["conversation"] = [t for t in convo if "time" not in t or clips.unclamped_frame(t["time"], 2) < 300]
    clip1["conversation"] = [convo[0]] + [t for t in convo if "time" in t and clips.unclamped_frame(t["time"], 2) >= 299]
    cfg = make_split(tmp_path, [clip0, clip1], tokenizer_dir)
    problems = data.validate(cfg, ["train"])
    assert any("initial_dst_state disagrees" in p.message and p.level == "WARNING" for p in problems)
    tokenizer = sequence.load_tokenizer(tokenizer_dir)
    dataset = data.ClipDataset(cfg, "train", tokenizer)
    second = dataset.clips[1]
    assert second.initial_state() == {
        "S1": "completed", "S2": "in_progress", "S3": "not_started", "S4": "not_started", "S5": "not_started",
        "S6": "not_started",
    }
    # No prompt contains a state reached later in its own clip: replay each clip and compare.
    for clip in dataset.clips:
        state = clip.initial_state()
        prompt_state = dict(state)
        for turn in sorted((t for t in clip.turns if t.role == "DST_UPDATE"), key=lambda t: (t.frame, t.index)):
            for step_id, transition in turn.content:
                assert clips.apply_transition(state, step_id, transition) is None
                # the step's state after this update differs from what the prompt claimed
                assert prompt_state[step_id] != state[step_id]
        prompt = tokenizer.decode(dataset.renderer.render(clip).input_ids[:400])
        assert "Current state: " + ", ".join(f"{k}: {v}" for k, v in prompt_state.items()) in prompt


def test_turns_at_same_frame_all_kept(tmp_path, sample_clip, tokenizer_dir):
    """Two assistant turns at one frame are joined, two DST turns merged; nothing overwritten."""
    clip = copy.deepcopy(sample_clip)
    clip["conversation"].append({"role": "assistant", "content": "Second reply.", "time": 112.7})
    cfg = make_split(tmp_path, [clip], tokenizer_dir)
    tokenizer = sequence.load_tokenizer(tokenizer_dir)
    dataset = data.ClipDataset(cfg, "train", tokenizer)
    events = dataset.clips[0].events()
    assert events[224].asst_texts[-1] == "Second reply." and len(events[224].asst_texts) == 2
    assert events[212].transitions == [("S1", "complete"), ("S2", "start")]
    r = dataset.renderer.render(dataset.clips[0])
    text = tokenizer.decode(r.input_ids)
    assert "Then, screw it with the screwdriver. Second reply." in text


# ---------------------------------------------------------------------------------------------------
# Frame layouts


def _clip_with(sample_clip, start, end):
    clip = copy.deepcopy(sample_clip)
    clip["start_frame_idx"], clip["end_frame_idx"] = start, end
    clip["conversation"] = [clip["conversation"][0], {"role": "assistant", "content": "Hi.", "time": (start + 3) / 2}]
    return clip


@pytest.mark.parametrize("I,columns", [(1, ("cls",)), (5, ("cls", "2x2")), (10, ("cls", "3x3"))])
@pytest.mark.parametrize("nested", [True, False])
def test_proassist_layout_rows_are_absolute_frames(tmp_path, sample_clip, I, columns, nested):
    clip = _clip_with(sample_clip, 40, 50)
    path = tmp_path / "f.arrow"
    write_proassist_features(path, 60, dim=8, columns=columns, nested=nested)
    table = pa.ipc.open_file(str(path)).read_all()
    cfg = load_config(None, [f"data.root={tmp_path}", "data.feature_dim=8", f"data.num_tokens_per_frame={I}"])
    parsed, problems = clips.parse_clip({**clip, "frames_file": "f.arrow"}, "x.json", 0, cfg)
    assert parsed is not None, problems
    # "f.arrow" is named after no video and, at I = 1, holds only cls: declared per-video, else it is ambiguous.
    store = frames.FrameStore(I, 8, frames_layout="per_video")
    feats = store.features(parsed)
    assert feats.shape == (10 * I, 8)
    # Frame 45's tokens: cls first, then the patch cells row-major.
    expected = [np.asarray(table.column(c)[45].as_py(), dtype=np.float32).reshape(-1, 8) for c in columns]
    np.testing.assert_array_equal(feats[5 * I:6 * I], np.concatenate(expected))


def test_per_clip_layout_with_start_offset(tmp_path, sample_clip):
    """A per-clip file: row i = frame start + i. Reading it with absolute indices would be out of range."""
    clip = _clip_with(sample_clip, 200, 230)
    values = np.arange(30 * 4, dtype=np.float16).reshape(30, 4)
    table = pa.table({"cls": pa.array(values.tolist(), type=pa.list_(pa.float16()))})
    with pa.ipc.new_stream(str(tmp_path / "clip.arrow"), table.schema) as writer:  # stream format too
        writer.write_table(table)
    cfg = load_config(None, [f"data.root={tmp_path}", "data.feature_dim=4"])
    parsed, _ = clips.parse_clip({**clip, "frames_file": "clip.arrow"}, "x.json", 0, cfg)
    store = frames.FrameStore(1, 4)
    assert store.layout(parsed) == ("per_clip", 0)
    np.testing.assert_array_equal(store.features(parsed), values.astype(np.float32))


def test_raw_frame_layout(tmp_path, sample_clip):
    import base64
    clip = _clip_with(sample_clip, 2, 5)
    jpegs = [bytes([0xFF, 0xD8, i]) for i in range(6)]
    table = pa.table({"frame": [base64.b64encode(j).decode() for j in jpegs]})
    with pa.ipc.new_file(str(tmp_path / "raw.arrow"), table.schema) as writer:
        writer.write_table(table)
    cfg = load_config(None, [f"data.root={tmp_path}", "data.feature_dim=4"])
    parsed, _ = clips.parse_clip({**clip, "frames_file": "raw.arrow"}, "x.json", 0, cfg)
    store = frames.FrameStore(1, 4)
    assert store.layout(parsed) == ("raw", 2)
    assert store.raw_frames(parsed) == jpegs[2:5]
    with pytest.raises(DataError, match="raw frames"):
        store.features(parsed)


def test_short_ambiguous_file_is_an_error(tmp_path, sample_clip):
    clip = _clip_with(sample_clip, 40, 50)
    write_proassist_features(tmp_path / "f.arrow", 45, dim=4)  # neither >= 50 rows nor exactly 10
    cfg = load_config(None, [f"data.root={tmp_path}", "data.feature_dim=4"])
    parsed, _ = clips.parse_clip({**clip, "frames_file": "f.arrow"}, "x.json", 0, cfg)
    with pytest.raises(DataError, match=r"needs frame 49 but the file has 45 rows"):
        frames.FrameStore(1, 4).features(parsed)


# ---------------------------------------------------------------------------------------------------
# Negative-frame sub-sampling and the sampler


def test_nfs_counts_and_determinism(sample_setup):
    cfg, tokenizer, dataset = sample_setup
    r = dataset.renderer.render(dataset.clips[0])
    n_events = int((r.speak_events | r.dst_events).sum())  # 9 frames with an event
    n_silent = len(r.speak_events) - n_events  # 249
    keep = sequence.nfs_keep(r.speak_events, r.dst_events, 0.1, 0, 0, 0)
    assert keep.sum() == n_events + round(0.1 * n_silent)  # 9 + 25
    assert keep[r.speak_events | r.dst_events].all()
    # Hard negatives: frame 449 is a DST positive with no speech -> kept with speak label 0.
    speak, update = sequence.head_labels(r, keep)
    p449 = r.decision_positions[449 - 193]
    assert speak[p449] == 0 and update[p449] == 1
    # Same (seed, epoch, clip) -> same frames (every rank, every resume); another epoch -> another draw.
    again = sequence.nfs_keep(r.speak_events, r.dst_events, 0.1, 0, 0, 0)
    assert (again == keep).all()
    other = sequence.nfs_keep(r.speak_events, r.dst_events, 0.1, 0, 1, 0)
    assert not (other == keep).all()
    # At least one silent frame is kept even at tiny rho.
    assert sequence.nfs_keep(r.speak_events, r.dst_events, 0.0001, 0, 0, 0).sum() == n_events + 1
    # Unkept silent frames are -100 for both heads.
    assert ((speak == sequence.IGNORE) == (update == sequence.IGNORE)).all()


def test_nfs_schedule(tmp_path):
    cfg = load_config(None, ["data.nfs_schedule=linear", "data.nfs_rho_start=0.5", "data.nfs_rho_end=0.1",
                             "train.max_steps=100"])
    assert sequence.rho_at(cfg, 0) == 0.5 and abs(sequence.rho_at(cfg, 50) - 0.3) < 1e-12 and abs(sequence.rho_at(cfg, 100) - 0.1) < 1e-12


def test_sampler_sharding_and_resume_cursor():
    lengths = list(range(50, 87))  # 37 clips
    ranks = [data.ClipBatchSampler(lengths, data.BatchPlan(2, 1, world_size=2), rank=r, seed=3) for r in range(2)]
    per_rank = [[b for _, b in zip(range(30), iter(s))] for s in ranks]
    # Each step's clips are split across ranks without overlap; 37 // 4 = 9 steps per epoch.
    assert ranks[0].steps_per_epoch == 9 and len(ranks[0]) == 9
    for b in range(9):
        a, c = [k.clip for k in per_rank[0][b]], [k.clip for k in per_rank[1][b]]
        assert not set(a) & set(c)
    epoch0 = {k.clip for r in per_rank for b in r[:9] for k in b}
    assert len(epoch0) == 36  # one clip dropped this epoch (incomplete step)
    assert [k.epoch for k in per_rank[0][9]] == [1, 1]  # endless: epoch 1 follows
    # Resume: a fresh sampler started at the cursor of batch 12 continues with batch 13, exactly.
    consumed = per_rank[0][12][0]
    resumed = data.ClipBatchSampler(lengths, data.BatchPlan(2, 1, world_size=2), rank=0, seed=3)
    resumed.start(consumed.epoch, consumed.cursor)
    continued = [b for _, b in zip(range(10), iter(resumed))]
    assert continued == per_rank[0][13:23]
    # Length grouping: batches hold clips of similar length.
    spread = np.mean([abs(lengths[b[0].clip] - lengths[b[1].clip]) for b in per_rank[0][:9]])
    assert spread < 10


def step_clips(sampler_args: dict, world_size: int, steps: int, start=(0, 0)) -> list[list[int]]:
    """The clips of each optimizer step, gathered over every rank and micro-step of the given split."""
    args = dict(sampler_args)
    plan = data.BatchPlan(args.pop("micro_batch"), args.pop("grad_accum"), world_size)
    samplers = [data.ClipBatchSampler(plan=plan, **args, rank=r) for r in range(world_size)]
    for s in samplers:
        s.start(*start)
    streams = [iter(s) for s in samplers]
    accum = sampler_args["grad_accum"]
    out = []
    for _ in range(steps):
        clips = []
        for _ in range(accum):
            for stream in streams:
                clips += [k.clip for k in next(stream)]
        out.append(sorted(clips))
    return out


@pytest.mark.parametrize("grouping", [True, False])
def test_sampler_steps_do_not_depend_on_the_split(grouping):
    """8 clips per step as 1 rank x 1 x 8, 1 x 4 x 2, 2 ranks x 2 x 2 and 2 x 4 x 1: the same clips in every
    step, and a resume at (epoch, steps done) under another split continues with the same clips."""
    lengths = [int(x) for x in np.random.default_rng(0).integers(100, 400, size=45)]
    base = dict(lengths=lengths, seed=7, length_grouping=grouping)
    splits = [(1, 1, 8), (1, 4, 2), (2, 2, 2), (2, 4, 1)]  # (world, micro_batch, grad_accum)
    assert data.ClipBatchSampler(lengths, data.BatchPlan(1, 8)).steps_per_epoch == 5  # 12 steps cross two epochs
    reference = step_clips({**base, "micro_batch": 1, "grad_accum": 8}, 1, 12)
    for world, mb, accum in splits[1:]:
        assert step_clips({**base, "micro_batch": mb, "grad_accum": accum}, world, 12) == reference
    # Resume after 7 steps (epoch 1, 2 steps done) with a different split: the same next steps.
    resumed = step_clips({**base, "micro_batch": 2, "grad_accum": 2}, 2, 5, start=(1, 2))
    assert resumed == reference[7:12]


# ---------------------------------------------------------------------------------------------------
# Validation of bad input


def test_validate_reports_every_class_in_one_pass(tmp_path, sample_clip, tokenizer_dir, capsys):
    good = copy.deepcopy(sample_clip)
    bad = []

    def variant(mutate):
        clip = copy.deepcopy(sample_clip)
        mutate(clip)
        bad.append(clip)

    variant(lambda c: c.pop("video_uid"))  # clip 0: missing field
    variant(lambda c: c["conversation"][2].update(role="narrator"))  # 1: unknown role, turn 2
    variant(lambda c: c["conversation"][1].update(content={"id": "S1"}))  # 2: DST content shape, turn 1
    variant(lambda c: c["conversation"][4].update(content=[{"id": "S9", "transition": "complete"}]))  # 3: unknown step
    variant(lambda c: c["conversation"].pop(1))  # 4: S1 never started -> illegal complete at turn 3
    variant(lambda c: c["conversation"][7].update(time=500.0))  # 5: time outside the clip, turn 7
    variant(lambda c: c.update(conversation=[]))  # 6: empty conversation
    variant(lambda c: c.update(video_uid="missing_video"))  # 7: frames file missing (no features written)
    variant(lambda c: c["conversation"][4]["content"][0].update(transition="finish"))  # 8: unknown transition
    make_split(tmp_path, [good] + bad, tokenizer_dir)
    (tmp_path / "feat" / "missing_video.arrow").unlink()  # clip 8's video has no features file
    code = data.main(["validate", str(tmp_path / "split.json"), "data.feature_dim=1152",
                      "data.features_path=" + str(tmp_path) + "/feat/{video_uid}.arrow", f"model.path={tokenizer_dir}"])
    out = capsys.readouterr().out
    lines = [l for l in out.splitlines() if l.startswith("ERROR")]
    assert code == 1
    f = str(tmp_path / "split.json")
    uid = sample_clip["video_uid"]
    expected = [
        f"ERROR {f}:clip 1 (None): missing required field 'video_uid'",
        f"ERROR {f}:clip 2 ({uid}):turn 2: unknown role 'narrator'",
        f"ERROR {f}:clip 3 ({uid}):turn 1: DST_UPDATE content must be a non-empty list",
        f"ERROR {f}:clip 4 ({uid}):turn 4: unknown step id S9",
        f"ERROR {f}:clip 5 ({uid}):turn 3: illegal transition S1->complete: S1 is not_started",
        f"ERROR {f}:clip 6 ({uid}):turn 7: time 500.0 s",
        f"ERROR {f}:clip 7 ({uid}): empty conversation",
        f"ERROR {f}:clip 8 (missing_video): ",
        f"ERROR {f}:clip 9 ({uid}):turn 4: unknown transition name in S1->finish",
    ]
    for prefix in expected:
        assert any(l.startswith(prefix) for l in lines), (prefix, lines)
    assert any("frames file not found" in l for l in lines if "missing_video" in l)
    assert not any(f"clip 0 ({uid})" in l for l in lines)  # the good clip is clean
    assert "error(s)" in out.splitlines()[-1]


def test_validate_feature_problems(tmp_path, sample_clip, tokenizer_dir, capsys):
    clips = []
    for uid in ("short", "wrongdim", "nan"):
        c = copy.deepcopy(sample_clip)
        c["video_uid"] = uid
        clips.append(c)
    write_proassist_features(tmp_path / "feat" / "short.arrow", 300, dim=16)
    write_proassist_features(tmp_path / "feat" / "wrongdim.arrow", 460, dim=8)
    nan_path = tmp_path / "feat" / "nan.arrow"
    values = np.ones((460, 1, 16), dtype=np.float16)
    values[250, 0, 3] = np.nan
    table = pa.table({"cls": pa.array(values.tolist(), type=pa.list_(pa.list_(pa.float16())))})
    with pa.ipc.new_file(str(nan_path), table.schema) as w:
        w.write_table(table)
    make_split(tmp_path, clips, tokenizer_dir, dim=16)
    code = data.main(["validate", str(tmp_path / "split.json"), "data.feature_dim=16",
                      "data.features_path=" + str(tmp_path) + "/feat/{video_uid}.arrow", f"model.path={tokenizer_dir}",
                      "data.max_seq_len=1000"])
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("ERROR")]
    assert code == 1
    assert any("clip 0 (short)" in l and "needs frame 450 but the file has 300 rows" in l for l in lines)
    assert any("clip 1 (wrongdim)" in l and "feature dim 8, data.feature_dim is 16" in l for l in lines)
    assert any("clip 2 (nan)" in l and "non-finite feature values at frame 250" in l for l in lines)
    # The token budget: every clip renders to more than 1000 tokens.
    assert sum("over data.max_seq_len=1000" in l for l in lines) == 3


def test_invalid_json_and_config_typos(tmp_path, capsys):
    (tmp_path / "broken.json").write_text('[{"video_uid": "a",}]')
    code = data.main(["validate", str(tmp_path / "broken.json")])
    out = capsys.readouterr().out
    assert code == 1 and f"ERROR {tmp_path / 'broken.json'}: invalid JSON" in out
    with pytest.raises(ConfigError, match="unknown key 'train.max_step'"):
        load_config(None, ["train.max_step=5"])
    with pytest.raises(ConfigError, match="train.max_steps' expects int"):
        load_config(None, ["train.max_steps=many"])
    (tmp_path / "c.yaml").write_text("data:\n  nfs_rhoo: 0.2\n")
    with pytest.raises(ConfigError, match="unknown key 'data.nfs_rhoo'"):
        load_config(tmp_path / "c.yaml")
    assert data.main(["show", str(tmp_path / "c.yaml")]) == 1
    assert "unknown key 'data.nfs_rhoo'" in capsys.readouterr().err


def test_overlength_policy(tmp_path, sample_clip, tokenizer_dir, capsys):
    """error refuses the run; drop trains on the clips that fit; split cuts the long clip into sub-clips."""
    short = copy.deepcopy(sample_clip)  # the sample's first 20 frames: fits in 500 tokens
    short.update(end_frame_idx=213, clip_idx=1)
    short["conversation"] = [t for t in short["conversation"] if "time" not in t or t["time"] < 106]
    cfg = make_split(tmp_path, [sample_clip, short], tokenizer_dir, extra=["data.max_seq_len=500"])
    tokenizer = sequence.load_tokenizer(tokenizer_dir)
    with pytest.raises(DataError, match=r"1 clip\(s\) exceed data.max_seq_len=500.*clip 0"):
        data.ClipDataset(cfg, "train", tokenizer)
    cfg.data.on_overlength = "drop"
    ds = data.ClipDataset(cfg, "train", tokenizer)
    assert [c.index for c in ds.dropped] == [0]
    assert [(c.index, c.part) for c in ds.clips] == [(1, None)] and ds.lengths[0] <= 500
    assert "1 over-length clip(s) dropped" in capsys.readouterr().out
    cfg.data.on_overlength = "split"
    ds = data.ClipDataset(cfg, "train", tokenizer)
    pieces = [c for c in ds.clips if c.index == 0]
    assert len(pieces) >= 2 and ds.dropped == []
    assert [c.part for c in pieces] == list(range(len(pieces)))
    assert all(n <= 500 for n in ds.lengths)
    assert f"1 over-length clip(s) cut into {len(pieces)} sub-clips" in capsys.readouterr().out
    data.ClipBatchSampler(ds.lengths, data.BatchPlan(1, 1))


def test_pad_distinct_from_eos(tokenizer_dir):
    from transformers import AutoTokenizer
    raw = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert raw.pad_token_id == raw.eos_token_id  # the fixture has pad == eos, as many real tokenizers
    tok = sequence.load_tokenizer(tokenizer_dir)
    assert tok.pad_token == "<pad>" and tok.pad_token_id != tok.eos_token_id
    assert len(sequence.new_token_ids(tok)) == 5


# ---------------------------------------------------------------------------------------------------
# Collate and the CLI


def test_collate_right_pads_and_orders_features(sample_setup):
    cfg, tokenizer, dataset = sample_setup
    a = dataset.item(0, rho=1.0)
    b = {k: (v[:100] if isinstance(v, np.ndarray) and v.ndim == 1 else v) for k, v in a.items()}
    n_img_b = int((b["input_ids"] == dataset.renderer.image_id).sum())
    b["frame_features"] = a["frame_features"][:n_img_b] + 1
    batch = data.collate([b, a], dataset.renderer.pad_id)
    assert batch["input_ids"].shape == (2, len(a["input_ids"]))
    assert (batch["input_ids"][0, 100:] == dataset.renderer.pad_id).all()
    assert batch["attention_mask"][0].sum() == 100 and batch["attention_mask"][1].all()
    # Features in row-major (b, t) order of the <image> tokens.
    assert batch["frame_features"].shape[0] == int((batch["input_ids"] == dataset.renderer.image_id).sum())
    np.testing.assert_array_equal(batch["frame_features"][:n_img_b].numpy(), b["frame_features"])
    # EOS tokens stay visible (attention 1) and trained (targets) wherever they are.
    eos = batch["input_ids"] == dataset.renderer.eos_id
    assert batch["attention_mask"][eos].all()


def test_show_json(tmp_path, sample_clip, tokenizer_dir, capsys):
    make_split(tmp_path, [sample_clip], tokenizer_dir)
    (tmp_path / "c.yaml").write_text(json.dumps({
        "data": {"root": str(tmp_path), "train": "split.json", "features_path": "{root}/feat/{video_uid}.arrow"},
        "model": {"path": str(tokenizer_dir)},
    }))
    assert data.main(["show", str(tmp_path / "c.yaml"), "--split", "train", "--index", "0", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    frames = {f["frame"]: f for f in shown["frames"]}
    assert len(frames) == 258
    assert [k for k, f in frames.items() if f["speak_label"] == 1] == SPEAK_FRAMES
    assert [k for k, f in frames.items() if f["dst_label"] == 1] == DST_FRAMES
    assert frames[212]["dst_text"] == "S1->complete, S2->start"
    assert frames[193]["user_text"].startswith("I want to assemble")
    assert all(f["speak_label"] in (0, 1) for f in frames.values())
    # The human-readable dump names tokens, frames and label streams.
    assert data.main(["show", str(tmp_path / "c.yaml")]) == 0
    dump = capsys.readouterr().out
    assert "'[DST]'" in dump and "dst:'</s>'" in dump and "asst:'</s>'" in dump


def test_make_demo_cli_deterministic_and_valid(tmp_path, capsys):
    """The command line itself once (a subprocess), then in process: the same bytes, and validate finds nothing."""
    r = subprocess.run([sys.executable, str(ROOT / "data.py"), "make-demo", "--out", str(tmp_path / "a"), "--videos", "6"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert data.main(["make-demo", "--out", str(tmp_path / "b"), "--videos", "6"]) == 0
    for split in ("train.json", "val.json", "test.json"):
        assert (tmp_path / "a" / split).read_bytes() == (tmp_path / "b" / split).read_bytes()
    (tmp_path / "demo.yaml").write_text((ROOT / "configs" / "demo.yaml").read_text())
    capsys.readouterr()
    code = data.main(["validate", str(tmp_path / "demo.yaml"), f"data.root={tmp_path / 'a'}",
                      f"model.path={tmp_path / 'a' / 'model'}"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "0 error(s)" in out


def test_dataset_refuses_missing_frames_before_training(tmp_path, sample_clip, tokenizer_dir):
    cfg = make_split(tmp_path, [sample_clip], tokenizer_dir)
    (tmp_path / "feat" / f"{sample_clip['video_uid']}.arrow").unlink()
    with pytest.raises(DataError, match=r"1 invalid clip\(s\).*\n.*frames file not found"):
        data.ClipDataset(cfg, "train", sequence.load_tokenizer(tokenizer_dir))


class _Array2D(pa.ExtensionType):
    """Stands in for HF datasets' Array2D extension type (unknown to plain pyarrow when reading)."""

    def __init__(self):
        super().__init__(pa.list_(pa.list_(pa.float16(), 4), 1), "datasets.features.features.Array2DExtensionType")

    def __arrow_ext_serialize__(self):
        return b""

    @classmethod
    def __arrow_ext_deserialize__(cls, storage_type, serialized):
        return cls()


@pytest.mark.parametrize("registered", [True, False])
def test_fixed_size_and_extension_typed_columns(tmp_path, sample_clip, registered):
    clip = _clip_with(sample_clip, 3, 8)
    values = np.arange(10 * 4, dtype=np.float16).reshape(10, 1, 4)
    storage = pa.array(values.tolist(), type=pa.list_(pa.list_(pa.float16(), 4), 1))
    ext = _Array2D()
    pa.register_extension_type(ext)
    try:
        table = pa.table({"cls": pa.ExtensionArray.from_storage(ext, storage)})
        with pa.ipc.new_file(str(tmp_path / "f.arrow"), table.schema) as writer:
            writer.write_table(table)
    finally:
        if not registered:
            pa.unregister_extension_type(ext.extension_name)
    try:
        cfg = load_config(None, [f"data.root={tmp_path}", "data.feature_dim=4"])
        parsed, _ = clips.parse_clip({**clip, "frames_file": "f.arrow"}, "x.json", 0, cfg)
        store = frames.FrameStore(1, 4, frames_layout="per_video")
        np.testing.assert_array_equal(store.features(parsed), values[3:8, 0].astype(np.float32))
    finally:
        if registered:
            pa.unregister_extension_type(ext.extension_name)
