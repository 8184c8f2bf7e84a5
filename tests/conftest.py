"""Shared fixtures: the user's sample clip with a features file, a tiny tokenizer, a small demo dataset."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clips import unclamped_frame  # noqa: E402  (the repository root is on the path from here on)

SAMPLE_CLIP = ROOT / "tests" / "data" / "prospect_sample_clip.json"

TOKENIZER_TEXT = [
    "You are a helpful and proactive assistant. Always be ready to assist and provide useful information ahead of time.",
    "Task steps: Current state: not_started, in_progress, completed S1 S2 S3 S4 S5 S6 -> start complete",
    "Assemble the chassis by attaching and screwing the chassis parts together. Attach wheels to the chassis.",
    "Great! Let's get started. Now, screw it with the screwdriver. Take the cabin window and secure it.",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,!?;:'\"-()",
]


def write_tokenizer(out_dir: Path, texts: list[str] = TOKENIZER_TEXT, vocab_size: int = 400) -> Path:
    """A byte-level BPE tokenizer with pad == eos (the case data.load_tokenizer must fix)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return out_dir


def write_proassist_features(path: Path, num_rows: int, dim: int = 1152, seed: int = 0,
                             columns=("cls",), nested: bool = True) -> np.ndarray:
    """A ProAssist-layout file: row k = absolute frame k. Returns the cls values (num_rows, dim)."""
    rng = np.random.default_rng(seed)
    arrays, names, cls_values = [], [], None
    for name in columns:
        cells = {"cls": 1, "2x2": 4, "3x3": 9}[name]
        values = rng.standard_normal((num_rows, cells, dim)).astype(np.float16)
        if name == "cls":
            cls_values = values[:, 0, :]
        if nested:
            arr = pa.array([[row.tolist() for row in frame] for frame in values],
                           type=pa.list_(pa.list_(pa.float16())))
        else:
            arr = pa.array([frame.reshape(-1).tolist() for frame in values], type=pa.list_(pa.float16()))
        arrays.append(arr)
        names.append(name)
    table = pa.table(dict(zip(names, arrays)))
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.ipc.new_file(str(path), table.schema) as writer:
        writer.write_table(table)
    return cls_values


def cut_sample(sample: dict, start: int, end: int, clip_idx: int) -> dict:
    """The sample clip restricted to [start, end): every turn the event-frame rule places in that range
    (including one at start - 1, which the clip's clamp attaches to its first frame), as a data builder
    cutting a video into clips writes them."""
    clip = copy.deepcopy(sample)
    clip.update(start_frame_idx=start, end_frame_idx=end, clip_idx=clip_idx)
    clip.pop("initial_dst_state", None)  # written for the original range; the loader recomputes it anyway
    system, timed = clip["conversation"][0], clip["conversation"][1:]
    clip["conversation"] = [system] + [
        turn for turn in timed if start - 1 <= unclamped_frame(turn["time"], clip["fps"]) <= end - 1]
    return clip


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return write_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture()
def sample_clip() -> dict:
    return json.loads(SAMPLE_CLIP.read_text())


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """A small demo dataset (8 training videos) with its tokenizer and tiny model config."""
    import demo
    out = tmp_path_factory.mktemp("demo")
    demo.make_demo(out, seed=0, num_videos=8)
    return out


@pytest.fixture(scope="session")
def tiny_ckpt(demo_dir, tmp_path_factory) -> Path:
    """A checkpoint of the demo model after a few training steps (in-process, CPU)."""
    import train
    from config import load_config
    run_dir = tmp_path_factory.mktemp("run")
    cfg = load_config(ROOT / "configs" / "demo.yaml", [
        f"data.root={demo_dir}", f"model.path={demo_dir / 'model'}", f"run.dir={run_dir}", "data.num_workers=0",
        "train.max_steps=3", "train.eval_every=0", "train.log_every=1", "train.save_every=3",
    ])
    train.train(cfg)
    return run_dir / "step_3"
