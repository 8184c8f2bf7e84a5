"""The streaming runner's context, token by token: the preallocated cache equals transformers' DynamicCache,
the teacher-forced context is exactly the training sequence, and each context strategy puts back what it
promises (whole frames with their blocks' EOS for drop_middle, the predicted state for reset_with_dst)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import evaluate
from checkpoint import load_for_inference
from clips import load_split
from data import FrameStore, Renderer


@pytest.fixture(scope="module")
def loaded(tiny_ckpt):
    model, tokenizer, cfg = load_for_inference(tiny_ckpt)
    cfg.eval.max_new_tokens, cfg.eval.max_dst_tokens = 4, 3
    return model, tokenizer, cfg


def video_and_features(cfg, split="val", multi_clip=False):
    clips, _ = load_split(cfg, split)
    videos = evaluate.assemble_videos(clips)
    video = next(v for v in videos if (len(v.clips) > 1) == multi_clip)
    store = FrameStore(cfg.data.num_tokens_per_frame, cfg.data.feature_dim)
    return video, evaluate.video_features(video, store, cfg.data.num_tokens_per_frame)


def runner_for(loaded, **kwargs):
    model, tokenizer, cfg = loaded
    return evaluate.StreamingRunner(model, Renderer(tokenizer, cfg.data.num_tokens_per_frame), cfg,
                                    torch.device("cpu"), **kwargs)


def test_preallocated_cache_stream_equals_dynamic_cache_stream(loaded):
    """Heads firing at every frame (generation, pending EOS, all of it): the same probabilities and texts."""
    _, _, cfg = loaded
    video, feats = video_and_features(cfg)
    fire = evaluate.Thresholds(-1.0, -1.0)
    fast = runner_for(loaded).run(video, feats, fire)
    slow = runner_for(loaded, cache="dynamic").run(video, feats, fire)
    assert len(fast) == len(slow) == video.num_frames
    np.testing.assert_allclose([r.p_speak for r in fast], [r.p_speak for r in slow], atol=1e-5)
    np.testing.assert_allclose([r.p_dst for r in fast], [r.p_dst for r in slow], atol=1e-5)
    assert [(r.asst_text, r.dst_text) for r in fast] == [(r.asst_text, r.dst_text) for r in slow]


def test_teacher_forced_context_is_the_training_sequence(loaded):
    """With ground-truth blocks as context and no reset, the tokens in the cache (plus the last pending
    block) are exactly what training renders for the clip, whatever the heads did in between."""
    model, tokenizer, cfg = loaded
    video, feats = video_and_features(cfg)
    renderer = Renderer(tokenizer, cfg.data.num_tokens_per_frame)
    for threshold in (2.0, -1.0):  # never fires; fires everywhere (generate, then roll back)
        runner = runner_for(loaded, teacher_forced=True)
        runner.run(video, feats, evaluate.Thresholds(threshold, threshold))
        assert runner.context_resets == 0
        assert runner.cache.get_seq_length() == len(runner.context_ids)
        expected = renderer.render(video.clips[0]).input_ids.tolist()
        assert runner.context_ids + runner.pending == expected


def snapshot_resets(runner) -> list[dict]:
    """Record, at every reset, the frames in context before it and the tokens the cache holds after it."""
    seen, original = [], runner._reset_context

    def wrapped():
        before = [(i, list(segment)) for i, segment in runner.segments]
        original()
        seen.append({"before": before, "after": list(runner.context_ids), "state": dict(runner.pred_state),
                     "kept": [(i, list(segment)) for i, segment in runner.segments]})

    runner._reset_context = wrapped
    return seen


@pytest.mark.parametrize("teacher_forced", [False, True], ids=["own-blocks", "teacher-forced"])
@pytest.mark.parametrize("strategy", ["reset_with_dst", "drop_all", "drop_middle"])
def test_context_strategies_put_back_what_they_promise(loaded, strategy, teacher_forced):
    model, tokenizer, cfg = loaded
    cfg.data.max_seq_len, cfg.eval.context_margin, cfg.eval.context_strategy = 200, 10, strategy
    video, feats = video_and_features(cfg)
    renderer = Renderer(tokenizer, cfg.data.num_tokens_per_frame)
    runner = runner_for(loaded, teacher_forced=teacher_forced)
    resets = snapshot_resets(runner)
    records = runner.run(video, feats, evaluate.Thresholds(0.0, 0.0))  # fire often: blocks and EOS everywhere
    assert len(records) == video.num_frames and len(resets) >= 2 and runner.context_resets == len(resets)
    assert runner.cache.get_seq_length() == len(runner.context_ids) <= cfg.data.max_seq_len
    image, eos = renderer.image_id, renderer.eos_id
    for reset in resets:
        if strategy == "reset_with_dst":
            # the model's own tracked state is its memory across the reset
            assert reset["after"] == renderer.prompt(video.system_text, video.steps, reset["state"])
        elif strategy == "drop_all":
            assert reset["after"] == renderer.prompt(video.system_text, video.steps, video.initial_state)
        else:
            prompt = renderer.prompt(video.system_text, video.steps, video.initial_state)
            kept = reset["kept"]
            assert kept, "drop_middle kept nothing"
            assert kept == reset["before"][-len(kept):]  # the most recent whole frames, in order
            assert reset["after"] == prompt + [t for _, segment in kept for t in segment]
            for _, segment in kept:
                assert segment[:cfg.data.num_tokens_per_frame] == [image] * cfg.data.num_tokens_per_frame
                # every generated block is closed by its EOS before the next frame starts
                for role in (renderer.dst_id, renderer.asst_id):
                    for start in [j for j, t in enumerate(segment) if t == role]:
                        assert eos in segment[start:], segment
                assert segment[-1] in (eos, image) or segment[-1] not in (renderer.dst_id, renderer.asst_id)
    if teacher_forced:
        # The tracked state follows the reference here, so it moves: reset_with_dst and drop_all differ.
        assert any(r["state"] != video.initial_state for r in resets)
