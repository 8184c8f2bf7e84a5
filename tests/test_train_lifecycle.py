"""A run's lifecycle around the loop: SIGTERM / Ctrl-C stop after a checkpoint and the re-run continues exactly,
a second signal aborts, a killed launcher ends its workers, resume across batch splits, validation that does not
depend on ranks or micro-batches, the fp16 GradScaler path, and what the user sees (errors, logs)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import distributed
import evaluate
from conftest import PY, ROOT, run_train, start_train, tiny_overrides, train_in_process, train_records, wait_for_step
from validation import validation_subset



def test_sigterm_saves_the_current_step_and_the_rerun_continues_exactly(demo_dir, tmp_path):
    """SIGTERM mid-run (loader worker, length grouping, LoRA dropout): a complete checkpoint of the step in
    progress, exit status 75, the resume command printed; re-running the command ends bitwise equal to a run
    that was never interrupted."""
    extra = {"train.max_steps": 14, "train.save_every": 100, "train.micro_batch": 2, "data.num_workers": 1,
             "data.length_grouping": "true", "model.trainable": "lora", "model.lora_rank": 4,
             "model.lora_alpha": 8, "model.lora_dropout": 0.1, "optim.lr": 1e-2}
    straight = tmp_path / "straight"
    run_train(tiny_overrides(demo_dir, straight, **extra))

    stopped = tmp_path / "stopped"
    args = tiny_overrides(demo_dir, stopped, **extra)
    proc = start_train(args)
    wait_for_step(stopped, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == distributed.EXIT_INTERRUPTED, err[-2000:]
    checkpoints = sorted(stopped.glob("step_*"))
    assert len(checkpoints) == 1, checkpoints
    step = int(checkpoints[0].name.split("_")[1])
    assert 3 <= step < 14, "the run finished before the signal; the test proves nothing"
    assert (checkpoints[0] / "trainer_state.json").exists() and not list(stopped.glob(".tmp_step_*"))
    assert f"interrupted by SIGTERM after step {step}" in out and "resume with the same command: python" in out
    assert "Traceback" not in err

    resumed = run_train(args)
    assert f"resumed from {checkpoints[0]}" in resumed.stdout
    a = load_file(str(straight / "step_14" / "model.safetensors"))
    b = load_file(str(stopped / "step_14" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = train_records(straight), train_records(stopped)
    for s in range(1, 15):
        assert ra[s]["loss"] == rb[s]["loss"], s


def test_a_second_signal_aborts_and_a_forwarded_copy_does_not(monkeypatch):
    stop = distributed.GracefulStop(same_request_s=0.2)
    exits = []
    monkeypatch.setattr(os, "_exit", lambda code: exits.append(code))
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.name == "SIGTERM" and exits == []
        os.kill(os.getpid(), signal.SIGINT)  # torchrun forwarding the same Ctrl-C: still one request
        assert exits == []
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGINT)  # a real second signal
        assert exits == [128 + signal.SIGINT]
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_killed_launcher_ends_its_workers_with_a_checkpoint(demo_dir, tmp_path):
    """SIGKILL on torchrun: its workers get SIGTERM from the kernel (they asked for it), save and exit instead
    of training on, or waiting forever, without it."""
    run_dir = tmp_path / "orphans"
    proc = start_train(tiny_overrides(demo_dir, run_dir, **{"train.max_steps": 100000, "train.save_every": 100000}),
                       nproc=2)
    wait_for_step(run_dir, 2, proc)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    workers = [int(pid) for pid in children]
    assert len(workers) == 2
    proc.kill()
    proc.wait()
    deadline = time.time() + 120
    while time.time() < deadline and any(Path(f"/proc/{pid}").exists() and
                                         "zombie" not in Path(f"/proc/{pid}/status").read_text() for pid in workers):
        time.sleep(0.1)
    alive = [pid for pid in workers if Path(f"/proc/{pid}").exists() and
             "zombie" not in Path(f"/proc/{pid}/status").read_text()]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, "workers outlived their launcher"
    assert list(run_dir.glob("step_*")), "the workers did not save before exiting"


RESUMED = {"train.max_steps": 6, "train.save_every": 3}


@pytest.fixture(scope="module")
def straight_records(demo_dir, tmp_path_factory) -> dict[int, dict]:
    """6 steps of one process with 1 clip x 4 accumulation, never interrupted: what every resume must equal."""
    straight = tmp_path_factory.mktemp("straight")
    run_train(tiny_overrides(demo_dir, straight, **RESUMED, **{"train.grad_accum": 4}))
    return train_records(straight)


def test_resume_with_another_split_of_the_same_clips_per_step(demo_dir, tmp_path, straight_records, capsys):
    """1 x 4 accumulation, resumed as 2 x 2: the same clips per step, so the same losses (to float summation
    order); a different number of clips per step is refused with the arithmetic spelled out."""
    split = tmp_path / "split"
    run_train(tiny_overrides(demo_dir, split, **{"train.max_steps": 3, "train.grad_accum": 4}))
    resumed = run_train(tiny_overrides(demo_dir, split, **RESUMED, **{"train.micro_batch": 2, "train.grad_accum": 2}))
    assert "batch split 1x1x4 -> 1x2x2, the same 4 clips per step" in resumed.stdout
    ra, rb = straight_records, train_records(split)
    for step in range(1, 7):
        assert rb[step]["loss"] == pytest.approx(ra[step]["loss"], rel=1e-4), step
        assert rb[step]["n_asst"] == ra[step]["n_asst"], step
    code, _, err = train_in_process(tiny_overrides(demo_dir, split, **{"train.max_steps": 8, "train.grad_accum": 3}),
                                    capsys)
    assert code == 1 and "saved with 4 clips per optimizer step" in err


def test_resume_on_fewer_ranks_continues_with_the_same_clips(demo_dir, tmp_path, straight_records):
    """2 gloo ranks x 1 clip x 2 accumulation, resumed by one process with 4 accumulation steps: the same 4 clips
    per step, so the same losses and target counts as a run that was one process throughout."""
    ranks = tmp_path / "ranks"
    run_train(tiny_overrides(demo_dir, ranks, **{"train.max_steps": 3, "train.grad_accum": 2}), nproc=2)
    resumed = run_train(tiny_overrides(demo_dir, ranks, **RESUMED, **{"train.grad_accum": 4}))
    assert "batch split 2x1x2 -> 1x1x4, the same 4 clips per step" in resumed.stdout
    ra, rb = straight_records, train_records(ranks)
    for step in range(1, 7):
        assert rb[step]["loss"] == pytest.approx(ra[step]["loss"], rel=1e-4), step
        assert [rb[step][f"n_{k}"] for k in ("asst", "dst", "speak_pos")] == [ra[step][f"n_{k}"] for k in ("asst", "dst", "speak_pos")]


AUTO_BATCH_SCRIPT = r"""
import os, sys
sys.path.insert(0, {root!r})
import distributed, train
# Each rank's largest micro-batch under its memory: rank 0 shares its GPU with a display and fits fewer clips.
fits = {{0: 1, 1: 2}}[int(os.environ["RANK"])]
train.largest_micro_batch = lambda model, dataset, cfg, device, autocast, limit: fits
distributed.exit_process(train.main({args!r}))
"""


def test_auto_batch_takes_the_micro_batch_every_rank_can_afford(demo_dir, tmp_path):
    """train.auto_batch under 2 gloo ranks whose (faked) memory allows 1 and 2 clips per micro-batch: both ranks
    use 1 (x 2 accumulation steps), the checkpoint records that split, and the run computes what a run configured
    that way computes (no clip duplicated or skipped)."""
    reference = tmp_path / "configured"
    run_train(tiny_overrides(demo_dir, reference, **{"train.max_steps": 3, "train.grad_accum": 2}), nproc=2)
    auto = tmp_path / "auto"
    args = [str(ROOT / "configs" / "demo.yaml"), *tiny_overrides(demo_dir, auto, **{
        "train.max_steps": 3, "train.micro_batch": 2, "train.grad_accum": 1, "train.auto_batch": "true"})]
    script = tmp_path / "auto_batch.py"
    script.write_text(AUTO_BATCH_SCRIPT.format(root=str(ROOT), args=args))
    result = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train.auto_batch: micro_batch 2 -> 1, grad_accum 1 -> 2" in result.stdout
    state = json.loads((auto / "step_3" / "trainer_state.json").read_text())
    assert (state["world_size"], state["micro_batch"], state["grad_accum"]) == (2, 1, 2)
    ra, rb = train_records(reference), train_records(auto)
    for step in (1, 2, 3):
        assert rb[step]["loss"] == ra[step]["loss"] and rb[step]["n_asst"] == ra[step]["n_asst"], step


def val_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "val"}


def test_the_best_checkpoint_is_kept_and_patience_stops_the_run(demo_dir, tmp_path):
    """Validation every 2 steps with a learning rate high enough that the validation loss soon stops improving:
    with patience 2 the run stops before train.max_steps, right after the second validation in a row without a
    better loss, exits 0 and says why; `best` names the step of the lowest validation loss in metrics.jsonl,
    rotation (every step saved, keep 2) never deleted it, and evaluate.py takes it. A run resumed from a
    checkpoint in the middle (the best-so-far and the patience count in its state) ends the same way."""
    settings = {"train.max_steps": 40, "train.eval_every": 2, "train.save_every": 1, "train.keep_last": 2,
                "train.early_stop_patience": 2, "optim.lr": 5e-2, "optim.warmup_steps": 1, "train.micro_batch": 2}
    run_dir = tmp_path / "early"
    result = run_train(tiny_overrides(demo_dir, run_dir, **settings))
    losses = val_losses(run_dir)
    steps = sorted(losses)
    best_step = min(steps, key=lambda s: (losses[s], s))
    # Where patience 2 runs out: the second validation in a row that is no better than the best before it.
    best, stale, expected_stop = None, 0, None
    for step in steps:
        best, stale = (losses[step], 0) if best is None or losses[step] < best else (best, stale + 1)
        if stale == 2:
            expected_stop = step
            break
    assert expected_stop is not None and steps[-1] == expected_stop < settings["train.max_steps"], losses
    assert f"early stop after step {expected_stop}: val/loss has not improved for 2 validations" in result.stdout
    assert (run_dir / "best").is_symlink() and (run_dir / "best").resolve() == (run_dir / f"step_{best_step}").resolve()
    assert sorted(p.name for p in run_dir.glob("step_*")) == sorted(
        {f"step_{best_step}", f"step_{expected_stop - 1}", f"step_{expected_stop}"})
    state = json.loads((run_dir / f"step_{expected_stop}" / "trainer_state.json").read_text())
    assert (state["best_step"], state["best_value"], state["stale_evals"]) == (best_step, losses[best_step], 2)
    assert evaluate.main(["--ckpt", str(run_dir / "best"), "--max-videos", "1", "--embedder", "bow",
                          "eval.max_new_tokens=2", "eval.max_dst_tokens=2"]) == 0

    resumed_dir = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed_dir, symlinks=True)
    shutil.rmtree(resumed_dir / f"step_{expected_stop}")
    lines = (resumed_dir / "metrics.jsonl").read_text().splitlines()
    (resumed_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in lines
                                                       if json.loads(line)["step"] < expected_stop))
    resumed = run_train(tiny_overrides(demo_dir, resumed_dir, **settings))
    assert f"resumed from {resumed_dir / f'step_{expected_stop - 1}'}" in resumed.stdout
    assert val_losses(resumed_dir) == losses and (resumed_dir / "best").resolve().name == f"step_{best_step}"
    assert f"early stop after step {expected_stop}" in resumed.stdout


def test_validation_subset_is_stratified_and_split_independent():
    lengths = [int(x) for x in np.random.default_rng(1).integers(100, 900, size=50)]
    subset = validation_subset(lengths, 10, seed=0)
    assert len(subset) == 10 and subset == validation_subset(lengths, 10, seed=0)
    chosen = sorted(lengths[i] for i in subset)
    ranked = sorted(lengths)
    for j, length in enumerate(chosen):  # one clip from each fifth-of-a-fifth... each tenth of the length ranking
        assert ranked[5 * j] <= length <= ranked[5 * j + 4]
    assert validation_subset(lengths, 0, seed=0) == list(range(50))
    assert validation_subset(lengths, 10, seed=1) != subset


def test_validation_is_the_same_for_every_split_and_rank_count(demo_dir, tmp_path):
    """evaluate_loss at rho = 1 on a capped subset: one rank with micro-batch 1, with micro-batch 4, and two gloo
    ranks give the same losses, counts and head scores; the record keeps the DST-text count (n_dst) apart
    from the DST-update head's scores (dst)."""
    extra = {"train.max_steps": 2, "train.eval_every": 2, "train.eval_max_clips": 6, "data.val": "train.json"}
    records = {}
    for name, nproc, mb in (("one_mb1", 1, 1), ("one_mb4", 1, 4), ("two_mb2", 2, 2)):
        run_dir = tmp_path / name
        run_train(tiny_overrides(demo_dir, run_dir, **extra, **{"train.micro_batch": mb,
                                                                "train.grad_accum": 4 // (mb * nproc)}), nproc=nproc)
        vals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["kind"] == "val"]
        assert len(vals) == 1
        records[name] = vals[0]
    ref = records["one_mb1"]
    assert ref["clips"] == 6 and ref["n_dst"] > 0 and set(ref["dst"]) >= {"f1", "auroc", "num_pos"}
    for name in ("one_mb4", "two_mb2"):
        other = records[name]
        for key in ("loss", "asst_ce", "dst_ce", "speak_bce", "dst_bce"):
            assert other[key] == pytest.approx(ref[key], rel=1e-5), (name, key)
        assert [other[f"n_{k}"] for k in ("asst", "dst", "speak_pos", "dst_neg")] == \
               [ref[f"n_{k}"] for k in ("asst", "dst", "speak_pos", "dst_neg")]
        assert other["speak"]["num_pos"] == ref["speak"]["num_pos"]
        assert other["dst"]["auroc"] == pytest.approx(ref["dst"]["auroc"], abs=1e-6)


def test_fp16_with_grad_scaler_on_cpu(demo_dir, tmp_path):
    """The Titan RTX path (fp16 autocast + GradScaler), run on the CPU: the scaler's state is checkpointed and
    restored, weights and optimizer states stay fp32, and the loss falls."""
    run_dir = tmp_path / "fp16"
    extra = {"train.precision": "fp16", "train.max_steps": 12, "train.save_every": 6, "train.micro_batch": 2,
             "optim.lr": 3e-3, "train.log_every": 1}
    first = run_train(tiny_overrides(demo_dir, run_dir, **{**extra, "train.max_steps": 6}))
    assert "with a GradScaler" in first.stdout
    state = json.loads((run_dir / "step_6" / "trainer_state.json").read_text())
    assert state["scaler"]["scale"] > 0 and "_growth_tracker" in state["scaler"]
    run_train(tiny_overrides(demo_dir, run_dir, **extra))
    saved = load_file(str(run_dir / "step_12" / "model.safetensors"))
    assert all(t.dtype == torch.float32 for k, t in saved.items() if t.is_floating_point())
    records = train_records(run_dir)
    assert records[12]["loss"] < 0.8 * records[1]["loss"]


def test_what_the_user_sees(demo_dir, tmp_path, capsys):
    """Short log lines with the same loss names as metrics.jsonl, no carriage returns when not on a terminal,
    no config dump on the console, a quiet 'nothing to do', checkpoint records; errors name the fix; a failed
    start leaves no run folder; raising max_steps says what happens to the schedule; train.resume=never refuses
    a run directory that holds checkpoints instead of rotating them away."""
    run_dir = tmp_path / "logs"
    first = run_train(tiny_overrides(demo_dir, run_dir, **{"train.max_steps": 4, "train.log_every": 2,
                                                            "train.save_every": 2}))
    assert "\r" not in first.stdout + first.stderr
    step_lines = [line for line in first.stdout.splitlines() if line.startswith("step ")]
    assert len(step_lines) == 2 and all(len(line) <= 160 for line in step_lines)
    assert all(name in step_lines[0] for name in ("asst_ce", "dst_ce", "speak_bce", "dst_bce", "eta"))
    assert "optim:" not in first.stdout and (run_dir / "config.yaml").exists()
    kinds = [json.loads(line)["kind"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("checkpoint") == 2

    code, out, _ = train_in_process(tiny_overrides(demo_dir, run_dir, **{"train.max_steps": 4}), capsys)
    assert code == 0 and out.strip().splitlines() == [
        f"nothing to do: {run_dir / 'step_4'} is at step 4 >= train.max_steps=4"]
    code, _, err = train_in_process(tiny_overrides(demo_dir, run_dir, **{"train.resume": "never"}), capsys)
    assert code == 1 and "already holds checkpoints" in err and "train.resume=auto" in err

    longer = run_train(tiny_overrides(demo_dir, run_dir, **{"train.max_steps": 6}))
    assert "train.max_steps changed from 4 to 6" in longer.stdout

    code, _, err = train_in_process(
        tiny_overrides(demo_dir, tmp_path / "other", **{"train.resume": str(run_dir / "step_5")}), capsys)
    assert code == 1 and "step_4" in err and "step_6" in err  # it lists what exists
    assert not (tmp_path / "other").exists()  # a failed start leaves no empty run folder

    code, _, err = train_in_process(tiny_overrides(demo_dir, tmp_path / "bad", **{"data.train": "nope.json"}), capsys)
    assert code == 1 and "nope.json" in err and not (tmp_path / "bad").exists()
