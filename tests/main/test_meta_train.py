"""Meta-training: the single-VJP meta-gradient is exact; runs resume; NaNs are contained; visualize caches."""
import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from hydra import compose, initialize_config_dir

import main.meta_train as mt
import main.visualize as vis
from main.run_modes import RunContext, dispatch
from utils.checkpoint import CheckpointError
from utils.convert import graph_to_state_dict
from utils.io import read_json
from utils.train import Limits

ROOT = Path(__file__).resolve().parents[2]
TINY = ["dataset=synthetic", "dataset.num_train=96", "dataset.num_test=16", "dataset.image_size=16", "model=resnet8",
        "debug=smoke", "debug.max_epochs=2", "resume=true", "progress=false", "threads=1", "metanetwork.num_layers=2",
        "metanetwork.hidden_dim=8", "task.meta_train.batch_size=16", "task.meta_train.batches_per_step=2",
        "task.meta_train.epochs=2", "task.visualize.max_speed_up=1.8", "task.visualize.eval_every=4"]


def _cfg(root, *overrides, name="main"):
    base = [o for o in TINY if not (o.startswith("metanetwork.") and any(v.startswith("metanetwork=") for v in overrides))]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(name, overrides=[*base, f"paths.root_dir={root}", *overrides])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("meta")
    dispatch(_cfg(root, "num=4", name="generate_dataset"))  # 3 training + 1 validation data models
    return root


def _trainer(cfg):
    ctx = RunContext(torch.device("cpu"), Path(cfg.run_dir), Limits())
    data = mt.load_data_models(cfg, "train")
    torch.manual_seed(0)
    metanet = mt.build_metanetwork(cfg.metanetwork, data[0].graph)
    return mt.MetaTrainer(cfg, ctx, metanet, torch.zeros(1, 3, 16, 16)), metanet, data[0]


def _perturbed_trainer(cfg):
    """A trainer whose metanetwork is moved off the identity (so the edit is not negligible), and two batches."""
    trainer, metanet, item = _trainer(cfg)
    torch.manual_seed(1)
    batches = [(torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))) for _ in range(2)]
    with torch.no_grad():
        for p in metanet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return trainer, metanet, item, batches


@pytest.mark.parametrize("reg", [0.0, 10.0])
def test_single_vjp_equals_backpropagating_the_summed_loss(store, reg):
    cfg = _cfg(store, f"task.meta_train.pruner_reg={reg}", "metanetwork.edit=additive")  # the published edit
    trainer, metanet, item, batches = _perturbed_trainer(cfg)
    trainer.step(item, iter(batches))
    fast = [p.grad.clone() for p in metanet.parameters()]
    metanet.zero_grad()

    # Direct: backpropagate sum_b CE(net_W(x_b)) + <sparsity gradient, W> through the metanetwork.
    state = graph_to_state_dict(mt.apply_metanetwork(metanet, item.graph))
    net = copy.deepcopy(item.model).eval()
    loss = sum(F.cross_entropy(torch.func.functional_call(net, state, (x,)), y) for x, y in batches)
    probe = copy.deepcopy(net)
    with torch.no_grad():
        for name, value in probe.state_dict(keep_vars=True).items():
            value.copy_(state[name])
    for p in probe.parameters():
        p.grad = torch.zeros_like(p)
    pruner = tp.pruner.GroupNormPruner(probe, torch.zeros(1, 3, 16, 16), tp.importance.GroupMagnitudeImportance(normalizer=None),
                                       reg=reg, alpha=16, ignored_layers=[probe.fc])
    pruner.regularize(probe, alpha=16)
    loss = loss + sum((p.grad.detach() * state[n]).sum() for n, p in probe.named_parameters())
    loss.backward()
    for a, b in zip(fast, (p.grad for p in metanet.parameters())):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert any(a.abs().sum() > 0 for a in fast)


