"""The channels a global group criterion removes at a target speed-up, as masks on the weights that stay.

Meta-training's prune-aware term (``task.meta_train.prune_aware``) evaluates the metanetwork's output network
*as it will be pruned*: the channels that the criterion removes at the target are zeroed, and the task loss
of what remains is what the metanetwork learns to keep low. Running Torch-Pruning's progressive pruner at
every step would cost seconds; :class:`PruneMask` instead makes the selection in one shot from the current
weights, the way global pruning ranks them:

1. every DepGraph group's channels are scored by the method's importance (group L2 with its normaliser, ...);
2. the channels are sorted by score over all groups (each group keeps at least its best channel);
3. the fewest lowest-scoring channels are removed so that the estimated MACs fall to ``base_macs / target``.
   A conv or linear layer's MACs scale with the share of its output and of its input channels that stay, so
   the estimate is a sum over layers of ``macs * kept_out * kept_in`` (scaled by the whole network's count
   over the conv/linear layers'); a binary search finds the count.

Removing a channel is the same as zeroing it at every layer that produces it (conv/linear rows and biases,
BatchNorm scale and shift): a zero channel adds nothing to the layers that consume it, and an identity
shortcut carries the zero on. So the masked network computes what the pruned one does, while keeping the
shapes that the metanetwork's conversion needs. The selection has no gradient (a hard mask).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
import torch.nn as tnn
import torch_pruning as tp

from utils.pruning.macs import MacCounter
from utils.pruning.methods import PruningMethod
from utils.pruning.progressive import pruning_kwargs

_LAYERS = (tnn.Conv2d, tnn.Linear)
# Zeroing a channel's scale and shift zeroes a BatchNorm's output channel; a LayerNorm's statistics would
# still count it, so networks with LayerNorm (ViTs) are not masked exactly and are left out here.
_PRODUCERS = (tnn.Conv2d, tnn.Linear, tnn.BatchNorm2d, tnn.BatchNorm1d)


@dataclass
class _Side:
    """Which channels of one layer dimension (its outputs or its inputs) a group controls."""

    layer: int            # index into PruneMask.layers
    channels: torch.Tensor  # (k,) channel indices of that dimension
    roots: torch.Tensor     # (k,) the group's root index of each


class PruneMask:
    """One-shot global selection of the channels to remove at a speed-up; see the module docstring.

    Args:
        model: the network whose weights are read at every :meth:`select` (kept by reference, so a network
            whose parameters are overwritten in place, like meta-training's work copy, is read afresh).
        method: a channel criterion (``utils.pruning.methods.build_method``).
        example_input: (1, C, H, W) for tracing and per-layer MACs.
    """

    def __init__(self, model: tnn.Module, method: PruningMethod, example_input: torch.Tensor) -> None:
        self.model, self.importance = model, method.importance
        kw = pruning_kwargs(model)
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_input,
                                                   unwrapped_parameters=kw.get("unwrapped_parameters"))
        self.groups = list(dg.get_all_groups(ignored_layers=kw.get("ignored_layers", []),
                                             root_module_types=list(_LAYERS)))
        self.layers: List[tnn.Module] = [m for m in model.modules() if isinstance(m, _LAYERS)]
        index = {m: i for i, m in enumerate(self.layers)}
        self.layer_macs = torch.tensor(_layer_macs(model, self.layers, example_input), dtype=torch.float64)
        # BatchNorm, activations and pooling shrink with the channels too: scale the conv/linear estimate by
        # the network's whole count over theirs
        self.scale = MacCounter(model, example_input[:1])() / float(self.layer_macs.sum())
        self.out_channels = torch.tensor([_width(m, out=True) for m in self.layers], dtype=torch.float64)
        self.in_channels = torch.tensor([_width(m, out=False) for m in self.layers], dtype=torch.float64)
        self.sides: List[Tuple[List[_Side], List[_Side]]] = []  # per group: (output sides, input sides)
        self.producers: List[List[Tuple[tnn.Module, torch.Tensor, torch.Tensor]]] = []
        for group in self.groups:
            outs, ins, producers = [], [], []
            for item in group.items:
                dep, module = item.dep, item.dep.target.module
                channels = torch.tensor([int(i) for i in item.idxs])
                roots = torch.tensor([int(r) for r in item.root_idxs])
                is_out = dg.is_out_channel_pruning_fn(dep.handler)
                if module in index:
                    (outs if is_out else ins).append(_Side(index[module], channels, roots))
                if is_out and isinstance(module, _PRODUCERS):
                    producers.append((module, channels, roots))
            self.sides.append((outs, ins))
            self.producers.append(producers)

    def scores(self) -> List[torch.Tensor]:
        """The criterion's score of every root channel of every group, from the current weights."""
        with torch.no_grad():
            return [self.importance(group).detach().float().cpu() for group in self.groups]

    def macs(self, kept: List[torch.Tensor]) -> float:
        """Estimated MACs of the network when ``kept[g]`` (bool per root channel) stay."""
        out_kept, in_kept = self.out_channels.clone(), self.in_channels.clone()
        for (outs, ins), keep in zip(self.sides, kept):
            for side in outs:
                out_kept[side.layer] -= float((~keep[side.roots]).sum())
            for side in ins:
                in_kept[side.layer] -= float((~keep[side.roots]).sum())
        return self.scale * float((self.layer_macs * (out_kept / self.out_channels) * (in_kept / self.in_channels)).sum())

    def select(self, target_speed_up: float, base_macs: float) -> List[torch.Tensor]:
        """``kept[g]``: bool per root channel of group ``g``, the fewest removals that reach the target."""
        scores = self.scores()
        flat = torch.cat(scores)  # a new tensor: the scores are left as they are
        offsets = torch.tensor([0] + [len(s) for s in scores]).cumsum(0)
        for g, s in enumerate(scores):  # each group keeps its best channel
            flat[offsets[g] + int(s.argmax())] = float("inf")
        order = torch.argsort(flat, stable=True)
        removable = int(torch.isfinite(flat).sum())
        goal = base_macs / target_speed_up

        def kept_after(k: int) -> List[torch.Tensor]:
            keep = torch.ones(len(flat), dtype=torch.bool)
            keep[order[:k]] = False
            return [keep[offsets[g]:offsets[g + 1]] for g in range(len(scores))]

        lo, hi = 0, removable  # the smallest k whose MACs reach the goal (hi if none does)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.macs(kept_after(mid)) <= goal:
                hi = mid
            else:
                lo = mid + 1
        return kept_after(lo)

    def weight_masks(self, kept: List[torch.Tensor]) -> Dict[torch.Tensor, torch.Tensor]:
        """``{parameter: 0/1 mask of its shape}`` that zeroes the removed channels at every producing layer."""
        masks: Dict[torch.Tensor, torch.Tensor] = {}
        for producers, keep in zip(self.producers, kept):
            for module, channels, roots in producers:
                gone = channels[~keep[roots]]
                if not len(gone):
                    continue
                for p in (module.weight, getattr(module, "bias", None)):
                    if p is None:
                        continue
                    mask = masks.setdefault(p, torch.ones_like(p))
                    mask[gone] = 0
        return masks


def _width(module: tnn.Module, out: bool) -> int:
    if isinstance(module, tnn.Conv2d):
        return module.out_channels if out else module.in_channels
    return module.out_features if out else module.in_features


def _layer_macs(model: tnn.Module, layers: List[tnn.Module], example_input: torch.Tensor) -> List[float]:
    """Multiply-accumulates of each conv/linear layer on ``example_input`` (one forward with hooks)."""
    macs = [0.0] * len(layers)

    def hook(i: int):
        def record(module, inputs, output):
            if isinstance(module, tnn.Conv2d):
                kh, kw = module.kernel_size
                macs[i] = float(output.numel() // output.shape[0] * (module.in_channels // module.groups) * kh * kw)
            else:
                macs[i] = float(output.numel() // output.shape[0] * module.in_features)
        return record

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(layers)]
    try:
        with torch.no_grad():
            was = model.training
            model.eval()
            model(example_input)
            model.train(was)
    finally:
        for h in handles:
            h.remove()
    return macs
