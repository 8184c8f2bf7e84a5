"""Evaluation fidelity: whole-video references from overlapping clips, overrides before the model is built,
per-pair sweep counters, the checkpoint's own precision, clear checkpoint-path errors, quiet loading, and
teacher-forced streaming equal to training forwards on a multi-clip video."""
from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import checkpoint
import evaluate
import stream
import train
from checkpoint import CheckpointError, load_for_inference
from clips import DataError, load_split
from config import Config, load_config
from conftest import ROOT, SAMPLE_CLIP, cut_sample, demo_config, write_proassist_features
from data import ClipDataset, collate, model_inputs
from frames import FrameStore
from logs import Progress
from model import inference_precision
from sequence import Renderer

# ----------------------------------------------------------------------------------------------------
# The sample clip cut into several clips of one video


def write_sample_split(tmp_path: Path, ranges: list[tuple[int, int]], dataset: str = "assembly101") -> Path:
    """A test split holding the sample clip cut at `ranges`, its features file, and a config; returns the config."""
    sample = json.loads(SAMPLE_CLIP.read_text())
    sample["dataset"] = dataset
    clips = [cut_sample(sample, start, end, i) for i, (start, end) in enumerate(ranges)]
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "test.json").write_text(json.dumps(clips))
    feature_file = tmp_path / "feat" / f"{sample['video_uid']}.arrow"
    if not feature_file.exists():
        write_proassist_features(feature_file, 460, dim=16)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"data": {"root": str(tmp_path), "test": "test.json", "feature_dim": 16,
                                        "features_path": "{root}/feat/{video_uid}.arrow"}}))
    return cfg


def load_clips(cfg_path: Path):
    clips, problems = load_split(load_config(cfg_path), "test")
    assert not [p for p in problems if p.level == "ERROR"], [str(p) for p in problems]
    return clips


SAMPLE_TRANSITIONS = 12  # S1..S6, each started and completed once
SAMPLE_REPLIES = 8


