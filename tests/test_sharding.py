"""train.parallel=fsdp on CPU with gloo and the demo's tiny Llama: the units and their precision, the training
script under FSDP equal to DDP (full fine-tuning and LoRA, validation with uneven shares), the fp16 GradScaler
across ranks, Distributed Checkpoint saves that are atomic and resume on the same and on other numbers of ranks,
SIGTERM, evaluation of a sharded checkpoint, and the export to a transformers model directory."""
from __future__ import annotations

import json
import pickle
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

import demo
import evaluate
import export
import sharding
import train
from checkpoint import (
    CheckpointError, CheckpointMeta, discard_unfinished_saves, is_sharded_checkpoint, list_checkpoints,
    load_for_inference, load_training_state, read_config, read_sharded_model_tensors, read_sharded_tensors,
    rng_state, save_checkpoint, save_sharded_checkpoint,
)
from config import load_config
from conftest import FRAME_SIZE, PY, ROOT, run_train, start_train, tiny_overrides, train_records, wait_for_step, write_tiny_vlm
from data import ClipDataset, collate
from model import LoRALinear, build_model, choose_precision, compile_decoder_layers, model_state_for_checkpoint, param_groups
from sequence import load_tokenizer

LORA = {"model.trainable": "lora", "model.lora_rank": 4, "model.lora_alpha": 8, "model.lora_dropout": 0.0}


# ---------------------------------------------------------------------------------------------------------
# One process, a one-rank gloo group: the units, precision, tied head, checkpointing, refusals


