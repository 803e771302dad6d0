"""The one-shot selection of prune-aware meta-training: the masked network is the pruned network."""
import pytest
import torch

from tests.utils.pruning.test_pruning import _CONFIGS, _trained_like
from utils.pruning.macs import MacCounter
from utils.pruning.methods import build_method
from utils.pruning.prune_mask import PruneMask


def _mask(model, name="group_l2_max"):
    return PruneMask(model, build_method(_CONFIGS[name]), torch.randn(1, 3, 32, 32))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet20", "vgg19_bn"])
@pytest.mark.parametrize("target", [1.5, 3.0])
def test_masking_the_selection_computes_what_pruning_it_computes(name, target):
    model = _trained_like(name)
    x = torch.randn(4, 3, 32, 32)
    base = MacCounter(model, x[:1])()
    pm = _mask(model)
    kept = pm.select(target, base)
    assert all(k.any() for k in kept)  # every group keeps a channel
    masks = pm.weight_masks(kept)
    masked = _trained_like(name)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for n, p in masked.named_parameters():
            if params[n] in masks:
                p.mul_(masks[params[n]])
    # the same channels removed for real, group by group
    for group, keep in zip(pm.groups, kept):
        gone = torch.nonzero(~keep).flatten().tolist()
        if gone:
            group.prune(idxs=gone)
    torch.testing.assert_close(masked(x), model(x), rtol=1e-4, atol=1e-4)
    reached = base / MacCounter(model, x[:1])()
    assert target * 0.98 <= reached <= target * 1.05  # an estimate, within a few percent


def test_the_selection_follows_the_weights_and_removes_the_weakest():
    model = _trained_like("resnet20")
    pm = _mask(model)
    with torch.no_grad():  # make channel 3 of the first block's inner conv the weakest of all
        model.layer1[0].conv1.weight[3].mul_(1e-3)
    kept = pm.select(1.05, MacCounter(model, torch.zeros(1, 3, 32, 32))())
    (g,) = [i for i, grp in enumerate(pm.groups) if grp[0].dep.target.module is model.layer1[0].conv1]
    assert not kept[g][3] and int((~torch.cat(kept)).sum()) >= 1
