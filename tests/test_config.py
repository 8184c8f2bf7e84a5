"""Config values: YAML-1.1 float spellings, quoted strings, value ranges at load time, `~` in path fields."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from config import ConfigError, from_dict, load_config, to_dict


def test_float_fields_accept_what_float_accepts(tmp_path):
    # The README's own example: YAML 1.1 reads `1e-4` (no dot) as a string.
    assert load_config(None, ["optim.lr=1e-4"]).optim.lr == 1e-4
    assert load_config(None, ["optim.eps=1E-8", "loss.focal_alpha=2.5e-1"]).optim.eps == 1e-8
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 1e-4\n  eps: 3e-9\nloss:\n  focal_alpha: 25e-2\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert (cfg.optim.lr, cfg.optim.eps, cfg.loss.focal_alpha) == (1e-4, 3e-9, 0.25)
    assert isinstance(cfg.optim.lr, float)
    # A checkpoint's saved config goes through the same path.
    assert from_dict({"optim": {"lr": "2e-4"}}).optim.lr == 2e-4


@pytest.mark.parametrize("override", ["optim.lr=fast", "optim.lr=1e-4x", "loss.focal_alpha=high", "optim.lr=true"])
def test_float_fields_still_refuse_non_numbers(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"'{key}' expects float"):
        load_config(None, [override])


def test_quoted_strings_are_yaml_strings_templates_stay_as_written():
    cfg = load_config(None, ["run.name='exp 1'", 'eval.embedder="bow"', "run.dir=\"runs/a b\""])
    assert cfg.run.name == "exp 1" and cfg.eval.embedder == "bow" and cfg.run.dir == "runs/a b"
    # Unquoted: the text as written, so templates need no quoting.
    cfg = load_config(None, ["data.features_path={root}/{dataset}/{video_uid}.arrow", "run.name=exp: 2"])
    assert cfg.data.features_path == "{root}/{dataset}/{video_uid}.arrow" and cfg.run.name == "exp: 2"
    assert load_config(None, ["data.features_path='{root}/{video_uid}.arrow'"]).data.features_path == "{root}/{video_uid}.arrow"
    with pytest.raises(ConfigError, match="run.name"):
        load_config(None, ['run.name="a" "b"'])  # quoted, but not one YAML string


@pytest.mark.parametrize("override,allowed", [
    ("train.log_every=0", ">= 1"),
    ("train.save_every=0", ">= 1"),
    ("train.grad_accum=0", ">= 1"),
    ("train.micro_batch=0", ">= 1"),
    ("train.max_steps=-1", ">= 1"),
    ("train.max_bad_steps=0", ">= 1"),
    ("train.keep_last=1", ">= 2"),
    ("train.seed=-3", ">= 0"),
    ("train.eval_every=-1", ">= 0"),
    ("data.max_seq_len=-5", ">= 1"),
    ("data.feature_dim=0", ">= 1"),
    ("data.num_workers=-1", ">= 0"),
    ("data.nfs_rho=1.5", "in [0, 1]"),
    ("optim.lr=-1e-4", ">= 0"),
    ("optim.lr=nan", "finite"),
    ("optim.eps=0", "> 0"),
    ("optim.beta2=1", "in [0, 1)"),
    ("model.lora_rank=0", ">= 1"),
    ("model.lora_dropout=1.0", "in [0, 1)"),
    ("loss.w_asst=-1", ">= 0"),
    ("eval.speak_threshold=2", "in [0, 1]"),
    ("eval.max_new_tokens=0", ">= 1"),
])
def test_value_ranges_checked_at_load_time(override, allowed):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"'{re.escape(key)}'.*{re.escape(allowed)}"):
        load_config(None, [override])


def test_value_ranges_in_yaml_name_the_file_and_key(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  log_every: 0\n")
    with pytest.raises(ConfigError, match=r"c.yaml: key 'train.log_every' must be >= 1"):
        load_config(tmp_path / "c.yaml")


def test_zero_where_it_means_off_is_kept():
    cfg = load_config(None, ["train.eval_every=0", "train.eval_max_clips=0", "optim.grad_clip=0",
                             "data.num_workers=0", "eval.repetition_guard=0", "loss.focal_gamma=0"])
    assert cfg.train.eval_every == 0 and cfg.optim.grad_clip == 0.0 and cfg.eval.repetition_guard == 0


def test_home_is_expanded_in_path_fields(tmp_path):
    home = os.path.expanduser("~")
    cfg = load_config(None, [
        "run.dir=~/runs/x", "data.root=~/data", "model.path=~/models/llama",
        "data.features_path=~/feat/{video_uid}.arrow", "train.resume=~/runs/x/step_10",
        "eval.embedder=~/encoders/minilm", "data.train=[~/a.json, b.json]",
    ])
    assert cfg.run.dir == f"{home}/runs/x"
    assert cfg.data.root == f"{home}/data"
    assert cfg.model.path == f"{home}/models/llama"
    assert cfg.data.features_path == f"{home}/feat/{{video_uid}}.arrow"
    assert cfg.train.resume == f"{home}/runs/x/step_10"
    assert cfg.eval.embedder == f"{home}/encoders/minilm"
    assert cfg.data.train == [f"{home}/a.json", "b.json"]
    # Words that are not paths stay words.
    cfg = load_config(None, ["train.resume=auto", "eval.embedder=bow"])
    assert cfg.train.resume == "auto" and cfg.eval.embedder == "bow"
    # YAML files too.
    (tmp_path / "c.yaml").write_text("run:\n  dir: ~/r\n")
    assert load_config(tmp_path / "c.yaml").run.dir == f"{home}/r"
    assert "~" not in str(to_dict(load_config(tmp_path / "c.yaml"))["run"])


def test_retired_keys_name_their_replacement_and_old_checkpoints_still_load(tmp_path):
    """A checkpoint written before train.eval_max_batches was replaced loads (the key is dropped with a
    warning); a config file or an override that still names it is refused with the replacement."""
    from config import ConfigError, from_dict, load_config
    old_checkpoint_config = {"train": {"max_steps": 10, "eval_max_batches": 200}}
    with pytest.warns(UserWarning, match="ignoring 'train.eval_max_batches'.*train.eval_max_clips"):
        cfg = from_dict(old_checkpoint_config, "runs/x/step_10/config.yaml")
    assert cfg.train.max_steps == 10 and cfg.train.eval_max_clips == 0
    path = tmp_path / "old.yaml"
    path.write_text("train:\n  eval_max_batches: 200\n")
    with pytest.raises(ConfigError, match="no longer a setting; use train.eval_max_clips"):
        load_config(path)
    with pytest.raises(ConfigError, match="no longer a setting; use train.eval_max_clips"):
        load_config(None, ["train.eval_max_batches=3"])


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).parents[1] / "configs").glob("*.yaml")))
def test_every_shipped_config_loads(name):
    """Each file in configs/ is a valid config of this version (no unknown, retired or out-of-range key)."""
    cfg = load_config(Path(__file__).parents[1] / "configs" / name)
    assert cfg.run.name
