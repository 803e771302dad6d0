"""PruningNet: shapes for every width vector, exact export into zoo networks, exact MACs, and it learns."""
import random

import pytest
import torch
from omegaconf import OmegaConf

from data_loaders import build_datasets, build_loaders
from main.metapruning import Scorer, calibration_batches
from main.run_modes import RunContext
from nn.metapruning.families import adapter_for, supported_models
from nn.metapruning.pruningnet import MacTable, PruningNet, RandomWidthNet, WidthSpace, recalibrate_bn
from nn.models import get_widths
from utils.pruning.macs import count_macs_params
from utils.train import Limits, fit

RATIOS = [0.25, 0.5, 0.75, 1.0]


def _net(name, hidden=4, seed=0):
    torch.manual_seed(seed)
    return PruningNet(adapter_for(name), 10, RATIOS, hidden=hidden)


def test_supported_models_cover_the_cifar_resnets_and_vgg():
    assert {"resnet8", "resnet20", "resnet56", "resnet110", "vgg19_bn"} <= set(supported_models())
    with pytest.raises(ValueError, match="no PruningNet for model=vit_tiny.*resnet20"):
        adapter_for("vit_tiny")


def test_width_space_channels_and_coupled_resnet_genes():
    space = WidthSpace([16, 64], [0.25, 0.5, 1.0])
    assert space.table == [[4, 8, 16], [16, 32, 64]]
    assert space.channels((0, 2)) == [4, 64] and space.full() == (2, 2) and space.narrowest() == (0, 0)
    with pytest.raises(ValueError, match="end at 1.0"):
        WidthSpace([16], [0.5, 0.75])
    adapter = adapter_for("resnet20")
    assert len(adapter.defaults) == 3 + 9  # stem/stage-1 stream, stages 2 and 3, nine block hidden widths
    widths = adapter.widths(list(range(1, 13)))
    assert widths == {"stem": 1, "stages": [1, 2, 3], "blocks": [[4, 5, 6], [7, 8, 9], [10, 11, 12]]}


@pytest.mark.slow
@pytest.mark.parametrize("name,size", [("resnet8", 16), ("resnet20", 16), ("vgg19_bn", 32)])
def test_every_width_vector_gives_correctly_shaped_weights_and_an_identical_zoo_network(name, size):
    net = _net(name, hidden=2 if name == "vgg19_bn" else 4).eval()
    space, rng = net.space, random.Random(0)
    x = torch.randn(2, 3, size, size)
    table = MacTable(net, name, x[:1])
    choices = [space.full(), space.narrowest()] + [space.sample(rng) for _ in range(2 if name == "vgg19_bn" else 6)]
    for choice in choices:
        channels = space.channels(choice)
        weights = net.generate(choice)
        for spec in net.adapter.convs:
            c_in = 3 if spec.in_gene is None else channels[spec.in_gene]
            assert tuple(weights[spec.name].shape) == (channels[spec.out_gene], c_in, spec.kernel, spec.kernel)
        model = net.export(name, choice).eval()
        assert get_widths(model) == net.widths(choice)
        # The exported network computes exactly what the PruningNet computes, and the search's MACs are its MACs.
        assert torch.allclose(model(x), net(x, choice), atol=1e-5)
        assert table(choice) == count_macs_params(model, x[:1])[0]
    assert table(space.full()) == count_macs_params(net.export(name, space.full()), x[:1])[0]


def test_recalibration_replaces_the_running_statistics_of_the_choices_bns_only():
    net = _net("resnet8").eval()
    choice, other = net.space.full(), net.space.narrowest()
    before = net.norm_for("bn1", other).running_mean.clone()
    batches = [torch.randn(8, 3, 16, 16) + 3.0 for _ in range(2)]
    recalibrate_bn(net, choice, batches)
    bn = net.norm_for("bn1", choice)
    assert int(bn.num_batches_tracked) == 2 and bn.momentum == 0.1 and not net.training
    assert bn.running_mean.abs().max() > 0.01  # statistics of the shifted inputs, not the reset zeros
    assert torch.equal(net.norm_for("bn1", other).running_mean, before)
    again = bn.running_mean.clone()
    recalibrate_bn(net, choice, batches)  # deterministic: the same batches give the same statistics
    assert torch.equal(bn.running_mean, again)


@pytest.mark.slow
def test_a_trained_pruningnet_scores_full_width_above_the_narrowest():
    cfg = {"name": "synthetic", "num_train": 320, "num_test": 32, "image_size": 16, "val_size": 0.25,
           "split_seed": 0, "augment": False, "noise": 0.6}
    loaders = build_loaders(build_datasets(cfg), batch_size=32, eval_batch_size=80, seed=0)
    net = _net("resnet8", hidden=4)
    optim = OmegaConf.create({"name": "sgd", "momentum": 0.9, "weight_decay": 5e-4, "amp": False})
    fit(RandomWidthNet(net), loaders, {"epochs": 10, "lr": 0.1, "milestones": [8], "select": "last"}, optim,
        torch.device("cpu"), seed=0, progress=False)
    ctx = RunContext(torch.device("cpu"), None, Limits())
    score = Scorer(net, calibration_batches(loaders["train"], 2, 0, ctx.device), loaders["val"], ctx)
    full, narrow = score(net.space.full()), score(net.space.narrowest())
    assert full["acc"] > narrow["acc"] and full["loss"] < narrow["loss"]
    assert full["acc"] >= 50.0  # 10 classes: chance is 10%