@pytest.fixture()
def one_rank_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def tied_model_dir(demo_dir: Path, tmp_path: Path) -> Path:
    """The demo's model directory with a tied LM head."""
    out = tmp_path / "tied_model"
    shutil.copytree(demo_dir / "model", out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    return out


def demo_cfg(demo_dir: Path, tmp_path: Path, *overrides: str, model_dir: Path | None = None):
    return load_config(ROOT / "configs" / "demo.yaml", [
        f"data.root={demo_dir}", f"model.path={model_dir or demo_dir / 'model'}", f"run.dir={tmp_path / 'run'}",
        "data.num_workers=0", *overrides,
    ])


def one_step(model, batch, cfg, dtype) -> tuple[float, list[torch.Tensor]]:
    """train.py's forward and backward, clipping and one AdamW step; returns the loss and the whole gradients."""
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
    optimizer = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-3)
    trainable = [p for p in model.parameters() if p.requires_grad]
    parts, _ = train.forward_backward(model, [batch], cfg, autocast, torch.amp.GradScaler("cpu", enabled=False))
    grads = [(p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone() for p in trainable]
    sharding.clip_grad_norm_(trainable, 1.0, torch.device("cpu"))
    optimizer.step()
    return float(parts[0]), grads


LORA_ARGS = [f"{k}={v}" for k, v in LORA.items()]
SETTINGS = {
    "full, tied head, activation checkpointing": (["train.activation_checkpointing=true"], True),
    "lora, frozen bf16": (LORA_ARGS + ["model.init=scratch", "model.frozen_dtype=bf16", "train.precision=bf16"], False),
    "frozen, frozen fp16, tied head, checkpointing": (
        ["model.trainable=frozen", "model.frozen_dtype=fp16", "train.precision=fp16", "train.activation_checkpointing=true"], True),
    "full, bf16 compute": (["train.precision=bf16"], False),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_sharded_model_trains_like_the_unsharded_one(setting, demo_dir, tmp_path, one_rank_group):
    """Every unit runs forward and backward: frozen half-precision weights beside fp32 LoRA in one unit, the fp32
    heads beside a bf16/fp16 decoder, a tied head, activation checkpointing. fp32 runs give the unsharded
    model's loss and gradients; half-precision runs gather the weights in the compute dtype (FSDP's
    param_dtype), where autocast keeps fp32 weights, so they agree to half-precision rounding."""
    overrides, tied = SETTINGS[setting]
    cfg = demo_cfg(demo_dir, tmp_path, *overrides, model_dir=tied_model_dir(demo_dir, tmp_path) if tied else None)
    dtype = choose_precision(cfg.train.precision, "cpu", None).dtype
    tokenizer = load_tokenizer(cfg.model.path)
    dataset = ClipDataset(cfg, "train", tokenizer, announce=False)
    shortest = min(range(len(dataset)), key=lambda i: dataset.lengths[i])  # half precision is slow on a CPU
    batch = collate([dataset.item(shortest, 0, 1.0)], dataset.renderer.pad_id)
    results = {}
    for name in ("plain", "sharded"):
        torch.manual_seed(0)
        model = build_model(cfg, tokenizer)
        if name == "sharded":
            model = sharding.shard_model(model, dtype)
            layers = sharding.decoder_layers(model)
            assert all(isinstance(m, FSDPModule) for m in [model, model.speak_head, *layers])
            assert (model.backbone.get_output_embeddings().weight is model.backbone.get_input_embeddings().weight) == tied
        results[name] = one_step(model, batch, cfg, dtype)
        assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    (loss, grads), (plain_loss, plain_grads) = results["sharded"], results["plain"]
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=0.1, atol=2e-2)
    assert loss == pytest.approx(plain_loss, rel=tolerance["rtol"] / 10 if dtype == torch.float32 else 2e-2)
    assert len(grads) == len(plain_grads) > 0
    for got, want in zip(grads, plain_grads):
        torch.testing.assert_close(got, want, **tolerance)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_raw_frames_vision_tower_is_a_unit_of_its_own(precision, tmp_path, one_rank_group):
    """data.frames=raw: the frozen vision tower is sharded as its own unit in its storage dtype, and the loss of
    the tiny SmolVLM equals the unsharded model's."""
    pytest.importorskip("PIL", reason="raw JPEG frames need Pillow (pip install -r requirements-frames.txt)")
    demo.make_demo(tmp_path / "raw", seed=0, num_videos=3, raw_frames=True, frame_size=FRAME_SIZE)
    vlm = write_tiny_vlm(tmp_path / "vlm", tmp_path / "raw" / "model")
    cfg = demo_cfg(tmp_path / "raw", tmp_path, "data.frames=raw", "data.feature_dim=64", "model.init=pretrained",
                   *LORA_ARGS, f"train.precision={precision}", f"model.frozen_dtype={precision}", model_dir=vlm)
    dtype = choose_precision(precision, "cpu", None).dtype
    tokenizer = load_tokenizer(cfg.model.path)
    dataset = ClipDataset(cfg, "train", tokenizer, announce=False)
    batch = collate([dataset.item(0, 0, 1.0)], dataset.renderer.pad_id)
    assert batch["frame_pixels"].shape[0] > 0
    results = {}
    for sharded in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg, tokenizer)
        if sharded:
            model = sharding.shard_model(model, dtype)
            assert isinstance(model.vision, FSDPModule)
        results[sharded] = one_step(model, batch, cfg, dtype)[0]
    assert results[True] == pytest.approx(results[False], rel=1e-6)


@pytest.mark.slow
def test_compiled_decoder_layers_shard_and_train_alike(demo_dir, tmp_path, one_rank_group):
    """train.compile before sharding (checkpointing -> compile -> shard): the same loss and gradients as the
    uncompiled sharded model (about a minute of compilation on a CPU)."""
    cfg = demo_cfg(demo_dir, tmp_path, "train.activation_checkpointing=true")
    tokenizer = load_tokenizer(cfg.model.path)
    dataset = ClipDataset(cfg, "train", tokenizer, announce=False)
    shortest = min(range(len(dataset)), key=lambda i: dataset.lengths[i])
    batch = collate([dataset.item(shortest, 0, 1.0)], dataset.renderer.pad_id)
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg, tokenizer)
        if compiled:
            assert compile_decoder_layers(model) == len(sharding.decoder_layers(model))
        results.append(one_step(sharding.shard_model(model, torch.float32), batch, cfg, torch.float32))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-6)
    for got, want in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_shard_model_refuses_clearly(demo_dir, tmp_path):
    cfg = demo_cfg(demo_dir, tmp_path)
    model = build_model(cfg, load_tokenizer(cfg.model.path))
    with pytest.raises(RuntimeError, match="launch with torchrun"):
        sharding.shard_model(model, torch.float32)


