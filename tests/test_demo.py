"""Tests for demo.py: the demo dataset, written in the exact input format of docs/data_format.md.

The checks here re-derive everything from the written files with the documented rules (the event-frame
rule, the initial-state formula), not from demo.py's internals, except for the feature
prototypes, which are needed to classify frames.
"""

import json
import math
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # the flat modules live at the repository root
    sys.path.insert(0, str(REPO_ROOT))

import demo  # noqa: E402

SEED = 0
NUM_VIDEOS = 12  # train videos; val and test get the minimum of 2 each: fast, but every feature shows up
LARGEST_TOKENS_PER_IMG = 5  # I = 5 (cls + 2x2) is the largest layout the demo's features support
PROJECT_SPECIAL_TOKENS = ("<image>", "[USER]", "[DST]", "[ASST]")
TRANSITIONS = {"start": ("not_started", "in_progress"), "complete": ("in_progress", "completed")}


def unclamped_frame(t: float, fps: int) -> int:
    """u(t) of the event-frame rule (docs/sequence.md): the last frame seen when a turn at time t happens (before clamping)."""
    return math.floor(t * fps + 1e-6) - 1


def read_tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def load_split(out_dir: Path, split: str) -> list[dict]:
    return json.loads((out_dir / f"{split}.json").read_text(encoding="utf-8"))


def read_arrow(path: Path) -> pa.Table:
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).read_all()


def timed_turns(clip: dict):
    """(attached frame, turn) for every turn with a time, in conversation order."""
    return [(unclamped_frame(turn["time"], clip["fps"]), turn) for turn in clip["conversation"] if "time" in turn]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("demo")
    summary = demo.make_demo(out_dir, seed=SEED, num_videos=NUM_VIDEOS)
    splits = {split: load_split(out_dir, split) for split in demo.SPLITS}
    return out_dir, summary, splits


@pytest.fixture(scope="module")
def videos(dataset):
    """video_uid -> its clips ordered by clip_idx, over all splits."""
    _, _, splits = dataset
    by_video = defaultdict(list)
    for clips in splits.values():
        for clip in clips:
            by_video[clip["video_uid"]].append(clip)
    return {uid: sorted(clips, key=lambda c: c["clip_idx"]) for uid, clips in sorted(by_video.items())}


def test_summary_matches_files(dataset):
    out_dir, summary, splits = dataset
    assert summary["vocab_size"] > 0 and Path(summary["model_dir"]) == out_dir / "model"
    assert demo.videos_per_split(NUM_VIDEOS) == {"train": NUM_VIDEOS, "val": 2, "test": 2}
    uids_by_split = {}
    for split, clips in splits.items():
        uids_by_split[split] = {clip["video_uid"] for clip in clips}
        entry = summary["splits"][split]
        assert Path(entry["path"]) == out_dir / f"{split}.json"
        assert entry["videos"] == len(uids_by_split[split]) == demo.videos_per_split(NUM_VIDEOS)[split]
        assert entry["clips"] == len(clips)
        assert entry["frames"] == sum(c["end_frame_idx"] - c["start_frame_idx"] for c in clips)
    train, val, test = (uids_by_split[s] for s in demo.SPLITS)
    assert not (train & val) and not (train & test) and not (val & test), "a video is in two splits"


def test_videos_per_split_scaling():
    assert demo.videos_per_split(None) == {"train": 60, "val": 10, "test": 10}
    assert demo.videos_per_split(1) == {"train": 1, "val": 2, "test": 2}
    with pytest.raises(ValueError):
        demo.videos_per_split(0)


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path):
    first = read_tree(Path(demo.make_demo(tmp_path / "a", seed=3, num_videos=4)["out_dir"]))
    second = read_tree(Path(demo.make_demo(tmp_path / "b", seed=3, num_videos=4)["out_dir"]))
    other = read_tree(Path(demo.make_demo(tmp_path / "c", seed=4, num_videos=4)["out_dir"]))
    assert first == second
    assert "model/tokenizer.json" in first and "train.json" in first
    for split in demo.SPLITS:
        assert first[f"{split}.json"] != other[f"{split}.json"]
    features = {name: data for name, data in first.items() if name.startswith("features/")}
    assert features and features != {name: data for name, data in other.items() if name.startswith("features/")}
    # The tokenizer is trained on an enumeration of all texts, so it does not depend on the seed.
    assert first["model/tokenizer.json"] == other["model/tokenizer.json"]


