"""Unstructured L1 and N:M pruning: exact counts and patterns, zeros kept through training, run modes."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from main.run_modes import dispatch
from nn.models import create_model
from tests.main.test_meta_train import _cfg
from utils.checkpoint import load_model
from utils.pruning import unstructured as us
from utils.pruning.progressive import PruningError
from utils.pruning.schemes import scheme_for


def _model(seed=0):
    torch.manual_seed(seed)
    return create_model("resnet8", num_classes=10).eval()


def test_global_magnitude_prunes_exactly_the_smallest_weights_and_spares_the_classifier():
    model = _model()
    head = model.fc.weight.detach().clone()
    before = torch.cat([w.detach().abs().flatten() for _, w in us.prunable_weights(model)])
    reached = us.magnitude_prune(model, 0.6)
    after = torch.cat([w.detach().flatten() for _, w in us.prunable_weights(model)])
    k = round(0.6 * before.numel())
    assert int((after == 0).sum()) == k and reached == pytest.approx(k / before.numel())
    assert before[after != 0].min() >= before[after == 0].max()  # global ranking: every kept |w| >= every dropped
    assert torch.equal(model.fc.weight, head)


def test_nm_pattern_keeps_n_of_every_m_along_input_channels():
    model = _model()
    reached, dense = us.nm_prune(model, 2, 4)
    assert dense == ["conv1"]  # 3 input channels: no 2:4 pattern possible
    for name, w in us.prunable_weights(model):
        if name in dense:
            assert int((w == 0).sum()) == 0
            continue
        runs = w.detach().permute(0, 2, 3, 1).reshape(-1, 4)
        assert torch.equal((runs != 0).sum(1), torch.full((runs.shape[0],), 2))
    total = sum(w.numel() for _, w in us.prunable_weights(model))
    stem = model.conv1.weight.numel()
    assert reached == pytest.approx(0.5 * (total - stem) / total)
    with pytest.raises(PruningError, match="0.25, 0.5, 0.75"):
        scheme_for({"name": "nm", "structure": "unstructured", "pattern": "nm", "m": 4}).check_target(model, 0.6, None, 1)


def test_nonzero_macs_halve_with_a_layerwise_half_sparsity():
    model = _model()
    x = torch.zeros(1, 3, 16, 16)
    dense = us.nonzero_macs(model, x)
    assert dense["dense"] == dense["nonzero"]
    us.magnitude_prune(model, 0.5, scope="layer")
    half = us.nonzero_macs(model, x)
    head = model.fc.weight.numel()  # the classifier is not pruned; a linear weight is used once per sample
    assert half["dense"] == dense["dense"] and half["nonzero"] == (dense["dense"] - head) // 2 + head


def test_fine_tuning_with_keep_zeros_keeps_pruned_weights_at_zero():
    model = _model().train()
    us.magnitude_prune(model, 0.7)
    zeros = [(w == 0).clone() for _, w in us.prunable_weights(model)]
    hook = us.keep_zeros(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(8, 3, 16, 16)), torch.randint(0, 10, (8,))).backward()
        hook()
        opt.step()
    for (_, w), z in zip(us.prunable_weights(model), zeros):
        assert torch.all(w[z] == 0) and torch.any(w[~z] != 0)


def test_sparsity_regularizer_shrinks_weights_the_pruning_would_drop_harder():
    model = _model()
    w = model.layer1[0].conv2.weight
    us.sparsity_regularizer(None, None, alpha=16, reg=1.0)(model)
    order = w.detach().abs().flatten().argsort()
    scale = (w.grad / w.detach()).flatten()[order]  # per-weight scale, from the smallest |w| to the largest
    assert scale[0] == pytest.approx(16, rel=1e-4) and scale[-1] == pytest.approx(1, rel=1e-4)
    assert torch.all(scale[1:] <= scale[:-1] * (1 + 1e-5))  # never scales a larger weight harder
    model.zero_grad(set_to_none=True)
    us.sparsity_regularizer(2, 4, alpha=16, reg=1.0)(model)
    keep = us.nm_keep_mask(w, 2, 4)
    scale = w.grad / w.detach()
    assert torch.allclose(scale[keep], torch.ones(())) and torch.allclose(scale[~keep], torch.full((), 16.0))
    assert model.conv1.weight.grad is None  # the dense RGB stem gets no N:M penalty


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("unstructured")


@pytest.mark.slow
@pytest.mark.parametrize("method,target", [("unstructured_l1", 0.6), ("nm_2_4", 0.5)])
def test_unstructured_methods_run_through_the_run_modes(root, method, target):
    dispatch(_cfg(root, f"method={method}", "num=3", name="generate_dataset"))
    dispatch(_cfg(root, f"method={method}", "run=meta_train"))
    vis = dispatch(_cfg(root, f"method={method}", "run=visualize", "index=[0,2]"))
    assert vis["axis"] == "sparsity" and all(len(pts) >= 2 for pts in vis["curves"].values())
    assert max(p["sparsity"] for p in vis["curves"][2]) > 0.4
    dispatch(_cfg(root, f"method={method}", "run=pretrain_final", "index=100", "num=3"))
    cfg = _cfg(root, f"method={method}", "run=pruning_final", f"index={target}", "reproduce_index=100", "meta_epoch=2")
    metrics = dispatch(cfg)
    assert metrics["axis"] == "sparsity" and metrics["target_sparsity"] == target
    assert metrics["nonzero_conv_linear_macs"] < metrics["dense_conv_linear_macs"]
    model, _ = load_model(next(Path(cfg.run_dir).glob(f"target100_*_x{target:g}")) / "model.pt")
    if method == "nm_2_4":
        assert metrics["sparsity"] == pytest.approx(us.sparsity(model)) and metrics["sparsity"] > 0.45
        assert all(torch.equal(w != 0, us.nm_keep_mask(w, 2, 4) & (w != 0)) for n, w in us.prunable_weights(model)
                   if n != "conv1")
    else:
        assert us.sparsity(model) >= target - 1e-9  # fine-tuning kept every zero