def test_cpu_offload_needs_a_gpu(demo_dir, tmp_path, one_rank_group):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cfg = demo_cfg(demo_dir, tmp_path)
    model = build_model(cfg, load_tokenizer(cfg.model.path))
    with pytest.raises(Exception, match="train.fsdp_cpu_offload=true .* no CUDA GPU"):
        sharding.shard_model(model, torch.float32, cpu_offload=True)


# ---------------------------------------------------------------------------------------------------------
# Two ranks: train.py under FSDP equals train.py under DDP


def two_rank_run(demo_dir: Path, run_dir: Path, parallel: str, **extra) -> dict[int, dict]:
    """train.py under torchrun, 2 gloo ranks, 6 steps of 1 clip x 2 accumulation per rank, validation at the
    end on 3 clips (shares of 2 and 1: a sharded forward is a collective, the shares must still meet)."""
    run_train(tiny_overrides(demo_dir, run_dir, **{
        "train.parallel": parallel, "train.max_steps": 6, "train.grad_accum": 2, "train.save_every": 6,
        "train.eval_every": 6, "train.eval_max_clips": 3, "data.val": "train.json", **extra}), nproc=2)
    return train_records(run_dir)


def val_record(run_dir: Path) -> dict:
    return next(json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["kind"] == "val")


@pytest.mark.parametrize("trainable", ["full", "lora"])
def test_fsdp_training_equals_ddp(trainable, demo_dir, tmp_path):
    """Per-step losses and pre-clip gradient norms to 1e-5 over 6 steps (clipping active), the validation
    record, and the final weights: FSDP (gradients summed over ranks) = DDP (averaged, loss x world size)."""
    extra = LORA if trainable == "lora" else {}
    ddp = two_rank_run(demo_dir, tmp_path / "ddp", "ddp", **extra)
    fsdp = two_rank_run(demo_dir, tmp_path / "fsdp", "fsdp", **extra)
    for step in range(1, 7):
        for field in ("loss", "grad_norm"):
            assert fsdp[step][field] == pytest.approx(ddp[step][field], rel=1e-5), (step, field)
    assert ddp[1]["grad_norm"] > 1.0, "clipping (optim.grad_clip=1) must be active for the test to mean something"
    assert ddp[6]["loss"] != pytest.approx(ddp[1]["loss"], rel=1e-3), "training must move the loss"
    val_ddp, val_fsdp = val_record(tmp_path / "ddp"), val_record(tmp_path / "fsdp")
    assert val_fsdp["clips"] == val_ddp["clips"] == 3 and val_fsdp["n_asst"] == val_ddp["n_asst"]
    assert val_fsdp["loss"] == pytest.approx(val_ddp["loss"], rel=1e-5)
    want = load_file(str(tmp_path / "ddp" / "step_6" / "model.safetensors"))
    got = read_sharded_model_tensors(tmp_path / "fsdp" / "step_6")
    assert got.keys() == want.keys() and len(want) > 5
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-6, msg=key)


