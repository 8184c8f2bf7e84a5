"""Checkpoints: atomic write, rotation, resume, and rebuilding a model from a checkpoint directory alone.

A checkpoint `runs/<name>/step_<N>/` holds

    model.safetensors     the tensors needed to rebuild the model (trainable ones; all of them when the
                          backbone itself was trained or randomly initialised)
    optimizer.pt          AdamW state (tensors and plain numbers only: loaded with weights_only=True)
      or, for train.parallel=fsdp (sharded, docs/training.md#sharded-training-fsdp):
    dcp/                  a Distributed Checkpoint of the same model tensors and the AdamW states, one file per
                          rank that wrote it; it loads on any number of ranks, or whole in one process
    optimizer_groups.json AdamW's hyperparameters per parameter group
    trainer_state.json    step, epoch, sampler cursor, tokens/frames seen, GradScaler state, best val loss
    rng_rank<R>.safetensors + rng_rank<R>.json   each rank's torch/CUDA and python/numpy RNG states
    config.yaml           the resolved config
    backbone/config.json  the backbone's architecture, so a fully trained model needs no base directory
    tokenizer files       the tokenizer with the project's special tokens

Everything is written into `.tmp_step_<N>` (by rank 0, or by every rank its shards), fsynced, then renamed to
`step_<N>` by rank 0: a crash leaves either the old set of checkpoints or the new one, never a half-written step.
Loading never unpickles arbitrary objects (DCP's metadata is read with a restricted unpickler).
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import sys
import warnings
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import yaml
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
)

from config import Config, ConfigError, apply_override, from_dict, to_yaml
from logs import no_transformers_progress_bars
from model import build_model, checkpoint_names, load_model_state
from sequence import load_tokenizer
from sharding import is_sharded

@dataclass
class TrainState:
    """The loop's position and counters; trainer_state.json holds them (with the batch plan and scaler)."""
    step: int = 0  # optimizer steps done
    epoch: int = 0
    cursor: int = 0  # optimizer steps of `epoch` done (the sampler's position)
    tokens_seen: int = 0
    frames_seen: int = 0
    best_value: Optional[float] = None  # the best train.best_metric so far
    best_step: Optional[int] = None  # the step it was validated at (runs/<name>/best names its checkpoint)
    stale_evals: int = 0  # validations since then without a better value (train.early_stop_patience)

    def record_validation(self, value: float, lower_is_better: bool) -> bool:
        """Count a validation's train.best_metric at this step; returns whether it is the best so far."""
        improved = self.best_value is None or (value < self.best_value if lower_is_better else value > self.best_value)
        if improved:
            self.best_value, self.best_step, self.stale_evals = value, self.step, 0
        else:
            self.stale_evals += 1
        return improved
    skipped_steps: int = 0  # non-finite steps skipped
    max_steps: int = 0  # train.max_steps the run had when saved (a change rescales the learning-rate schedule)


STEP_DIR = re.compile(r"^step_(\d+)$")
REQUIRED_FILES = ("trainer_state.json", "config.yaml")  # besides the tensors of either layout (missing_files)


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
    """The files a complete checkpoint has that `ckpt` lacks: the DDP layout (model.safetensors, optimizer.pt)
    or, where a dcp/ directory is, the sharded one (its .metadata)."""
    tensors = (f"{SHARDED_DIR}/.metadata",) if (ckpt / SHARDED_DIR).is_dir() else ("model.safetensors", "optimizer.pt")
    return [f for f in (*tensors, *REQUIRED_FILES) if not (ckpt / f).is_file()]


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


def agreed_resume(cfg: Config, world_size: int) -> Optional[Path]:
    """find_resume on every rank, checked to be the same checkpoint everywhere. Each rank looks in run.dir on its
    own: on nodes that do not share a file system they could resume from different steps (or one start fresh)
    and train on without any error. A lookup that fails on one rank fails on all of them, with its message."""
    found, error = None, None
    try:
        found = find_resume(cfg)
    except ConfigError as err:
        error = str(err)
    if world_size == 1:
        if error is not None:
            raise ConfigError(error)
        return found
    answers: list = [None] * world_size
    dist.all_gather_object(answers, (error, None if found is None else str(found.resolve())))
    failed = [(rank, message) for rank, (message, _) in enumerate(answers) if message is not None]
    if failed:
        raise ConfigError(f"rank {failed[0][0]}: {failed[0][1]}")
    paths = [path for _, path in answers]
    if len(set(paths)) > 1:
        seen = ", ".join(f"rank {rank}: {path or 'no checkpoint'}" for rank, path in enumerate(paths))
        raise ConfigError(
            f"the ranks found different checkpoints to resume from in run.dir={cfg.run.dir} ({seen}). Every node "
            f"must see the same run directory: put run.dir on a file system all nodes share, or pass "
            f"train.resume=PATH with a checkpoint every node can read")
    return found


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


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for p in sorted([d for d in path.rglob("*") if d.is_dir()] + [path]):
        fsync_dir(p)


