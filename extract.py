"""Feature extraction: a VLM's frozen vision tower run once over every raw frame the config's clips need.

    python data.py extract-features configs/smolvlm2.yaml --out features/smolvlm2-500m     # the command line
    summary = extract_features(cfg, "features/smolvlm2-500m")

It writes one `{out}/{dataset}/{video_uid}.arrow` per video in the per-video feature layout (`cls`, `2x2`, `3x3`,
float16; frames.write_feature_file), computed exactly as training with `data.frames: raw` computes them
(backbones.FrameEncoder, the run's precision and frozen dtype), so both paths feed the projector the same
numbers. Resumable: a video whose file is complete is skipped. docs/real_models.md#smolvlm2 has the commands.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from backbones import frame_encoder_from_vlm, load_vlm
from clips import DataError, load_split
from config import ConfigError
from frames import (
    FrameChunks, FramePreprocessing, FrameStore, is_complete_feature_file, require_pillow, write_feature_file,
)
from logs import Progress
from model import cast_frozen, choose_precision, device_capability, frozen_storage_dtype


def extract_features(cfg, out_dir, frames_path: str = "", device: str | None = None, num_workers: int = 2,
                     progress: bool = True) -> dict:
    """Run the VLM's frozen vision tower over every frame any clip of the config's splits needs, and write one
    `{out_dir}/{dataset}/{video_uid}.arrow` per video (see write_feature_file). Resumable: a video whose file is
    complete is skipped. Frames are read from each clip's `frames_file` (or the `frames_path` template, with the
    fields of data.features_path). Returns a summary with the data.features_path to train with."""
    require_pillow()
    out_dir = Path(out_dir)
    read_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, features_path=frames_path))
    videos: dict[tuple[str, str], list] = {}  # (dataset, video_uid) -> [frames file, frames needed]
    errors = []
    for split in ("train", "val", "test"):
        if not getattr(cfg.data, split):  # a split left empty in the config (a missing file is an error below)
            continue
        clips, problems = load_split(read_cfg, split)
        errors += [str(p) for p in problems if p.level == "ERROR"]
        for clip in clips:
            entry = videos.setdefault((clip.dataset, clip.video_uid), [clip.frames_path, 0])
            if entry[0] != clip.frames_path:
                errors.append(f"{clip.file}:clip {clip.index} ({clip.video_uid}): frames file {clip.frames_path} differs "
                              f"from {entry[0]} of another clip of the same video")
            entry[1] = max(entry[1], clip.end)
    if errors:
        raise DataError(f"{len(errors)} problem(s) in the clips; fix them first (python data.py validate):\n" + "\n".join(errors[:20]))
    if not videos:
        raise ConfigError("no clips found in the config's train/val/test split files")

    source = cfg.model.vision_path or cfg.model.path
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = choose_precision(cfg.train.precision, torch_device.type, device_capability(torch_device))
    encoder = frame_encoder_from_vlm(load_vlm(source, cfg.model.attn_implementation), source,
                                     cfg.data.num_tokens_per_frame, cfg.model.vision_batch_frames)
    if precision.dtype != torch.float32:
        # Stored as in training (model.frozen_dtype), so both paths compute the same numbers.
        cast_frozen(encoder, frozen_storage_dtype(cfg, torch_device))
    encoder.to(torch_device)
    preprocessing = FramePreprocessing.from_model_dir(source)
    autocast = precision.autocast(torch_device.type)
    if progress:
        print(f"vision tower of {source} on {torch_device}, {precision.name} ({precision.reason}); {len(videos)} videos -> {out_dir}")

    todo, skipped = [], 0
    for (dataset, uid), (path, end) in sorted(videos.items()):
        out = out_dir / dataset / f"{uid}.arrow"
        if is_complete_feature_file(out, end, encoder.output_dim):
            skipped += 1
            continue
        table = FrameStore(1, encoder.output_dim).table(path)
        if "frame" not in table.column_names:
            raise DataError(f"{path} (video {uid}): no 'frame' column (raw base64 JPEG frames); columns {table.column_names}")
        rows = table.num_rows
        if rows < end:
            raise DataError(f"{path} (video {uid}): a clip needs frame {end - 1} but the file has {rows} rows")
        todo.append((uid, path, end, out))
    total = sum(end for _, _, end, _ in todo)
    start = time.perf_counter()
    bar = Progress(total, "extract", "frame", enabled=progress)
    for uid, path, end, out in todo:
        chunks = FrameChunks(path, end, encoder.batch_frames, preprocessing, uid)
        loader = DataLoader(chunks, batch_size=None, num_workers=num_workers,
                            pin_memory=torch_device.type == "cuda")
        pooled = []
        for pixels in loader:  # (n, S, S, 3) uint8
            with autocast:
                pooled.append(encoder.pooled(pixels.to(torch_device, non_blocking=True)).to(torch.float16).cpu())
            bar.update(len(pixels))
        write_feature_file(out, torch.cat(pooled).numpy())
    bar.close()
    seconds = time.perf_counter() - start
    return {
        "out_dir": str(out_dir), "videos": len(videos), "extracted": len(todo), "skipped": skipped, "frames": total,
        "seconds": seconds, "frames_per_second": total / seconds if seconds > 0 and total else None,
        "feature_dim": encoder.output_dim,
        "features_path": str(out_dir / "{dataset}" / "{video_uid}.arrow"),
    }