FP16_SCRIPT = r"""
import json, math, sys
import torch
sys.path.insert(0, {root!r})
import distributed, train
from config import load_config
from data import ClipDataset, collate
from model import build_model, param_groups, run_precision
from sequence import load_tokenizer
from sharding import clip_grad_norm_, shard_model

rank, _, world, device = distributed.setup_distributed(600)
cfg = load_config({config!r}, {overrides!r})
precision = run_precision(cfg, device)  # fp16 with a GradScaler
torch.manual_seed(0)
tokenizer = load_tokenizer(cfg.model.path)
model = shard_model(build_model(cfg, tokenizer), precision.dtype)
optimizer = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-3)
scaler = precision.scaler("cpu")
dataset = ClipDataset(cfg, "train", tokenizer, announce=False)
trainable = [p for p in model.parameters() if p.requires_grad]
steps = []
for step in range(3):
    batch = collate([dataset.item(2 * step + rank, 0, 1.0)], dataset.renderer.pad_id)
    train.forward_backward(model, [batch], cfg, precision.autocast("cpu"), scaler)
    if step == 1 and rank == 1:
        trainable[0].grad.to_local().view(-1)[0] = math.inf  # this rank's shard only
    before = [p.to_local().clone() for p in trainable]
    scaler.unscale_(optimizer)
    norm = clip_grad_norm_(trainable, 1.0, device)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    changed = any(not torch.equal(b, p.to_local()) for b, p in zip(before, trainable))
    steps.append({{"changed": changed, "scale": scaler.get_scale(), "norm": float(norm)}})
gathered = [None] * world
torch.distributed.all_gather_object(gathered, steps)
if rank == 0:
    open({out!r}, "w").write(json.dumps(gathered))
distributed.end_distributed(world)
distributed.exit_process(0)
"""


def test_fp16_overflow_in_one_rank_shard_skips_the_step_on_every_rank(demo_dir, tmp_path):
    """train.forward_backward under fp16 with torch.amp.GradScaler on sharded gradients: an inf in rank 1's shard
    alone skips the step on both ranks (no shard changes) and halves the scale on both."""
    out = tmp_path / "fp16.json"
    overrides = tiny_overrides(demo_dir, tmp_path / "unused", **LORA, **{"train.precision": "fp16"})
    script = tmp_path / "fp16.py"
    script.write_text(FP16_SCRIPT.format(root=str(ROOT), config=str(ROOT / "configs" / "demo.yaml"),
                                         overrides=overrides, out=str(out)))
    result = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = json.loads(out.read_text())
    assert [[s["changed"] for s in steps] for steps in ranks] == [[True, False, True]] * 2
    for steps in ranks:
        assert steps[1]["scale"] == steps[0]["scale"] / 2 == steps[2]["scale"] and steps[1]["norm"] == float("inf")


# ---------------------------------------------------------------------------------------------------------
# Distributed Checkpoint: atomic, resumes exactly, reshards


SAVED = {"train.parallel": "fsdp", "train.max_steps": 12, "train.save_every": 3, "train.keep_last": 5, **LORA}


@pytest.fixture(scope="module")
def saved(demo_dir, tmp_path_factory) -> Path:
    """One 2-rank FSDP run of train.py, LoRA, 12 steps, a sharded checkpoint every 3 steps."""
    run_dir = tmp_path_factory.mktemp("saved") / "straight"
    run_train(tiny_overrides(demo_dir, run_dir, **SAVED), nproc=2)
    return run_dir