@dataclass
class CheckpointMeta:
    """What a checkpoint holds beside the model and optimizer tensors (written by rank 0)."""
    trainer_state: dict  # TrainState fields, the batch plan, the GradScaler state
    tokenizer: Any
    backbone_config: Any
    rng_states: list  # one (tensors, plain) pair per rank, as rng_state() returns


def write_meta(tmp: Path, cfg: Config, meta: CheckpointMeta) -> None:
    """RNG states, config, tokenizer, backbone config, and trainer_state.json last: its presence inside step_<N>
    is what a complete checkpoint looks like."""
    for rank, (tensors, plain) in enumerate(meta.rng_states):
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / f"rng_rank{rank}.safetensors"))
        (tmp / f"rng_rank{rank}.json").write_text(json.dumps(plain))
    (tmp / "config.yaml").write_text(to_yaml(cfg))
    meta.tokenizer.save_pretrained(str(tmp))
    meta.backbone_config.save_pretrained(str(tmp / "backbone"))
    (tmp / "trainer_state.json").write_text(json.dumps(meta.trainer_state, indent=2))


def fresh_tmp(run_dir: Path, step: int) -> Path:
    """.tmp_step_<step>, empty: one left by a crash during an earlier save of this step is removed first."""
    tmp = run_dir / f".tmp_step_{step}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, keep_last: int) -> Path:
    """fsync the finished .tmp_step_<N>, rename it to step_<N>, keep the newest `keep_last`; returns step_<N>."""
    final = tmp.parent / tmp.name.removeprefix(".tmp_")
    fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)  # re-saving the same step (e.g. the final save right after a periodic one)
    os.replace(tmp, final)
    fsync_dir(tmp.parent)
    rotate(tmp.parent, keep_last)
    return final


