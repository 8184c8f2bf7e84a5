"""Experiment trackers fed the records of metrics.jsonl: Weights & Biases (offline unless asked) and TensorBoard.

    trackers = Trackers(run_dir, TrackerOptions(wandb_project="proassist", tensorboard=True), config=cfg_dict,
                        enabled=rank == 0)
    print(trackers.describe())          # start-up line: where each tracker writes, and how to sync W&B
    trackers.log(record)                # every dict written to metrics.jsonl; record["step"] is the step
    trackers.finish(exit_code)          # on every exit path; a second call does nothing

Both receive the same scalars: a record's numbers as `<kind>/<key>` (`train/loss`, `val/asst_ce`) and the
numbers of a nested dict as `<kind>/<name>_<key>` (`val/speak_f1`, `val/dst_auroc`); strings, None and the
step itself are skipped. The optimizer step is the x axis of both.

W&B: `mode="offline"` (the default) writes `<run_dir>/wandb/offline-run-<time>-<id>/` and sends nothing
anywhere (WANDB_MODE is forced to offline for this process, and W&B's error reporting is off); upload it later
with `wandb sync <run_dir>/wandb/offline-run-*`. `mode="online"` streams to the W&B server and needs a login.
The run id is stored in `<run_dir>/wandb_run_id` when the run first starts, so a resumed run continues the same
W&B run (`resume="allow"`). The run config is the resolved config.

wandb and tensorboard are optional (requirements-track.txt) and imported only when asked for.
"""
from __future__ import annotations

import importlib.util
import os
import secrets
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from distributed import EXIT_INTERRUPTED

TRACK_REQUIREMENTS = "requirements-track.txt"
WANDB_ID_FILE = "wandb_run_id"
WANDB_MODES = ("offline", "online")


@dataclass
class TrackerOptions:
    wandb_project: str = ""  # empty: no W&B
    wandb_mode: str = "offline"  # offline | online
    wandb_run_name: str = ""  # empty: the run directory's name
    tensorboard: bool = False
    system_stats: bool = True  # W&B samples CPU/GPU/memory use in its service process


def missing_package(package: str, setting: str) -> ModuleNotFoundError:
    return ModuleNotFoundError(
        f"{setting} needs the {package} package, which is not installed: pip install -r {TRACK_REQUIREMENTS}"
    )


def check_installed(options: TrackerOptions) -> None:
    """Refuse, before a run starts, a tracker whose package is missing (the error names the requirements file)."""
    if options.wandb_project and importlib.util.find_spec("wandb") is None:
        raise missing_package("wandb", f"train.wandb_project={options.wandb_project}")
    if options.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise missing_package("tensorboard", "train.tensorboard=true")