def test_sharded_checkpoint_layout(saved):
    ckpt = saved / "step_3"
    assert [p.name for p in list_checkpoints(saved)] == ["step_3", "step_6", "step_9", "step_12"]
    assert is_sharded_checkpoint(ckpt) and not (ckpt / "model.safetensors").exists()
    assert sorted(p.name for p in (ckpt / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    for name in ("trainer_state.json", "config.yaml", "optimizer_groups.json", "rng_rank0.json", "rng_rank1.json",
                 "backbone/config.json", "tokenizer.json"):
        assert (ckpt / name).is_file(), name
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert (state["step"], state["world_size"]) == (3, 2)
    model_tensors = read_sharded_model_tensors(ckpt)
    assert read_config(ckpt).model.init == "scratch" and "backbone.model.layers.0.self_attn.q_proj.lora_A" in model_tensors
    states = read_sharded_tensors(ckpt, "optim.")
    assert {k.rsplit(".", 1)[1] for k in states} == {"step", "exp_avg", "exp_avg_sq"}
    assert all(not k.startswith("backbone.") or "lora_" in k for k in {k.rsplit(".", 1)[0] for k in states})


def resume_from(saved: Path, step: int, run_dir: Path) -> Path:
    """A run directory holding only the straight run's step_<step>: re-running train.py there resumes from it."""
    run_dir.mkdir(parents=True)
    shutil.copytree(saved / f"step_{step}", run_dir / f"step_{step}")
    return run_dir


def test_sigterm_under_fsdp_saves_a_checkpoint_that_resumes_exactly(demo_dir, saved, tmp_path):
    """SIGTERM to torchrun (forwarded to both ranks) mid-run: the step in progress finishes, both ranks write their
    shards of one complete checkpoint, and the re-run continues bitwise like the run that never stopped."""
    run_dir = tmp_path / "stopped"
    overrides = tiny_overrides(demo_dir, run_dir, **{**SAVED, "train.save_every": 100})
    proc = start_train(overrides, nproc=2)
    wait_for_step(run_dir, 3, proc)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=300)
    checkpoints = list_checkpoints(run_dir)
    assert len(checkpoints) == 1 and not list(run_dir.glob(".tmp_*")), checkpoints
    step = int(checkpoints[0].name.split("_")[1])
    assert 3 <= step < 12, "the run finished before the signal; the test proves nothing"
    assert json.loads((checkpoints[0] / "trainer_state.json").read_text())["step"] == step
    resumed = run_train(overrides, nproc=2)
    assert f"resumed from {checkpoints[0]}" in resumed.stdout
    straight, stopped = train_records(saved), train_records(run_dir)
    assert [stopped[s]["loss"] for s in range(1, 13)] == [straight[s]["loss"] for s in range(1, 13)]
    want, got = read_sharded_model_tensors(saved / "step_12"), read_sharded_model_tensors(run_dir / "step_12")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_resume_on_one_process_continues_with_the_same_clips(demo_dir, saved, tmp_path):
    """The 2-rank checkpoint of step 3 resumed by one process (no torchrun) with 2 accumulation steps for the same
    2 clips per step: the losses of steps 4..12 equal the 2-rank run's to 1e-5."""
    run_dir = resume_from(saved, 3, tmp_path / "one")
    resumed = run_train(tiny_overrides(demo_dir, run_dir, **{**SAVED, "train.grad_accum": 2}))
    assert "batch split 2x1x1 -> 1x1x2, the same 2 clips per step" in resumed.stdout
    straight, one = train_records(saved), train_records(run_dir)
    for step in range(4, 13):
        assert one[step]["loss"] == pytest.approx(straight[step]["loss"], rel=1e-5), step


@pytest.mark.slow
def test_checkpoint_reshards_from_2_to_1_to_4_ranks(demo_dir, tmp_path):
    """4 clips per step as 2 ranks x 2 accumulation steps, saved at step 3; one process (4 accumulation steps)
    resumes it and saves step 6; 4 ranks (1 clip each) resume that: every step's loss equals the uninterrupted
    2-rank run's to 1e-5, and the 4-rank checkpoint has one shard file per rank."""
    common = {**SAVED, "train.max_steps": 9}
    straight = tmp_path / "straight"
    run_train(tiny_overrides(demo_dir, straight, **{**common, "train.grad_accum": 2}), nproc=2)
    one = resume_from(straight, 3, tmp_path / "one")
    run_train(tiny_overrides(demo_dir, one, **{**common, "train.grad_accum": 4}))
    four = resume_from(one, 6, tmp_path / "four")
    resumed = run_train(tiny_overrides(demo_dir, four, **{**common, "train.grad_accum": 1}), nproc=4)
    assert "batch split 1x1x4 -> 4x1x1, the same 4 clips per step" in resumed.stdout
    assert sorted(p.name for p in (four / "step_9" / "dcp").glob("*.distcp")) == [f"__{r}_0.distcp" for r in range(4)]
    want, got = train_records(straight), {**train_records(one), **train_records(four)}
    for step in range(4, 10):
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5), step


class FailingTokenizer:
    def save_pretrained(self, path):
        raise OSError("disk full")