def test_the_prune_aware_term_adds_the_gradient_of_the_pruned_networks_loss(store):
    """With reg 0: the metanetwork's gradient is that of sum_b CE(net_W(x_b)) + weight * sum_b CE(net_{W*m}(x_b)),
    m the criterion's selection at the target (held fixed)."""
    weight = 0.5
    cfg = _cfg(store, "task.meta_train.pruner_reg=0", "task.meta_train.prune_aware.weight=0.5",
               "task.meta_train.prune_aware.targets=[1.6]")
    trainer, metanet, item, batches = _perturbed_trainer(cfg)
    r = trainer.step(item, iter(batches), target=1.6)
    fast = [p.grad.clone() for p in metanet.parameters()]
    metanet.zero_grad()
    assert r["prune_target"] == 1.6 and r["pruned_task_loss"] > r["task_loss"]  # removing channels costs loss

    state = graph_to_state_dict(mt.apply_metanetwork(metanet, item.graph))
    w = trainer.work(item)
    masks = {n: w.mask.weight_masks(w.mask.select(1.6, item.info["base_macs"])).get(p) for n, p in
             w.model.named_parameters()}
    assert sum(int((m == 0).sum()) for m in masks.values() if m is not None) > 0
    net = copy.deepcopy(item.model).eval()
    masked = {n: v if masks.get(n) is None else v * masks[n] for n, v in state.items()}
    loss = sum(F.cross_entropy(torch.func.functional_call(net, state, (x,)), y) for x, y in batches)
    loss = loss + weight * sum(F.cross_entropy(torch.func.functional_call(net, masked, (x,)), y) for x, y in batches)
    loss.backward()
    for a, b in zip(fast, (p.grad for p in metanet.parameters())):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_a_prune_aware_run_logs_the_pruned_loss_and_validates_at_its_targets(store):
    cfg = _cfg(store, "run=meta_train", "run_name=prune_aware", "task.meta_train.prune_aware.weight=1",
               "task.meta_train.prune_aware.targets=[1.3,1.6]")
    dispatch(cfg)
    meta_dir = Path(cfg.meta_train_dir)
    rows = (meta_dir / "meta_losses.csv").read_text().splitlines()
    assert "pruned_task_loss" in rows[0] and "prune_target" in rows[0] and len(rows) == 1 + 2 * 3
    val = (meta_dir / "meta_val.csv").read_text().splitlines()
    assert "val_acc_at_1.3x" in val[0] and "val_acc_at_1.6x" in val[0] and len(val) == 1 + 3  # epoch 0 too


def test_prune_aware_with_batch_statistics_trains_and_validates_with_adaptive_bn(store, monkeypatch):
    seen = []
    real = mt.batch_statistics
    monkeypatch.setattr(mt, "batch_statistics", lambda model: seen.append(model) or real(model))
    cfg = _cfg(store, "run=meta_train", "run_name=prune_aware_batch", "task.meta_train.prune_aware.weight=1",
               "task.meta_train.prune_aware.targets=[1.3]", "task.meta_train.prune_aware.batch_norm=batch")
    dispatch(cfg)
    assert len(seen) == 2 * 3  # every step's pruned loss, and only it
    val = (Path(cfg.meta_train_dir) / "meta_val.csv").read_text().splitlines()
    assert "val_acc_at_1.3x_adaptive_bn" in val[0] and len(val) == 1 + 3


def test_selecting_by_adaptive_bn_validates_at_the_tasks_targets(store):
    cfg = _cfg(store, "run=meta_train", "run_name=adaptive_bn", "task.visualize.select_by=adaptive_bn",
               "task.pruning.target_speed_ups=[1.3]")
    rows = dispatch(cfg)["val"]
    assert len(rows) == 3 and all(0.0 <= r["val_acc_at_1.3x_adaptive_bn"] <= 100.0 for r in rows)
    assert set(mt.adaptive_bn_scores(rows)) == {0, 1, 2}


def test_prune_aware_settings_are_checked(store):
    with pytest.raises(mt.ConfigError, match="prune_aware.targets"):
        mt.prune_aware_settings(_cfg(store, "task.meta_train.prune_aware.weight=1", "task.meta_train.prune_aware.targets=[]"))
    assert mt.prune_aware_settings(_cfg(store)) is None  # off by default: the published objective


