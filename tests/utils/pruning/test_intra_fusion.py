import pytest
import torch
import torch_pruning as tp
from omegaconf import OmegaConf

from nn.models import create_model
from utils.checkpoint import load_model, save_model
from utils.pruning.intra_fusion import IntraFusion, fold_batchnorm, transport_plan
from utils.pruning.methods import PruningError, build_method
from utils.pruning.progressive import progressive_prune

METHOD_DIR = __import__("pathlib").Path(__file__).resolve().parents[3] / "configs" / "method"


def _trained_like(name="resnet8"):
    """A zoo model whose BNs have non-trivial scales, shifts and statistics."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.2, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-1.0, 1.0)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _duplicate(pairs, *tensors_out):
    """Make output channel ``j`` of every tensor an exact copy of channel ``i`` for each (i, j)."""
    with torch.no_grad():
        for i, j in pairs:
            for t in tensors_out:
                t[j] = t[i]


def _bn_tensors(bn):
    return bn.weight, bn.bias, bn.running_mean, bn.running_var


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet8", "vgg19_bn"])
def test_bn_folding_keeps_logits_and_the_architecture(name, tmp_path):
    model = _trained_like(name)
    x = torch.randn(4, 3, 32, 32)
    before = model(x)
    keys = list(model.state_dict())
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert fold_batchnorm(model, x[:1]) == n_bn
    assert torch.allclose(model(x), before, atol=1e-5)
    for m in model.modules():  # the BN is a pure shift now: weight / sqrt(var + eps) == 1
        if isinstance(m, torch.nn.BatchNorm2d):
            assert torch.allclose(m.weight, torch.sqrt(m.running_var + m.eps), rtol=1e-6)
    fold_batchnorm(model, x[:1])  # folding twice changes nothing
    assert torch.allclose(model(x), before, atol=1e-5)
    save_model(tmp_path / "folded.pt", model)
    loaded, _ = load_model(tmp_path / "folded.pt")
    assert list(loaded.state_dict()) == keys and torch.equal(loaded.eval()(x), model(x))


def test_transport_plans_satisfy_their_marginals():
    torch.manual_seed(0)
    x = torch.randn(12, 7)
    keep = [0, 2, 3, 5, 8, 11]
    uniform = transport_plan(x, keep, torch.full((12,), 1 / 12), torch.full((6,), 1 / 6), p=1)
    assert uniform.shape == (12, 6) and (uniform >= 0).all()
    assert torch.allclose(uniform.sum(1), torch.full((12,), 1 / 12, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(uniform.sum(0), torch.full((6,), 1 / 6, dtype=torch.float64), atol=1e-6)
    a = torch.rand(12, dtype=torch.float64) + 0.1
    a /= a.sum()
    b = a[keep] / a[keep].sum()
    plan = transport_plan(x, keep, a, b, p=2)
    assert torch.allclose(plan.sum(1), a, atol=1e-6) and torch.allclose(plan.sum(0), b, atol=1e-6)


def _fuse(model, x, module, pruned, scaling, marginals="uniform", transport="emd"):
    """Fuse channels ``pruned`` of ``module``'s output group (unless scaling is None), then prune them."""
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
    group = dg.get_pruning_group(module, tp.prune_conv_out_channels, pruned)
    plan = None
    if scaling is not None:
        hook = IntraFusion(tp.importance.GroupMagnitudeImportance(p=2), scaling=scaling, marginals=marginals,
                           transport=transport)
        plan = hook.fuse(hook.full_group(group, dg), pruned, dg)
    group.prune()
    return plan


@pytest.mark.parametrize("where", ["hidden", "residual_stream"])
def test_exact_scaling_reproduces_logits_when_pruning_duplicates(where):
    x = torch.randn(4, 3, 32, 32)
    pairs = [(i, i + 8) for i in range(8)]  # channels 8..15 copy channels 0..7
    outputs = {}
    for scaling in ("exact", "paper", None):
        model = _trained_like("resnet8")
        if where == "hidden":  # conv1 -> bn1 -> conv2 inside the block
            block = model.layer1[0]
            _duplicate(pairs, block.conv1.weight, *_bn_tensors(block.bn1))
            root = block.conv1
        else:  # the stage-1 residual stream: stem conv + bn1 and the block's conv2 + bn2 all write it
            _duplicate(pairs, model.conv1.weight, *_bn_tensors(model.bn1), model.layer1[0].conv2.weight,
                       *_bn_tensors(model.layer1[0].bn2))
            root = model.conv1
        reference = model(x)
        plan = _fuse(model, x, root, [j for _, j in pairs], scaling)
        assert root.out_channels == 8
        outputs[scaling] = (model(x) - reference).abs().max().item()
        if plan is not None:  # each duplicate (and its original) goes to the original, nothing else moves
            expected = torch.zeros(16, 8, dtype=torch.float64)
            expected[torch.arange(16), torch.arange(16) % 8] = 1 / 16
            assert torch.allclose(plan, expected, atol=1e-12)
    assert outputs["exact"] < 1e-5
    assert outputs["paper"] > 1e-2 and outputs[None] > 1e-2  # halved columns / dropped copies change the logits


