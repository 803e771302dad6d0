"""run=pretrain_final and run=pruning_final on tiny data: targets reached, metrics written, models reload."""
import copy
from pathlib import Path

import pytest
import torch

from main.run_modes import ConfigError, dispatch
from tests.main.test_meta_train import _cfg
from utils.checkpoint import CheckpointError, load_model
from utils.io import read_json
from utils.pruning.progressive import PruningError


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("final")
    dispatch(_cfg(root, "num=3", name="generate_dataset"))
    dispatch(_cfg(root, "run=meta_train"))
    dispatch(_cfg(root, "run=pretrain_final", "index=100"))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [["meta_epoch=2"], ["metanetwork=none"], ["metanetwork=none", "method=sparse_learning"]],
                         ids=["metanetwork", "baseline", "sparse_learning"])
def test_pruning_final_reaches_the_target_and_saves_a_reloadable_network(root, overrides, monkeypatch):
    import main.final as final

    assert not list(root.rglob("target_100/work"))  # pretrain_final removes its stage checkpoints once done

    if "method=sparse_learning" in overrides:
        dispatch(_cfg(root, "run=pretrain_final", "index=100", "method=sparse_learning", "num=3"))
    saved = {}
    real_save = final.save_model

    def keep(path, model, **extra):  # the network as it is when it is saved
        if Path(path).name == "model.pt":
            saved["model"] = copy.deepcopy(model).cpu().eval()
        return real_save(path, model, **extra)

    monkeypatch.setattr(final, "save_model", keep)
    cfg = _cfg(root, "run=pruning_final", "index=1.6", "reproduce_index=100", *overrides)
    metrics = dispatch(cfg)
    assert metrics["speed_up"] >= 1.6 and metrics["macs"] < metrics["target_macs"]
    for key in ("base_val_acc", "base_test_acc", "val_acc", "test_acc", "params", "latency", "timings", "config"):
        assert key in metrics
    assert metrics["latency"]["pruned"]["latency_ms"] > 0
    out = next(Path(cfg.run_dir).glob("target100_*_x1.6"))
    assert read_json(out / "metrics.json")["speed_up"] == pytest.approx(metrics["speed_up"])
    model, payload = load_model(out / "model.pt")
    assert model.fc.out_features == 10  # the classifier keeps its outputs
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model.eval()(x), saved["model"](x))  # the file holds the network that was saved
    # A re-run continues from the saved stages: same numbers, no new pruning.
    again = dispatch(cfg)
    assert again["speed_up"] == metrics["speed_up"]


@pytest.mark.slow
def test_baselines_share_the_after_metanetwork_finetune_of_their_target(root, monkeypatch):
    import main.final as final

    plain = _cfg(root, "run=pruning_final", "target=1.6", "slot=100", "metanetwork=none")
    dispatch(plain)
    shared = Path(plain.final_targets_dir) / "target_100" / "finetuned" / "plain"
    assert (shared / "after_metanetwork.pt").is_file()
    stages, real = [], final.train_stage
    monkeypatch.setattr(final, "train_stage", lambda cfg, ctx, model, loaders, stage, *a, **k:
                        stages.append(stage) or real(cfg, ctx, model, loaders, stage, *a, **k))
    other = _cfg(root, "run=pruning_final", "target=1.6", "slot=100", "metanetwork=none", "method=random",
                 f"final_targets_dir={plain.final_targets_dir}")
    metrics = dispatch(other)
    assert stages == ["finetune_after_pruning"] and metrics["method"] == "random"  # found, not trained again
    assert "after_metanetwork_s" not in metrics["timings"]
    # the target network's own accuracy is measured once and kept beside it
    cached = read_json(Path(plain.final_targets_dir) / "target_100" / "base_metrics.json")["metrics"]
    assert cached["base_test_acc"] == metrics["base_test_acc"] and cached["base_val_acc"] == metrics["base_val_acc"]


def test_finished_stages_are_not_reused_under_other_inputs(root):
    dispatch(_cfg(root, "run=pruning_final", "target=1.6", "slot=100", "meta_epoch=2"))
    with pytest.raises(CheckpointError, match="inputs.json belongs to a run with other settings .*metanetwork"):
        dispatch(_cfg(root, "run=pruning_final", "target=1.6", "slot=100", "meta_epoch=2",
                      "metanetwork.magnitude_features=false"))


