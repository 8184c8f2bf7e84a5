"""SmolVLM2 throughput, random weights of the real shapes: feature extraction and training on extracted features.

    python bench/bench_smolvlm.py                                   # CPU: a tiny shape, seconds
    python bench/bench_smolvlm.py --shape 256m --precision fp16     # GPU: SmolVLM2-256M shape
    python bench/bench_smolvlm.py --shape 500m --seq-len 4096 --micro-batch 2

* extraction: frames/s of the extract-features loop (base64 JPEG rows of an Arrow file -> Pillow decode and
  resize in DataLoader workers -> rescale/normalise, vision tower, connector, pooling on the device), plus the
  two halves on their own: decode + resize per CPU process, and the device part on pre-decoded frames.
* training: tokens/s of `train.forward_backward` + AdamW (LoRA, checkpointing as configured) for the VLM's text
  model as backbone on synthetic clips of --seq-len tokens (one <image> per frame, a text block every few
  frames, as ProAssist clips at I = 1), frame features of the connector's width.
Needs Pillow (requirements-frames.txt). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import tempfile
import time
from pathlib import Path

from common import device_facts, emit, parse_args, run

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader
from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

import demo
import train
from backbones import frame_encoder_from_vlm, load_vlm, vlm_text_backbone
from config import load_config
from data import collate, to_device
from frames import FrameChunks, FramePreprocessing, decode_frames, require_pillow
from logs import peak_flops, peak_memory_gb
from model import assemble, cast_frozen, choose_precision, device_capability, flops_per_token, param_groups
from sequence import IGNORE, load_tokenizer

VISION_BASE = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   image_size=512, patch_size=16)  # SigLIP-B/16 at 512 px, as in SmolVLM2-256M / 500M
SHAPES = {
    "tiny": dict(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             image_size=32, patch_size=4),
                 text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2),
                 scale_factor=2, source_px=48, resize_longest_edge=64, vocab=None),
    "256m": dict(vision=VISION_BASE,
                 text=dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                           num_key_value_heads=3),
                 scale_factor=4, source_px=384, resize_longest_edge=512, vocab=49280),
    "500m": dict(vision=VISION_BASE,
                 text=dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                           num_key_value_heads=5),
                 scale_factor=4, source_px=384, resize_longest_edge=512, vocab=49280),
}
FRAMES_PER_TEXT_BLOCK = 8  # a 16-token [DST]/[ASST]-like block after every 8th frame
TEXT_BLOCK_TOKENS = 16
PROMPT_TOKENS = 120


def write_model_dir(out: Path, shape: dict) -> Path:
    """A random SmolVLM2-shaped directory: weights, the demo's tokenizer with SmolVLM2's image tokens, preprocessor."""
    tokenizer = demo.train_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]})
    tokenizer.eos_token = "<end_of_utterance>"
    vocab = shape["vocab"] or len(tokenizer)
    config = SmolVLMConfig(
        text_config=dict(shape["text"], model_type="llama", vocab_size=vocab, max_position_embeddings=8192),
        vision_config=shape["vision"], scale_factor=shape["scale_factor"],
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    SmolVLMForConditionalGeneration(config).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    size = shape["vision"]["image_size"]
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "SmolVLMImageProcessor", "resample": 1, "rescale_factor": 1 / 255,
        "size": {"longest_edge": 4 * size}, "max_image_size": {"longest_edge": size},
        "video_sampling": {"fps": 1, "video_size": {"longest_edge": shape["resize_longest_edge"]}},
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    }))
    return out


def write_raw_frames(path: Path, num_frames: int, side: int) -> list[str]:
    """Smooth random images (JPEG sizes like camera frames, unlike white noise) as base64 JPEG rows."""
    Image = require_pillow()
    rng = np.random.default_rng(0)
    cells = []
    for _ in range(num_frames):
        coarse = rng.integers(0, 256, (side // 16, side // 16, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((side, side), Image.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        cells.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    table = pa.table({"frame": cells})
    with pa.ipc.new_file(str(path), table.schema) as writer:
        writer.write_table(table)
    return cells


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_extraction(model_dir: Path, frames_path: Path, cells: list[str], cfg, device, dtype, workers: int) -> dict:
    preprocessing = FramePreprocessing.from_model_dir(model_dir)
    encoder = frame_encoder_from_vlm(load_vlm(model_dir), model_dir, 1, cfg.model.vision_batch_frames)
    if dtype != torch.float32:
        cast_frozen(encoder, dtype)  # as model.frozen_dtype stores the tower in training
    encoder.to(device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    n = len(cells)

    start = time.perf_counter()
    decoded = decode_frames(cells, preprocessing, "bench", 0)  # (n, S, S, 3) uint8, one process
    decode_seconds = time.perf_counter() - start

    pixels = torch.from_numpy(decoded).to(device)
    with autocast:
        encoder.pooled(pixels[:encoder.batch_frames])  # warm-up
    synchronize(device)
    start = time.perf_counter()
    with autocast:
        encoder.pooled(pixels)
    synchronize(device)
    device_seconds = time.perf_counter() - start

    chunks = FrameChunks(frames_path, n, encoder.batch_frames, preprocessing, "bench")
    loader = DataLoader(chunks, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda")
    start = time.perf_counter()
    for chunk in loader:
        with autocast:
            encoder.pooled(chunk.to(device, non_blocking=True)).to(torch.float16).cpu()
    synchronize(device)
    loop_seconds = time.perf_counter() - start
    return {
        "frames": n, "tower_px": preprocessing.image_size,
        "decode_workers": workers, "frames_per_s": n / loop_seconds,
        "decode_resize_frames_per_s_per_process": n / decode_seconds,
        "tower_pool_frames_per_s": n / device_seconds,
        "tokens_per_frame_before_pooling": (preprocessing.image_size // encoder.vision_model.config.patch_size) ** 2
        // encoder.connector.scale_factor ** 2,
    }


def synthetic_batch(seq_len: int, micro_batch: int, vocab: int, image_id: int, special_ids: set, feature_dim: int) -> dict:
    """A collated batch of `micro_batch` clips of `seq_len` tokens with ProAssist's I = 1 structure."""
    rng = np.random.default_rng(0)
    ordinary = np.array([i for i in range(min(vocab, 4000)) if i not in special_ids])
    ids = rng.choice(ordinary, size=(micro_batch, seq_len))
    asst = np.full((micro_batch, seq_len), IGNORE)
    speak = np.full((micro_batch, seq_len), IGNORE)
    pos, frame = PROMPT_TOKENS, 0
    while pos < seq_len - TEXT_BLOCK_TOKENS - 1:
        ids[:, pos] = image_id
        speak[:, pos] = int(frame % FRAMES_PER_TEXT_BLOCK == 0)
        if frame % FRAMES_PER_TEXT_BLOCK == 0:
            asst[:, pos + 1:pos + TEXT_BLOCK_TOKENS] = ids[:, pos + 2:pos + TEXT_BLOCK_TOKENS + 1]
            pos += TEXT_BLOCK_TOKENS
        pos, frame = pos + 1, frame + 1
    n_images = int((ids[0] == image_id).sum())
    items = [{"input_ids": ids[b], "asst_targets": asst[b], "dst_targets": np.full(seq_len, IGNORE),
              "speak_labels": speak[b], "dst_labels": speak[b].copy(), "decision_mask": speak[b] != IGNORE,
              "frame_features": np.random.default_rng(b).standard_normal((n_images, feature_dim)).astype(np.float32),
              "clip_index": b} for b in range(micro_batch)]
    return collate(items, pad_id=-1)  # no padding: every clip has seq_len tokens