@pytest.mark.slow
def test_meta_train_writes_checkpoints_and_resumes_bit_identically(store, monkeypatch):
    full = _cfg(store, "run=meta_train", "run_name=full")
    dispatch(full)
    meta_dir = Path(full.meta_train_dir)
    assert sorted(p.name for p in (meta_dir / "metanetwork").glob("*.pt")) == ["epoch_001.pt", "epoch_002.pt"]
    for name in ("meta_losses.csv", "meta_val.csv", "meta_train.png", "meta_last.pt"):
        assert (meta_dir / name).is_file()
    assert len((meta_dir / "meta_losses.csv").read_text().splitlines()) == 1 + 2 * 3  # header + 2 epochs x 3 models
    header = (meta_dir / "meta_val.csv").read_text().splitlines()[0].split(",")
    assert {"val_acc", "small_group_fraction", "min_max_ratio", "norm_sq"} <= set(header)

    cut = _cfg(store, "run=meta_train", "run_name=cut")
    real, calls = mt.MetaTrainer.step, []

    def dies(self, item, batches, *target):
        calls.append(item.slot)
        if len(calls) == 5:
            raise RuntimeError("killed")
        return real(self, item, batches, *target)

    monkeypatch.setattr(mt.MetaTrainer, "step", dies)
    with pytest.raises(RuntimeError, match="killed"):
        dispatch(cut)
    monkeypatch.setattr(mt.MetaTrainer, "step", real)
    dispatch(cut)  # resumes after epoch 1
    a = torch.load(meta_dir / "metanetwork" / "epoch_002.pt", weights_only=True)["metanetwork"]
    b = torch.load(Path(cut.meta_train_dir) / "metanetwork" / "epoch_002.pt", weights_only=True)["metanetwork"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(CheckpointError, match="other settings"):
        dispatch(_cfg(store, "run=meta_train", "run_name=cut", "task.meta_train.lr=0.5"))


def test_non_finite_steps_are_skipped_then_stop(store, monkeypatch):
    monkeypatch.setattr(mt.MetaTrainer, "step", lambda self, item, b, *target: {"task_loss": float("nan"), "sparsity": 0.0,
                                                                        "finite": False})
    with pytest.raises(FloatingPointError, match="not finite"):
        dispatch(_cfg(store, "run=meta_train", "run_name=nan", "task.meta_train.max_bad_steps=2"))
    assert not (Path(_cfg(store, "run_name=nan").meta_train_dir) / "meta_last.pt").exists()


@pytest.mark.slow
def test_visualize_draws_cached_curves(store, monkeypatch):
    dispatch(_cfg(store, "run=meta_train", "run_name=vis"))  # meta-train a metanetwork to visualise
    cfg = _cfg(store, "run=visualize", "index=[0,2]", "run_name=vis")
    result = dispatch(cfg)
    run_dir = Path(cfg.run_dir)
    assert (run_dir / "acc_vs_speed_up.png").is_file() and (run_dir / "acc_vs_speed_up.pdf").is_file()
    for epoch in (0, 2):
        points = read_json(run_dir / f"curve_epoch_{epoch:03d}.json")["points"]
        assert points[-1]["speed_up"] >= 1.8 and all(0 <= p["val_acc"] <= 100 for p in points)
        assert [p["speed_up"] for p in points] == sorted(p["speed_up"] for p in points)
    assert set(result["curves"]) == {0, 2}
    monkeypatch.setattr(vis, "curve", lambda *a, **k: pytest.fail("a cached curve was recomputed"))
    dispatch(cfg)
    with pytest.raises(CheckpointError, match="epoch_007.pt does not exist"):
        dispatch(_cfg(store, "run=visualize", "index=[0,7]", "run_name=vis"))


def test_another_methods_data_models_are_read_only_when_named(store):
    """The store was made for group_l2_max: method=random refuses it, data_models_method=group_l2_max reads it
    (curves of one criterion on another's data models), and generating into it under another method is refused."""
    with pytest.raises(FileNotFoundError, match="method=random"):
        mt.load_data_models(_cfg(store, "method=random"), "val")
    cfg = _cfg(store, "method=random", "data_models_method=group_l2_max")
    ours = mt.load_data_models(_cfg(store), "val")
    theirs = mt.load_data_models(cfg, "val")
    assert len(theirs) == len(ours) == 1
    torch.testing.assert_close(theirs[0].graph.node_features, ours[0].graph.node_features, rtol=0, atol=0)
    with pytest.raises(mt.ConfigError, match="drop it and set method=group_l2_max"):
        dispatch(_cfg(store, "method=random", "data_models_method=group_l2_max", "num=1", name="generate_dataset"))


def test_the_accuracy_floor_keeps_epochs_near_the_originals_accuracy():
    rows = [{"epoch": 0, "val_acc": 90.0}, {"epoch": 1, "val_acc": 85.0}, {"epoch": 2, "val_acc": 82.0},
            {"epoch": 3, "val_acc": 80.0}]
    assert mt.floor_epochs(rows, 0.9) == [0, 1, 2]  # 0.9 * 90 = 81
    assert mt.floor_epochs(rows, 0.0) == [0, 1, 2, 3]
    # requested 2 and 4: 4 was never trained, and the last epoch above the floor (2) is always a candidate
    assert mt.floor_candidates([2, 4], rows, 0.9) == [0, 2]
    assert mt.floor_candidates([3], rows, 0.9) == [0, 2]
    assert mt.floor_candidates([3, 4], rows, 0.0) == [0, 3, 4]  # off: the candidates as requested
    # no epoch keeps the floor: the most accurate one stands in
    assert mt.floor_candidates([3], rows, 0.99) == [0, 1]


def test_meta_training_stops_below_the_accuracy_floor_and_stays_stopped(store, monkeypatch):
    accs = {0: 50.0, 1: 40.0, 2: 45.0}  # epoch 1 keeps 80% of the original: below a floor of 0.9
    monkeypatch.setattr(mt, "validate", lambda ctx, metanet, val_set, loaders, example, epoch, **kw:
                        {"epoch": epoch, "val_acc": accs[epoch], "small_group_fraction": 0.0})
    cfg = _cfg(store, "run=meta_train", "run_name=floor", "task.meta_train.accuracy_floor=0.9")
    summary = dispatch(cfg)
    meta_dir = Path(cfg.meta_train_dir)
    assert summary["trained_epochs"] == 1 and [r["epoch"] for r in summary["val"]] == [0, 1]
    assert sorted(p.name for p in (meta_dir / "metanetwork").glob("*.pt")) == ["epoch_001.pt"]
    assert dispatch(cfg)["trained_epochs"] == 1  # a re-run resumes and does not train past the floor
    assert not (meta_dir / "metanetwork" / "epoch_002.pt").exists()
    with pytest.raises(mt.ConfigError, match="accuracy_floor"):
        dispatch(_cfg(store, "run=meta_train", "run_name=floor", "task.meta_train.accuracy_floor=1.5"))
