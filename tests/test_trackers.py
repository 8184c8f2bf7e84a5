"""trackers.py: the scalar names, a W&B offline run read back from its own files (config, history, summary,
exit code), train.py logging to one W&B run id across a SIGTERM stop and its resume, TensorBoard event files with the same names, the
missing-package errors. Nothing here reaches a network: HTTP(S) proxies and the W&B server address point at a
local listener that counts connections, and the offline tests assert it saw none.

Slow: the control showing that the listener does see W&B's traffic when a run is online."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import signal
import socket
import struct
import sys
import threading
from pathlib import Path

import pytest
import yaml

from config import load_config
from conftest import ROOT, run_train, start_train, tiny_overrides, wait_for_step
from distributed import EXIT_INTERRUPTED
from trackers import TrackerOptions, Trackers, scalars

has_wandb = importlib.util.find_spec("wandb") is not None
has_tensorboard = importlib.util.find_spec("tensorboard") is not None
needs_wandb = pytest.mark.skipif(not has_wandb, reason="needs wandb: pip install -r requirements-track.txt")
needs_tensorboard = pytest.mark.skipif(not has_tensorboard, reason="needs tensorboard: pip install -r requirements-track.txt")

TRAIN = {"kind": "train", "step": 2, "loss": 14.3, "asst_ce": 6.5, "n_asst": 348, "lr": 2e-4, "mfu": None,
         "tokens_per_s": 4049.3, "epoch": 0, "skipped_steps": 0}
VAL = {"kind": "val", "step": 2, "loss": 13.7, "clips": 15,
       "speak": {"precision": 0.14, "recall": 0.38, "f1": 0.2, "auroc": 0.57, "num_pos": 98, "num_neg": 856},
       "dst": {"precision": 0.08, "recall": 0.41, "f1": 0.14, "auroc": None, "num_pos": 63, "num_neg": 891}}
CHECKPOINT = {"kind": "checkpoint", "step": 2, "path": "runs/demo/step_2"}


def train_record(step: int) -> dict:
    return {**TRAIN, "step": step, "loss": 10.0 / step}


def resolved_config() -> dict:
    return dataclasses.asdict(load_config(ROOT / "configs" / "demo.yaml", []))


# ---------------------------------------------------------------------------------------------------------
# Reading W&B's offline run files: a LevelDB-style log of wandb_internal.Record protobufs (32 KiB blocks, each
# record chunk behind a 7-byte header: crc32c, length, type FULL/FIRST/MIDDLE/LAST) after a 7-byte file
# header ":W&B", 0xBEE1, version 0. The installed wandb has no public reader for it.

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def log_records(path: Path) -> list[bytes]:
    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, magic, version)
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            records.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            records.append(pending + chunk)
    return records


def read_offline_run(run_path: Path) -> dict:
    """id, config, history {step: values}, summary (last value per key) and exit code of one offline-run-* dir."""
    from wandb.proto import wandb_internal_pb2

    run = {"config": {}, "history": {}, "summary": {}, "exit_code": None}
    (log_file,) = run_path.glob("run-*.wandb")
    for raw in log_records(log_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["id"] = record.run.run_id
            run["config"].update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            run["config"].update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            items = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            run["history"][record.history.step.num] = items
        elif kind == "summary":
            run["summary"].update({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.summary.update})
        elif kind == "exit":
            run["exit_code"] = record.exit.exit_code
    run["config"].pop("_wandb", None)
    return run


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))  # the name starts with the start time


# ---------------------------------------------------------------------------------------------------------
# No network: a local listener that counts connections, and an environment that sends W&B to it


@pytest.fixture()
def network_trap(monkeypatch):
    """Every proxied HTTP(S) request and the W&B server address go to a local listener; returns its hits.
    WANDB_MODE=online in the environment: a misconfigured shell that offline mode must override."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    hits: list[bytes] = []

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            hits.append(conn.recv(200))
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "WANDB_BASE_URL"):
        monkeypatch.setenv(name, url)
    monkeypatch.setenv("NO_PROXY", "")
    monkeypatch.setenv("no_proxy", "")
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "true")
    yield hits
    server.close()


def quick_options(**fields) -> TrackerOptions:
    return TrackerOptions(**{"wandb_project": "proassist-test", "system_stats": False, **fields})


# ---------------------------------------------------------------------------------------------------------
# Names


def test_records_become_kind_slash_key_scalars():
    assert scalars(TRAIN) == {"train/loss": 14.3, "train/asst_ce": 6.5, "train/n_asst": 348.0, "train/lr": 2e-4,
                              "train/tokens_per_s": 4049.3, "train/epoch": 0.0, "train/skipped_steps": 0.0}
    val = scalars(VAL)
    assert val["val/loss"] == 13.7 and val["val/clips"] == 15.0
    assert val["val/speak_f1"] == 0.2 and val["val/speak_auroc"] == 0.57 and val["val/dst_num_neg"] == 891.0
    assert "val/dst_auroc" not in val and "val/step" not in val  # None and the step are not scalars
    assert scalars(CHECKPOINT) == {}


# ---------------------------------------------------------------------------------------------------------
# W&B offline


