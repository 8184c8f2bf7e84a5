"""The training script end to end on CPU with the demo's tiny model: accumulation and rank invariance,
exact resume after SIGKILL, rotation, atomic saves, reload, precision choice, non-finite steps."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoint
import train
from conftest import PY, ROOT, run_train, tiny_overrides, train_records
from data import model_inputs, search_micro_batch
from model import choose_precision

# ---------------------------------------------------------------------------------------------------
# Pure helpers


def test_precision_choice():
    assert choose_precision("auto", "cuda", (7, 5))[:2] == (torch.float16, True)  # Titan RTX
    assert choose_precision("auto", "cuda", (8, 0))[:2] == (torch.bfloat16, False)  # A100
    assert choose_precision("auto", "cuda", (9, 0))[:2] == (torch.bfloat16, False)  # H100
    assert choose_precision("auto", "cpu", None)[:2] == (torch.float32, False)
    assert choose_precision("fp16", "cuda", (8, 0))[:2] == (torch.float16, True)
    assert "7.5" in choose_precision("auto", "cuda", (7, 5))[2]


def test_lr_schedule():
    from config import OptimConfig
    optim = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [train.get_lr(s, optim, 110) for s in range(111)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.55) and lrs[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


# ---------------------------------------------------------------------------------------------------
# Global normalisation: the step's gradient does not depend on how it is split


GRADS_SCRIPT = r"""
import contextlib, sys, torch
sys.path.insert(0, {root!r})
import distributed
import train
from config import load_config
from data import ClipDataset, collate
from model import build_model
from safetensors.torch import save_file
from sequence import load_tokenizer
mode, out = sys.argv[1], sys.argv[2]
cfg = load_config({config!r}, {overrides!r})
rank, _, world, device = distributed.setup_distributed(cfg.train.dist_timeout_s)
torch.manual_seed(0)
tokenizer = load_tokenizer(cfg.model.path)
model = build_model(cfg, tokenizer)
dataset = ClipDataset(cfg, "train", tokenizer)
pad = dataset.renderer.pad_id
items = [dataset.item(i, epoch=0, rho=0.1) for i in range(4)]  # uneven target counts per clip
if mode == "1x4":
    micro_batches = [collate([it], pad) for it in items]
elif mode == "4x1":
    micro_batches = [collate(items, pad)]
else:  # 2 ranks x 2 accumulation steps: rank r takes clips r and r + 2
    model = torch.nn.parallel.DistributedDataParallel(model)
    micro_batches = [collate([it], pad) for it in items[rank::2]]
parts, counts = train.forward_backward(model, micro_batches, cfg, contextlib.nullcontext(),
                                       torch.amp.GradScaler("cpu", enabled=False))
distributed.all_reduce(parts, world)
inner = model.module if world > 1 else model
if rank == 0:
    grads = {{n: p.grad.contiguous() for n, p in inner.named_parameters() if p.grad is not None}}
    grads["__parts__"] = parts.float()
    save_file(grads, out)
if world > 1:
    distributed.end_distributed(world)  # barrier, then tear gloo down
    distributed.exit_process(0)  # no interpreter finalization racing gloo's threads (see distributed.exit_process)
