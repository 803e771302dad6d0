"""How selectively a network's channels are sized: what a magnitude criterion can remove cheaply.

A network is easy to prune by group L2 magnitude when, inside each DepGraph group, some channels are much
weaker than the others. Two figures over the prunable groups (classifier ignored):

* ``small_group_fraction``: the share of channels whose group L2 score is below 10% of the largest score in
  their group, averaged over groups;
* ``min_max_ratio``: the smallest over the largest score of a group (L2 norms, not squared), averaged over
  groups; about 0.8 for a trained network, 0 when some channel of every group is switched off.

A metanetwork that shrinks every channel by the same factor changes neither figure; one that shrinks the weak
channels of each group drives the first up and the second down, as plain gradient descent on
``GroupNormPruner``'s penalty does.
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch_pruning as tp

from utils.pruning.progressive import pruning_kwargs


def group_scores(model: torch.nn.Module, example: torch.Tensor) -> List[torch.Tensor]:
    """Per prunable group, the group L2 norm of each channel ``(C,)`` (mean over the group's members)."""
    imp = tp.importance.GroupMagnitudeImportance(p=2, normalizer=None, group_reduction="mean")
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    ignored = pruning_kwargs(model).get("ignored_layers", [])
    scores = []
    for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=[torch.nn.Conv2d, torch.nn.Linear]):
        with torch.no_grad():
            s = imp(group)
        if s is not None and s.numel() > 1:
            scores.append(s.clamp(min=0).sqrt())
    return scores


def selectivity(model: torch.nn.Module, example: torch.Tensor) -> Dict[str, float]:
    """``small_group_fraction`` and ``min_max_ratio`` of ``model`` (see the module docstring)."""
    scores = group_scores(model, example)
    if not scores:
        return {"small_group_fraction": 0.0, "min_max_ratio": 1.0}
    small = [float((s < 0.1 * s.max()).float().mean()) for s in scores]
    ratio = [float(s.min() / s.max()) if float(s.max()) > 0 else 1.0 for s in scores]
    return {"small_group_fraction": sum(small) / len(small), "min_max_ratio": sum(ratio) / len(ratio)}


def weight_norm_sq(model: torch.nn.Module) -> float:
    """``||W||^2`` over the weights of every convolution and linear layer."""
    return float(sum(m.weight.detach().double().square().sum() for m in model.modules()
                     if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))))