def test_pruning_final_errors_are_early_and_clear(root):
    with pytest.raises(ConfigError, match="target='abc' is not a number"):
        dispatch(_cfg(root, "run=pruning_final", "target=abc", "slot=100", "metanetwork=none"))
    with pytest.raises(PruningError, match=r"target=0.5 is not above this network's current speed-up \(1\.3"):
        dispatch(_cfg(root, "run=pruning_final", "target=0.5", "slot=100", "metanetwork=none"))
    with pytest.raises(PruningError, match="unreachable"):
        dispatch(_cfg(root, "run=pruning_final", "index=5000", "reproduce_index=100", "metanetwork=none"))
    with pytest.raises(CheckpointError, match="target_7/model.pt does not exist.*run=pretrain_final slot=7"):
        dispatch(_cfg(root, "run=pruning_final", "index=1.6", "reproduce_index=7", "metanetwork=none"))
    with pytest.raises(ConfigError, match="needs meta_epoch"):
        dispatch(_cfg(root, "run=pruning_final", "index=1.6", "reproduce_index=100"))
    with pytest.raises(CheckpointError, match="epoch_009.pt does not exist"):
        dispatch(_cfg(root, "run=pruning_final", "index=1.6", "reproduce_index=100", "meta_epoch=9"))


def test_analyse_compares_before_and_after_the_metanetwork(root):
    cfg = _cfg(root, "run=analyse", "meta_epoch=2")
    summary = dispatch(cfg)
    run_dir = Path(cfg.run_dir)
    result = read_json(run_dir / "analyse.json")
    assert (run_dir / "analyse.png").is_file()
    for key in ("before", "after"):
        stats = result[key]
        assert stats["groups"] and all(len(g["l2"]) == g["channels"] == len(g["taylor"]) for g in stats["groups"])
        assert all(v >= 0 for g in stats["groups"] for v in g["l1"] + g["l2"] + g["taylor"])
        assert 0 <= summary[key]["share_of_channels_below_10pct_of_group_max"] <= 1
        assert set(stats["filter_correlation"]) and all(0 <= c <= 1 for c in stats["filter_correlation"].values())
    # The metanetwork changed the weights, so the statistics differ.
    assert result["before"]["groups"][0]["l2"] != result["after"]["groups"][0]["l2"]
    with pytest.raises(ConfigError, match="meta_epoch"):
        dispatch(_cfg(root, "run=analyse"))


@pytest.mark.slow
def test_export_writes_a_checked_onnx_file_next_to_the_model(root):
    pytest.importorskip("onnxruntime", reason="the export extra is not installed")
    # the named forms (target=, slot=) of the baseline test's index=1.6 reproduce_index=100
    cfg = _cfg(root, "run=pruning_final", "target=1.6", "slot=100", "metanetwork=none", "export_onnx=true")
    metrics = dispatch(cfg)
    out = next(Path(cfg.run_dir).glob("target100_none_x1.6"))
    assert (out / "model.onnx").is_file() and metrics["onnx"]["max_abs_diff"] <= 1e-4
    assert read_json(out / "metrics.json")["onnx"]["path"] == str(out / "model.onnx")
    (out / "model.onnx").unlink()
    result = dispatch(_cfg(root, "run=export", f"path={out / 'model.pt'}"))
    assert (out / "model.onnx").is_file() and read_json(out / "export.json")["batch"] == result["batch"] > 1
    assert result["max_abs_diff"] <= 1e-4 and result["onnxruntime_ms"] > 0
    with pytest.raises(ConfigError, match="needs the model file as path="):
        dispatch(_cfg(root, "run=export"))
    with pytest.raises(CheckpointError, match="does not exist"):
        dispatch(_cfg(root, "run=export", f"path={out / 'nothing.pt'}"))


def test_a_regularised_fine_tune_does_not_resume_under_other_settings(tmp_path):
    """train_stage fingerprints the method when an after-backward hook (sparse learning) runs: a checkpoint
    made with another reg, or without the hook, is refused instead of silently continued."""
    from main.run_modes import RunContext
    from main.stages import data_for, new_model, train_stage
    from utils.train import Limits

    def run(*overrides, hook=lambda *a: None):
        cfg = _cfg(tmp_path, "method=sparse_learning", *overrides)
        ctx = RunContext(torch.device("cpu"), tmp_path / "run", Limits.from_cfg(cfg.get("debug")))
        splits, loaders = data_for(cfg, ctx)
        model = new_model(cfg, splits.num_classes, 0, ctx.device)
        return train_stage(cfg, ctx, model, loaders, "finetune_after_metanetwork", tmp_path / "stage", 0,
                           after_backward=hook)

    run("method.reg=0.05", "debug.max_epochs=1")
    with pytest.raises(CheckpointError, match="after_backward"):
        run("method.reg=0.02", "debug.max_epochs=1")
    with pytest.raises(CheckpointError, match="after_backward"):
        run("method.reg=0.05", "debug.max_epochs=1", hook=None)
    assert run("method.reg=0.05", "debug.max_epochs=1").history  # the same settings resume