"""


def test_gradients_invariant_to_accumulation_and_ranks(demo_dir, tmp_path):
    """The step's gradients: 1 clip x 4 accumulation == 4 clips x 1 == 2 gloo ranks x 1 clip x 2 accumulation."""
    script = tmp_path / "grads.py"
    overrides = tiny_overrides(demo_dir, tmp_path / "unused")
    script.write_text(GRADS_SCRIPT.format(root=str(ROOT), config=str(ROOT / "configs" / "demo.yaml"), overrides=overrides))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    grads = {}
    for mode in ("1x4", "4x1", "ddp"):
        out = tmp_path / f"{mode}.safetensors"
        launcher = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if mode == "ddp" else [PY]
        r = subprocess.run([*launcher, str(script), mode, str(out)], cwd=ROOT, capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        grads[mode] = load_file(str(out))
    reference = grads["1x4"]
    assert len(reference) > 20 and any(k.startswith("speak_head") for k in reference)
    for mode in ("4x1", "ddp"):
        assert grads[mode].keys() == reference.keys()
        for key, value in reference.items():
            torch.testing.assert_close(grads[mode][key], value, rtol=1e-4, atol=1e-7, msg=f"{mode}: {key}")
    # The test can fail: per-micro-batch means (instead of global counts) give other gradients.
    assert not torch.allclose(reference["speak_head.weight"], 4 * reference["speak_head.weight"])


def test_two_rank_training_logs_match_one_rank(demo_dir, tmp_path):
    """The real script under torchrun (gloo): same losses and pre-clip gradient norm as one process with
    twice the accumulation, for a few optimizer steps."""
    records = {}
    for name, nproc, accum in (("one", 1, 4), ("two", 2, 2)):
        run_dir = tmp_path / name
        run_train(tiny_overrides(demo_dir, run_dir, **{"train.grad_accum": accum, "train.max_steps": 3}), nproc=nproc)
        records[name] = train_records(run_dir)
        assert (run_dir / "step_3" / "rng_rank0.json").exists()
        assert (run_dir / "step_3" / "rng_rank1.json").exists() == (nproc == 2)
    for step in (1, 2, 3):
        one, two = records["one"][step], records["two"][step]
        for field in ("loss", "asst_ce", "dst_ce", "speak_bce", "dst_bce", "grad_norm"):
            assert two[field] == pytest.approx(one[field], rel=1e-4), (step, field)
        assert [two[f"n_{k}"] for k in ("asst", "dst", "speak_pos")] == [one[f"n_{k}"] for k in ("asst", "dst", "speak_pos")]


# ---------------------------------------------------------------------------------------------------
# Checkpoints


def test_exact_resume_after_sigkill(demo_dir, tmp_path):
    # LoRA with dropout: the resumed run must also continue the RNG stream exactly.
    overrides = dict(**{"train.max_steps": 10, "train.save_every": 3, "train.micro_batch": 2, "model.trainable": "lora",
                        "model.lora_rank": 4, "model.lora_alpha": 8, "model.lora_dropout": 0.1, "optim.lr": 1e-2})
    straight = tmp_path / "straight"
    run_train(tiny_overrides(demo_dir, straight, **overrides))

    killed = tmp_path / "killed"
    args = tiny_overrides(demo_dir, killed, **overrides)
    proc = subprocess.Popen([PY, str(ROOT / "train.py"), str(ROOT / "configs" / "demo.yaml"), *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while not (killed / "step_3").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "step_3").exists()
    assert not (killed / "step_9").exists(), "the run finished before it could be killed; the test proves nothing"
    # A save the kill interrupted (as in test_kill_during_save_leaves_no_partial_checkpoint) is ignored by the
    # resume, deleted and reported.
    unfinished = killed / ".tmp_step_7"
    shutil.copytree(killed / "step_3", unfinished)
    (unfinished / "trainer_state.json").unlink()
    resumed = run_train(args)
    assert "resumed from" in resumed.stdout
    assert f"deleted {unfinished}: a checkpoint save that never finished" in resumed.stdout
    assert not unfinished.exists()

    a = load_file(str(straight / "step_10" / "model.safetensors"))
    b = load_file(str(killed / "step_10" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bitwise, fp32 on CPU
    ra, rb = train_records(straight), train_records(killed)
    assert sorted(ra) == sorted(rb) == list(range(1, 11))
    for step in ra:
        for field in ("loss", "asst_ce", "dst_ce", "speak_bce", "dst_bce", "grad_norm"):
            assert ra[step][field] == rb[step][field], (step, field)
    sa = json.loads((straight / "step_10" / "trainer_state.json").read_text())
    sb = json.loads((killed / "step_10" / "trainer_state.json").read_text())
    assert (sa["epoch"], sa["cursor"]) == (sb["epoch"], sb["cursor"])
    # Rotation happened along the way: keep_last=3 of steps 3, 6, 9, 10.
    assert [p.name for p in checkpoint.list_checkpoints(killed)] == ["step_6", "step_9", "step_10"]


def test_rotation_never_deletes_newest(tmp_path):
    for step in (1, 2, 3, 4, 5):
        (tmp_path / f"step_{step}").mkdir()
    (tmp_path / ".tmp_step_6").mkdir()
    deleted = checkpoint.rotate(tmp_path, keep_last=2)
    assert [p.name for p in deleted] == ["step_1", "step_2", "step_3"]
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_4", "step_5"]
    # step_10 sorts after step_9 numerically, not as text
    (tmp_path / "step_10").mkdir()
    checkpoint.rotate(tmp_path, keep_last=1)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_10"]
    from config import ConfigError, load_config
    with pytest.raises(ConfigError, match="keep_last"):
        load_config(None, ["train.keep_last=1"])


KILL_DURING_SAVE = r"""
import os, signal, sys, torch
sys.path.insert(0, {root!r})
import checkpoint
from config import Config
class Tok:
    def save_pretrained(self, path):
        os.kill(os.getpid(), signal.SIGKILL)  # die half-way through writing the checkpoint
class Cfg:
    def save_pretrained(self, path):
        pass
p = torch.nn.Parameter(torch.ones(3))
opt = torch.optim.AdamW([p])
meta = checkpoint.CheckpointMeta({{"step": 7}}, Tok(), Cfg(), [checkpoint.rng_state()])
checkpoint.save_checkpoint({run!r}, 7, {{"w": p.detach()}}, opt, Config(), meta, keep_last=3)
"""


def test_kill_during_save_leaves_no_partial_checkpoint(tmp_path):
    (tmp_path / "step_5").mkdir()
    script = KILL_DURING_SAVE.format(root=str(ROOT), run=str(tmp_path))
    result = subprocess.run([PY, "-c", script], capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert not (tmp_path / "step_7").exists()
    assert (tmp_path / ".tmp_step_7" / "model.safetensors").exists()  # it really was mid-write
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_5"]


def test_checkpoint_reloads_identically_and_refuses_bad_weights(demo_dir, tmp_path):
    from data import ClipDataset, collate
    for trainable in ("full", "lora"):
        run_dir = tmp_path / trainable
        run_train(tiny_overrides(demo_dir, run_dir, **{"train.max_steps": 2, "model.trainable": trainable,
                                                        "model.lora_rank": 4, "model.lora_alpha": 8}))
        ckpt = run_dir / "step_2"
        model, tokenizer, cfg = checkpoint.load_for_inference(ckpt)
        again, _, _ = checkpoint.load_for_inference(ckpt)
        dataset = ClipDataset(cfg, "val", tokenizer)
        batch = collate([dataset.item(0)], dataset.renderer.pad_id)
        with torch.no_grad():
            out1 = model(**model_inputs(batch, all_frames=True))
            out2 = again(**model_inputs(batch, all_frames=True))
        for key in ("speak_logits", "dst_logits", "text_ce"):
            assert torch.equal(out1[key], out2[key])
        # The reloaded weights are the trained ones (heads, projector, new rows, LoRA included).
        saved = load_file(str(ckpt / "model.safetensors"))
        state = model.state_dict()
        assert any(k.startswith("speak_head") for k in saved) and any(k.startswith("new_token_embed") for k in saved)
        if trainable == "lora":
            assert any("lora" in k for k in saved)
        for key, value in saved.items():
            assert torch.equal(state[key], value), key

        # A missing tensor and an extra tensor are refused, naming them.
        broken = tmp_path / f"broken_{trainable}"
        subprocess.run(["cp", "-r", str(ckpt), str(broken)], check=True)
        tensors = dict(saved)
        removed = sorted(k for k in tensors if k.startswith("dst_head"))[0]
        del tensors[removed]
        tensors["surprise.weight"] = torch.zeros(2)
        save_file(tensors, str(broken / "model.safetensors"))
        with pytest.raises(checkpoint.CheckpointError) as err:
            checkpoint.load_for_inference(broken)
        assert removed in str(err.value) and "surprise.weight" in str(err.value)
    (broken / "optimizer.pt").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="missing optimizer.pt"):
        checkpoint.load_for_inference(broken)


# ---------------------------------------------------------------------------------------------------
# Non-finite steps


def test_non_finite_loss_is_skipped_and_counted(demo_dir, tmp_path, monkeypatch):
    from config import load_config
    import losses
    real = losses.compute_loss
    calls = {"n": 0}

    def poisoned(outputs, batch, counts, cfg):
        calls["n"] += 1
        loss, parts = real(outputs, batch, counts, cfg)
        if calls["n"] == 2:  # the second optimizer step
            loss = loss * float("nan")
            parts = {k: v * float("nan") for k, v in parts.items()}
        return loss, parts

    monkeypatch.setattr(losses, "compute_loss", poisoned)
    cfg = load_config(ROOT / "configs" / "demo.yaml", tiny_overrides(demo_dir, tmp_path / "nan", **{"train.max_steps": 3}))
    with pytest.warns(UserWarning, match="step 1: non-finite"):
        summary = train.train(cfg)
    state = json.loads((tmp_path / "nan" / "step_3" / "trainer_state.json").read_text())
    assert state["skipped_steps"] == 1 and summary["step"] == 3
    assert train_records(tmp_path / "nan")[2]["skipped_steps"] == 1

    monkeypatch.setattr(losses, "compute_loss", lambda o, b, c, cfg: tuple(
        (x * float("nan")) if isinstance(x, torch.Tensor) else {k: v * float("nan") for k, v in x.items()}
        for x in real(o, b, c, cfg)))
    cfg = load_config(ROOT / "configs" / "demo.yaml",
                      tiny_overrides(demo_dir, tmp_path / "nan2", **{"train.max_steps": 10, "train.max_bad_steps": 3}))
    with pytest.raises(RuntimeError, match="3 non-finite steps in a row"), pytest.warns(UserWarning):
        train.train(cfg)


def test_micro_batch_search():
    limit_clips = 11  # pretend 11 clips fit
    probed = []

    def fits(mb):
        probed.append(mb)
        return mb <= limit_clips

    assert search_micro_batch(fits, 64) == 8
    assert probed == [1, 2, 4, 8, 16]  # divisors of 64, stopping at the first failure
    assert search_micro_batch(lambda mb: True, 6) == 6  # divisors only: clips per rank per step unchanged
    assert search_micro_batch(lambda mb: mb < 4, 12) == 3
    assert search_micro_batch(lambda mb: False, 8) == 0


def test_half_precision_keeps_fp32_weights_and_optimizer_states(demo_dir, tmp_path):
    """bf16 compute with bf16-stored frozen weights: trainable weights and AdamW states stay fp32."""
    run_dir = tmp_path / "bf16"
    run_train(tiny_overrides(demo_dir, run_dir, **{
        "train.precision": "bf16", "model.trainable": "lora", "model.frozen_dtype": "bf16", "model.lora_rank": 4,
        "model.lora_alpha": 8, "model.init": "scratch", "train.max_steps": 2}))
    state = torch.load(run_dir / "step_2" / "optimizer.pt", weights_only=True)
    moments = [t for s in state["state"].values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")]
    assert moments and all(t.dtype == torch.float32 for t in moments)
    saved = load_file(str(run_dir / "step_2" / "model.safetensors"))
    lora = [k for k in saved if "lora_" in k]
    assert lora and all(saved[k].dtype == torch.float32 for k in lora)
    assert saved["speak_head.weight"].dtype == torch.float32
    # scratch init saves the (random, frozen) backbone too, stored in bf16 as configured
    assert saved["backbone.model.layers.0.mlp.up_proj.base.weight"].dtype == torch.bfloat16


@pytest.mark.slow  # the default suite trains the full demo to the README's figures (test_demo_learns)
def test_demo_training_reduces_every_loss(demo_dir, tmp_path):
    """A short demo run: each loss component falls well below its start (the full demo is in the README)."""
    run_dir = tmp_path / "learn"
    run_train(tiny_overrides(demo_dir, run_dir, **{"train.max_steps": 40, "train.micro_batch": 4, "optim.lr": 3e-3,
                                                    "optim.warmup_steps": 5, "train.log_every": 5}))
    records = train_records(run_dir)
    first, last = records[5], records[40]
    for field in ("asst_ce", "dst_ce", "speak_bce", "dst_bce"):
        assert last[field] < 0.7 * first[field], (field, first[field], last[field])
    curves = (run_dir / "curves.html").read_text()
    assert curves.count("<polyline") >= 7 and "training losses" in curves

