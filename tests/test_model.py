"""Tests for model.py on a tiny random Llama (CPU, fp32): input embeddings (new-token rows, projected frame
features), LM head only at text positions, KV-cache streaming == one full forward, LoRA, trainable sets,
activation checkpointing proven on, checkpoint tensors round trip, optimizer groups, fp32 heads."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the flat modules live in the repo root

import model as model_module  # noqa: E402
from conftest import (  # noqa: E402
    CLIP, HIDDEN, LAYERS, SENTENCES, SHORT_CLIP, all_positions, assert_compiled_equals_eager, ids_of, llama_dict,
    make_batch, make_cfg, perturb_trainable, tiny_model, training_step,
)
from sequence import IGNORE, new_token_ids  # noqa: E402
from model import (  # noqa: E402
    LoRALinear,
    activation_checkpointing_active,
    build_model,
    build_model_from_config_dict,
    checkpoint_names,
    count_parameters,
    describe,
    flops_per_token,
    load_model_state,
    model_state_for_checkpoint,
    param_groups,
    set_activation_checkpointing,
)

def trainable_names(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


NEW_PARTS = {
    "projector.0.weight", "projector.0.bias", "projector.2.weight", "projector.2.bias",
    "speak_head.weight", "speak_head.bias", "dst_head.weight", "dst_head.bias", "new_token_embed.weight",
}


# ---------------------------------------------------------------------------------------------------------
# Input embeddings


@pytest.mark.parametrize("layout", ["beyond", "inside"])
def test_new_token_rows_start_at_mean_and_train_when_frozen(tokenizer, base_vocab, layout):
    # beyond: added ids >= the embedding size (Llama-style); inside: the matrix is padded past the tokenizer (Qwen)
    vocab_size = base_vocab if layout == "beyond" else len(tokenizer) + 9
    model = tiny_model(tokenizer, base_vocab, vocab_size=vocab_size, trainable="frozen")
    table = model.backbone.get_input_embeddings().weight
    added = new_token_ids(tokenizer)
    assert (min(added) >= table.shape[0]) == (layout == "beyond")

    expected = table[:base_vocab].float().mean(0)  # the tokenizer's own rows only, never padding rows
    assert torch.allclose(model.new_token_embed.weight, expected.expand(len(added), -1), atol=1e-6)
    assert model.new_token_embed.weight.requires_grad and not table.requires_grad

    # added ids read the extra table, ordinary ids the backbone's
    ids = torch.tensor([[3, *added]])
    embeds = model.embed(ids)  # (1, 1 + n_added, H)
    assert torch.equal(embeds[0, 0], table[3])
    assert torch.equal(embeds[0, 1:], model.new_token_embed.weight)

    # and they receive gradients in frozen mode
    model.train()
    out = model(**make_batch(tokenizer))
    (out["text_logits"].logsumexp(-1).sum() + out["speak_logits"].sum()).backward()
    used = [model.new_token_row[tokenizer.convert_tokens_to_ids(t)] for t in ("[USER]", "[DST]", "[ASST]")]
    assert all(model.new_token_embed.weight.grad[row].abs().sum() > 0 for row in used)


def test_projected_features_replace_image_embeddings_in_order(tokenizer, base_vocab):
    model = tiny_model(tokenizer, base_vocab)
    batch = make_batch(tokenizer)
    captured = {}

    def capture(module, args, kwargs):
        captured["inputs_embeds"] = kwargs["inputs_embeds"]

    handle = model.decoder.register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        model(**batch)
        projected = model.projector(batch["frame_features"])  # (N, H)
        token_embeds = model.embed(batch["input_ids"])  # (B, T, H)
    handle.remove()
    image_mask = batch["input_ids"] == model.image_token_id
    assert torch.equal(captured["inputs_embeds"][image_mask], projected)
    assert torch.equal(captured["inputs_embeds"][~image_mask], token_embeds[~image_mask])


def test_changing_a_frame_feature_changes_only_later_outputs(tokenizer, base_vocab):
    model = tiny_model(tokenizer, base_vocab)
    batch = all_positions(make_batch(tokenizer, clips=(CLIP,)))
    image_positions = (batch["input_ids"][0] == model.image_token_id).nonzero().squeeze(1)
    changed_row = 3
    position = int(image_positions[changed_row])
    changed = dict(batch, frame_features=batch["frame_features"].clone())
    changed["frame_features"][changed_row] += 1.0
    with torch.no_grad():
        before, after = model(**batch), model(**changed)
    for key in ("text_logits", "speak_logits", "dst_logits"):  # one row per position here
        old, new = before[key], after[key]
        assert torch.allclose(old[:position], new[:position], atol=1e-6), key
        differs = (old[position:] != new[position:]).reshape(len(old) - position, -1).any(-1)
        assert differs.all(), key


def test_image_count_mismatch_is_refused(tokenizer, base_vocab):
    model = tiny_model(tokenizer, base_vocab)
    batch = make_batch(tokenizer)
    with pytest.raises(ValueError, match=r"12 <image> tokens but frame_features has 11 rows"):
        model(**dict(batch, frame_features=batch["frame_features"][:-1]))
    with pytest.raises(ValueError, match=r"frame_features has 0 rows"):
        model(**dict(batch, frame_features=None))


# ---------------------------------------------------------------------------------------------------------
# LM head and decision heads


def test_lm_head_runs_on_exactly_the_text_positions_in_chunks(tokenizer, base_vocab, monkeypatch):
    model = tiny_model(tokenizer, base_vocab)
    batch = make_batch(tokenizer)
    n_text = int(batch["text_mask"].sum())
    rows_seen = []
    lm_head = model.backbone.get_output_embeddings()
    lm_head.register_forward_hook(lambda module, args, out: rows_seen.append(args[0].shape[0]))
    with torch.no_grad():
        whole = model(**batch)
        monkeypatch.setattr(model_module, "LM_HEAD_CHUNK_ROWS", 7)
        chunked = model(**batch)
    assert rows_seen[0] == n_text
    assert rows_seen[1:] == [7] * (n_text // 7) + ([n_text % 7] if n_text % 7 else [])
    assert whole["text_logits"].shape == (n_text, model.vocab_size)
    assert whole["text_logits"].dtype == torch.float32
    assert torch.allclose(whole["text_logits"], chunked["text_logits"], atol=1e-6)  # other matmul blocking
    assert whole["speak_logits"].shape == whole["dst_logits"].shape == (int(batch["head_mask"].sum()),)

    rows_seen.clear()  # no text positions: the LM head sees zero rows, the output is (0, V)
    with torch.no_grad():
        empty = model(**dict(batch, text_mask=None))
    assert rows_seen == [0] and empty["text_logits"].shape == (0, model.vocab_size)


def test_text_logits_equal_the_backbones_logits(tokenizer, base_vocab):
    model = tiny_model(tokenizer, base_vocab)
    words = [CLIP[1:6], "attach the wheels to the chassis </s> now pick".split()]
    T = max(len(w) for w in words)
    # right-padded with an ordinary id (eos) so that no added id is involved
    input_ids = torch.full((2, T), tokenizer.eos_token_id)
    text_mask = torch.zeros(2, T, dtype=torch.bool)
    for b, w in enumerate(words):
        input_ids[b, : len(w)] = ids_of(tokenizer, w)
        text_mask[b, : len(w)] = True
    text_mask[1, 2] = False  # a gap, so the gather is not a prefix
    with torch.no_grad():
        ours = model(input_ids, text_mask=text_mask)["text_logits"]
        reference = model.backbone(input_ids=input_ids).logits  # (B, T, V)
        alone = model.backbone(input_ids=input_ids[:1, : len(words[0])]).logits  # the short row, unpadded
    assert torch.allclose(ours, reference[text_mask], atol=1e-5)
    # Right padding needs no mask: the padded row's real positions equal the row run alone.
    assert torch.allclose(reference[0, : len(words[0])], alone[0], atol=1e-5)


def test_fused_cross_entropy_equals_logits_cross_entropy(tokenizer, base_vocab):
    """text_targets (training) give the same per-row cross-entropy and the same gradients as the logits path,
    with the LM head tied and untied, in several chunk sizes."""
    import losses
    for tied in (False, True):
        model = tiny_model(tokenizer, base_vocab, tied=tied)
        batch = make_batch(tokenizer)
        text_mask = batch["text_mask"]
        targets = torch.roll(batch["input_ids"], -1, dims=1)[text_mask] % model.vocab_size  # (n_text,) in the vocab
        targets[3] = IGNORE  # an ignored row contributes nothing

        def grads(out_loss):
            model.zero_grad(set_to_none=True)
            out_loss.backward()
            return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

        logits = model(**batch)["text_logits"]  # (n_text, V)
        reference = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        weights = torch.linspace(0.5, 2.0, len(targets))  # distinct per-row weights reach every row's gradient
        reference_grads = grads((reference * weights).sum())
        for chunk in (losses.CE_CHUNK_ROWS, 3):
            losses.CE_CHUNK_ROWS, saved = chunk, losses.CE_CHUNK_ROWS
            try:
                fused = model(**batch, text_targets=targets)["text_ce"]
                fused_grads = grads((fused * weights).sum())
            finally:
                losses.CE_CHUNK_ROWS = saved
            assert fused.shape == reference.shape and fused.dtype == torch.float32
            torch.testing.assert_close(fused, reference.detach(), rtol=1e-5, atol=1e-6)
            assert fused_grads.keys() == reference_grads.keys()
            lm_weight = "backbone.lm_head.weight" if not tied else "backbone.model.embed_tokens.weight"
            assert lm_weight in fused_grads
            for name, grad in reference_grads.items():
                torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_embeddings_follow_the_autocast_dtype(tokenizer, base_vocab):
    """Under bf16 autocast the decoder receives bf16 embeddings, so the residual stream is half precision."""
    model = tiny_model(tokenizer, base_vocab)
    batch = make_batch(tokenizer)
    seen = []
    handle = model.decoder.layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    with torch.no_grad():
        model(**batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(**batch)
    handle.remove()
    assert seen == [torch.float32, torch.bfloat16]


def test_heads_are_fp32_under_bf16_autocast(tokenizer, base_vocab):
    model = tiny_model(tokenizer, base_vocab, head_type="mlp")
    dtypes = []
    for head in (model.speak_head, model.dst_head):
        head.register_forward_hook(lambda m, args, out: dtypes.append((args[0].dtype, out.dtype)))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**make_batch(tokenizer))
    assert dtypes == [(torch.float32, torch.float32)] * 2
    assert all(out[k].dtype == torch.float32 for k in ("text_logits", "speak_logits", "dst_logits"))
    assert all(p.dtype == torch.float32 for p in [*model.speak_head.parameters(), *model.dst_head.parameters()])


# ---------------------------------------------------------------------------------------------------------
# Streaming with the KV cache


@pytest.mark.parametrize("cache_kind", ["preallocated", "dynamic"])
def test_streaming_with_kv_cache_equals_one_full_forward(tokenizer, base_vocab, cache_kind):
    from transformers import DynamicCache

    model = tiny_model(tokenizer, base_vocab)
    batch = all_positions(make_batch(tokenizer, clips=(CLIP,)))
    input_ids, features = batch["input_ids"], batch["frame_features"]
    with torch.no_grad():
        full = model(**batch)

    cuts = [0, 6, 7, 8, 11, 19, input_ids.shape[1]]  # pieces of several sizes, including single tokens
    cache = model_module.PreallocatedCache(LAYERS, 64) if cache_kind == "preallocated" else DynamicCache()
    pieces, used_features = [], 0
    with torch.no_grad():
        for start, end in zip(cuts[:-1], cuts[1:]):
            piece = input_ids[:, start:end]
            n_images = int((piece == model.image_token_id).sum())
            everything = torch.ones_like(piece, dtype=torch.bool)
            out = model(piece, features[used_features : used_features + n_images],
                        text_mask=everything, head_mask=everything, past_key_values=cache, use_cache=True)
            assert out["past_key_values"] is cache and cache.get_seq_length() == end
            used_features += n_images
            pieces.append(out)
    for key in ("text_logits", "speak_logits", "dst_logits"):
        streamed = torch.cat([p[key] for p in pieces])
        assert (streamed - full[key]).abs().max() < 1e-4, key


def test_preallocated_cache_truncates_and_refuses_overflow(tokenizer, base_vocab):
    """Rolling back moves the length; what is fed afterwards overwrites the stale positions, and the result
    equals a stream that never fed the rolled-back tokens."""
    model = tiny_model(tokenizer, base_vocab)
    ids = ids_of(tokenizer, "<s> you are a helpful assistant now pick up the screwdriver and screw".split()).unsqueeze(0)
    detour = ids_of(tokenizer, "attach the wheels".split()).unsqueeze(0)
    last = torch.zeros(1, ids.shape[1] - 8, dtype=torch.bool)
    last[0, -1] = True
    with torch.no_grad():
        straight = model_module.PreallocatedCache(LAYERS, 16)
        model(ids[:, :8], past_key_values=straight, use_cache=True)
        expected = model(ids[:, 8:], text_mask=last, past_key_values=straight, use_cache=True)["text_logits"]

        rolled = model_module.PreallocatedCache(LAYERS, 16)
        model(ids[:, :8], past_key_values=rolled, use_cache=True)
        model(detour, past_key_values=rolled, use_cache=True)
        assert rolled.length == 11
        rolled.truncate(8)
        assert rolled.get_seq_length() == 8
        assert rolled.get_max_length() == 16  # transformers' cache interface: the capacity, not the fill
        got = model(ids[:, 8:], text_mask=last, past_key_values=rolled, use_cache=True)["text_logits"]
        assert torch.allclose(got, expected, atol=1e-5)
        with pytest.raises(RuntimeError, match="KV cache overflow: 21 positions in a cache of 16"):
            model(ids[:, :8], past_key_values=rolled, use_cache=True)
    with pytest.raises(ValueError, match="cannot truncate"):
        rolled.truncate(40)


def test_causal_sdpa_refuses_an_attention_mask(tokenizer, base_vocab):
    model = tiny_model(tokenizer, base_vocab)
    ids = ids_of(tokenizer, CLIP[:4]).unsqueeze(0)
    with pytest.raises(ValueError, match="takes no attention mask"):
        model.backbone(input_ids=ids, attention_mask=torch.ones(1, 4, 4, dtype=torch.bool)[None])


# ---------------------------------------------------------------------------------------------------------
# What trains: LoRA, frozen, dtypes


def test_lora_starts_as_the_base_model_and_trains_exactly_its_adapters(tokenizer, base_vocab):
    full = tiny_model(tokenizer, base_vocab, seed=3)
    lora = tiny_model(tokenizer, base_vocab, seed=3, trainable="lora", lora_dropout=0.1)
    batch = make_batch(tokenizer)
    with torch.no_grad():
        expected, got = full(**batch), lora(**batch)
    for key in ("text_logits", "speak_logits", "dst_logits"):
        assert torch.allclose(expected[key], got[key], atol=1e-6), key

    targets = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    adapters = {f"backbone.model.layers.{i}.{t}.lora_{ab}" for i in range(LAYERS) for t in targets for ab in "AB"}
    assert trainable_names(lora) == NEW_PARTS | adapters
    lora_layer = lora.backbone.model.layers[0].self_attn.q_proj
    assert isinstance(lora_layer, LoRALinear) and lora_layer.scale == 8.0 / 4
    assert torch.equal(lora_layer.lora_B, torch.zeros_like(lora_layer.lora_B))

    with torch.no_grad():  # the adapter is wired in: a non-zero B changes the output
        lora_layer.lora_B.normal_()
        assert not torch.allclose(lora(**batch)["text_logits"], got["text_logits"])


def test_lora_target_that_matches_nothing_is_refused(tokenizer, base_vocab):
    with pytest.raises(ValueError, match=r"\['qproj'\] match no nn.Linear.*q_proj"):
        tiny_model(tokenizer, base_vocab, trainable="lora", lora_targets=["qproj", "v_proj"])


def test_frozen_trains_projector_heads_and_new_rows_only(tokenizer, base_vocab):
    model = tiny_model(tokenizer, base_vocab, trainable="frozen")
    assert trainable_names(model) == NEW_PARTS
    assert count_parameters(model)[0] == sum(p.numel() for n, p in model.named_parameters() if n in NEW_PARTS)
    full = tiny_model(tokenizer, base_vocab)
    assert trainable_names(full) == {name for name, _ in full.named_parameters()}


def test_half_precision_frozen_weights_keep_trainable_weights_fp32(tokenizer, base_vocab):
    model = tiny_model(tokenizer, base_vocab, trainable="lora", frozen_dtype="bf16").train()
    for name, param in model.named_parameters():
        assert param.dtype == (torch.float32 if param.requires_grad else torch.bfloat16), name
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**make_batch(tokenizer))
    (out["text_logits"].logsumexp(-1).sum() + out["speak_logits"].sum()).backward()
    lora_B = model.backbone.model.layers[0].mlp.down_proj.lora_B
    assert lora_B.grad is not None and lora_B.grad.dtype == torch.float32 and lora_B.grad.abs().sum() > 0
    assert "bfloat16" in describe(model)


# ---------------------------------------------------------------------------------------------------------
# Activation checkpointing





@pytest.mark.parametrize("trainable", ["full", "lora", "frozen"])
def test_activation_checkpointing_recomputes_layers_and_keeps_gradients(tokenizer, base_vocab, trainable):
    model = tiny_model(tokenizer, base_vocab, trainable=trainable, lora_dropout=0.1)
    batch = make_batch(tokenizer)
    assert not activation_checkpointing_active(model)
    calls_off, saved_off, grads_off = training_step(model, batch)

    set_activation_checkpointing(model, True)
    assert activation_checkpointing_active(model)
    assert "activation checkpointing: on" in describe(model)
    calls_on, saved_on, grads_on = training_step(model, batch)

    assert calls_off == [1] * LAYERS  # each decoder layer ran once
    assert calls_on == [2] * LAYERS  # ... and again in backward: the layers really are recomputed
    assert saved_on < saved_off / 2  # inside the layers nothing is kept for backward
    assert grads_on.keys() == grads_off.keys() == trainable_names(model)
    for name in grads_off:
        assert torch.allclose(grads_on[name], grads_off[name], atol=1e-6, rtol=1e-5), name

    set_activation_checkpointing(model, False)
    assert not activation_checkpointing_active(model)
    assert training_step(model, batch)[0] == [1] * LAYERS


def test_checkpointing_works_when_no_layer_input_requires_grad(tokenizer, base_vocab):
    # The layers' input needs no grad, the case where reentrant checkpointing silently drops the adapters'
    # gradients. (In real runs the trainable new-token rows make inputs_embeds require grad anyway.)
    model = tiny_model(tokenizer, base_vocab, trainable="lora")
    model.new_token_embed.weight.requires_grad_(False)
    ids = ids_of(tokenizer, SENTENCES[1].split()).unsqueeze(0)
    assert not model.embed(ids).requires_grad
    batch = {"input_ids": ids, "text_mask": torch.ones_like(ids, dtype=torch.bool)}
    with torch.no_grad():
        model.backbone.model.layers[0].mlp.up_proj.lora_B.normal_()  # so that lora_A gets a gradient too
    _, _, grads_off = training_step(model, batch)
    set_activation_checkpointing(model, True)
    calls, _, grads_on = training_step(model, batch)
    assert calls == [2] * LAYERS
    assert grads_on["backbone.model.layers.0.mlp.up_proj.lora_A"].abs().sum() > 0
    for name in grads_off:
        assert torch.allclose(grads_on[name], grads_off[name], atol=1e-6, rtol=1e-5), name


# ---------------------------------------------------------------------------------------------------------
# Checkpoint tensors





@pytest.mark.parametrize("trainable", ["full", "lora"])
def test_checkpoint_tensors_rebuild_identical_outputs(tokenizer, base_vocab, tmp_path, trainable):
    from safetensors.torch import load_file, save_file

    # the pretrained base directory a lora run reloads its frozen backbone from
    torch.manual_seed(11)
    base = build_model_from_config_dict(llama_dict(base_vocab, tied=True), tokenizer, make_cfg())
    base.backbone.save_pretrained(str(tmp_path / "base"))
    cfg = make_cfg(trainable=trainable, init="pretrained", path=str(tmp_path / "base"))

    torch.manual_seed(0)
    trained = build_model(cfg, tokenizer).eval()
    perturb_trainable(trained)
    tensors = model_state_for_checkpoint(trained, cfg)
    names = set(tensors)
    assert "backbone.lm_head.weight" not in names  # tied to the embedding: saved once, under its name
    if trainable == "full":
        assert "backbone.model.embed_tokens.weight" in names and "backbone.model.layers.1.mlp.up_proj.weight" in names
    else:
        assert names == NEW_PARTS | {"new_token_ids"} | {n for n in names if n.endswith(("lora_A", "lora_B"))}
        assert len(names) == len(NEW_PARTS) + 1 + 2 * 7 * LAYERS
    save_file(tensors, str(tmp_path / "model.safetensors"))

    # full: a random backbone of another seed, everything comes from the checkpoint
    fresh_cfg = make_cfg(trainable=trainable, init="scratch" if trainable == "full" else "pretrained",
                         path=str(tmp_path / "base"))
    torch.manual_seed(1)
    fresh = build_model(fresh_cfg, tokenizer).eval()
    load_model_state(fresh, load_file(str(tmp_path / "model.safetensors")), fresh_cfg)
    assert fresh.backbone.lm_head.weight is fresh.backbone.model.embed_tokens.weight  # still tied
    batch = make_batch(tokenizer)
    with torch.no_grad():
        expected, got = trained(**batch), fresh(**batch)
    for key in ("text_logits", "speak_logits", "dst_logits"):
        assert torch.equal(expected[key], got[key]), key


def test_scratch_backbone_is_saved_even_when_frozen(tokenizer, base_vocab):
    # a random frozen backbone cannot be reloaded from model.path, so it goes into the checkpoint
    model = tiny_model(tokenizer, base_vocab, trainable="frozen", init="scratch")
    names = checkpoint_names(model, make_cfg(trainable="frozen", init="scratch"))
    assert "backbone.model.layers.0.self_attn.q_proj.weight" in names
    assert not any("layers" in n for n in checkpoint_names(model, make_cfg(trainable="frozen", init="pretrained")))


def test_checkpoint_with_missing_or_extra_tensors_is_refused(tokenizer, base_vocab):
    cfg = make_cfg(trainable="lora", init="pretrained")
    model = tiny_model(tokenizer, base_vocab, trainable="lora")
    tensors = model_state_for_checkpoint(model, cfg)
    del tensors["speak_head.bias"]
    tensors["backbone.model.norm.weight"] = torch.ones(HIDDEN)
    with pytest.raises(ValueError, match=r"missing 1 \[speak_head.bias\]; unexpected 1 \[backbone.model.norm.weight\]"):
        load_model_state(model, tensors, cfg)

    # a lora checkpoint loaded as a full run: the whole backbone is missing and the adapters are unexpected
    full_cfg = make_cfg(trainable="full")
    with pytest.raises(ValueError, match=r"missing 21 \[backbone.lm_head.weight, backbone.model.embed_tokens.weight"):
        load_model_state(tiny_model(tokenizer, base_vocab), model_state_for_checkpoint(model, cfg), full_cfg)

    tensors = model_state_for_checkpoint(model, cfg)
    tensors["new_token_ids"] = tensors["new_token_ids"] + 1
    with pytest.raises(ValueError, match="new-token ids"):
        load_model_state(model, tensors, cfg)


# ---------------------------------------------------------------------------------------------------------
# Optimizer groups and accounting


def test_param_groups_exclude_biases_norms_and_embeddings_from_decay(tokenizer, base_vocab):
    model = tiny_model(tokenizer, base_vocab, head_type="mlp")
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    name_of = {id(p): n for n, p in model.named_parameters()}
    decay_names = {name_of[id(p)] for p in decay["params"]}
    no_decay_names = {name_of[id(p)] for p in no_decay["params"]}
    assert decay_names.isdisjoint(no_decay_names)
    assert decay_names | no_decay_names == set(name_of.values())
    for name in ("backbone.model.embed_tokens.weight", "new_token_embed.weight", "backbone.model.norm.weight",
                 "backbone.model.layers.0.input_layernorm.weight", "projector.0.bias", "speak_head.2.bias",
                 "dst_head.0.bias"):
        assert name in no_decay_names, name
    for name in ("backbone.model.layers.0.self_attn.q_proj.weight", "backbone.lm_head.weight",
                 "projector.2.weight", "speak_head.0.weight", "dst_head.2.weight"):
        assert name in decay_names, name

    frozen = tiny_model(tokenizer, base_vocab, trainable="frozen")
    groups = param_groups(frozen, 0.1)
    assert sum(p.numel() for g in groups for p in g["params"]) == count_parameters(frozen)[0]
    torch.optim.AdamW(groups, lr=1e-3)  # accepted as is


def test_flops_per_token_and_parameter_counts(tokenizer, base_vocab):
    model = tiny_model(tokenizer, base_vocab)
    decoder_params = sum(p.numel() for p in model.backbone.model.parameters())
    non_embedding = decoder_params - model.backbone.model.embed_tokens.weight.numel()
    assert flops_per_token(model, 100) == 6 * non_embedding + 12 * LAYERS * HIDDEN * 100
    trainable, total = count_parameters(model)
    assert trainable == total == sum(p.numel() for p in model.parameters())
    assert "projector" in describe(model) and "new_token_embed" in describe(model)


def test_build_model_scratch_uses_the_seed_and_pretrained_loads_weights(tokenizer, base_vocab, model_dir, tmp_path):
    cfg = make_cfg(init="scratch", path=str(model_dir))
    torch.manual_seed(5)
    first = build_model(cfg, tokenizer)
    torch.manual_seed(5)
    second = build_model(cfg, tokenizer)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name

    first.backbone.save_pretrained(str(tmp_path))
    loaded = build_model(make_cfg(init="pretrained", path=str(tmp_path)), tokenizer)
    assert loaded.backbone.config._attn_implementation == "causal_sdpa"
    for (name, a), b in zip(first.backbone.state_dict().items(), loaded.backbone.state_dict().values()):
        assert torch.equal(a, b), name


def test_expandable_segments_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    model_module.prefer_expandable_segments()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    model_module.prefer_expandable_segments()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"


def test_attention_choice_is_reported_and_in_effect(tokenizer, base_vocab, monkeypatch):
    """configure_attention names the kernels; the model's attention is this project's mask-free causal SDPA,
    and that function is what every decoder layer calls."""
    assert "causal SDPA" in model_module.configure_attention(torch.device("cpu"))
    model = tiny_model(tokenizer, base_vocab)
    assert model.backbone.config._attn_implementation == "causal_sdpa"
    calls = []
    real = model_module.causal_sdpa_attention

    def spy(*args, **kwargs):
        calls.append(args[1].shape)
        return real(*args, **kwargs)

    from transformers import AttentionInterface
    monkeypatch.setitem(AttentionInterface._global_mapping, "causal_sdpa", spy)
    with torch.no_grad():
        model(**make_batch(tokenizer))
    assert len(calls) == LAYERS


def test_compiled_layers_equal_eager_with_checkpointing(tokenizer, base_vocab):
    """train.compile: each decoder layer compiled (inductor on the CPU here), activation checkpointing still
    wrapping it, gives the eager outputs and gradients; a second batch length does not break it."""
    eager = tiny_model(tokenizer, base_vocab)
    compiled = tiny_model(tokenizer, base_vocab)
    for m in (eager, compiled):
        set_activation_checkpointing(m, True)
        m.train()
    assert model_module.compile_decoder_layers(compiled) == LAYERS
    for clips in ((CLIP, SHORT_CLIP), (CLIP,)):
        assert_compiled_equals_eager(eager, compiled, make_batch(tokenizer, clips=clips))
    assert activation_checkpointing_active(compiled)
