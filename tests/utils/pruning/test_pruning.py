import pytest
import torch
import torch_pruning as tp
import torchvision

from configs import load_group_option
from data_loaders import build_datasets, build_loaders
from nn.models import create_model
from utils.checkpoint import load_model, save_model
from utils.pruning.macs import MacCounter, count_macs_params
from utils.pruning.methods import build_method
from utils.pruning.progressive import (
    PruningError,
    build_pruner,
    loss_gradients,
    progressive_prune,
    prune_step,
    pruning_kwargs,
)
from utils.registry import UnknownNameError

METHOD_DIR = __import__("pathlib").Path(__file__).resolve().parents[3] / "configs" / "method"
# (published names, such as group_l2_norm_max_normalizer, are aliases of these: tests/configs covers them)
_CONFIGS = {p.stem: c for p in sorted(METHOD_DIR.glob("*.yaml")) if (c := load_group_option("method", p.stem)).name == p.stem}
# Channel-pruning criteria run through progressive_prune; unstructured methods through their scheme
# (tests/utils/pruning/test_unstructured.py); width-search pipelines end to end in tests/nn/metapruning.
METHODS = [n for n, c in _CONFIGS.items() if "pipeline" not in c and c.get("structure", "channels") == "channels"]
OTHER_METHODS = [n for n in _CONFIGS if n not in METHODS]


def test_every_method_config_is_covered_by_one_kind_of_test():
    assert {"group_l2_max", "sparse_learning", "intra_fusion"} <= set(METHODS)
    assert set(OTHER_METHODS) == {"metapruning", "rewarded_metapruning", "unstructured_l1", "nm_2_4"}


def _method(name):
    return build_method(_CONFIGS[name])