def test_a_save_that_fails_midway_is_never_picked_up_and_rotation_keeps_k(demo_dir, tmp_path):
    """One process without a process group: the shards are written, then the save fails before the rename;
    only .tmp_step_<N> exists, which list_checkpoints ignores and the next start deletes. Rotation keeps 2."""
    cfg = demo_cfg(demo_dir, tmp_path)
    tokenizer = load_tokenizer(cfg.model.path)
    model = build_model(cfg, tokenizer)
    optimizer = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-3)
    run_dir = tmp_path / "run"

    def meta(tok) -> CheckpointMeta:
        return CheckpointMeta({"step": 1}, tok, model.backbone.config, [rng_state()])

    with pytest.raises(OSError, match="disk full"):
        save_sharded_checkpoint(run_dir, 5, model, optimizer, cfg, meta(FailingTokenizer()), keep_last=2)
    assert (run_dir / ".tmp_step_5" / "dcp" / ".metadata").is_file() and list_checkpoints(run_dir) == []
    assert discard_unfinished_saves(run_dir) == [run_dir / ".tmp_step_5"]
    for step in (1, 2, 3):
        save_sharded_checkpoint(run_dir, step, model, optimizer, cfg, meta(tokenizer), keep_last=2)
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_2", "step_3"]


def test_metadata_naming_other_code_is_refused(saved, tmp_path):
    ckpt = tmp_path / "bad"
    shutil.copytree(saved / "step_3", ckpt)
    (ckpt / "dcp" / ".metadata").write_bytes(pickle.dumps(print))  # any callable outside DCP's metadata classes
    with pytest.raises(CheckpointError, match="builtins.print, which is not part of DCP metadata"):
        read_sharded_model_tensors(ckpt)


def test_checkpoints_of_the_other_layout_are_refused_with_the_fix(saved, tiny_ckpt):
    for ckpt, parallel, fix in ((saved / "step_3", "ddp", "resume it with train.parallel=fsdp"),
                                (tiny_ckpt, "fsdp", "resume it with train.parallel=ddp")):
        cfg = read_config(ckpt, [f"train.parallel={parallel}"])
        model = build_model(cfg, load_tokenizer(ckpt))
        optimizer = torch.optim.AdamW(param_groups(model, 0.0))
        with pytest.raises(CheckpointError, match=fix):
            load_training_state(ckpt, model, optimizer, torch.amp.GradScaler("cpu", enabled=False), cfg)


# ---------------------------------------------------------------------------------------------------------
# Evaluation from a sharded checkpoint


def test_evaluation_of_a_sharded_checkpoint_equals_the_ddp_checkpoints(saved, tmp_path, capsys):
    """evaluate.py on the FSDP checkpoint and on a DDP checkpoint holding the same weights: the same predictions
    frame for frame (generation included) and the same metrics.json but for its wall-clock fields."""
    fsdp_ckpt = saved / "step_12"
    model, tokenizer, cfg = load_for_inference(fsdp_ckpt)
    meta = CheckpointMeta({"step": 12}, tokenizer, model.backbone.config, [rng_state()])
    ddp_ckpt = save_checkpoint(tmp_path / "ddp_run", 12, model_state_for_checkpoint(model, cfg),
                               torch.optim.AdamW(param_groups(model, 0.0)), cfg, meta, keep_last=2)
    outputs = []
    for ckpt in (fsdp_ckpt, ddp_ckpt):
        out = tmp_path / f"eval_{ckpt.parent.name}"
        assert evaluate.main(["--ckpt", str(ckpt), "--max-videos", "1", "--embedder", "bow", "--out", str(out),
                              "eval.max_new_tokens=2", "eval.max_dst_tokens=2", "eval.speak_threshold=0.7",
                              "eval.dst_threshold=0.7"]) == 0
        result = json.loads((out / "metrics.json").read_text())
        result.pop("seconds"), result.pop("frames_per_second"), result.pop("checkpoint")
        outputs.append((result, (out / "predictions.jsonl").read_bytes()))
    assert outputs[0] == outputs[1] and outputs[0][1].count(b"\n") > 20


