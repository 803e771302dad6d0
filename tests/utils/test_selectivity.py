"""Selectivity figures, and the metanetwork's expressivity: with the sparsity term alone, meta-training on
one small network must shrink channels as selectively as direct descent on the penalty does."""
from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from main.meta_train import penalty_descent
from nn.metanetwork import GraphMetanetwork
from nn.models import create_model
from utils.convert import model_to_graph
from utils.pruning.schemes import scheme_for
from utils.pruning.selectivity import selectivity, weight_norm_sq

METHOD = OmegaConf.create({"name": "group_l2_max", "importance": "group_magnitude", "p": 2, "group_reduction": "mean",
                           "normalizer": "max"})
PENALTY = OmegaConf.create({"pruner_reg": 1.0, "alpha": 16})


def _net():
    torch.manual_seed(0)
    return create_model("resnet8", num_classes=10).eval(), torch.randn(1, 3, 16, 16)


def test_selectivity_of_a_network_with_switched_off_channels():
    model, example = _net()
    before = selectivity(model, example)
    assert before["small_group_fraction"] == 0.0 and 0.5 < before["min_max_ratio"] < 1.0
    with torch.no_grad():  # switch off half the output channels of the first block's inner conv (+ its BN)
        model.layer1[0].conv1.weight[:8] = 0
        model.layer1[0].bn1.weight[:8] = 0
        model.layer1[0].bn1.bias[:8] = 0
        model.layer1[0].conv2.weight[:, :8] = 0
    after = selectivity(model, example)
    assert after["small_group_fraction"] > before["small_group_fraction"]
    assert after["min_max_ratio"] < before["min_max_ratio"]
    assert weight_norm_sq(model) < weight_norm_sq(_net()[0])


def _descend(metanet_cfg=None, lr=0.003, optimizer="adamw"):
    model, example = _net()
    regularize = scheme_for(METHOD).meta_regularizer(model, example, PENALTY)
    graph = model_to_graph(model)
    metanet = None
    if metanet_cfg is not None:
        torch.manual_seed(0)
        metanet = GraphMetanetwork.from_graph(graph, hidden_dim=16, num_layers=2, node_ratio=0.01, edge_ratio=0.01,
                                              **metanet_cfg)
    r = penalty_descent(model, regularize, graph, metanet, lr=lr, max_steps=300, fall=10.0, optimizer=optimizer)
    return r, selectivity(model, example)


@pytest.mark.slow
def test_metanetwork_shrinks_channels_as_selectively_as_direct_descent():
    direct, direct_sel = _descend()
    assert direct["norm_sq_start"] / direct["norm_sq_end"] >= 10
    meta, meta_sel = _descend({"edit": "relative_scale", "magnitude_features": True}, lr=0.01, optimizer="nsgd")
    assert meta["norm_sq_start"] / meta["norm_sq_end"] >= 10  # ||W||^2 has fallen 10x ...
    # ... selectively: at least as many channels below 10% of their group's largest norm as direct descent
    # leaves (measured 12.0% against 4.9%), and the within-group min/max norm well below its start (0.88)
    assert meta_sel["small_group_fraction"] >= direct_sel["small_group_fraction"] > 0
    assert meta_sel["min_max_ratio"] <= 0.7