@needs_wandb
def test_offline_run_holds_the_resolved_config_and_the_last_values(tmp_path, network_trap):
    config = resolved_config()
    run_dir = tmp_path / "demo"
    with Trackers(run_dir, quick_options(), config) as tracked:
        assert tracked.describe() == (f"trackers: W&B offline run {tracked.wandb_run.id} in {run_dir / 'wandb'} "
                                      f"(upload later: wandb sync {run_dir / 'wandb'}/offline-run-*)")
        for step in (1, 2, 3):
            tracked.log(train_record(step))
        tracked.log({**VAL, "step": 3})
        tracked.log({**CHECKPOINT, "step": 3})
    tracked.finish()  # a second finish does nothing

    (run_path,) = offline_runs(run_dir)
    run = read_offline_run(run_path)
    assert run["id"] == (run_dir / "wandb_run_id").read_text().strip() == tracked.wandb_run.id
    assert run["config"] == json.loads(json.dumps(config))
    assert sorted(run["history"]) == [1, 2, 3]
    assert run["history"][3]["train/loss"] == 10.0 / 3 and run["history"][3]["val/speak_f1"] == 0.2
    assert run["summary"]["train/loss"] == 10.0 / 3 and run["summary"]["val/loss"] == 13.7
    assert run["exit_code"] == 0
    assert os.environ["WANDB_MODE"] == "offline"
    assert network_trap == []


@needs_wandb
def test_train_py_logs_to_one_offline_wandb_run_across_a_sigterm_and_its_resume(demo_dir, tmp_path, network_trap):
    """train.py with train.wandb_project and the default offline mode, stopped by SIGTERM and re-run: one W&B run
    id over both offline directories, the resolved config as its config, every record of metrics.jsonl at its
    optimizer step, the last loss in the summary, exit codes 75 then 0, and not a byte sent anywhere."""
    run_dir = tmp_path / "run"
    args = tiny_overrides(demo_dir, run_dir, **{"train.max_steps": 14, "train.save_every": 100, "train.eval_every": 7,
                                                "train.wandb_project": "proassist-test"})
    proc = start_train(args)
    wait_for_step(run_dir, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_INTERRUPTED, err[-2000:]
    assert f"W&B offline run {(run_dir / 'wandb_run_id').read_text().strip()}" in out
    run_train(args)

    first, second = (read_offline_run(path) for path in offline_runs(run_dir))
    assert first["id"] == second["id"] == (run_dir / "wandb_run_id").read_text().strip()
    assert (first["exit_code"], second["exit_code"]) == (EXIT_INTERRUPTED, 0)
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert first["config"] == second["config"] == json.loads(json.dumps(resolved))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = {**first["history"], **second["history"]}
    for record in records:
        for name, value in scalars(record).items():
            assert logged[record["step"]][name] == pytest.approx(value), (record["step"], name)
    last_train = [r for r in records if r["kind"] == "train"][-1]
    assert second["summary"]["train/loss"] == pytest.approx(last_train["loss"]) and last_train["step"] == 14
    assert network_trap == []


@needs_wandb
def test_bad_settings_are_refused(tmp_path, network_trap):
    with pytest.raises(ValueError, match="train.wandb_mode must be one of offline, online, got 'cloud'"):
        Trackers(tmp_path / "a", quick_options(wandb_mode="cloud"), {})
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "wandb_run_id").write_text("not an id!\n")
    with pytest.raises(ValueError, match=r"wandb_run_id holds 'not an id!', not a W&B run id; delete the file"):
        Trackers(tmp_path / "b", quick_options(), {})
    assert network_trap == []


def test_other_ranks_and_no_trackers_do_nothing(tmp_path):
    for tracked in (Trackers(tmp_path / "rank1", quick_options(tensorboard=True), {}, enabled=False),
                    Trackers(tmp_path / "none", TrackerOptions(), {})):
        tracked.log(TRAIN)
        assert tracked.describe() is None
        tracked.finish()
    assert not (tmp_path / "rank1").exists() and not (tmp_path / "none").exists()


# ---------------------------------------------------------------------------------------------------------
# TensorBoard


@needs_tensorboard
def test_tensorboard_event_files_hold_the_same_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracked = Trackers(tmp_path, TrackerOptions(tensorboard=True), {})
    assert tracked.describe() == f"trackers: TensorBoard in {tmp_path / 'tb'}"
    records = [train_record(1), train_record(2), VAL, CHECKPOINT]
    for record in records:
        tracked.log(record)
    tracked.finish()
    tracked.finish()

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == set(scalars(TRAIN)) | set(scalars(VAL))
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 10.0), (2, 5.0)]
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("val/speak_f1")] == [(2, 0.2)]


# ---------------------------------------------------------------------------------------------------------
# Missing packages


def test_missing_packages_name_the_requirements_file(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ModuleNotFoundError
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ModuleNotFoundError, match=r"train.wandb_project=x needs the wandb package.*"
                                                  r"pip install -r requirements-track.txt"):
        Trackers(tmp_path, TrackerOptions(wandb_project="x"), {})
    with pytest.raises(ModuleNotFoundError, match=r"train.tensorboard=true needs the tensorboard package.*"
                                                  r"pip install -r requirements-track.txt"):
        Trackers(tmp_path, TrackerOptions(tensorboard=True), {})


# ---------------------------------------------------------------------------------------------------------
# Slow: the listener sees W&B's traffic when a run is online (so the offline tests' zero means something)


@pytest.mark.slow
@needs_wandb
def test_the_network_trap_catches_an_online_run(tmp_path, network_trap, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    with pytest.raises(Exception, match="127.0.0.1"):
        wandb.init(project="proassist-test", dir=str(tmp_path), mode="online",
                   settings=wandb.Settings(init_timeout=5, x_disable_stats=True, console="off"))
    assert network_trap and network_trap[0].startswith(b"POST /graphql")
