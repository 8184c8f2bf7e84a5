"""The project's attention (`causal_sdpa`) against transformers' own `eager`, fp32 on CPU.

(a) The bare function against transformers' eager attention with the mask transformers' own mask builder
makes: square, cached chunk, single query, right-padded batch, grouped K/V heads, sliding windows, and
bidirectional modules. (b) Every backbone family: whole-sequence logits and logits streamed through a cache
(chunks of varying sizes and single tokens) equal `eager` on a sequence longer than the sliding window, or
the family is refused at start-up with a message that names the setting and the attention that works.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache
from transformers.masking_utils import causal_mask_function, eager_mask, sliding_window_causal_mask_function
from transformers.models.llama.modeling_llama import eager_attention_forward

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the flat modules live in the repo root

from config import Config  # noqa: E402
from sequence import load_tokenizer  # noqa: E402
from model import (  # noqa: E402
    ATTENTION, PreallocatedCache, build_model_from_config_dict, causal_sdpa_attention, check_attention_support,
)

HEAD_DIM = 8
WINDOW = 16
SEQ_LEN = 40  # longer than WINDOW: the window changes the result
CHUNKS = (9, 1, 1, 13, 1, 7, 1, 1, 6)  # a streamed sequence of SEQ_LEN: chunks across the window edge, single tokens
TOL = dict(atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# (a) The bare attention function


class AttentionModule(nn.Module):
    """What an attention function reads from a decoder layer's attention module."""

    def __init__(self, kv_groups: int, is_causal: bool = True):
        super().__init__()
        self.num_key_value_groups = kv_groups
        self.head_dim = HEAD_DIM
        self.is_causal = is_causal


def qkv(batch: int, q_heads: int, kv_heads: int, q_len: int, kv_len: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, q_heads, q_len, HEAD_DIM, generator=gen)  # (B, Hq, q, D)
    key = torch.randn(batch, kv_heads, kv_len, HEAD_DIM, generator=gen)  # (B, Hkv, kv, D)
    value = torch.randn(batch, kv_heads, kv_len, HEAD_DIM, generator=gen)
    return query, key, value


