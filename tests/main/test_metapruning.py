"""run=pruning_final method=metapruning|rewarded_metapruning end-to-end on tiny data through the real config."""
from pathlib import Path

import pytest
import torch

from main.run_modes import ConfigError, dispatch
from nn.models import create_model
from tests.main.test_meta_train import _cfg
from utils.checkpoint import load_model
from utils.io import read_json
from utils.pruning.macs import count_macs_params
from utils.pruning.progressive import PruningError

SMALL = ["method.search.population=6", "method.search.generations=2", "method.search.parents=3",
         "method.recalibration_batches=1", "method.hidden=2", "method.ratios.num=5"]
FINAL_KEYS = ("task", "method", "metanetwork", "target_speed_up", "seed", "val_acc", "val_loss", "test_acc", "test_loss",
              "speed_up", "macs", "params", "base_macs", "base_params", "latency", "timings", "config",
              "base_val_acc", "base_test_acc", "base_reference")


@pytest.mark.parametrize("overrides", [["method=metapruning"], ["method=rewarded_metapruning"],
                                       ["method=metapruning", "method.retrain.init=generated",
                                        "method.retrain.schedule=finetune_after_pruning"]],
                         ids=["metapruning", "rewarded", "from_generated_weights"])
@pytest.mark.slow
def test_pruning_final_runs_metapruning_to_the_target(tmp_path, overrides):
    cfg = _cfg(tmp_path, "run=pruning_final", "index=1.5", *SMALL, *overrides)
    metrics = dispatch(cfg)
    assert set(FINAL_KEYS) <= set(metrics) and metrics["metanetwork"] == "none"
    assert metrics["method"] == cfg.method.name and metrics["search"]["fitness"] == cfg.method.fitness
    assert 1.5 <= metrics["speed_up"] <= 1.5 * 1.1 and metrics["macs"] == metrics["search"]["best"]["macs"]
    out = Path(cfg.run_dir) / "x1.5"
    assert read_json(out / "metrics.json")["speed_up"] == pytest.approx(metrics["speed_up"])
    model, payload = load_model(out / "model.pt")
    assert payload["arch"]["widths"] == metrics["search"]["widths"]
    x = torch.zeros(1, 3, 16, 16)
    assert count_macs_params(model, x)[0] == metrics["macs"]  # speed-up against the default-width network
    assert count_macs_params(create_model("resnet8"), x)[0] == metrics["base_macs"]
    # a re-run resumes every stage: same search result, same numbers, no retraining
    again = dispatch(cfg)
    assert again["search"]["choice"] == metrics["search"]["choice"] and again["test_acc"] == metrics["test_acc"]
    assert again["timings"]["pruningnet_s"] == 0.0


def test_errors_are_early_and_clear(tmp_path):
    with pytest.raises(PruningError, match="unreachable"):
        dispatch(_cfg(tmp_path, "run=pruning_final", "index=40", "method=metapruning", *SMALL))
    with pytest.raises(ConfigError, match="retrain.schedule=nope.*pretrain"):
        dispatch(_cfg(tmp_path, "run=pruning_final", "index=1.5", "method=metapruning", "method.retrain.schedule=nope"))
    with pytest.raises(ConfigError, match="no PruningNet for model=vit_tiny"):
        dispatch(_cfg(tmp_path, "run=pruning_final", "index=1.5", "method=metapruning", "model=vit_tiny"))
    assert not list(Path(tmp_path).rglob("pruningnet_last.pt"))  # nothing was trained before the errors
