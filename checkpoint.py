"""Checkpoints: atomic write, rotation, resume, and rebuilding a model from a checkpoint directory alone.

A checkpoint `runs/<name>/step_<N>/` holds

    model.safetensors     the tensors needed to rebuild the model (trainable ones; all of them when the
                          backbone itself was trained or randomly initialised)
    optimizer.pt          AdamW state (tensors and plain numbers only: loaded with weights_only=True)
    trainer_state.json    step, epoch, sampler cursor, tokens/frames seen, GradScaler state, best val loss
    rng_rank<R>.safetensors + rng_rank<R>.json   each rank's torch/CUDA and python/numpy RNG states
    config.yaml           the resolved config
    backbone/config.json  the backbone's architecture, so a fully trained model needs no base directory
    tokenizer files       the tokenizer with the project's special tokens

Rank 0 writes everything into `.tmp_step_<N>`, fsyncs the files and the directory, then renames it to
`step_<N>`: a crash leaves either the old set of checkpoints or the new one, never a half-written step.
Loading never unpickles arbitrary objects.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from config import Config, ConfigError, apply_override, from_dict, to_yaml
from logs import no_transformers_progress_bars
from model import build_model, load_model_state
from sequence import load_tokenizer

@dataclass
class TrainState:
    """The loop's position and counters; trainer_state.json holds them (with the batch plan and scaler)."""
    step: int = 0  # optimizer steps done
    epoch: int = 0
    cursor: int = 0  # optimizer steps of `epoch` done (the sampler's position)
    tokens_seen: int = 0
    frames_seen: int = 0
    best_val_loss: Optional[float] = None
    skipped_steps: int = 0  # non-finite steps skipped
    max_steps: int = 0  # train.max_steps the run had when saved (a change rescales the learning-rate schedule)


STEP_DIR = re.compile(r"^step_(\d+)$")
REQUIRED_FILES = ("model.safetensors", "optimizer.pt", "trainer_state.json", "config.yaml")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the directory and what is wrong."""


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories are ignored)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def discard_unfinished_saves(run_dir: str | Path) -> list[Path]:
    """Delete the `.tmp_step_<N>` directories a run left when it stopped while writing a checkpoint (they
    never became checkpoints and nothing reads them). Returns what was deleted, for the start-up report."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    unfinished = sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith(".tmp_step_"))
    for path in unfinished:
        shutil.rmtree(path)
    return unfinished


def missing_files(ckpt: Path) -> list[str]:
    return [f for f in REQUIRED_FILES if not (ckpt / f).is_file()]


def checkpoints_hint(run_dir: Path, flag: str, instead: str) -> str:
    """What `run_dir` holds and what to pass instead, for the error about a checkpoint path that is wrong.
    `flag` is how the user passes a checkpoint ("--ckpt ", "train.resume="); `instead` is the advice when
    the run directory holds no complete checkpoint."""
    complete = [p for p in list_checkpoints(run_dir) if not missing_files(p)]
    if complete:
        names = ", ".join(p.name for p in complete)
        return f"{run_dir} has {names}; pass one of them, e.g. {flag}{complete[-1]}"
    if run_dir.is_dir():
        return f"{run_dir} holds no complete checkpoint (step_<N> directory); {instead}"
    return f"{run_dir} does not exist either; {instead}"


def require_checkpoint(path: str | Path, flag: str, instead: str) -> Path:
    """`path` if it is a complete checkpoint directory; otherwise a CheckpointError (one line) that says what
    is wrong and lists the complete checkpoints that do exist where the user was looking."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{flag}{path}: no such directory; {checkpoints_hint(path.parent, flag, instead)}")
    if not path.is_dir():
        raise CheckpointError(f"{flag}{path}: not a directory; {checkpoints_hint(path.parent, flag, instead)}")
    missing = missing_files(path)
    if not missing:
        return path
    if list_checkpoints(path):
        raise CheckpointError(f"{flag}{path} is a run directory, not a checkpoint; {checkpoints_hint(path, flag, instead)}")
    raise CheckpointError(f"{flag}{path}: incomplete checkpoint, missing {', '.join(missing)}; "
                          f"{checkpoints_hint(path.parent, flag, instead)}")


def find_resume(cfg: Config) -> Optional[Path]:
    if cfg.train.resume == "never":
        return None
    if cfg.train.resume == "auto":
        checkpoints = list_checkpoints(cfg.run.dir)
        return checkpoints[-1] if checkpoints else None
    return require_checkpoint(
        cfg.train.resume, "train.resume=",
        instead=f"pass train.resume=auto to resume from the newest checkpoint of run.dir={cfg.run.dir} "
                f"(or start there fresh), or the path of an existing step_<N> directory",
    )


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's RNG states as (tensors, JSON-able dict)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = np_state["state"]["key"].tolist()
    plain = {"python": [py_version, list(py_state), py_gauss], "numpy": np_state}
    return tensors, plain


def set_rng_state(tensors: dict[str, torch.Tensor], plain: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))
    np_state = plain["numpy"]
    np_state["state"]["key"] = np.asarray(np_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(np_state)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for p in sorted([d for d in path.rglob("*") if d.is_dir()] + [path]):
        _fsync_dir(p)


def save_checkpoint(
    run_dir: str | Path, step: int, model_tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
    trainer_state: dict, cfg: Config, tokenizer, backbone_config, rng_states: list[tuple[dict, dict]],
    keep_last: int,
) -> Path:
    """Write step_<step> atomically (rank 0 only), then keep the newest `keep_last`. Returns its path."""
    run_dir = Path(run_dir)
    final = run_dir / f"step_{step}"
    tmp = run_dir / f".tmp_step_{step}"
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a crash during an earlier save of this step
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model_tensors.items()}, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    for rank, (tensors, plain) in enumerate(rng_states):
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / f"rng_rank{rank}.safetensors"))
        (tmp / f"rng_rank{rank}.json").write_text(json.dumps(plain))
    (tmp / "config.yaml").write_text(to_yaml(cfg))
    tokenizer.save_pretrained(str(tmp))
    backbone_config.save_pretrained(str(tmp / "backbone"))
    # trainer_state.json last: its presence inside step_<N> is what a complete checkpoint looks like.
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)  # re-saving the same step (e.g. the final save right after a periodic one)
    os.replace(tmp, final)
    _fsync_dir(run_dir)
    rotate(run_dir, keep_last)
    return final


def rotate(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints; the newest is never deleted. Returns the deleted."""
    if keep_last < 1:
        raise ValueError("keep_last must be >= 1")
    checkpoints = list_checkpoints(run_dir)
    doomed = checkpoints[:-keep_last]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def check_complete(ckpt: Path) -> None:
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: not a directory")
    missing = missing_files(ckpt)
    if missing:
        raise CheckpointError(f"{ckpt}: incomplete checkpoint, missing {', '.join(missing)}")


