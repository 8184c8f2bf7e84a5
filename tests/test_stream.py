"""The streaming runner's context, token by token: the preallocated cache equals transformers' DynamicCache,
the teacher-forced context is exactly the training sequence, and each context strategy puts back what it
promises (whole frames with their blocks' EOS for drop_middle, the predicted state for reset_with_dst)."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import stream
from checkpoint import load_for_inference
from clips import FrameEvents, load_split
from config import load_config
from conftest import ROOT, SAMPLE_CLIP, cut_sample, write_proassist_features
from data import ClipDataset, collate, model_inputs
from frames import FrameStore
from model import build_model
from sequence import Renderer, load_tokenizer


@pytest.fixture(scope="module")
def loaded(tiny_ckpt):
    model, tokenizer, cfg = load_for_inference(tiny_ckpt)
    cfg.eval.max_new_tokens, cfg.eval.max_dst_tokens = 4, 3
    return model, tokenizer, cfg


def video_and_features(cfg, split="val", multi_clip=False):
    clips, _ = load_split(cfg, split)
    videos = stream.assemble_videos(clips)
    video = next(v for v in videos if (len(v.clips) > 1) == multi_clip)
    store = FrameStore(cfg.data.num_tokens_per_frame, cfg.data.feature_dim)
    return video, stream.video_features(video, store, cfg.data.num_tokens_per_frame)


def runner_for(loaded, **kwargs):
    model, tokenizer, cfg = loaded
    return stream.StreamingRunner(model, Renderer(tokenizer, cfg.data.num_tokens_per_frame), cfg,
                                    torch.device("cpu"), **kwargs)


def test_preallocated_cache_stream_equals_dynamic_cache_stream(loaded):
    """Heads firing at every frame (generation, pending EOS, all of it): the same probabilities and texts."""
    _, _, cfg = loaded
    video, feats = video_and_features(cfg)
    fire = stream.Thresholds(-1.0, -1.0)
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
        runner.run(video, feats, stream.Thresholds(threshold, threshold))
        assert runner.context_resets == 0
        assert runner.cache.get_seq_length() == len(runner.context_ids)
        expected = renderer.render(video.clips[0]).input_ids.tolist()
        assert runner.context_ids + runner.pending == expected


def snapshot_resets(runner) -> list[dict]:
    """Record, at every reset, the frames in context before it, the tokens the cache holds after it and the
    frames kept."""
    seen, original = [], runner._reset_context

    def wrapped():
        before = [(seg.frame_index, list(seg.tokens)) for seg in runner.segments]
        original()
        seen.append({"before": before, "after": list(runner.context_ids),
                     "kept": [(seg.frame_index, list(seg.tokens)) for seg in runner.segments]})

    runner._reset_context = wrapped
    return seen


def expected_segment(renderer, video, record, teacher_forced: bool, tokens: list[int]) -> list[int]:
    """Frame `record.frame` in the training layout, rendered here from the video and the record alone: the frame
    tokens and user blocks, then the reference blocks (teacher-forced) or a block for each head that fired,
    holding the tokens it generated (read from `tokens`, their text checked against the record)."""
    ev = video.events.get(record.frame, FrameEvents())
    expected = renderer.frame() + [t for text in ev.user_texts for t in renderer.user_block(text)]
    if teacher_forced:
        if ev.transitions:
            expected += renderer.dst_block(ev.transitions)
        if ev.asst_texts:
            expected += renderer.asst_block(ev.asst_texts)
        return expected
    for fired, role, text in ((record.dst, renderer.dst_id, record.dst_text),
                              (record.speak, renderer.asst_id, record.asst_text)):
        if not fired:
            continue
        start = len(expected)
        assert tokens[start] == role, (record.frame, tokens)
        end = tokens.index(renderer.eos_id, start)
        generated = tokens[start + 1:end]
        assert renderer.tokenizer.decode(generated, skip_special_tokens=True).strip() == text
        expected += [role, *generated, renderer.eos_id]
    return expected


@pytest.mark.parametrize("teacher_forced", [False, True], ids=["own-blocks", "teacher-forced"])
@pytest.mark.parametrize("strategy", ["reset_with_dst", "drop_all", "drop_middle"])
def test_context_strategies_put_back_what_they_promise(loaded, strategy, teacher_forced):
    """After each reset the cache holds exactly a prompt rendered here, with the state the strategy promises,
    computed from the records (the stream's own updates) or the reference (teacher-forced), never from the
    runner's tracking; drop_middle's frames are the most recent whole frames, token for token."""
    model, tokenizer, cfg = loaded
    cfg.data.max_seq_len, cfg.eval.context_margin, cfg.eval.context_strategy = 200, 10, strategy
    video, feats = video_and_features(cfg)
    renderer = Renderer(tokenizer, cfg.data.num_tokens_per_frame)
    runner = runner_for(loaded, teacher_forced=teacher_forced)
    resets = snapshot_resets(runner)
    records = runner.run(video, feats, stream.Thresholds(0.0, 0.0))  # fire often: blocks and EOS everywhere
    assert len(records) == video.num_frames and len(resets) >= 2 and runner.context_resets == len(resets)
    assert runner.cache.get_seq_length() == len(runner.context_ids) <= cfg.data.max_seq_len
    # The state after each frame: the stream's own legal updates, or the reference the context carried.
    states_after = video.reference_states() if teacher_forced else stream.predicted_states(video, records)

    def state_before(frame_index: int) -> dict:
        return states_after[frame_index - 1] if frame_index > 0 else video.initial_state

    for reset in resets:
        next_frame = reset["before"][-1][0] + 1  # a reset happens before the frame after the last one in context
        if strategy == "reset_with_dst":
            assert reset["after"] == renderer.prompt(video.system_text, video.steps, state_before(next_frame))
        elif strategy == "drop_all":
            assert reset["after"] == renderer.prompt(video.system_text, video.steps, video.initial_state)
        else:
            kept = reset["kept"]
            assert kept, "drop_middle kept nothing"
            assert kept == reset["before"][-len(kept):]  # the most recent whole frames, in order
            first = kept[0][0]
            prompt = renderer.prompt(video.system_text, video.steps, state_before(first))
            assert reset["after"] == prompt + [t for _, segment in kept for t in segment]
            for frame_index, segment in kept:
                assert segment == expected_segment(renderer, video, records[frame_index], teacher_forced, segment)
    if teacher_forced:
        # The tracked state follows the reference here, so it moves: the prompts of reset_with_dst and
        # drop_middle differ from drop_all's (for drop_middle: a kept frame after a state change).
        assert any(state_before(r["before"][-1][0] + 1) != video.initial_state for r in resets)
        if strategy == "drop_middle":
            assert any(state_before(r["kept"][0][0]) != video.initial_state for r in resets)


# ----------------------------------------------------------------------------------------------------
# Half precision: the stream keeps the buffers training keeps


@pytest.fixture(scope="module")
def long_clip(demo_dir, tmp_path_factory):
    """The user's sample clip cut to frames [193, 330) at I = 10 tokens per frame: about 1,500 positions, so
    rotary angles are checked far along the sequence. Random weights with sharpened attention (q and k scaled
    by 8): attention then depends on position, as a trained model's does."""
    root = tmp_path_factory.mktemp("long_clip")
    sample = json.loads(SAMPLE_CLIP.read_text())
    (root / "val.json").write_text(json.dumps([cut_sample(sample, 193, 330, 0)]))
    write_proassist_features(root / sample["frames_file"], 330, dim=64, columns=("cls", "3x3"))
    cfg = load_config(ROOT / "configs" / "demo.yaml", [
        f"data.root={root}", f"model.path={demo_dir / 'model'}", "model.init=scratch", "data.val=val.json",
        "data.num_tokens_per_frame=10", "data.feature_dim=64", "data.max_seq_len=4096", "data.num_workers=0"])
    tokenizer = load_tokenizer(cfg.model.path)
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer).eval()
    with torch.no_grad():
        for layer in model.decoder.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    dataset = ClipDataset(cfg, "val", tokenizer, announce=False)
    return cfg, model, dataset


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 0.015), (torch.float16, 0.005)], ids=["bf16", "fp16"])
def test_half_precision_stream_keeps_rotary_buffers_and_equals_the_training_forward(long_clip, dtype, tolerance):
    """Training casts no buffer: the rotary frequencies stay fp32 under autocast. The runner stores weights in
    half precision for speed but keeps every buffer as built, so the teacher-forced stream equals the training
    forward under the same autocast, also beyond position 1,000 (head logits within half-precision rounding;
    with half-precision rotary frequencies they drift by ~0.04 there)."""
    cfg, model, dataset = long_clip
    training_model, streaming_model = copy.deepcopy(model), copy.deepcopy(model)
    runner = stream.StreamingRunner(streaming_model, dataset.renderer, cfg, torch.device("cpu"), teacher_forced=True,
                                      dtype=dtype)
    float_buffers = {name: b.dtype for name, b in streaming_model.named_buffers() if b.is_floating_point()}
    assert any("rotary" in name for name in float_buffers) and set(float_buffers.values()) == {torch.float32}
    assert streaming_model.decoder.layers[0].mlp.up_proj.weight.dtype == dtype
    assert streaming_model.speak_head.weight.dtype == torch.float32

    clip = dataset.clips[0]
    video = stream.assemble_videos([clip])[0]
    feats = stream.video_features(video, dataset.store, cfg.data.num_tokens_per_frame)
    records = runner.run(video, feats, stream.Thresholds(2.0, 2.0))  # the context is the training sequence
    probs = np.array([[r.p_speak for r in records], [r.p_dst for r in records]], dtype=np.float64)
    streamed = np.log(probs / (1 - probs))  # (2, num_frames) head logits

    batch = collate([dataset.item(0)], dataset.renderer.pad_id)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        out = training_model(**model_inputs(batch, all_frames=True))
    trained = torch.stack([out["speak_logits"], out["dst_logits"]]).double().numpy()
    positions = dataset.renderer.render(clip).decision_positions
    far = positions > 1000
    assert far.sum() >= 30 and positions.max() < cfg.data.max_seq_len
    assert np.abs(streamed[:, far] - trained[:, far]).max() < tolerance
