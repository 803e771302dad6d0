"""Every option of every config group composes with the real config tree, and what it names exists."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from data_loaders import list_datasets
from nn.models import list_models
from utils.optim import OPTIMIZERS, build_optimizer, build_scheduler

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
GROUPS = ["task", "model", "dataset", "method", "metanetwork", "optim", "paths", "debug", "experiment"]


def _options(group):
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def _compose(overrides=()):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("main", overrides=list(overrides))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_option_composes_and_resolves(group, option):
    cfg = _compose([f"{group}={option}"])
    OmegaConf.resolve(cfg)  # every interpolation resolves
    assert cfg.run_dir.endswith(f"/{cfg.task.name}/{cfg.run}/{cfg.run_name}")
    assert cfg.model.name in list_models()
    assert cfg.dataset.name in list_datasets()
    assert cfg.optim.name in OPTIMIZERS
    for schedule in cfg.task.schedules.values():
        build_scheduler(_opt(cfg), schedule, schedule.epochs)


def _opt(cfg):
    import torch

    return build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg.optim, lr=0.1)


def test_every_group_has_options_and_names_match_files():
    for group in GROUPS:
        assert _options(group), f"config group {group} is empty"
    for group in ("model", "method"):
        for option in _options(group):
            own = OmegaConf.load(CONFIG_DIR / group / f"{option}.yaml")
            if group == "method" and "name" not in own:  # an alias: the published name of one of ours
                assert len(own.defaults) == 2 and own.defaults[0] in _options(group), option
                continue
            assert own.name == option


PUBLISHED_METHODS = {"group_l2_norm_max_normalizer": "group_l2_max", "group_l2_norm_mean_normalizer": "group_l2_mean",
                     "group_l2_norm_no_normalizer": "group_l2_none", "unstructured_l1_norm": "unstructured_l1"}


@pytest.mark.parametrize("published, ours", sorted(PUBLISHED_METHODS.items()))
def test_published_method_names_are_aliases_with_a_log_line(published, ours):
    from configs import load_group_option
    from main.run_modes import alias_note

    cfg = _compose([f"method={published}"])
    assert cfg.method == _compose([f"method={ours}"]).method  # same settings, so the same data models and stages
    assert load_group_option("method", published) == cfg.method
    assert alias_note("method", published, cfg) == (f"method={published} is the published code's name for "
                                                    f"method={ours}: running method={ours}")
    assert alias_note("method", ours, cfg) is None
    # a stage that swapped the method (the benchmark) is not reported as an alias
    assert alias_note("method", published, _compose(["method=random"])) is None


def test_task_selects_model_and_dataset_but_command_line_wins():
    cfg = _compose(["task=VGG19_on_CIFAR100"])
    assert (cfg.model.name, cfg.dataset.name, cfg.dataset.num_classes) == ("vgg19_bn", "cifar100", 100)
    assert cfg.task.schedules.finetune_after_pruning.milestones == [80, 120]
    cfg = _compose(["task=resnet56_on_CIFAR10", "model=resnet20"])
    assert (cfg.model.name, cfg.dataset.name) == ("resnet20", "cifar10")


def test_debug_overrides_top_level_values_and_uses_its_own_run_dir():
    cfg = _compose(["debug=quick"])
    assert cfg.debug.max_epochs == 2 and cfg.task.batch_size == 32 and cfg.resume is False
    assert "debug-quick" in cfg.run_dir
    assert _compose([]).get("debug") is None


def test_bad_override_fails_with_hydras_list_of_options():
    with pytest.raises(MissingConfigException, match="resnet56"):
        _compose(["model=resnet65"])


def test_the_evidence_set_adds_its_rows_and_drops_random_and_taylor():
    methods = _compose(["benchmark=evidence"]).benchmark.methods
    assert methods.random is None and methods.taylor is None  # null: left out by run=benchmark
    assert {"graph_metanetwork", "published_metanetwork", "group_l2_max", "group_l2_capped", "sparse_learning",
            "intra_fusion"} <= {k for k, v in methods.items() if v is not None}