def _trained_like(name, num_classes=10):
    """A zoo model with non-degenerate BN scales/statistics (fresh BN weights are all 1: every tie)."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=num_classes)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.2, 1.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet20", "vgg19_bn", "resnet18", "vit_tiny", "mobilenet_v2"])
def test_fast_mac_counter_equals_torch_pruning_before_and_after_pruning(name):
    torch.manual_seed(0)
    model = (torchvision.models.mobilenet_v2(weights=None, num_classes=10) if name == "mobilenet_v2"
             else create_model(name)).eval()
    x = torch.randn(1, 3, 32, 32)
    counter = MacCounter(model, x)
    assert counter.exact
    assert counter() == count_macs_params(model, x)[0]
    tp.pruner.BasePruner(model, x, importance=tp.importance.RandomImportance(), pruning_ratio=0.4,
                         global_pruning=not name.startswith("vit"), **pruning_kwargs(model)).step()
    if hasattr(model, "zoo_arch"):
        from nn.models import family_of
        family_of(model).after_pruning(model)
    assert counter() == count_macs_params(model, x)[0]
    assert counter.params() == count_macs_params(model, x)[1]


@pytest.mark.slow
def test_progressive_pruning_reaches_target_with_at_most_one_step_overshoot(tmp_path):
    model = _trained_like("resnet8")
    x = torch.randn(4, 3, 32, 32)
    base = count_macs_params(model, x[:1])[0]
    result = progressive_prune(model, 2.0, _method("group_l2_max"), x)
    reference = base / count_macs_params(model, x[:1])[0]
    assert result.speed_up == pytest.approx(reference) and result.speed_up >= 2.0
    assert result.history[-2]["speed_up"] < 2.0 <= result.history[-1]["speed_up"]
    assert [h["step"] for h in result.history] == list(range(result.steps + 1))
    assert model.fc.out_features == 10  # the classifier keeps its outputs
    out = model(x)
    out.sum().backward()
    save_model(tmp_path / "pruned.pt", model)
    loaded, _ = load_model(tmp_path / "pruned.pt")
    assert torch.equal(loaded.eval()(x), model(x))


@pytest.mark.slow
def test_speed_up_is_relative_to_the_unpruned_network():
    model = _trained_like("resnet8")
    x = torch.randn(1, 3, 32, 32)
    base = count_macs_params(model, x)[0]
    first = progressive_prune(model, 1.3, _method("l1"), x)
    second = progressive_prune(model, 1.8, _method("l1"), x, base_macs=base)
    assert first.speed_up >= 1.3 and second.speed_up >= 1.8
    assert second.speed_up == pytest.approx(base / count_macs_params(model, x)[0])
    assert progressive_prune(model, 1.5, _method("l1"), x, base_macs=base).steps == 0  # already there


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_every_method_prunes_a_tiny_model(name):
    model = _trained_like("resnet8")
    x = torch.randn(2, 3, 16, 16)
    method = _method(name)
    calibrate = None
    if method.needs_gradients:
        splits = build_datasets({"name": "synthetic", "num_train": 32, "num_test": 8, "image_size": 16, "val_size": 0.25})
        loader = build_loaders(splits, batch_size=8)["train"]
        calibrate = loss_gradients(method, lambda: iter(loader), torch.device("cpu"))
    result = progressive_prune(model, 1.25, method, x, steps=20, calibrate=calibrate)
    assert result.speed_up >= 1.25 and model(x).shape == (2, 10)


def test_unreachable_target_fails_early_and_leaves_the_model_alone():
    model = _trained_like("resnet8")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruningError, match="unreachable.*Choose a smaller target"):
        progressive_prune(model, 1000.0, _method("group_l2_max"), torch.randn(1, 3, 32, 32))
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())


def test_gradient_methods_need_data_and_unknown_criteria_are_listed():
    with pytest.raises(PruningError, match="needs gradients"):
        progressive_prune(_trained_like("resnet8"), 1.5, _method("taylor"), torch.randn(1, 3, 32, 32))
    with pytest.raises(UnknownNameError, match="group_magnitude"):
        build_method({"importance": "l3"})


def test_group_options_with_a_defaults_list_load_like_hydra_composes_them():
    reward = load_group_option("method", "rewarded_metapruning")
    base = load_group_option("method", "metapruning")
    assert reward.pipeline == base.pipeline == "metapruning" and reward.fitness == "reward"
    assert reward.name == "rewarded_metapruning" and reward.search == base.search
    with pytest.raises(FileNotFoundError, match="method=nope: no such option; valid: .*group_l2_max"):
        load_group_option("method", "nope")


@pytest.mark.slow
def test_a_per_layer_cap_keeps_every_layer_where_global_pruning_empties_some():
    """Global group-L2 on a network whose third stage is tiny cuts that stage to a sixth; under
    max_pruning_ratio=0.5 every conv keeps about half of its channels (Torch-Pruning checks the cap before
    each step, so a layer may end one step below it)."""
    def widths(cap):
        model = _trained_like("resnet20")
        with torch.no_grad():  # make the last stage's channels weak, so the global ranking takes them first
            for name, p in model.named_parameters():
                if name.startswith("layer3") and p.dim() == 4:
                    p.mul_(0.01)
        config = dict(_CONFIGS["group_l2_capped"], max_pruning_ratio=cap)
        progressive_prune(model, 1.6, build_method(config), torch.randn(1, 3, 32, 32))
        return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}

    full = {n: m.out_channels for n, m in create_model("resnet20").named_modules() if isinstance(m, torch.nn.Conv2d)}
    capped, uncapped = widths(0.5), widths(1.0)
    assert min(capped[n] / full[n] for n in full) >= 0.4
    assert min(uncapped[n] / full[n] for n in full) < 0.2
    with pytest.raises(PruningError, match="max_pruning_ratio=1.5"):
        build_method(dict(_CONFIGS["group_l2_capped"], max_pruning_ratio=1.5))


def _magnitude(p, normalizer):
    return lambda: tp.importance.GroupMagnitudeImportance(p=p, group_reduction="mean", normalizer=normalizer)


# Each channel criterion and the Torch-Pruning importance it must rank by, written out here from the method's
# published definition (not through build_method). Random has no ranking to check.
REFERENCE_IMPORTANCE = {
    "group_l2_max": _magnitude(2, "max"), "group_l2_mean": _magnitude(2, "mean"), "group_l2_none": _magnitude(2, None),
    "group_l2_capped": _magnitude(2, "max"), "l1": _magnitude(1, "mean"), "sparse_learning": _magnitude(2, "max"),
    "intra_fusion": _magnitude(2, "max"), "intra_fusion_exact": _magnitude(2, "max"),
    "bn_scale": lambda: tp.importance.BNScaleImportance(normalizer="mean"),
    "lamp": lambda: tp.importance.LAMPImportance(p=2), "fpgm": lambda: tp.importance.FPGMImportance(p=2),
    "taylor": lambda: tp.importance.GroupTaylorImportance(normalizer="mean"),
    "hessian": lambda: tp.importance.GroupHessianImportance(normalizer="mean"),
}


def test_every_channel_criterion_has_a_reference_ranking():
    assert set(REFERENCE_IMPORTANCE) == set(METHODS) - {"random"}


class _Recorder:
    """A group hook that records which channels each group loses."""

    def __init__(self):
        self.pruned = {}

    def prepare(self, model, pruner):
        pass

    def before_prune(self, group, idxs, pruner):
        self.pruned[group[0].dep.target.module] = idxs


@pytest.mark.parametrize("name", sorted(REFERENCE_IMPORTANCE))
def test_each_criterion_removes_the_channels_torch_pruning_ranks_lowest(name):
    """One global step of the project's pruner on a tiny network: the method's importance equals Torch-Pruning's
    own on every group, and every group loses exactly its lowest-ranked channels. A criterion wired to other
    scores (random ones, another normaliser, another p) fails here."""
    model = _trained_like("resnet8")
    x = torch.randn(2, 3, 16, 16)
    method, reference = _method(name), REFERENCE_IMPORTANCE[name]()
    if method.needs_gradients:
        splits = build_datasets({"name": "synthetic", "num_train": 32, "num_test": 8, "image_size": 16, "val_size": 0.25})
        batches = [b for _, b in zip(range(2), build_loaders(splits, batch_size=8)["train"])]
        loss_gradients(method, lambda: iter(batches), torch.device("cpu"))(model)  # fills what the method reads
        if method.per_sample_gradients:  # the reference keeps its own per-sample statistics, from the same samples
            reference.zero_grad()
            for xb, yb in batches:
                for j in range(len(xb)):
                    model.zero_grad(set_to_none=True)
                    torch.nn.functional.cross_entropy(model(xb[j:j + 1]), yb[j:j + 1]).backward()
                    reference.accumulate_grad(model)
        else:
            model.zero_grad(set_to_none=True)
            for xb, yb in batches:
                torch.nn.functional.cross_entropy(model(xb), yb).backward()
    method.group_hook = _Recorder()  # Intra-Fusion's merge happens after the selection, which is what is checked
    pruner = build_pruner(model, method, x, steps=5)
    groups = list(pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types))
    scores = {}
    for group in groups:
        expected = reference(group)
        torch.testing.assert_close(method.importance(group), expected, rtol=1e-5, atol=1e-7)
        scores[group[0].dep.target.module] = expected
    prune_step(pruner, method)
    pruned = method.group_hook.pruned
    assert pruned and set(pruned) <= set(scores)
    for module, idxs in pruned.items():
        score = scores[module]
        kept = torch.ones(len(score), dtype=torch.bool)
        kept[idxs] = False
        if idxs and kept.any():
            assert score[idxs].max() <= score[kept].min(), (name, module)


def test_the_sparsity_gradient_stays_finite_with_a_one_channel_layer():
    """Sparse learning's regulariser on a network with a layer cut down to one channel (a lightly pruned target
    network can have one): Torch-Pruning's own ``regularize`` makes every gradient NaN there (its scale is
    0/0 for a one-channel group); the project's hook leaves that group out and regularises the others."""
    from utils.pruning.progressive import build_pruner
    from utils.pruning.schemes import scheme_for

    class TwoConvs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 1, 3, padding=1), torch.nn.Conv2d(1, 8, 3, padding=1)
            self.fc = torch.nn.Linear(8, 10)

        def forward(self, x):
            return self.fc(torch.relu(self.b(torch.relu(self.a(x)))).mean((2, 3)))

    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)

    def grads(regularize):
        model.zero_grad()
        model(x).square().sum().backward()
        regularize(model)
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    model = TwoConvs()
    cfg = load_group_option("method", "sparse_learning")
    cfg.reg = 0.5
    hook = scheme_for(cfg).finetune_hook(model, x, "finetune_after_metanetwork")
    plain = grads(lambda m: None)
    ours = grads(hook)
    assert all(torch.isfinite(g).all() for g in ours.values())
    assert not torch.equal(ours["b.weight"], plain["b.weight"])  # the 8-channel group is still regularised
    raw = build_pruner(model, build_method(cfg), x, steps=1).regularize
    assert any(not torch.isfinite(g).all() for g in grads(raw).values())  # what the guard prevents
