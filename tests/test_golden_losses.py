"""Golden losses: the demo model's per-step training loss for 10 fp32 steps on CPU, pinned.

They change only when the numerics are meant to change (a new loss term, another initialisation, another
sampler order...); such a commit updates GOLDEN and says why. A refactor that moves code around must leave
them exactly where they are. The tolerance absorbs the last bits that differ between CPUs' kernels, not a
change of what is computed (any such change moves the losses by far more within 10 steps).
"""
from __future__ import annotations

import pytest

from conftest import run_train, tiny_overrides, train_records

# configs/demo.yaml on the 8-video demo dataset (tests/conftest.py `demo_dir`), micro-batch 2 x 2 accumulation,
# one thread, fp32: the loss of optimizer steps 1..10.
GOLDEN = [14.5077805519104, 13.80394983291626, 13.273882389068604, 12.811522960662842, 12.466262817382812,
          11.932125091552734, 11.395781993865967, 11.245543956756592, 10.890646934509277, 10.80786657333374]


def test_demo_model_losses_for_ten_fp32_steps_are_pinned(demo_dir, tmp_path):
    run_dir = tmp_path / "golden"
    run_train(tiny_overrides(demo_dir, run_dir, **{
        "train.max_steps": 10, "train.micro_batch": 2, "train.grad_accum": 2, "optim.warmup_steps": 3,
        "data.length_grouping": "true", "train.precision": "fp32"}))
    records = train_records(run_dir)
    losses = [records[step]["loss"] for step in range(1, 11)]
    assert losses == pytest.approx(GOLDEN, rel=1e-4)
