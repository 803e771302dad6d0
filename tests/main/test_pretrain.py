"""``run=pretrain`` end-to-end through the real config tree, and the CLI's answers to bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from data_loaders import build_datasets, build_loaders
from main.run_modes import dispatch, list_run_modes
from utils.checkpoint import load_model
from utils.train import evaluate

ROOT = Path(__file__).resolve().parents[2]


def _cfg(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("main", overrides=list(overrides))


@pytest.mark.slow
def test_pretrain_debug_on_digits_learns_and_saves_a_reloadable_model(tmp_path):
    cfg = _cfg("debug=quick", "debug.max_epochs=3", f"paths.output_dir={tmp_path}")
    metrics = dispatch(cfg)
    run_dir = Path(cfg.run_dir)
    assert metrics["epochs_run"] == 3
    assert metrics["val_acc"] > 50 and metrics["test_acc"] > 50  # chance is 10%
    assert metrics["macs"] > 1e7 and 2e5 < metrics["params"] < 3e5  # ResNet-20: ~0.27 M parameters
    for name in ("model.pt", "metrics.json", "pretrain_history.csv", "pretrain_history.png", "pretrain_last.pt"):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "metrics.json").read_text())["test_acc"] == pytest.approx(metrics["test_acc"])
    # The saved file rebuilds the network without pickle and reproduces the reported test accuracy.
    model, payload = load_model(run_dir / "model.pt")
    assert payload["arch"]["name"] == "resnet20"
    loaders = build_loaders(build_datasets(cfg.dataset), batch_size=32, eval_batch_size=512)
    assert evaluate(model, loaders["test"], torch.device("cpu"))["acc"] == pytest.approx(metrics["test_acc"])


@pytest.mark.slow
def test_pretrain_rerun_resumes_instead_of_retraining(tmp_path):
    cfg = _cfg("debug=smoke", "resume=true", f"paths.output_dir={tmp_path}")
    first = dispatch(cfg)
    history = (Path(cfg.run_dir) / "pretrain_history.csv").read_text()
    second = dispatch(cfg)
    assert second["epochs_run"] == first["epochs_run"] == 1
    assert second["test_acc"] == first["test_acc"]
    assert (Path(cfg.run_dir) / "pretrain_history.csv").read_text() == history


def test_run_modes_are_listed():
    assert "pretrain" in list_run_modes()


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "main", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cli_rejects_unknown_run_mode_and_missing_dataset(tmp_path):
    out = _cli("run=bogus", f"paths.root_dir={tmp_path}", cwd=tmp_path)
    assert out.returncode == 2
    valid = "Valid names: " + ", ".join(list_run_modes())
    assert "Unknown run mode 'bogus'" in out.stdout + out.stderr and valid in out.stdout + out.stderr
    out = _cli("dataset=cifar10", f"paths.root_dir={tmp_path}", cwd=tmp_path)
    assert out.returncode == 2
    text = out.stdout + out.stderr
    assert str(tmp_path / "datasets" / "cifar10" / "cifar-10-batches-py" / "data_batch_1") in text
    assert "tar xzf cifar-10-python.tar.gz" in text
    # The error is also in the run directory's log.
    log = next(tmp_path.glob("outputs/resnet20_on_digits/pretrain/*/main.log")).read_text()
    assert "expected files are missing" in log


@pytest.mark.parametrize("override,message", [("seed=abc", "seed='abc' is not valid"),
                                              ("resume=maybe", "resume='maybe' is not valid"),
                                              ("device=tpu", "device='tpu'"),
                                              ("threads=-2", "threads=-2: torch's CPU threads are >= 1"),
                                              ("threads=0", "threads=0: torch's CPU threads are >= 1")])
def test_mistyped_top_level_values_are_config_errors(override, message, tmp_path):
    from main.run_modes import ConfigError

    with pytest.raises(ConfigError, match=message):
        dispatch(_cfg(override, f"paths.output_dir={tmp_path}"))