@pytest.mark.parametrize("transport", ["emd", "nearest"])
def test_per_group_folding_equals_folding_the_whole_network(transport):
    """BN folded inside each fusion and unfolded with the kept channels' scales gives the same function as
    fusing a network folded once (the paper's set-up); channels that receive nothing keep their parameters."""
    x = torch.randn(4, 3, 32, 32)
    pruned = [1, 4, 6, 9, 13]
    per_group, folded = _trained_like("resnet8"), _trained_like("resnet8")
    fold_batchnorm(folded, x[:1])
    for model in (per_group, folded):
        plan = _fuse(model, x, model.layer1[0].conv1, pruned, "exact", transport=transport)
    assert torch.allclose(per_group(x), folded(x), atol=1e-5)
    untouched = [k for k in range(plan.shape[1]) if (plan[:, k] > 0).sum() == 1]  # received only itself
    reference = _trained_like("resnet8").layer1[0]
    kept = [i for i in range(16) if i not in pruned]
    for k in untouched:
        assert torch.allclose(per_group.layer1[0].conv1.weight[k], reference.conv1.weight[kept[k]], atol=1e-6)
        assert torch.allclose(per_group.layer1[0].bn1.weight[k], reference.bn1.weight[kept[k]], atol=1e-6)
    if transport == "nearest":  # every channel goes whole to one kept channel; rows keep their marginals
        assert torch.equal((plan > 0).sum(1), torch.ones(16, dtype=torch.long)) and len(untouched) > 0
        assert torch.allclose(plan.sum(1), torch.full((16,), 1 / 16, dtype=torch.float64))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["intra_fusion", "intra_fusion_exact"])
def test_progressive_intra_fusion_reaches_target_and_reloads(name, tmp_path):
    model = _trained_like("resnet8")
    x = torch.randn(4, 3, 32, 32)
    method = build_method(OmegaConf.load(METHOD_DIR / f"{name}.yaml"))
    assert method.group_hook is not None and method.group_hook.scaling == ("exact" if "exact" in name else "paper")
    result = progressive_prune(model, 1.5, method, x, steps=30)
    assert result.speed_up >= 1.5 and result.history[-2]["speed_up"] < 1.5
    assert model.fc.out_features == 10 and method.group_hook.last_plan is not None
    # each surviving channel stands for the original channels whose mass it absorbed: a group's masses add
    # up to its original width (resnet8: 16, 32 or 64 channels), and some channel absorbed another
    masses = list(method.group_hook._mass.values())
    assert masses and all(round(m.sum().item(), 6) in (16, 32, 64) for m in masses)
    assert max(m.max().item() for m in masses) > 1
    out = model(x)
    out.sum().backward()
    save_model(tmp_path / "pruned.pt", model)
    loaded, _ = load_model(tmp_path / "pruned.pt")
    assert torch.equal(loaded.eval()(x), model(x))


def test_importance_marginals_follow_the_criterion():
    model = _trained_like("resnet8")
    x = torch.randn(2, 3, 32, 32)
    cfg = {**OmegaConf.load(METHOD_DIR / "intra_fusion.yaml"), "marginals": "importance"}
    method = build_method(cfg)
    assert progressive_prune(model, 1.3, method, x, steps=20).speed_up >= 1.3
    plan = method.group_hook.last_plan  # rows sum to the normalised importance of all channels
    assert torch.allclose(plan.sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-9)
    assert not torch.allclose(plan.sum(1), torch.full_like(plan.sum(1), 1 / plan.shape[0]), atol=1e-6)


def test_unsupported_layers_and_options_fail_clearly():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 4)).eval()
    with pytest.raises(PruningError, match="does not support LayerNorm"):
        progressive_prune(model, 1.2, build_method(OmegaConf.load(METHOD_DIR / "intra_fusion.yaml")),
                          torch.randn(1, 8), steps=10)
    with pytest.raises(PruningError, match="scaling must be"):
        IntraFusion(scaling="double")