def test_fresh_process_reproduces_the_files(dataset, tmp_path):
    """Catches hash-order randomness (Python's PYTHONHASHSEED, the BPE trainer's hash maps)."""
    out_dir, _, _ = dataset
    script = f"import demo; demo.make_demo({str(tmp_path)!r}, seed={SEED}, num_videos={NUM_VIDEOS})"
    env = dict(os.environ, PYTHONHASHSEED="12345", HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, check=True)
    assert read_tree(tmp_path) == read_tree(out_dir)


def test_clip_fields_and_turn_format(dataset):
    _, _, splits = dataset
    for clips in splits.values():
        for clip in clips:
            where = f"{clip['video_uid']} clip {clip['clip_idx']}"
            assert clip["dataset"] == "demo"
            assert clip["fps"] == 2 and clip["num_tokens_per_img"] == 1
            assert clip["frames_file"] == f"features/{clip['video_uid']}.arrow"
            assert clip["video_uid"].startswith("demo_")
            assert "inferred_goal" in clip, "extra fields exercise the loader's ignore path"
            step_ids = [step["id"] for step in clip["dst"]]
            assert step_ids == [f"S{i}" for i in range(1, len(step_ids) + 1)]
            assert 4 <= len(step_ids) <= 7
            assert all(step["type"] == "step" and step["name"] for step in clip["dst"])
            assert set(clip["initial_dst_state"]) == set(step_ids)

            system, *turns = clip["conversation"]
            assert system["role"] == "system" and "time" not in system and system["content"]
            assert turns, f"{where}: nothing but the system turn"
            for turn in turns:
                assert turn["role"] in ("user", "assistant", "DST_UPDATE"), where
                assert isinstance(turn["time"], float), where
                assert float(turn["time"] * clip["fps"]).is_integer(), f"{where}: time not on a frame"
                # Strictly inside: no turn relies on the event-frame rule's clamp.
                frame = unclamped_frame(turn["time"], clip["fps"])
                assert clip["start_frame_idx"] <= frame < clip["end_frame_idx"], where
                if turn["role"] == "DST_UPDATE":
                    assert len(turn["content"]) == 1
                    (update,) = turn["content"]
                    assert set(update) == {"id", "transition"}
                    assert update["id"] in step_ids and update["transition"] in TRANSITIONS
                else:
                    assert isinstance(turn["content"], str) and turn["content"]
            times = [turn["time"] for turn in turns]
            assert times == sorted(times), f"{where}: turns out of time order"


def test_clips_tile_each_video_and_cut_inside_steps(dataset, videos):
    out_dir, _, _ = dataset
    cut_mid_step = 0
    for uid, clips in videos.items():
        num_rows = read_arrow(out_dir / clips[0]["frames_file"]).num_rows
        assert [c["clip_idx"] for c in clips] == list(range(len(clips)))
        assert clips[0]["start_frame_idx"] == 0 and clips[-1]["end_frame_idx"] == num_rows
        for previous, clip in zip(clips, clips[1:]):
            assert clip["start_frame_idx"] == previous["end_frame_idx"], uid
            cut_mid_step += "in_progress" in clip["initial_dst_state"].values()
        assert all(c["dst"] == clips[0]["dst"] for c in clips)
    assert any(len(clips) > 1 for clips in videos.values()), "no clip with clip_idx > 0"
    assert cut_mid_step > 0, "no step in progress at a clip boundary"


def test_arrow_files_have_the_proassist_layout(dataset, videos):
    out_dir, _, _ = dataset
    cell_type = pa.list_(pa.list_(pa.float16()))
    for uid, clips in videos.items():
        table = read_arrow(out_dir / clips[0]["frames_file"])
        assert table.schema.names == ["cls", "2x2"]
        assert table.schema.field("cls").type == cell_type and table.schema.field("2x2").type == cell_type
        cls = np.asarray(table.column("cls").to_pylist(), dtype=np.float32)
        patches = np.asarray(table.column("2x2").to_pylist(), dtype=np.float32)
        assert cls.shape == (table.num_rows, 1, demo.FEATURE_DIM)
        assert patches.shape == (table.num_rows, 4, demo.FEATURE_DIM)
        assert np.isfinite(cls).all() and np.isfinite(patches).all()
        assert table.num_rows == clips[-1]["end_frame_idx"]


