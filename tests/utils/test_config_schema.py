"""Every setting of the schema rejects a bad value before any work, naming key, value and a fix; the typed sections
declare every key once, fill in its default and refuse a key they do not declare."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import ValidationError

from configs.schema import SECTIONS
from utils.config_schema import RULES, ConfigError, check_config, settings

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
ROOT = CONFIG_DIR.parent

# one bad value per kind of rule (by what the rule says is valid)
BAD = {"an integer >= 1": 0, "an integer >= 0": -1, "a number > 0": 0.0, "a number >= 0": -1.0, "a number >= 1": 0.5,
       "a non-empty list, each a speed-up > 1": [1.0], "a non-empty list, each an integer >= 1": [0],
       "a non-empty list, each an integer": [], "a number in (0, 1)": 1.0, "an integer": "abc",
       "a speed-up > 1": 1.0, "a list of increasing integers >= 0 (may be empty)": [9, 6],
       "null or a non-empty list of epochs >= 0": [-2],
       "one of fast, pyg, multiplicative": "slow", "one of additive, relative_scale": "channel_scale",  # retired edit
       "one of relu, tanh, silu": "gelu", "one of nsgd, adamw": "adam", "one of target, adaptive_bn, knee": "elbow",
       "one of batch, stored": "running", "a number in [0, 1) (0: off)": 1.0,
       "a list, each a speed-up > 1": [0.5]}


def _compose(overrides=()):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("main", overrides=list(overrides))


def _concrete_keys(cfg):
    """The patterns of RULES with ``*`` replaced by the first child that the composed config has."""
    for pattern in RULES:
        parts = pattern.split(".")
        if "*" in parts:
            i = parts.index("*")
            node = OmegaConf.select(cfg, ".".join(parts[:i]))
            parts[i] = next(iter(node.keys()))
        yield pattern, ".".join(parts)


def test_the_shipped_configs_pass():
    for overrides in ([], ["method=sparse_learning"], ["task=resnet56_on_CIFAR10"], ["task=VGG19_on_CIFAR100"]):
        check_config(_compose(overrides))


def test_every_rule_has_a_bad_value():
    assert {rule.valid for rule in RULES.values()} <= set(BAD)


@pytest.mark.parametrize("pattern", list(RULES))
def test_each_key_rejects_a_bad_value(pattern):
    cfg = _compose(["method=sparse_learning"])  # has method.reg
    key = dict(_concrete_keys(cfg))[pattern]
    assert OmegaConf.select(cfg, key, default="missing") != "missing", key
    bad = BAD[RULES[pattern].valid]
    try:
        with open_dict(cfg):
            OmegaConf.update(cfg, key, bad, merge=False)
    except ValidationError as refused:  # a typed section refuses a value of the wrong type itself
        assert key in str(refused)
        return
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    message = str(err.value)
    assert message.startswith(f"{key}={bad!r} is not valid")
    assert f"e.g. {key}={RULES[pattern].example}" in message
    # the example it gives is itself valid
    with open_dict(cfg):
        OmegaConf.update(cfg, key, yaml.safe_load(RULES[pattern].example), merge=False)
    check_config(cfg)


def test_bools_are_not_integers():
    cfg = _compose()
    cfg.task.schedules.pretrain.epochs = True
    with pytest.raises(ConfigError, match="task.schedules.pretrain.epochs=True"):
        check_config(cfg)
    with pytest.raises(Exception, match="task.meta_train.epochs"):  # a typed section refuses it on assignment
        cfg.task.meta_train.epochs = True


def test_every_schema_key_has_a_type_a_default_and_a_meaning():
    import dataclasses
    for section, schema in SECTIONS.items():
        for f in dataclasses.fields(schema):
            assert f.metadata.get("meaning"), f"{section}.{f.name} has no meaning"
            assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING, f.name


def test_the_sections_are_typed_with_their_defaults_filled_in():
    cfg = _compose(["metanetwork=resnet56", "task.meta_train.gamma=0.5", "metanetwork.kernels=false"])
    mt, meta, vis = settings(cfg, "task.meta_train"), settings(cfg, "metanetwork"), settings(cfg, "task.visualize")
    # keys the YAML files do not set are declared by the schema: overridable without `+`, with their defaults
    assert (mt.gamma, meta.kernels, meta.backend, vis.data_model) == (0.5, False, None, 0)
    assert isinstance(mt.alpha, float) and mt.alpha == 16.0  # the YAML's integer 16, converted to the declared type
    assert mt.prune_aware.weight == 0.0 and mt.prune_aware.targets == []
    bench = settings(cfg, "benchmark")
    assert bench.speed_ups == [8.0, 12.0] and bench.workers == 2  # interpolations resolved in the whole config


@pytest.mark.parametrize("section,key,close", [("task.meta_train", "epoch", "epochs"), ("metanetwork", "hidden_dims", "hidden_dim"),
                                               ("task.visualize", "select_targets", "select_target"),
                                               ("task.meta_train.prune_aware", "weights", "weight")])
def test_a_key_a_section_does_not_declare_is_refused_with_the_closest(section, key, close):
    cfg = _compose(["metanetwork=resnet56"])
    with open_dict(cfg):  # as `+key=...` or a YAML file would add it
        OmegaConf.update(cfg, f"{section}.{key}", 3, force_add=True)
    with pytest.raises(ConfigError, match=f"{section}.{key} is not a setting.*Did you mean `{section}.{close}`"):
        check_config(cfg)


def test_a_hand_made_config_reads_the_same_settings():
    """``settings`` works on a config that Hydra did not type (e.g. built in a test): the schema fills it in."""
    plain = OmegaConf.create({"task": {"meta_train": {"lr": 0.01, "milestones": [2]}}})
    mt = settings(plain, "task.meta_train")
    assert (mt.lr, mt.milestones, mt.epochs, mt.gamma) == (0.01, [2], 8, 0.1)
    with pytest.raises(ConfigError, match="task.meta_train.lr"):
        settings(OmegaConf.create({"task": {"meta_train": {"lr": "fast"}}}), "task.meta_train")


@pytest.mark.slow
@pytest.mark.parametrize("override", ["task.meta_train.batches_per_step=0", "benchmark.seeds=[]",
                                      "task.schedules.pretrain.lr=-1", "metanetwork.edit=channel_scale"])
def test_the_command_line_exits_2_before_any_work(override, tmp_path):
    run = subprocess.run([sys.executable, "-m", "main", override, f"paths.root_dir={tmp_path}", "progress=false"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    key = override.split("=")[0]
    assert f"{key}=" in run.stdout + run.stderr and "is not valid" in run.stdout + run.stderr
    assert "Traceback" not in run.stderr
    assert not list(tmp_path.rglob("*.pt"))  # nothing was trained