def save_checkpoint(run_dir: str | Path, step: int, model_tensors: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, cfg: Config, meta: CheckpointMeta, keep_last: int) -> Path:
    """Write step_<step> atomically (rank 0 only, whole tensors), then keep the newest `keep_last`. Returns its path."""
    tmp = fresh_tmp(Path(run_dir), step)
    save_file({k: v.detach().contiguous().cpu() for k, v in model_tensors.items()}, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    write_meta(tmp, cfg, meta)
    return publish(tmp, keep_last)


def rotate(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints; the newest is never deleted, nor the one `best` names.
    Returns the deleted."""
    if keep_last < 1:
        raise ValueError("keep_last must be >= 1")
    best = best_checkpoint(run_dir)
    doomed = [path for path in list_checkpoints(run_dir)[:-keep_last] if path != best]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


BEST_LINK = "best"  # runs/<name>/best: a relative link to the step_<N> with the best train.best_metric


def best_checkpoint(run_dir: str | Path) -> Optional[Path]:
    """The checkpoint `run_dir/best` names, or None."""
    link = Path(run_dir) / BEST_LINK
    return Path(run_dir) / os.readlink(link) if link.is_symlink() else None


def mark_best(ckpt: Path) -> Path:
    """Point `best` beside `ckpt` at it, atomically (a new link renamed over the old one); returns the link.
    Rotation keeps the checkpoint it names; `evaluate.py --ckpt runs/<name>/best` evaluates it."""
    link, tmp = ckpt.parent / BEST_LINK, ckpt.parent / f".{BEST_LINK}.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(ckpt.name)
    os.replace(tmp, link)
    fsync_dir(ckpt.parent)
    return link


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


# ----------------------------------------------------------------------------------------------------------
# Sharded checkpoints (train.parallel=fsdp): Distributed Checkpoint, every rank writes its shards; any number of
# ranks (or one process without a process group) reads them

SHARDED_DIR = "dcp"  # inside step_<N>: the DCP files, `.metadata` plus one `__<rank>_0.distcp` per rank
OPTIMIZER_GROUPS = "optimizer_groups.json"  # inside step_<N>: AdamW's hyperparameters and each group's names
SINGLE_PROCESS_WARNING = "torch.distributed is disabled, unavailable or uninitialized"
# What a DCP `.metadata` file may name when it is unpickled (see read_metadata), besides the classes defined in
# DCP's metadata module and torch's dtypes. Anything else in the file is refused instead of being called.
METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("collections", "OrderedDict"),
}
METADATA_MODULE = "torch.distributed.checkpoint.metadata"


def collective(model: nn.Module) -> bool:
    """Whether checkpoint reads and writes of `model` are collectives over the process group: for a sharded
    model they are; an unsharded one is saved and loaded by its one process (no process group, or one rank)."""
    if is_sharded(model):
        return True
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError(f"a sharded checkpoint of an unsharded model on {dist.get_world_size()} ranks: every rank "
                           f"would write the whole model; shard it first (shard_model)")
    return False


def _rank(model: nn.Module) -> int:
    return dist.get_rank() if collective(model) else 0


def _barrier(model: nn.Module) -> None:
    if collective(model):
        dist.barrier()


def model_tensors(model: nn.Module, cfg: Config) -> dict[str, torch.Tensor]:
    """The model tensors a checkpoint holds (checkpoint_names: trainable ones, or the whole backbone for full or
    scratch runs; tied aliases once), as this rank's shards (DTensors) under FSDP or whole tensors without."""
    state = get_model_state_dict(model)
    return {name: state[name] for name in checkpoint_names(model, cfg)}


def optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, list[dict]]:
    """(per-parameter AdamW state tensors keyed by parameter name, the param groups). States that do not exist
    yet are created first (DCP loads into existing tensors): a zero-gradient step at lr 0 changes no weight."""
    full = get_optimizer_state_dict(model, optimizer)
    return full["state"], full["param_groups"]


def save_sharded(ckpt_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Config) -> None:
    """Collective: every rank writes its shards of the model tensors and AdamW states into ckpt_dir/dcp, and
    rank 0 writes the optimizer's hyperparameters to optimizer_groups.json. Only tensors go into DCP, so that
    loading never unpickles a stored object (DCP would torch.load non-tensor entries without weights_only)."""
    states, groups = optimizer_tensors(model, optimizer)
    with warnings.catch_warnings():  # one process without a process group saves alone, as intended
        warnings.filterwarnings("ignore", message=SINGLE_PROCESS_WARNING)
        dcp.save({"model": model_tensors(model, cfg), "optim": states}, checkpoint_id=str(ckpt_dir / SHARDED_DIR),
                 no_dist=not collective(model))
    if _rank(model) == 0:
        (ckpt_dir / OPTIMIZER_GROUPS).write_text(json.dumps(groups, indent=1))


def check_all_shards_written(tmp: Path) -> None:
    """Rank 0 renames the directory, so every rank's shard file must be in it: not so when run.dir is local to
    each node of a multi-node run."""
    storage = read_metadata(tmp / SHARDED_DIR).storage_data.values()
    missing = sorted({info.relative_path for info in storage if not (tmp / SHARDED_DIR / info.relative_path).is_file()})
    if missing:
        raise CheckpointError(
            f"{tmp / SHARDED_DIR}: shard files {missing} written by other ranks are not visible to rank 0; with "
            f"several nodes run.dir must be on a filesystem every node shares"
        )


def save_sharded_checkpoint(run_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                            cfg: Config, meta: CheckpointMeta, keep_last: int) -> Path:
    """Collective: write step_<step> atomically (every rank its shards into .tmp_step_<step>, then rank 0 the
    rest, fsync, rename), keep the newest `keep_last`, and return the path once every rank may go on.

    A stop at any moment leaves either the previous checkpoints or the new one: list_checkpoints ignores
    the .tmp_ directory and discard_unfinished_saves deletes it at the next start. `meta` is read on rank 0
    only."""
    tmp = Path(run_dir) / f".tmp_step_{step}"
    if _rank(model) == 0:
        fresh_tmp(Path(run_dir), step)
    _barrier(model)  # no rank writes before a stale directory is gone
    save_sharded(tmp, model, optimizer, cfg)  # DCP ends with a collective: every shard is written after it
    if _rank(model) == 0:
        check_all_shards_written(tmp)
        write_meta(tmp, cfg, meta)
        publish(tmp, keep_last)
    _barrier(model)
    return Path(run_dir) / f"step_{step}"


def is_sharded_checkpoint(ckpt: str | Path) -> bool:
    return (Path(ckpt) / SHARDED_DIR / ".metadata").is_file()


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        found = getattr(sys.modules.get(module), name, None)
        allowed = ((module, name) in METADATA_GLOBALS
                   or (module == METADATA_MODULE and isinstance(found, type) and found.__module__ == module)
                   or (module == "torch" and isinstance(found, torch.dtype)))
        if not allowed:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which is not part of DCP metadata")
        return super().find_class(module, name)


def read_metadata(sharded_dir: Path) -> Metadata:
    """A DCP directory's `.metadata` (a pickle), unpickled with only DCP's metadata classes and torch's types
    allowed: reading a checkpoint runs no code from it."""
    path = Path(sharded_dir) / ".metadata"
    if not path.is_file():
        raise CheckpointError(f"{sharded_dir}: no .metadata (not a complete Distributed Checkpoint directory)")
    with open(path, "rb") as f:
        try:
            metadata = _MetadataUnpickler(f).load()
        except pickle.UnpicklingError as err:
            raise CheckpointError(f"{path}: {err}") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: not DCP metadata ({type(metadata).__name__})")
    return metadata


class _SafeReader(FileSystemReader):
    """FileSystemReader whose metadata is read with read_metadata's restricted unpickler."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = read_metadata(Path(self.path))
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _require_tensors(metadata: Metadata, keys: Sequence[str], where: Path) -> None:
    """Every requested key must be a stored tensor: DCP would torch.load a stored object without weights_only."""
    entries = metadata.state_dict_metadata
    missing = [k for k in keys if k not in entries]
    objects = [k for k in keys if k in entries and not isinstance(entries[k], TensorStorageMetadata)]
    if missing or objects:
        raise CheckpointError(f"{where}: missing tensors {missing[:10]}; stored as objects, not tensors {objects[:10]}")


def saved_model_names(ckpt: Path) -> list[str]:
    metadata = read_metadata(ckpt / SHARDED_DIR)
    return [key.removeprefix("model.") for key in metadata.state_dict_metadata if key.startswith("model.")]


def read_sharded_tensors(ckpt: str | Path, prefix: str) -> dict[str, torch.Tensor]:
    """Whole CPU tensors of a DCP checkpoint whose flattened names start with `prefix` ("model." for the model
    tensors, "optim." for the AdamW states), names without the prefix. Runs in one process, with or without a
    process group (no collective)."""
    ckpt = Path(ckpt)
    metadata = read_metadata(ckpt / SHARDED_DIR)
    state = {key: torch.empty(item.size, dtype=item.properties.dtype)
             for key, item in metadata.state_dict_metadata.items()
             if key.startswith(prefix) and isinstance(item, TensorStorageMetadata)}
    with warnings.catch_warnings():  # DCP warns that it loads in one process, which is the point here
        warnings.filterwarnings("ignore", message=SINGLE_PROCESS_WARNING)
        dcp.load(state, storage_reader=_SafeReader(str(ckpt / SHARDED_DIR)), no_dist=True)
    return {key.removeprefix(prefix): tensor for key, tensor in state.items()}


def read_sharded_model_tensors(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """The model tensors of a DCP checkpoint, whole, as model.safetensors would hold them."""
    return read_sharded_tensors(ckpt, "model.")


def check_model_names(ckpt: Path, model: nn.Module, cfg: Config) -> None:
    """The same strictness as model.load_model_state: the checkpoint holds exactly the expected tensors."""
    expected, saved = set(checkpoint_names(model, cfg)), set(saved_model_names(ckpt))
    if expected != saved:
        missing, unexpected = sorted(expected - saved), sorted(saved - expected)
        raise CheckpointError(
            f"{ckpt}: checkpoint tensors do not match a model.trainable={cfg.model.trainable}, model.init="
            f"{cfg.model.init} model: missing {len(missing)} {missing[:10]}; unexpected {len(unexpected)} "
            f"{unexpected[:10]}. Was it saved with another model.trainable, model.lora_targets or backbone?"
        )


def saved_groups(ckpt: Path, groups: list[dict]) -> list[dict]:
    """The checkpoint's AdamW param groups, which must name the same parameters as this optimizer's `groups`."""
    saved = json.loads((ckpt / OPTIMIZER_GROUPS).read_text())
    if [g["params"] for g in saved] != [g["params"] for g in groups]:
        raise CheckpointError(f"{ckpt}/{OPTIMIZER_GROUPS}: saved for other trainable parameters or weight-decay "
                              f"groups than this model's; resume with the run's model.trainable and model settings")
    for group in saved:
        group["betas"] = tuple(group["betas"])  # JSON made AdamW's tuple a list
    return saved


def load_sharded(ckpt: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Config) -> None:
    """Collective under FSDP: restore the model tensors and the AdamW state of a DCP checkpoint saved on any
    number of ranks, into `model` sharded on any number of ranks, or unsharded in one process without a process
    group. Refuses missing or unexpected tensors, other new-token ids and other trainable parameters."""
    ckpt = Path(ckpt)
    if not is_sharded_checkpoint(ckpt) and (ckpt / "model.safetensors").is_file():
        raise CheckpointError(f"{ckpt} was saved under train.parallel=ddp (model.safetensors, no {SHARDED_DIR}/): resume "
                              f"it with train.parallel=ddp, or start a new run (another run.name) with fsdp")
    check_model_names(ckpt, model, cfg)
    states, groups = optimizer_tensors(model, optimizer)
    state = {"model": model_tensors(model, cfg), "optim": states}
    reader = _SafeReader(str(ckpt / SHARDED_DIR))
    keys = [f"model.{n}" for n in state["model"]] + [f"optim.{n}.{k}" for n, entry in states.items() for k in entry]
    _require_tensors(reader.read_metadata(), keys, ckpt)
    groups = saved_groups(ckpt, groups)
    with warnings.catch_warnings():  # one process without a process group loads alone, as intended
        warnings.filterwarnings("ignore", message=SINGLE_PROCESS_WARNING)
        dcp.load(state, storage_reader=reader, no_dist=not collective(model))  # in place, this rank's slices
    saved_ids, own_ids = state["model"]["new_token_ids"], model.new_token_ids
    if not torch.equal(saved_ids.cpu(), own_ids.cpu()):
        raise CheckpointError(f"{ckpt}: new-token ids {saved_ids.tolist()} differ from this tokenizer's "
                              f"{own_ids.tolist()}: load the tokenizer saved with the checkpoint")
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, optimizer, {"state": state["optim"], "param_groups": groups})


def load_training_state(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scaler, cfg: Config) -> TrainState:
    """Resume: the model's weights, the AdamW state, the GradScaler state, and the loop state of a checkpoint.
    Under train.parallel=fsdp from its Distributed Checkpoint (any number of ranks); otherwise from
    model.safetensors and optimizer.pt. A checkpoint of the other layout is refused with the fix."""
    if cfg.train.parallel == "fsdp":
        load_sharded(ckpt, model, optimizer, cfg)
    elif is_sharded_checkpoint(ckpt):
        raise CheckpointError(f"{ckpt} was saved under train.parallel=fsdp (dcp/): resume it with "
                              f"train.parallel=fsdp, on any number of ranks")
    else:
        load_model_state(model, load_model_tensors(ckpt), cfg)
        load_optimizer_state(ckpt, optimizer, next(model.parameters()).device)
    saved = read_trainer_state(ckpt)
    if saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
    known = {f.name for f in dataclasses.fields(TrainState)}
    return TrainState(**{k: v for k, v in saved.items() if k in known})


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
        model = build_model(cfg, tokenizer, torch.device(device))
    sharded = is_sharded_checkpoint(ckpt)
    try:
        load_model_state(model, read_sharded_model_tensors(ckpt) if sharded else load_model_tensors(ckpt), cfg)
    except (KeyError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{ckpt}/{SHARDED_DIR if sharded else 'model.safetensors'}: {err}") from None
    # A fresh copy: the one above had model.path pointed at the saved backbone to build it.
    return model.to(device).eval(), tokenizer, read_config(ckpt, overrides)
