"""Export a checkpoint to a transformers model directory, for serving or sharing the language model.

    python export.py --ckpt runs/x/step_5000 --out exported/x               # base weights + LoRA as a peft adapter
    python export.py --ckpt runs/x/step_5000 --out exported/x --merge-lora  # LoRA merged into the weights

It reads DDP checkpoints (model.safetensors) and FSDP ones (dcp/) alike and writes the backbone with the added
tokens' rows in an enlarged embedding (`AutoModelForCausalLM.from_pretrained(out)` loads it), the tokenizer, a
generation config that never emits the added tokens, and the project's own parts (projector, decision heads,
new-token rows) in video_assistant.safetensors with video_assistant.json (docs/training.md#export).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file
from transformers import GenerationConfig

from checkpoint import CheckpointError, load_for_inference
from config import Config, ConfigError
from model import DTYPES, LoRALinear, VideoAssistant

EXTRA_PARTS = "video_assistant.safetensors"  # projector, heads, new-token rows
EXTRA_PARTS_INFO = "video_assistant.json"
ADAPTER_DIR = "lora_adapter"  # without --merge-lora: the LoRA matrices as a peft adapter


def backbone_weights(model: VideoAssistant, merge_lora: bool) -> dict[str, torch.Tensor]:
    """The backbone's tensors under transformers' names, fp32: LoRA layers give their base weight, plus
    scale * B @ A when `merge_lora`. A tied LM head is left out (transformers re-ties it on load)."""
    lora = {name: m for name, m in model.backbone.named_modules() if isinstance(m, LoRALinear)}
    tied = model.backbone.get_output_embeddings().weight is model.backbone.get_input_embeddings().weight
    out = {}
    for name, tensor in model.backbone.state_dict().items():
        module_name, _, leaf = name.rpartition(".")
        if leaf in ("lora_A", "lora_B") or (tied and name == "lm_head.weight"):
            continue
        if module_name.endswith(".base") and module_name.removesuffix(".base") in lora:
            layer_name = module_name.removesuffix(".base")
            name = f"{layer_name}.{leaf}"
            if merge_lora and leaf == "weight":
                layer = lora[layer_name]
                delta = layer.scale * (layer.lora_B.detach().float() @ layer.lora_A.detach().float())  # (out, in)
                tensor = tensor.float() + delta
        out[name] = tensor.detach().float()
    return out


def add_new_token_rows(model: VideoAssistant, weights: dict[str, torch.Tensor]) -> int:
    """Write the new_token_embed rows into the embedding table at the added ids, enlarging it (and an untied
    LM head, with zero rows) when the ids lie beyond it. Returns the new vocabulary size."""
    embed_name = next(n for n in weights if n.endswith("embed_tokens.weight"))
    table = weights[embed_name]  # (V, H)
    ids = model.new_token_ids.tolist()
    size = max(table.shape[0], max(ids) + 1)
    grown = torch.cat([table, table.new_zeros(size - table.shape[0], table.shape[1])])  # (size, H)
    grown[ids] = model.new_token_embed.weight.detach().float()
    weights[embed_name] = grown
    if "lm_head.weight" in weights:
        head = weights["lm_head.weight"]
        weights["lm_head.weight"] = torch.cat([head, head.new_zeros(size - head.shape[0], head.shape[1])])
    return size


def extra_parts(model: VideoAssistant) -> dict[str, torch.Tensor]:
    """The project's parts outside the language model: projector, decision heads, new-token rows and ids."""
    state = model.state_dict()
    prefixes = ("projector.", "speak_head.", "dst_head.", "new_token_embed.", "new_token_ids")
    return {k: v.detach().contiguous() for k, v in state.items() if k.startswith(prefixes)}


def write_lora_adapter(model: VideoAssistant, cfg: Config, out_dir: Path) -> None:
    """The LoRA matrices as a peft adapter (adapter_config.json + adapter_model.safetensors) over the exported
    base model; `PeftModel.from_pretrained(base, out_dir / "lora_adapter")` applies them."""
    tensors = {}
    for name, module in model.backbone.named_modules():
        if isinstance(module, LoRALinear):
            tensors[f"base_model.model.{name}.lora_A.weight"] = module.lora_A.detach().contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = module.lora_B.detach().contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.model.lora_rank, "lora_alpha": cfg.model.lora_alpha,
        "lora_dropout": cfg.model.lora_dropout, "target_modules": sorted(cfg.model.lora_targets), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True, "base_model_name_or_path": "..",
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))


def write_backbone(out_dir: Path, model: VideoAssistant, tokenizer, merge_lora: bool, dtype: torch.dtype) -> None:
    """model.safetensors, config.json, the tokenizer and generation_config.json of the exported language model."""
    weights = backbone_weights(model, merge_lora)
    vocab_size = add_new_token_rows(model, weights)
    save_file({k: v.to(dtype).contiguous() for k, v in weights.items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    config = model.backbone.config
    config.vocab_size, config.dtype = vocab_size, dtype
    config.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    generation = GenerationConfig.from_model_config(config)
    generation.suppress_tokens = model.new_token_ids.tolist()  # inputs only: the model never learned to emit them
    generation.pad_token_id = tokenizer.pad_token_id
    generation.save_pretrained(str(out_dir))


def export_model_dir(ckpt_dir: str | Path, out_dir: str | Path, merge_lora: bool, dtype: str = "fp32") -> Path:
    """Write a transformers model directory from a DDP or FSDP checkpoint: the backbone (LoRA merged when
    `merge_lora`, else the base weights plus a peft adapter in lora_adapter/) with the added tokens' rows in an
    enlarged embedding, the tokenizer, a generation config that never generates the added tokens, and the
    project's own parts in video_assistant.safetensors. `dtype`: fp32, fp16 or bf16 for the weights."""
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    model, tokenizer, cfg = load_for_inference(ckpt_dir)
    has_lora = any(isinstance(m, LoRALinear) for m in model.modules())
    if merge_lora and not has_lora:
        raise ValueError(f"{ckpt_dir}: --merge-lora, but the checkpoint has no LoRA layers "
                         f"(model.trainable={cfg.model.trainable}); export without it")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_backbone(out_dir, model, tokenizer, merge_lora, DTYPES[dtype])
    save_file(extra_parts(model), str(out_dir / EXTRA_PARTS), metadata={"format": "pt"})
    info = {"checkpoint": str(ckpt_dir), "feature_dim": cfg.data.feature_dim, "head_type": cfg.model.head_type,
            "image_token_id": model.image_token_id, "new_token_ids": model.new_token_ids.tolist(),
            "lora": "merged" if merge_lora else (ADAPTER_DIR if has_lora else None)}
    (out_dir / EXTRA_PARTS_INFO).write_text(json.dumps(info, indent=2))
    if has_lora and not merge_lora:
        write_lora_adapter(model, cfg, out_dir / ADAPTER_DIR)
    return out_dir


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint directory (runs/<name>/step_<N>), DDP or FSDP")
    parser.add_argument("--out", required=True, help="output model directory")
    parser.add_argument("--merge-lora", action="store_true", help="merge LoRA into the base weights (lora runs)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="weight dtype (default fp32)")
    args = parser.parse_args(argv)
    try:
        out = export_model_dir(args.ckpt, args.out, args.merge_lora, args.dtype)
    except (CheckpointError, ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out} (AutoModelForCausalLM.from_pretrained({str(out)!r}); project parts in {out / EXTRA_PARTS})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