def classify_frames(cls: np.ndarray, task_index: int, prototypes: demo.Prototypes):
    """Phase (0 idle, i step i, n + 1 done) by nearest prototype, and whether the struggle pattern shows."""
    num_phases = len(demo.TASKS[task_index].steps) + 2
    rows = [prototypes.row(task_index, phase) for phase in range(num_phases)]
    candidates = prototypes.cls[rows]  # (phases, D)
    distances = np.linalg.norm(cls[:, None, :] - candidates[None], axis=-1)  # (N, phases)
    phases = distances.argmin(axis=1)
    residual = cls - candidates[phases]
    direction = prototypes.struggle_cls
    struggle = residual @ direction / (direction @ direction) > 0.5
    return phases, struggle


def test_events_sit_on_the_frame_that_first_shows_their_cause(dataset, videos):
    """The event-frame rule: an event caused by what frame k first shows is attached to k, i.e. t = (k + 1) / fps."""
    out_dir, _, _ = dataset
    prototypes = demo.make_prototypes(SEED)
    slugs = [task.slug for task in demo.TASKS]
    for uid, clips in videos.items():
        task_index = next(i for i, slug in enumerate(slugs) if uid.startswith(f"demo_{slug}_"))
        num_steps = len(clips[0]["dst"])
        table = read_arrow(out_dir / clips[0]["frames_file"])
        cls = np.asarray(table.column("cls").to_pylist(), dtype=np.float64)[:, 0, :]
        phases, struggle = classify_frames(cls, task_index, prototypes)
        assert (np.diff(phases) >= 0).all() and phases[0] == 0 and phases[-1] == num_steps + 1, uid

        events = [event for clip in clips for event in timed_turns(clip)]
        dst_events = [(frame, update["id"], update["transition"])
                      for frame, turn in events if turn["role"] == "DST_UPDATE" for update in turn["content"]]
        expected = []
        for step in range(1, num_steps + 2):
            first = int(np.flatnonzero(phases == step)[0])
            if step > 1:
                expected.append((first, f"S{step - 1}", "complete"))
            if step <= num_steps:
                expected.append((first, f"S{step}", "start"))
        assert dst_events == expected, uid

        # Every phase change has an assistant line at the same frame; tips sit on struggle onsets.
        assistant_frames = {frame for frame, turn in events if turn["role"] == "assistant"}
        assert {frame for frame, _, _ in expected} <= assistant_frames, uid
        onsets = {int(k) for k in np.flatnonzero(struggle) if k == 0 or not struggle[k - 1]}
        tip_frames = {frame for frame, turn in events if turn.get("labels") == "initiative|tip"}
        assert tip_frames == onsets, uid


def test_questions_are_answered_at_once_from_the_true_state(videos):
    answered = 0
    for uid, clips in videos.items():
        task = next(task for task in demo.TASKS if uid.startswith(f"demo_{task.slug}_"))
        state = dict(clips[0]["initial_dst_state"])
        turns = [turn for clip in clips for turn in clip["conversation"] if "time" in turn]
        for index, turn in enumerate(turns):
            if turn["role"] == "DST_UPDATE":
                for update in turn["content"]:
                    state[update["id"]] = TRANSITIONS[update["transition"]][1]
            if turn["role"] != "user":
                continue
            reply = turns[index + 1]
            assert reply["role"] == "assistant" and reply["time"] == turn["time"], uid
            (current,) = [int(sid[1:]) for sid, value in state.items() if value == "in_progress"]
            kind = next(kind for kind, text in demo.QUESTIONS.items() if text == turn["content"])
            assert reply["content"] == demo.answer_question(kind, task, current)
            answered += 1
    assert answered > 0, "no user question in the test dataset"