def scalars(record: dict) -> dict[str, float]:
    """The numbers of a metrics.jsonl record under tracker names: `<kind>/<key>`, nested `<kind>/<name>_<key>`."""
    kind = record["kind"]
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in ("kind", "step"):
            continue
        if isinstance(value, dict):
            for inner, inner_value in value.items():
                if _is_number(inner_value):
                    out[f"{kind}/{key}_{inner}"] = float(inner_value)
        elif _is_number(value):
            out[f"{kind}/{key}"] = float(value)
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def new_run_id() -> str:
    """8 characters of [a-z0-9], the shape of W&B's own run ids."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def stored_run_id(run_dir: Path) -> str:
    """The W&B run id of this run directory, created and stored on first use."""
    path = run_dir / WANDB_ID_FILE
    if path.is_file():
        run_id = path.read_text().strip()
        if not run_id or not all(c.isalnum() or c in "-_" for c in run_id):
            raise ValueError(f"{path} holds {run_id!r}, not a W&B run id; delete the file to start a new W&B run")
        return run_id
    run_id = new_run_id()
    run_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    partial.write_text(run_id + "\n")
    partial.replace(path)  # atomic: a stop while writing leaves no half-written id
    return run_id


def start_wandb(run_dir: Path, options: TrackerOptions, config: dict):
    """A W&B run for `run_dir` (offline unless options.wandb_mode is online), resumed when it exists."""
    if options.wandb_mode not in WANDB_MODES:
        raise ValueError(f"train.wandb_mode must be one of {', '.join(WANDB_MODES)}, got {options.wandb_mode!r}")
    if options.wandb_mode == "offline":
        # Offline means offline whatever the environment says: a WANDB_MODE=online left in a shell must not
        # send anything, and neither may W&B's crash reports.
        os.environ["WANDB_MODE"] = "offline"
        os.environ["WANDB_ERROR_REPORTING"] = "false"
    try:
        import wandb
    except ModuleNotFoundError as err:
        raise missing_package("wandb", f"train.wandb_project={options.wandb_project}") from err
    settings = wandb.Settings(
        console="off",  # the console lines are in the job's log already; every number is logged as a metric
        x_disable_stats=not options.system_stats,
        save_code=False,
    )
    return wandb.init(
        project=options.wandb_project, name=options.wandb_run_name or run_dir.resolve().name,
        mode=options.wandb_mode, dir=str(run_dir), config=config, id=stored_run_id(run_dir), resume="allow",
        settings=settings,
    )


def start_tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ModuleNotFoundError as err:
        raise missing_package("tensorboard", "train.tensorboard=true") from err
    return SummaryWriter(str(run_dir / "tb"))


class Trackers:
    """W&B and/or TensorBoard for one run directory; everything is a no-op when `enabled` is False (ranks > 0)
    or no tracker is asked for."""

    def __init__(self, run_dir: str | Path, options: TrackerOptions, config: dict, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.options = options
        self.wandb_run = None
        self.tensorboard = None
        self.finished = False
        if not enabled:
            return
        if options.tensorboard:
            self.tensorboard = start_tensorboard(self.run_dir)
        if options.wandb_project:
            try:
                self.wandb_run = start_wandb(self.run_dir, options, config)
            except BaseException:
                self.finish(1)
                raise

    def describe(self) -> Optional[str]:
        """The start-up line, or None without trackers."""
        parts = []
        if self.wandb_run is not None:
            where = self.run_dir / "wandb"
            if self.options.wandb_mode == "offline":
                parts.append(f"W&B offline run {self.wandb_run.id} in {where} (upload later: wandb sync "
                             f"{where}/offline-run-*)")
            else:
                parts.append(f"W&B run {self.wandb_run.id} online, project {self.options.wandb_project}")
        if self.tensorboard is not None:
            parts.append(f"TensorBoard in {self.run_dir / 'tb'}")
        return "trackers: " + "; ".join(parts) if parts else None

    def log(self, record: dict) -> None:
        if self.finished or (self.wandb_run is None and self.tensorboard is None):
            return
        values = scalars(record)
        if not values:
            return
        step = int(record["step"])
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)
        if self.tensorboard is not None:
            for name, value in values.items():
                self.tensorboard.add_scalar(name, value, step)

    def finish(self, exit_code: int = 0) -> None:
        """Flush and close every tracker. exit_code: 0 done, EXIT_INTERRUPTED (75) stopped by a signal after a
        checkpoint (W&B marks the run preempted: it will resume), anything else failed."""
        if self.finished:
            return
        self.finished = True
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            import wandb

            if exit_code == EXIT_INTERRUPTED:
                self.wandb_run.mark_preempting()
            self.wandb_run.finish(exit_code=exit_code)
            # finish() returns before W&B's service process has written the run's last records (offline, half of
            # the runs read back at once lacked them); teardown waits for it. W&B's own teardown runs at exit,
            # which a torchrun worker skips (train.exit_process ends it with os._exit).
            wandb.teardown(exit_code=exit_code)

    def __enter__(self) -> "Trackers":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(0 if exc_type is None else 1)