@pytest.mark.parametrize("ranges", [
    [(193, 260), (213, 451)],  # overlapping: the turns at frame 212 are in both clips (clamped to 213 in the second)
    [(193, 304), (304, 451)],  # consecutive, but the turns at frame 303 sit at the start - 1 of the second clip
    [(193, 260), (260, 451)],  # consecutive, every turn in exactly one clip (the usual case)
], ids=["overlapping", "shared-boundary-turns", "consecutive"])
def test_clips_of_one_video_give_each_reference_once(tmp_path, capsys, ranges):
    whole = load_clips(write_sample_split(tmp_path / "whole", [(193, 451)]))[0]
    clips = load_clips(write_sample_split(tmp_path, ranges))
    assert len(clips) == 2
    (video,) = stream.assemble_videos(clips)
    assert (video.start, video.end) == (193, 451)
    # The events of the whole video are exactly those of the uncut clip: same frames, nothing twice.
    assert video.events == whole.events()
    assert sum(len(ev.transitions) for ev in video.events.values()) == SAMPLE_TRANSITIONS
    assert sum(len(ev.asst_texts) for ev in video.events.values()) == SAMPLE_REPLIES
    assert set(video.reference_states()[-1].values()) == {"completed"}
    if ranges == [(193, 260), (260, 451)]:
        assert sum(len(ev.transitions) + len(ev.asst_texts) + len(ev.user_texts) for ev in video.events.values()) \
            == sum(1 for clip in clips for turn in clip.turns if turn.time is not None)

    out = tmp_path / "oracle"
    assert evaluate.main(["--config", str(tmp_path / "c.yaml"), "--oracle", "--embedder", "bow", "--out", str(out)]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["speak"]["f1"] == 1.0 and result["dst"]["f1"] == 1.0 and result["dst"]["state_accuracy"] == 1.0
    assert result["speak"]["num_good"] == result["speak"]["num_matched"] == SAMPLE_REPLIES
    assert result["speak"]["num_missed"] == result["speak"]["num_redundant"] == 0
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 451 - 193
    assert sum(len(line["ref_transitions"]) for line in lines) == SAMPLE_TRANSITIONS
    assert sum(line["ref_asst_text"] is not None for line in lines) == SAMPLE_REPLIES
    capsys.readouterr()


def test_skipped_clips_without_a_video_uid_do_not_stop_the_evaluation(tmp_path, capsys):
    """data.on_invalid_clip=skip: a clip without video_uid (or with a number for one) is skipped like any
    other invalid clip; the videos of the skipped clips that name one are left out whole."""
    cfg_path = write_sample_split(tmp_path, [(193, 451)])
    split = tmp_path / "test.json"
    valid = json.loads(split.read_text())[0]
    no_uid = {k: v for k, v in valid.items() if k != "video_uid"}
    number_uid = {**valid, "video_uid": 7}
    other_video = {**valid, "video_uid": "broken_video", "fps": -1}
    split.write_text(json.dumps([valid, no_uid, number_uid, other_video]))
    code = evaluate.main(["--config", str(cfg_path), "--oracle", "--embedder", "bow", "--out", str(tmp_path / "out"),
                          "data.on_invalid_clip=skip"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "skipping 2 video(s) with a skipped clip: 7, broken_video" in err
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["num_videos"] == 1


def test_clips_of_one_video_that_cannot_form_a_timeline_are_refused(tmp_path):
    clips = load_clips(write_sample_split(tmp_path, [(193, 260), (260, 451)]))
    swapped = [dataclasses.replace(clips[0], clip_idx=1), dataclasses.replace(clips[1], clip_idx=0)]
    with pytest.raises(DataError, match="a clip starts before clip_idx 0 .frame 260."):
        stream.assemble_videos(swapped)
    with pytest.raises(DataError, match=r"its clips disagree on fps \(\[1.0, 2.0\]\)"):
        stream.assemble_videos([clips[0], dataclasses.replace(clips[1], fps=1.0)])


# ----------------------------------------------------------------------------------------------------
# What the user sees


def test_unknown_dataset_warning_only_for_real_unknown_names(demo_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    assert evaluate.main(["--config", str(demo_config(demo_dir, tmp_path)), "--oracle", "--embedder", "bow",
                          "--split", "val", "--out", str(out)]) == 0
    assert "unknown dataset" not in capsys.readouterr().err
    for dataset, warned in (("assembly101", False), ("my_new_kitchens", True)):
        case = tmp_path / dataset
        cfg = write_sample_split(case, [(193, 451)], dataset=dataset)
        assert evaluate.main(["--config", str(cfg), "--oracle", "--embedder", "bow", "--out", str(case / "o")]) == 0
        err = capsys.readouterr().err
        assert (f"warning: unknown dataset '{dataset}'" in err) == warned, err
        assert err.count("unknown dataset") == int(warned)


def make_fake_run(run_dir: Path, steps: list[int]) -> None:
    """step_<N> directories that look complete (the files exist), plus the debris a real run can hold."""
    for step in steps:
        (run_dir / f"step_{step}").mkdir(parents=True)
        for name in ("model.safetensors", "optimizer.pt", *checkpoint.REQUIRED_FILES):
            (run_dir / f"step_{step}" / name).write_text("")
    (run_dir / "step_700").mkdir()  # incomplete: not offered
    (run_dir / "step_700" / "config.yaml").write_text("")
    (run_dir / ".tmp_step_800").mkdir()  # a save interrupted by a crash: not offered


def test_checkpoint_paths_that_are_not_checkpoints_fail_in_one_line(tmp_path, capsys):
    run = tmp_path / "runs" / "demo"
    make_fake_run(run, [200, 400, 600])
    listing = f"{run} has step_200, step_400, step_600; pass one of them, e.g. --ckpt {run}/step_600"
    for ckpt, what in ((run, "is a run directory, not a checkpoint"), (run / "step_99999", "no such directory"),
                       (run / "step_700", "incomplete checkpoint, missing model.safetensors, optimizer.pt")):
        assert evaluate.main(["--ckpt", str(ckpt)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: --ckpt {ckpt}") and what in err and listing in err, err
        assert err.count("\n") == 1 and "Traceback" not in err
    assert evaluate.main(["--ckpt", str(tmp_path / "elsewhere" / "step_5")]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'elsewhere'} does not exist either; train first" in err and err.count("\n") == 1


def test_resume_path_that_is_not_a_checkpoint_lists_the_ones_that_exist(tmp_path):
    run = tmp_path / "runs" / "demo"
    make_fake_run(run, [2, 4])
    cfg = Config()
    cfg.run.dir = str(run)
    cfg.train.resume = str(run / "step_4")
    assert checkpoint.find_resume(cfg) == run / "step_4"
    cfg.train.resume = str(run / "step_5")
    with pytest.raises(CheckpointError) as err:
        checkpoint.find_resume(cfg)
    assert f"{run} has step_2, step_4; pass one of them, e.g. train.resume={run}/step_4" in str(err.value)
    cfg.train.resume = str(tmp_path / "runs" / "nope" / "step_5")
    with pytest.raises(CheckpointError) as err:
        checkpoint.find_resume(cfg)
    message = str(err.value)
    assert "no such directory" in message and "nope does not exist either" in message
    assert "train.resume=auto" in message and "\n" not in message
    (tmp_path / "runs" / "empty").mkdir()
    cfg.train.resume = str(tmp_path / "runs" / "empty" / "step_5")
    with pytest.raises(CheckpointError, match="empty holds no complete checkpoint"):
        checkpoint.find_resume(cfg)


# ----------------------------------------------------------------------------------------------------
# Loading a checkpoint


@pytest.fixture(scope="module")
def lora_ckpt(demo_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A LoRA checkpoint of a pretrained base whose directory moved after training: (checkpoint, new base)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    tmp = tmp_path_factory.mktemp("lora")
    base = tmp / "base"
    shutil.copytree(demo_dir / "model", base)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base)).save_pretrained(base)
    train.train(load_config(ROOT / "configs" / "demo.yaml", [
        f"data.root={demo_dir}", f"model.path={base}", "model.init=pretrained", "model.trainable=lora",
        "model.lora_rank=4", "model.lora_alpha=8", f"run.dir={tmp / 'run'}", "data.num_workers=0",
        "train.max_steps=1", "train.eval_every=0", "train.save_every=1", "train.log_every=1",
    ]))
    moved = base.rename(tmp / "moved_base")
    return tmp / "run" / "step_1", moved


def test_model_path_override_finds_a_moved_base_model_quietly(lora_ckpt, tmp_path, capsys):
    from transformers.utils import logging as hf_logging
    ckpt, moved = lora_ckpt
    args = ["--ckpt", str(ckpt), "--split", "val", "--max-videos", "1", "--embedder", "bow",
            "--speak-threshold", "2", "--dst-threshold", "2"]
    assert evaluate.main(args + ["--out", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert "needs its base model at model.path=" in err and "model.path=/new/place" in err
    assert err.count("\n") == 1 and "Traceback" not in err

    assert evaluate.main(args + ["--out", str(tmp_path / "b"), f"model.path={moved}"]) == 0
    seen = capsys.readouterr()
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["num_frames"] > 0
    # transformers' own weight-loading bar is not shown (ours, per video, is); the setting is restored.
    assert "Loading weights" not in seen.err + seen.out
    assert "\r" not in seen.err + seen.out  # no progress bar when the output is not a terminal
    assert hf_logging.is_progress_bar_enabled()
    _, _, cfg = load_for_inference(ckpt, overrides=[f"model.path={moved}"])
    assert cfg.model.path == str(moved)


def checkpoint_with_precision(tiny_ckpt: Path, tmp_path: Path, precision: str) -> Path:
    ckpt = tmp_path / f"step_{precision}"
    shutil.copytree(tiny_ckpt, ckpt)
    tree = yaml.safe_load((ckpt / "config.yaml").read_text())
    tree["train"]["precision"] = precision
    (ckpt / "config.yaml").write_text(yaml.safe_dump(tree))
    return ckpt


def test_precision_defaults_to_the_checkpoints_training_precision(tiny_ckpt, tmp_path, capsys):
    choose = inference_precision
    assert choose(None, "fp32", "cuda", (7, 5))[0] == torch.float32  # auto would give fp16 on Turing
    assert choose(None, "auto", "cuda", (7, 5))[0] == torch.float16
    assert choose(None, "auto", "cuda", (9, 0))[0] == torch.bfloat16
    assert choose(None, "auto", "cpu", None)[0] == torch.float32
    assert choose("fp16", "fp32", "cuda", (9, 0))[0] == torch.float16
    assert choose("auto", "fp32", "cuda", (7, 5))[0] == torch.float16
    assert "train.precision=auto, which gives fp16 on this compute capability 7.5" in choose(None, "auto", "cuda", (7, 5)).reason

    ckpt = checkpoint_with_precision(tiny_ckpt, tmp_path, "bf16")
    args = ["--ckpt", str(ckpt), "--split", "val", "--max-videos", "1", "--embedder", "bow",
            "--speak-threshold", "2", "--dst-threshold", "2", "--device", "cpu"]
    assert evaluate.main(args + ["--out", str(tmp_path / "a")]) == 0
    assert "precision: bf16 (the checkpoint's train.precision=bf16; --precision overrides)" in capsys.readouterr().err
    assert evaluate.main(args + ["--out", str(tmp_path / "b"), "--precision", "fp32"]) == 0
    assert "precision: fp32 (--precision fp32)" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# The sweep


def test_context_resets_are_counted_per_sweep_pair(tiny_ckpt, tmp_path, capsys):
    """Two pairs that never fire stream identically: each must report the same count, not a running total."""
    out = tmp_path / "e"
    code = evaluate.main(["--ckpt", str(tiny_ckpt), "--split", "val", "--max-videos", "1", "--embedder", "bow",
                          "--sweep-speak=2,3", "--sweep-dst=2", "--out", str(out), "data.max_seq_len=180",
                          "eval.context_margin=20", "eval.max_new_tokens=4", "eval.max_dst_tokens=4"])
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "metrics.json").read_text())
    first, second = result["sweep"]
    assert first["context_resets"] == second["context_resets"] > 0
    assert result["context_resets"] == first["context_resets"]
    header, *rows = (out / "sweep.csv").read_text().splitlines()
    column = header.split(",").index("context_resets")
    assert [int(row.split(",")[column]) for row in rows] == [first["context_resets"]] * 2


# ----------------------------------------------------------------------------------------------------
# Teacher-forced streaming equals training forwards on a multi-clip video


def head_probabilities(model, dataset: ClipDataset, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame (p_speak, p_dst) of one training-style forward over a dataset clip, all frames read."""
    batch = collate([dataset.item(index)], dataset.renderer.pad_id)
    with torch.no_grad():
        out = model(**model_inputs(batch, all_frames=True))
    return torch.sigmoid(out["speak_logits"]).numpy(), torch.sigmoid(out["dst_logits"]).numpy()


def whole_video_split(cfg, split: str, video_uid: str, out: Path) -> Path:
    """A split file holding the video's clips as one clip in the user's format: the first clip's fields, the
    whole frame range, the first system turn, then every clip's timed turns (each distinct turn once)."""
    raws = []
    for path in [Path(cfg.data.root) / getattr(cfg.data, split)]:
        raws += [raw for raw in json.loads(path.read_text()) if raw["video_uid"] == video_uid]
    raws.sort(key=lambda raw: raw["clip_idx"])
    whole = copy.deepcopy(raws[0])
    whole.pop("initial_dst_state", None)
    whole["end_frame_idx"] = raws[-1]["end_frame_idx"]
    whole["conversation"] = [raws[0]["conversation"][0]]
    seen = set()
    for raw in raws:
        for turn in raw["conversation"][1:]:
            key = (turn["time"], turn["role"], json.dumps(turn["content"]))
            if key not in seen:
                seen.add(key)
                whole["conversation"].append(turn)
    out.write_text(json.dumps([whole]))
    return out


@pytest.mark.parametrize("threshold", [2.0, -1.0], ids=["never-fires", "always-fires"])
def test_teacher_forced_stream_equals_training_forward_on_a_multi_clip_video(tiny_ckpt, tmp_path, threshold):
    """The stream runs a multi-clip video from the first clip's prompt to the last clip's end, so its
    per-frame head probabilities equal one training forward over the whole video rendered as one clip.
    A later clip's own training sequence starts again from its own prompt and state: only the first
    clip's frames also equal that clip's own forward."""
    model, tokenizer, cfg = load_for_inference(tiny_ckpt)
    cfg.eval.max_new_tokens, cfg.eval.max_dst_tokens = 3, 3
    clips, _ = load_split(cfg, "val")
    video = next(v for v in stream.assemble_videos(clips) if len(v.clips) > 1)
    feats = stream.video_features(video, FrameStore(1, cfg.data.feature_dim), 1)
    runner = stream.StreamingRunner(model, Renderer(tokenizer, 1), cfg, torch.device("cpu"), teacher_forced=True)
    records = runner.run(video, feats, stream.Thresholds(threshold, threshold))
    assert runner.context_resets == 0  # the whole video fits the context: nothing but the rendering differs
    streamed = np.array([[r.p_speak for r in records], [r.p_dst for r in records]])  # (2, num_frames)
    if threshold < 0:
        assert all(r.asst_text is not None and r.dst_text is not None for r in records)

    # The whole video as one training clip.
    whole_cfg = copy.deepcopy(cfg)
    whole_cfg.data.val = str(whole_video_split(cfg, "val", video.video_uid, tmp_path / "whole.json"))
    whole_set = ClipDataset(whole_cfg, "val", tokenizer)
    assert whole_set.clips[0].events() == video.events
    whole = np.array(head_probabilities(model, whole_set, 0))
    assert whole.shape == streamed.shape == (2, video.num_frames)
    assert np.abs(streamed - whole).max() < 1e-4

    # Each clip's own training forward: the first clip is a prefix of the stream; the second is not.
    dataset = ClipDataset(cfg, "val", tokenizer)
    first, second = (next(i for i, c in enumerate(dataset.clips) if c.video_uid == video.video_uid and c.clip_idx == k)
                     for k in (0, 1))
    first_clip, second_clip = dataset.clips[first], dataset.clips[second]
    own_first = np.array(head_probabilities(model, dataset, first))
    assert np.abs(streamed[:, :first_clip.num_frames] - own_first).max() < 1e-4
    own_second = np.array(head_probabilities(model, dataset, second))
    offset = second_clip.start - video.start
    assert np.abs(streamed[:, offset:offset + second_clip.num_frames] - own_second).max() > 1e-3


def test_progress_away_from_a_terminal_is_plain_lines(capsys):
    progress = Progress(3, "stream speak>0.5 dst>0.5", "video", every_s=0.0)
    for _ in range(3):
        progress.update()
    progress.close()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert [line.split(",")[0] for line in lines] == ["stream speak>0.5 dst>0.5: 1/3 videos (33%)",
                                                      "stream speak>0.5 dst>0.5: 2/3 videos (67%)"]
    assert all("eta" in line for line in lines)