def test_initial_state_follows_the_spec_and_replay_is_legal(videos):
    for uid, clips in videos.items():
        for index, clip in enumerate(clips):
            where = f"{uid} clip {clip['clip_idx']}"
            fps, boundary = clip["fps"], clip["start_frame_idx"] - 1
            # The initial-state formula from the schema spans must agree with what the file says.
            recomputed = {}
            for step in clip["dst"]:
                if unclamped_frame(step["end_ts"], fps) < boundary:
                    recomputed[step["id"]] = "completed"
                elif unclamped_frame(step["start_ts"], fps) < boundary <= unclamped_frame(step["end_ts"], fps):
                    recomputed[step["id"]] = "in_progress"
                else:
                    recomputed[step["id"]] = "not_started"
            assert recomputed == clip["initial_dst_state"], where

            state = dict(clip["initial_dst_state"])
            for turn_index, turn in enumerate(clip["conversation"]):
                if turn["role"] != "DST_UPDATE":
                    continue
                for update in turn["content"]:
                    before, after = TRANSITIONS[update["transition"]]
                    assert state[update["id"]] == before, f"{where} turn {turn_index}: illegal {update}"
                    state[update["id"]] = after
            if index + 1 < len(clips):
                assert state == clips[index + 1]["initial_dst_state"], where
            else:
                assert set(state.values()) == {"completed"}, where


def test_model_dir_loads_offline_with_pad_equal_to_eos(dataset, monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    import torch

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out_dir, summary, splits = dataset
    model_dir = out_dir / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = AutoConfig.from_pretrained(model_dir)

    # pad == eos on purpose (as many real tokenizers ship): the loader must add a distinct <pad> (test_data.py).
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert tokenizer.bos_token == "<s>" and tokenizer.unk_token == "<unk>"
    vocab = tokenizer.get_vocab()
    assert not any(token in vocab for token in PROJECT_SPECIAL_TOKENS), "the loader adds those"
    assert 500 <= len(tokenizer) <= 1000 and len(tokenizer) == summary["vocab_size"]

    # Byte-level: any text survives a round trip, including characters the corpus never saw.
    text = "Now, mount the new tire. Ünïcødé ✓ 42 [DST] S1->complete"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text
    assert tokenizer("Now").input_ids[0] == tokenizer.bos_token_id, "Llama-style: the tokenizer prepends BOS"

    assert config.model_type == "llama"
    assert config.vocab_size == len(tokenizer)
    assert (config.bos_token_id, config.eos_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert config.tie_word_embeddings is False
    assert config.hidden_size == 128 and config.num_attention_heads == 4 and config.num_key_value_heads == 2
    assert config.max_position_embeddings >= max(c["max_seq_len"] for c in splits["train"])
    assert not (model_dir / "model.safetensors").exists(), "the demo trains from scratch"

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tokenizer))


def test_clips_fit_the_token_budget_even_at_five_tokens_per_frame(dataset):
    """An upper estimate of the sequence layout's rendering: prompt, I tokens per frame, one block per turn."""
    from transformers import AutoTokenizer

    out_dir, _, splits = dataset
    tokenizer = AutoTokenizer.from_pretrained(out_dir / "model")

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    for clips in splits.values():
        for clip in clips:
            prompt = "\n".join(
                [clip["conversation"][0]["content"], "Task steps:"]
                + [f"{step['id']}: {step['name']}" for step in clip["dst"]]
                + ["Current state: " + ", ".join(f"{sid}: {value}" for sid, value in clip["initial_dst_state"].items())]
            ) + "\n"
            num_frames = clip["end_frame_idx"] - clip["start_frame_idx"]
            tokens = 1 + count(prompt) + LARGEST_TOKENS_PER_IMG * num_frames
            for _, turn in timed_turns(clip):
                if turn["role"] == "DST_UPDATE":
                    text = ", ".join(f"{u['id']}->{u['transition']}" for u in turn["content"])
                else:
                    text = turn["content"]
                tokens += 2 + count(text)  # role token + text + EOS
            assert tokens < clip["max_seq_len"], f"{clip['video_uid']} clip {clip['clip_idx']}: ~{tokens} tokens"