def read_config(ckpt: str | Path, overrides: Sequence[str] = ()) -> Config:
    """The checkpoint's resolved config, then the `key=value` overrides (a bad override is a ConfigError)."""
    ckpt = Path(ckpt)
    path = ckpt / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{ckpt}: missing config.yaml (is this a step_<N> directory of a run?)")
    try:
        cfg = from_dict(yaml.safe_load(path.read_text()), str(path))
    except ConfigError as err:
        raise CheckpointError(f"{path}: {err}") from None
    for text in overrides:
        apply_override(cfg, text)
    return cfg


def read_trainer_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "trainer_state.json").read_text())


def load_optimizer_state(ckpt: Path, optimizer: torch.optim.Optimizer, device) -> None:
    state = torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True)
    optimizer.load_state_dict(state)


def load_rng_state(ckpt: Path, rank: int) -> None:
    tensors_path, plain_path = ckpt / f"rng_rank{rank}.safetensors", ckpt / f"rng_rank{rank}.json"
    if not tensors_path.is_file():
        raise CheckpointError(
            f"{ckpt}: no RNG state for rank {rank} (saved with fewer ranks); resume with the same world size"
        )
    set_rng_state(load_file(str(tensors_path)), json.loads(plain_path.read_text()))


def seed_rank(seed: int, rank: int, step: int, resume_from: Optional[Path]) -> None:
    """Resume puts this rank's RNG exactly where the interrupted run had it (dropout masks continue identically);
    a new run, or a rank the checkpoint has no state for, is seeded afresh, differently per rank."""
    if resume_from is not None and (resume_from / f"rng_rank{rank}.json").is_file():
        load_rng_state(resume_from, rank)
        return
    if resume_from is not None:
        warnings.warn(f"{resume_from} has no RNG state for rank {rank} (it was saved with fewer ranks): "
                      f"seeded afresh, so dropout masks differ from an uninterrupted run")
    torch.manual_seed(seed + 1000 * rank + step)


def load_model_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    path = ckpt / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{ckpt}: missing model.safetensors")
    return load_file(str(path))


def load_for_inference(ckpt: str | Path, device: str | torch.device = "cpu", overrides: Sequence[str] = ()):
    """(model in eval mode, tokenizer, cfg) from a checkpoint directory alone (plus, for lora/frozen runs of a
    pretrained backbone, the base model directory recorded in its config). Missing or unexpected weights fail.

    `overrides` (`key=value`) apply before the model is built, so `model.path=/new/place` finds a base
    model that moved since training."""
    ckpt = Path(ckpt)
    check_complete(ckpt)
    cfg = read_config(ckpt, overrides)
    tokenizer = load_tokenizer(ckpt)
    saves_backbone = cfg.model.trainable == "full" or cfg.model.init == "scratch"
    if saves_backbone:
        # The checkpoint holds every backbone weight: build the architecture from its own config.json.
        # A data.frames=raw run's frozen vision tower is not in it: it still comes from the original directory.
        cfg.model.vision_path = cfg.model.vision_path or cfg.model.path
        cfg.model.path = str(ckpt / "backbone")
        cfg.model.init = "scratch"
    elif not Path(cfg.model.path).is_dir():
        raise CheckpointError(
            f"{ckpt}: a {cfg.model.trainable} run needs its base model at model.path={cfg.model.path}, which is "
            f"missing; if it moved, pass its new place as an override, e.g. model.path=/new/place/of/the/base"
        )
    with no_transformers_progress_bars():
        model = build_model(cfg, tokenizer)
    try:
        load_model_state(model, load_model_tensors(ckpt), cfg)
    except (KeyError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{ckpt}/model.safetensors: {err}") from None
    # A fresh copy: the one above had model.path pointed at the saved backbone to build it.
    return model.to(device).eval(), tokenizer, read_config(ckpt, overrides)
