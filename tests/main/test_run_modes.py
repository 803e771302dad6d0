"""The run-mode argument by name (shard=, slot=, target=, epochs=) and by the published index=."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from main.run_modes import ConfigError, run_argument

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def _compose(name, overrides=()):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(name, overrides=list(overrides))


@pytest.mark.slow
@pytest.mark.parametrize("name, run", [("shard", "generate"), ("slot", "pretrain_final"), ("target", "pruning_final"),
                                       ("epochs", "visualize")])
def test_named_key_and_index_alias_agree_or_fail(name, run):
    value = "[0,4,8]" if name == "epochs" else "3"
    want = [0, 4, 8] if name == "epochs" else 3
    assert run_argument(_compose("main", [f"run={run}", f"{name}={value}"]), name) == want
    assert run_argument(_compose("main", [f"run={run}", f"index={value}"]), name) == want
    assert run_argument(_compose("main", [f"run={run}", f"{name}={value}", f"index={value}"]), name) == want
    assert run_argument(_compose("main", [f"run={run}"]), name) is None
    with pytest.raises(ConfigError, match=f"{name}=.* and index=.* disagree.*e.g. {name}="):
        run_argument(_compose("main", [f"run={run}", f"{name}={value}", "index=5"]), name)


@pytest.mark.slow
def test_pruning_final_slot_accepts_reproduce_index():
    cfg = _compose("main", ["run=pruning_final", "reproduce_index=100"])
    assert run_argument(cfg, "slot", "reproduce_index") == 100
    with pytest.raises(ConfigError, match="slot=7 and reproduce_index=100 disagree"):
        run_argument(_compose("main", ["run=pruning_final", "reproduce_index=100", "slot=7"]), "slot", "reproduce_index")


@pytest.mark.parametrize("overrides, shard", [([], 0), (["shard=2"], 2), (["index=3"], 3)])
def test_generate_log_directory_follows_the_shard_in_either_form(overrides, shard):
    cfg = _compose("generate_dataset", overrides)
    assert cfg.run_name == f"shard{shard}_seed0"


@pytest.mark.slow
def test_published_name_key_sets_the_run_name():
    assert _compose("main", ["name=Final"]).run_name == "Final"
    assert _compose("main", []).run_name == "resnet20_group_l2_max_seed0"
    assert _compose("main", ["run_name=mine"]).run_name == "mine"


@pytest.mark.slow
def test_the_readme_published_and_named_commands_mean_the_same():
    published = _compose("main", ["task=resnet56_on_CIFAR10", "method=group_l2_norm_max_normalizer", "name=Final",
                                  "run=pruning_final", "reproduce_index=0", "seed=7", "index=2.3", "meta_epoch=28"])
    named = _compose("main", ["task=resnet56_on_CIFAR10", "method=group_l2_max", "run_name=Final", "run=pruning_final",
                              "slot=0", "seed=7", "target=2.3", "meta_epoch=28"])
    for cfg in (published, named):
        assert run_argument(cfg, "target") == 2.3 and run_argument(cfg, "slot", "reproduce_index") == 0
    assert published.method == named.method and published.run_dir == named.run_dir


def _run_main(tmp_path, *args):
    import os
    import subprocess
    import sys

    env = {**os.environ, "GMP_ROOT": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "main", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_help_lists_every_mode_with_its_arguments_and_writes_nothing(tmp_path):
    from main.run_modes import USAGE, list_run_modes

    assert set(USAGE) == set(list_run_modes())  # every registered mode has a usage line
    done = _run_main(tmp_path, "run=help")
    assert done.returncode == 0
    lines = done.stdout.splitlines()
    assert len(lines) == len(list_run_modes())
    assert any(line.split() == ["pruning_final", "slot=K", "target=T", "[meta_epoch=E", "|", "metanetwork=none]"]
               for line in lines)
    assert list(tmp_path.iterdir()) == []  # no outputs/ folder


@pytest.mark.slow
def test_an_unknown_mode_exits_2_with_the_valid_ones_and_writes_nothing(tmp_path):
    done = _run_main(tmp_path, "run=pruning_finale")
    assert done.returncode == 2 and "Did you mean 'pruning_final'" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [((), "run=export needs the model file as path="),
                                          (("path=nowhere/model.pt",), "path=nowhere/model.pt: no such file")])
def test_export_without_its_file_exits_2_and_writes_nothing(tmp_path, args, message):
    done = _run_main(tmp_path, "run=export", *args)
    assert done.returncode == 2 and message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("override,message", [
    ("task.meta_train.epoch=3", "Could not override 'task.meta_train.epoch'. Did you mean `task.meta_train.epochs`?"),
    ("+task.meta_train.epoch=3", "no config declares, so nothing would read it. Did you mean `task.meta_train.epochs`?"),
    ("method=group_l9", "Could not find 'method/group_l9'; available: bn_scale"),
    ("seed", "Error parsing override 'seed': an override is key=value"),
])
@pytest.mark.slow
def test_hydras_own_errors_exit_2_with_one_line_before_any_folder(tmp_path, override, message):
    done = _run_main(tmp_path, "run=pretrain", override)
    assert done.returncode == 2 and message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_an_output_root_that_is_a_file_exits_2_with_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    done = _run_main(tmp_path, "run=pretrain", f"paths.root_dir={blocker}")
    assert done.returncode == 2 and "is a file, not a folder" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and blocker.read_text() == ""


def test_a_read_only_output_root_exits_2_with_one_line(tmp_path):
    import os

    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    if os.access(locked, os.W_OK):  # root may write anywhere: the check is the process's own permission
        pytest.skip("this process may write into a read-only folder (running as root)")
    done = _run_main(tmp_path, "run=pretrain", f"paths.root_dir={locked}")
    assert done.returncode == 2 and "is not writable" in done.stderr
