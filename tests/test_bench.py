"""The training benchmark's --parallel sides: the loop's step under DDP and under FSDP2, on every rank's own
batches, in one torchrun launch; the first step is the same computation on both sides."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess

import pytest

from conftest import PY, ROOT


def bench(args: list[str], nproc: int | None) -> subprocess.CompletedProcess:
    launch = [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else [PY]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launch, str(ROOT / "bench" / "bench_train.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_parallel_sides_run_the_same_first_step(demo_dir, tmp_path):
    out = tmp_path / "fsdp_vs_ddp.json"
    done = bench([str(ROOT / "configs" / "demo.yaml"), f"data.root={demo_dir}", f"model.path={demo_dir}/model",
                  "--shape", "demo", "--setting", "full", "--precision", "fp32", "--steps", "2", "--warmup", "1",
                  "--parallel", "ddp,fsdp", "--out", str(out)], nproc=2)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["world_size"] == 2 and set(record) >= {"ddp", "fsdp", "speedup_tokens_per_s", "memory_ratio"}
    ddp, fsdp = record["ddp"], record["fsdp"]
    # Both ranks' batches counted on both sides, and the first step computed alike: same loss to fp32 rounding.
    assert ddp["tokens_per_step"] == fsdp["tokens_per_step"] > 0
    assert fsdp["first_loss"] == pytest.approx(ddp["first_loss"], rel=1e-5)
    assert ddp["trainable_parameters"] == fsdp["trainable_parameters"]
    assert record["speedup_tokens_per_s"] == pytest.approx(fsdp["tokens_per_s"] / ddp["tokens_per_s"])
    assert done.stdout.count("ratio:") == 1  # rank 0 alone prints the table


def test_parallel_outside_torchrun_says_how_to_launch(demo_dir, monkeypatch):
    done = bench([str(ROOT / "configs" / "demo.yaml"), f"data.root={demo_dir}", "--parallel", "fsdp"], nproc=None)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "error: --parallel runs under torchrun: torchrun --nproc_per_node=N" in done.stderr
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from bench_train import parallel_sides
    from config import ConfigError
    monkeypatch.setenv("RANK", "0")
    assert parallel_sides("ddp, fsdp-offload") == ["ddp", "fsdp-offload"]
    with pytest.raises(ConfigError, match="give wrappers from ddp, fsdp, fsdp-offload"):
        parallel_sides("ddp,zero3")


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                    reason="needs torchao: pip install --no-deps -r requirements-quant.txt")
def test_frozen_dtype_sides_compare_a_16_bit_and_an_nf4_base(demo_dir, tmp_path):
    """--frozen-dtype fp32,nf4: the same LoRA step over the base stored both ways; the NF4 base is the same random
    base quantised (first loss within NF4's error) and its decoder linears take about a quarter of the bytes."""
    out = tmp_path / "nf4.json"
    done = bench([str(ROOT / "configs" / "demo.yaml"), f"data.root={demo_dir}", f"model.path={demo_dir}/model",
                  "--shape", "demo", "--setting", "lora", "--precision", "fp32", "--steps", "2", "--warmup", "1",
                  "--frozen-dtype", "fp32,nf4", "--out", str(out)], nproc=None)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    record = json.loads(out.read_text())
    dense, nf4 = record["frozen-fp32"], record["frozen-nf4"]
    assert nf4["first_loss"] == pytest.approx(dense["first_loss"], rel=1e-2)
    assert nf4["first_loss"] != dense["first_loss"]  # quantised: not the fp32 base itself
    assert dense["trainable_parameters"] == nf4["trainable_parameters"]
    assert set(dense["frozen_bytes"]) == {"fp32"} and set(nf4["frozen_bytes"]) == {"nf4", "fp32"}
    assert sum(nf4["frozen_bytes"].values()) < sum(dense["frozen_bytes"].values())