def bench_training(model_dir: Path, cfg, device, dtype, use_scaler, steps: int, seq_len: int) -> dict:
    tokenizer = load_tokenizer(model_dir)
    torch.manual_seed(0)
    backbone = vlm_text_backbone(load_vlm(model_dir))
    model = assemble(backbone, tokenizer, cfg).to(device).train()
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    specials = {tokenizer.convert_tokens_to_ids(t) for t in ("<image>", "[USER]", "[DST]", "[ASST]")}
    batch = to_device(synthetic_batch(seq_len, cfg.train.micro_batch, backbone.config.vocab_size, image_id,
                                            specials, cfg.data.feature_dim), device)
    optimizer = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-5, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def one_step():
        train.forward_backward(model, [batch], cfg, autocast, scaler)
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        one_step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        one_step()
    synchronize(device)
    seconds = time.perf_counter() - start
    tokens = steps * cfg.train.micro_batch * seq_len
    peak = peak_flops(device, dtype)
    tokens_per_s = tokens / seconds
    return {
        "seq_len": seq_len, "micro_batch": cfg.train.micro_batch, "steps": steps,
        "frames_per_clip": int((batch["input_ids"][0] == image_id).sum()),
        "trainable": cfg.model.trainable, "lora_rank": cfg.model.lora_rank,
        "activation_checkpointing": cfg.train.activation_checkpointing,
        "seconds_per_step": seconds / steps, "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * flops_per_token(model, seq_len) / peak if peak else None,
        "peak_memory_gb": peak_memory_gb(device),
        "text_parameters": sum(p.numel() for p in backbone.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default=None, choices=tuple(SHAPES), help="default: 256m on a GPU, tiny on CPU")
    parser.add_argument("--precision", default="auto", help="auto | fp32 | fp16 | bf16")
    parser.add_argument("--frames", type=int, default=None, help="frames to extract (default 512 GPU, 64 CPU)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="JPEG decoding worker processes (default: 4, or fewer on a machine with fewer cores)")
    parser.add_argument("--seq-len", type=int, default=None, help="training clip length (default 4096 GPU, 512 CPU)")
    parser.add_argument("--micro-batch", type=int, default=1, help="clips per training step")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps (after 2 warm-up steps)")
    parser.add_argument("--checkpointing", choices=("on", "off"), default="on")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parse_args(parser)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    shape_name = args.shape or ("256m" if gpu else "tiny")
    shape = SHAPES[shape_name]
    dtype, use_scaler, reason = choose_precision(args.precision, device.type, device_capability(device))
    feature_dim = shape["text"]["hidden_size"]
    cfg = load_config(None, [
        "model.trainable=lora", "model.lora_rank=128", "model.lora_alpha=256", f"data.feature_dim={feature_dim}",
        f"train.micro_batch={args.micro_batch}", "train.grad_accum=1",
        f"train.activation_checkpointing={str(args.checkpointing == 'on').lower()}",
        f"model.frozen_dtype={'fp32' if dtype == torch.float32 else {torch.float16: 'fp16', torch.bfloat16: 'bf16'}[dtype]}",
    ])
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(Path(tmp) / "vlm", shape)
        frames_path = Path(tmp) / "frames.arrow"
        cells = write_raw_frames(frames_path, args.frames or (512 if gpu else 64), shape["source_px"])
        extraction = bench_extraction(model_dir, frames_path, cells, cfg, device, dtype, args.workers)
        extraction["source_px"] = shape["source_px"]
        training = bench_training(model_dir, cfg, device, dtype, use_scaler, args.steps, args.seq_len or (4096 if gpu else 512))
    emit({"benchmark": "smolvlm", **device_facts(device), "shape": shape_name, "precision": str(dtype),
          "precision_reason": reason, "extraction": extraction, "training": training}, args.out)


if __name__ == "__main__":
    run(main)