# ---------------------------------------------------------------------------------------------------------
# Export to a transformers model directory


def lm_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The project's LM-head logits at every position of one sequence without frames: (T, V)."""
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        return model(ids, text_mask=mask)["text_logits"]


def sample_ids(tokenizer) -> torch.Tensor:
    """Ordinary text and the added tokens that need no frame feature ([USER], [DST], [ASST], <pad>)."""
    text = "[USER] Attach the wheels. [DST] S1->complete [ASST] Now attach the cabin. <pad>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    added = set(tokenizer.convert_tokens_to_ids(["[USER]", "[DST]", "[ASST]", "<pad>"]))
    assert len(added & set(ids)) == 4
    return torch.tensor([ids])


def assert_exported_logits_equal(out: Path, model, tokenizer, peft_adapter: bool = False) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    exported = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True, dtype=torch.float32)
    if peft_adapter:
        peft = pytest.importorskip("peft", reason="the adapter check needs peft (requirements-bench.txt)")
        exported = peft.PeftModel.from_pretrained(exported, str(out / export.ADAPTER_DIR))
    exported.eval()
    ids = sample_ids(AutoTokenizer.from_pretrained(str(out)))
    assert ids.tolist() == sample_ids(tokenizer).tolist()
    want = lm_logits(model, ids)  # (T, V)
    with torch.no_grad():
        got = exported(input_ids=ids).logits[0, :, :want.shape[1]]  # (T, V) over the project's vocabulary
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_export_of_a_ddp_checkpoint_loads_in_transformers_with_equal_logits(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "export"
    assert export.main(["--ckpt", str(tiny_ckpt), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    model, tokenizer, _ = load_for_inference(tiny_ckpt)
    assert_exported_logits_equal(out, model, tokenizer)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == len(tokenizer) > model.vocab_size
    extra = load_file(str(out / export.EXTRA_PARTS))
    assert torch.equal(extra["projector.0.weight"], model.projector[0].weight)
    assert json.loads((out / "generation_config.json").read_text())["suppress_tokens"] == model.new_token_ids.tolist()
    assert export.main(["--ckpt", str(tiny_ckpt), "--out", str(out), "--merge-lora"]) == 1
    assert "no LoRA layers" in capsys.readouterr().err


def test_export_of_a_tied_lora_checkpoint_merged_and_as_an_adapter(demo_dir, tmp_path):
    """A tied LM head with trained (non-zero) LoRA matrices: merged, the exported model alone gives the
    project's logits; unmerged, the base model plus the peft adapter gives them."""
    cfg = demo_cfg(demo_dir, tmp_path, *LORA_ARGS, model_dir=tied_model_dir(demo_dir, tmp_path))
    tokenizer = load_tokenizer(cfg.model.path)
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer).eval()
    for module in model.modules():
        if isinstance(module, LoRALinear):
            torch.nn.init.normal_(module.lora_B, std=0.05)
    optimizer = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-3)
    meta = CheckpointMeta({"step": 1}, tokenizer, model.backbone.config, [rng_state()])
    ckpt = save_checkpoint(tmp_path / "run", 1, model_state_for_checkpoint(model, cfg), optimizer, cfg, meta, keep_last=2)
    merged = export.export_model_dir(ckpt, tmp_path / "merged", merge_lora=True)
    config = json.loads((merged / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and "lm_head.weight" not in load_file(str(merged / "model.safetensors"))
    assert_exported_logits_equal(merged, model, tokenizer)
    adapter = export.export_model_dir(ckpt, tmp_path / "adapter", merge_lora=False)
    assert_exported_logits_equal(adapter, model, tokenizer, peft_adapter=True)


def test_export_of_a_sharded_checkpoint(saved, tmp_path):
    ckpt = saved / "step_3"
    out = export.export_model_dir(ckpt, tmp_path / "export", merge_lora=True)
    model, tokenizer, _ = load_for_inference(ckpt)
    assert_exported_logits_equal(out, model, tokenizer)
