"""Shared set-up for the benchmarks: the repository on sys.path, the scripts' own argument parsing and start-up
errors, model shapes, device facts, JSON output."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import AutoConfig  # noqa: E402

from checkpoint import CheckpointError  # noqa: E402
from clips import DataError  # noqa: E402
from config import ConfigError  # noqa: E402
from distributed import exit_process  # noqa: E402
from model import build_model, build_model_from_config_dict  # noqa: E402

# Random-init backbones of real shapes (no weights needed): the demo's tiny Llama, Llama-3.2-1B's and -3B's shapes.
SHAPES = {
    "demo": None,  # the config.json in model.path
    "llama1b": dict(
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    ),
    "llama3b": dict(
        model_type="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    ),
}


def parse_args(parser: argparse.ArgumentParser, argv: Optional[list[str]] = None) -> argparse.Namespace:
    """As evaluate.py parses: key=value overrides may sit between options (`CONFIG --batches 30 data.x=y`)."""
    return parser.parse_intermixed_args(argv)


def run(main: Callable[[], None]) -> None:
    """Run a benchmark's main; a config, data or checkpoint the scripts it measures would refuse ends here the
    same way, in one line naming the setting and the fix (exit status 1), not in a traceback."""
    code = 0
    try:
        main()
    except (ConfigError, DataError, CheckpointError, ModuleNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        code = 1
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_process(code)  # a torchrun worker (bench_train.py --parallel): see distributed.exit_process
    sys.exit(code)


def build(cfg, tokenizer, shape: str, device: Optional[torch.device] = None):
    """The model of `shape` as the scripts build it; `device`: where the run computes (an NF4 base is quantised
    there)."""
    torch.manual_seed(cfg.train.seed)
    if SHAPES[shape] is None and cfg.model.frozen_dtype != "nf4":
        return build_model(cfg, tokenizer, device)
    config = SHAPES[shape] or AutoConfig.from_pretrained(cfg.model.path, local_files_only=True).to_dict()
    # Random weights stand for a pretrained base. The scripts refuse an NF4 base over model.init=scratch because
    # a checkpoint would have to hold it; a benchmark saves nothing.
    cfg.model.init = "pretrained"
    return build_model_from_config_dict(config, tokenizer, cfg, device)


def device_facts(device: torch.device) -> dict:
    facts = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
             "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
        facts["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return facts


def emit(result: dict, out: str | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