def eager_reference(query, key, value, window=None, padding=None, causal=True):
    """transformers' eager attention with the mask its mask builder makes: the last q of kv positions query."""
    batch, q_heads, q_len, _ = query.shape
    kv_len = key.shape[2]
    mask = None
    if causal:
        mask_function = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
        mask = eager_mask(batch, q_len, kv_len, q_offset=kv_len - q_len, kv_offset=0, mask_function=mask_function,
                          attention_mask=padding, dtype=torch.float32)  # (B, 1, q, kv)
    module = AttentionModule(q_heads // key.shape[1]).eval()
    out, _ = eager_attention_forward(module, query, key, value, mask, scaling=HEAD_DIM ** -0.5)
    return out  # (B, q, Hq, D)


BARE_CASES = {  # batch, q heads, kv heads, q, kv, sliding window
    "square": (2, 4, 4, 12, 12, None),
    "cached_chunk": (1, 4, 4, 5, 20, None),
    "single_query": (1, 4, 4, 1, 20, None),
    "gqa_square": (2, 8, 2, 12, 12, None),
    "gqa_cached_chunk": (1, 8, 2, 5, 20, None),
    "gqa_single_query": (1, 8, 2, 1, 20, None),
    "window_square": (2, 8, 2, 24, 24, 8),
    "window_cached_chunk": (1, 8, 2, 5, 30, 8),
    "window_chunk_wider_than_window": (1, 8, 2, 12, 30, 8),
    "window_single_query": (1, 8, 2, 1, 30, 8),
    "window_wider_than_sequence": (1, 4, 4, 6, 12, 16),
}


@pytest.mark.parametrize("case", BARE_CASES)
def test_bare_attention_equals_eager(case):
    batch, q_heads, kv_heads, q_len, kv_len, window = BARE_CASES[case]
    query, key, value = qkv(batch, q_heads, kv_heads, q_len, kv_len)
    module = AttentionModule(q_heads // kv_heads)
    out, weights = causal_sdpa_attention(module, query, key, value, None, scaling=HEAD_DIM ** -0.5,
                                         sliding_window=window)
    assert weights is None and out.shape == (batch, q_len, q_heads, HEAD_DIM)
    torch.testing.assert_close(out, eager_reference(query, key, value, window), **TOL)


@pytest.mark.parametrize("window", [None, 5])
def test_right_padded_batch_equals_eager_with_its_padding_mask_at_real_positions(window):
    """No mask is passed for the padding: a real token attends only to earlier positions, never to the padding."""
    lengths = (12, 7)
    query, key, value = qkv(2, 8, 2, 12, 12, seed=1)
    padding = torch.arange(12)[None, :] < torch.tensor(lengths)[:, None]  # (B, T) True at real tokens
    out, _ = causal_sdpa_attention(AttentionModule(4), query, key, value, None, scaling=HEAD_DIM ** -0.5,
                                   sliding_window=window)
    expected = eager_reference(query, key, value, window, padding=padding)
    for row, length in enumerate(lengths):
        torch.testing.assert_close(out[row, :length], expected[row, :length], **TOL)


def test_plain_causal_square_stays_mask_free(monkeypatch):
    """The common path (no window, or a window the sequence does not exceed) hands SDPA no mask tensor and
    `is_causal`; a sequence longer than the window gets a mask."""
    calls = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((kwargs.get("attn_mask"), kwargs.get("is_causal")))
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    query, key, value = qkv(1, 4, 4, 12, 12)
    for window in (None, 12, 11):
        causal_sdpa_attention(AttentionModule(1), query, key, value, None, sliding_window=window)
    (mask_none, causal_none), (mask_wide, causal_wide), (mask_narrow, causal_narrow) = calls
    assert mask_none is None and causal_none is True
    assert mask_wide is None and causal_wide is True
    assert mask_narrow is not None and causal_narrow is False


@pytest.mark.parametrize("how", ["kwarg", "module"])
def test_a_bidirectional_module_gets_bidirectional_attention(how):
    """Vision towers and encoders pass is_causal=False (or set it on the module): no causal mask for them."""
    query, key, value = qkv(2, 4, 4, 10, 10, seed=2)
    module = AttentionModule(1, is_causal=how != "module")
    kwargs = {"is_causal": False} if how == "kwarg" else {}
    out, _ = causal_sdpa_attention(module, query, key, value, None, scaling=HEAD_DIM ** -0.5, **kwargs)
    torch.testing.assert_close(out, eager_reference(query, key, value, causal=False), **TOL)


def test_a_vision_tower_under_causal_sdpa_equals_eager():
    """The SmolVLM2 vision tower (is_causal=False) built with this project's attention name stays bidirectional."""
    from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig
    from transformers.models.smolvlm.modeling_smolvlm import SmolVLMVisionTransformer

    config = SmolVLMVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 image_size=32, patch_size=8)
    torch.manual_seed(0)
    ours = SmolVLMVisionTransformer._from_config(copy.deepcopy(config), attn_implementation=ATTENTION).eval()
    eager = SmolVLMVisionTransformer._from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    eager.load_state_dict(ours.state_dict())
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = eager(pixel_values=pixels).last_hidden_state  # (2, patches, 32)
        torch.testing.assert_close(ours(pixel_values=pixels).last_hidden_state, expected, **TOL)


@pytest.mark.parametrize("setting, value, words", [
    ("softcap", 50.0, "softcap"),
    ("s_aux", torch.zeros(4), "sinks"),
    ("position_bias", torch.zeros(1, 4, 6, 6), "position_bias"),
])
def test_settings_it_cannot_compute_are_refused_not_ignored(setting, value, words):
    query, key, value_states = qkv(1, 4, 4, 6, 6)
    with pytest.raises(ValueError, match=f"{words}.*model.attn_implementation"):
        causal_sdpa_attention(AttentionModule(1), query, key, value_states, None, **{setting: value})


def test_a_bidirectional_sliding_window_is_refused():
    query, key, value = qkv(1, 4, 4, 6, 6)
    with pytest.raises(ValueError, match="bidirectional.*sliding_window"):
        causal_sdpa_attention(AttentionModule(1), query, key, value, None, sliding_window=4, is_causal=False)


# ---------------------------------------------------------------------------------------------------------
# (b) Backbone families: the backbone's own forward under causal_sdpa and under eager


def tiny(**fields) -> dict:
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=HEAD_DIM, vocab_size=96, max_position_embeddings=128,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return {**base, **fields}


FAMILIES = {  # model_type and tiny config fields of the families the project runs under causal_sdpa
    "llama": ("llama", tiny()),
    "smollm2": ("llama", tiny(hidden_size=48, num_attention_heads=6, tie_word_embeddings=True)),
    "qwen2": ("qwen2", tiny()),
    "qwen2_sliding": ("qwen2", tiny(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "mistral_sliding": ("mistral", tiny(sliding_window=WINDOW)),
    "phi3_sliding": ("phi3", tiny(sliding_window=WINDOW)),
    "gemma3_text_sliding": ("gemma3_text", tiny(sliding_window=WINDOW, query_pre_attn_scalar=HEAD_DIM,
                                                layer_types=["sliding_attention", "full_attention"])),
    "smolvlm2_text": ("smolvlm", {"text_config": {"model_type": "llama", **tiny()}}),
}


def family_config(family: str):
    model_type, fields = FAMILIES[family]
    return AutoConfig.for_model(model_type, **fields).get_text_config()


def backbone_pair(family: str):
    """The family's backbone under causal_sdpa and under eager, with the same random weights."""
    config = family_config(family)
    torch.manual_seed(0)
    # A config object each: a model reads its attention implementation from its config at every forward.
    ours = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=ATTENTION, dtype=torch.float32)
    eager = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager", dtype=torch.float32)
    eager.load_state_dict(ours.state_dict())
    assert (ours.config._attn_implementation, eager.config._attn_implementation) == (ATTENTION, "eager")
    return config, ours.eval(), eager.eval()


def sequence_ids(config, batch: int = 1) -> torch.Tensor:
    return torch.randint(3, config.vocab_size, (batch, SEQ_LEN), generator=torch.Generator().manual_seed(1))


def streamed_logits(backbone, ids: torch.Tensor, cache) -> torch.Tensor:
    """Logits of `ids` (1, T) fed in CHUNKS through `cache`: (1, T, V)."""
    pieces, start = [], 0
    with torch.no_grad():
        for size in CHUNKS:
            out = backbone(input_ids=ids[:, start:start + size], past_key_values=cache, use_cache=True)
            pieces.append(out.logits)
            start += size
    assert start == ids.shape[1]
    return torch.cat(pieces, dim=1)


def test_families_include_windows_narrower_than_the_sequence():
    for family in FAMILIES:
        if "sliding" in family:
            config = family_config(family)
            assert config.sliding_window == WINDOW < SEQ_LEN, family
            assert any(t == "sliding_attention" for t in getattr(config, "layer_types", ["sliding_attention"]))


@pytest.mark.parametrize("family", FAMILIES)
def test_family_whole_sequence_logits_equal_eager(family):
    config, ours, eager = backbone_pair(family)
    check_attention_support(config, ATTENTION)  # honoured, so not refused
    ids = sequence_ids(config, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, eager(input_ids=ids).logits, **TOL)


@pytest.mark.parametrize("cache_kind", ["dynamic", "preallocated"])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_streamed_logits_equal_eager_at_every_position(family, cache_kind):
    """DynamicCache(config) keeps only a window of keys in sliding layers; PreallocatedCache keeps them all."""
    config, ours, eager = backbone_pair(family)
    ids = sequence_ids(config)
    cache = DynamicCache(config=config) if cache_kind == "dynamic" else PreallocatedCache(config.num_hidden_layers, 64)
    with torch.no_grad():
        expected = eager(input_ids=ids).logits  # (1, T, V)
    torch.testing.assert_close(streamed_logits(ours, ids, cache), expected, **TOL)


def test_project_training_forward_on_a_sliding_window_backbone_equals_eager(tokenizer_dir):
    """VideoAssistant's training forward (right-padded batch, no mask, fused LM head + cross-entropy) on a
    Mistral layout with sliding_window < clip length: the per-token losses equal those under eager."""
    tokenizer = load_tokenizer(tokenizer_dir)
    config_dict = {"model_type": "mistral", **tiny(vocab_size=400, sliding_window=WINDOW)}
    lengths = (SEQ_LEN, SEQ_LEN - 12)
    ids = torch.randint(3, 400, (2, SEQ_LEN), generator=torch.Generator().manual_seed(2))
    text_mask = torch.arange(SEQ_LEN)[None, :] < torch.tensor(lengths)[:, None] - 1  # (B, T), a next token exists
    ids[1, lengths[1]:] = tokenizer.pad_token_id
    targets = ids[:, 1:][text_mask[:, :-1]]  # (n_text,)
    losses = {}
    for attention in (ATTENTION, "eager"):
        cfg = Config()
        cfg.model.attn_implementation, cfg.data.feature_dim, cfg.train.activation_checkpointing = attention, 8, False
        torch.manual_seed(0)
        model = build_model_from_config_dict(config_dict, tokenizer, cfg).eval()
        with torch.no_grad():
            losses[attention] = model(ids, text_mask=text_mask, text_targets=targets)["text_ce"]  # (n_text,)
    torch.testing.assert_close(losses[ATTENTION], losses["eager"], **TOL)


REFUSED = {  # model_type, config fields, words the start-up message must contain
    "gemma2": ("gemma2", tiny(sliding_window=WINDOW, final_logit_softcapping=None, query_pre_attn_scalar=HEAD_DIM),
               ["attn_logit_softcapping=50.0", "model.attn_implementation: eager"]),
    "gpt_oss": ("gpt_oss", tiny(sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2),
                ["attention sinks", "model.attn_implementation: eager"]),
    "gemma3_bidirectional": ("gemma3_text", tiny(use_bidirectional_attention=True),
                             ["use_bidirectional_attention", "causal"]),
}


@pytest.mark.parametrize("family", REFUSED)
def test_family_refused_at_start_up_with_the_setting_and_the_fix(family):
    model_type, fields, words = REFUSED[family]
    config = AutoConfig.for_model(model_type, **fields)
    with pytest.raises(ValueError) as refusal:
        check_attention_support(config, ATTENTION)
    for word in words:
        assert word in str(refusal.value), (word, str(refusal.value))
    check_attention_support(config, "eager")  # the attention the message names accepts it

    cfg = Config()
    cfg.model.attn_implementation = ATTENTION
    with pytest.raises(ValueError, match="model.attn_implementation"):  # before transformers builds anything
        build_model_from_config_dict({"model_type": model_type, **fields}, None, cfg)
