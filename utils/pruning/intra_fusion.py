"""Intra-Fusion (Theus et al., ICLR 2024): fuse the pruned channels of a group into the kept ones.

Conventional pruning keeps the channels a criterion ranks highest and drops the rest. Intra-Fusion keeps
the same channels but lets the dropped ones live on in them, data-free. Per group, right before
Torch-Pruning removes its channels (:class:`IntraFusion`, a group hook of progressive pruning):

1. **BatchNorm folding**: each BN's factor ``c = gamma / sqrt(var + eps)`` is multiplied into the rows of
   the conv/linear before it, so that channels are comparable and can be averaged (exact, with eps).
2. **Optimal transport** (:func:`transport_plan`): every channel ``j`` of the group (n of them) is described
   by its folded producer parameters, concatenated over all layers that write the channel (conv rows,
   biases, the BN shift; the whole residual stream for a ResNet stage). POT's exact solver ``ot.emd`` gives
   a plan ``T`` (n, m) from all channels to the m kept ones, cost ``||x_j - x_k||_p`` between normalised
   vectors, uniform or importance marginals ``a`` (n,), ``b = a[kept] / sum`` (m,). Progressive pruning
   fuses a few channels per step, so "uniform" means uniform over the *original* channels: a channel
   that absorbed others carries their mass into later steps (the first step is the paper's one-shot
   problem). ``transport: nearest`` leaves the target marginal free instead (each channel goes to its
   nearest kept channel), which never forces a kept channel to absorb a distant one.
3. **Fusion** (:func:`fuse_slots`): with ``P = T / b`` (columns sum to 1) every producer's kept rows become
   ``W_k <- sum_j P_jk W_j`` (biases, BN beta and mean alike, one plan for all producers of the group), the
   consumers' columns are combined (below), and the result is unfolded with each kept channel's own ``c``:
   an unfused channel keeps its exact parameters, and the criterion keeps ranking the network as trained.
   With ``fold_bn: true`` the folding is instead applied to the whole network once (:func:`fold_batchnorm`,
   the paper's set-up; the criterion then ranks folded weights).

Two scalings of the consumer columns (config ``scaling``):

- ``paper``: the same barycentric map as the producers, ``C_k <- sum_j P_jk C_j`` (the paper multiplies
  every layer of the group by the one column-normalised map).
- ``exact``: each source channel hands its whole column on, split by where its mass went:
  ``C_k <- sum_j (T_jk / a_j) C_j``. If channel j is an exact duplicate of kept channel i and the plan
  sends j (and i) to i, the producer row of i stays and its consumer column becomes ``C_i + C_j``: the
  network's function is unchanged. The paper's scaling halves that column instead.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import ot
import torch
import torch.nn as tnn
import torch_pruning as tp

from utils.pruning.methods import GROUP_HOOKS, PruningError
from utils.registry import Registry

log = logging.getLogger(__name__)

_BATCHNORMS = (tnn.BatchNorm1d, tnn.BatchNorm2d, tnn.BatchNorm3d)
_CONVS = (tnn.Conv1d, tnn.Conv2d, tnn.Conv3d)


# --------------------------------------------------------------------------------------------- BN folding
def _folds_into(bn: tnn.Module, dg: tp.DependencyGraph) -> Optional[tnn.Module]:
    """The conv/linear whose output only this BN reads, or None."""
    node = dg.module2node.get(bn)
    if node is None or len(node.inputs) != 1:
        return None
    prev = node.inputs[0]
    if isinstance(prev.module, _CONVS + (tnn.Linear,)) and len(prev.outputs) == 1:
        return prev.module
    return None


def fold_batchnorm(model: tnn.Module, example_input: torch.Tensor, dg: Optional[tp.DependencyGraph] = None) -> int:
    """Fold every BatchNorm's scale into the layer before it; the model's eval output is unchanged.

    With ``c = gamma / sqrt(var + eps)`` per channel, the previous layer's rows and bias are multiplied by
    ``c`` and the BN keeps ``running_mean <- c * mean``, ``running_var <- c^2 * var``, ``bias = beta`` and
    ``weight <- sqrt(running_var + eps)``. In eval mode the BN then only adds ``beta - running_mean`` (the
    folded bias; the zoo's convs have none, so it stays in the BN and the architecture and state-dict keys
    stay as they are). Unlike a BN reset to (0, 1, 1, 0), the running statistics stay those of the folded
    channel, so fine-tuning in train mode starts from about the same function. Folding twice is a no-op.

    Returns the number of folded BNs. Raises :class:`PruningError` for a BN that follows something other
    than a conv/linear read only by it.
    """
    was_training = model.training
    model.eval()
    dg = dg or tp.DependencyGraph().build_dependency(model, example_inputs=example_input)  # needs autograd
    with torch.no_grad():
        folded = sum(_fold_one(name, bn, dg) for name, bn in model.named_modules() if isinstance(bn, _BATCHNORMS))
    model.train(was_training)
    return folded


def _fold_one(name: str, bn: tnn.Module, dg: tp.DependencyGraph) -> int:
    """Fold one BN (see :func:`fold_batchnorm`); returns 1."""
    prev = _folds_into(bn, dg)
    if prev is None or not bn.track_running_stats or not bn.affine:
        raise PruningError(f"intra_fusion cannot fold BatchNorm {name!r}: it must directly follow a conv or "
                           "linear layer whose output only it reads, and have affine weights and running stats")
    var = bn.running_var.double()
    c = bn.weight.double() / torch.sqrt(var + bn.eps)  # (C,)
    shape = (-1,) + (1,) * (prev.weight.dim() - 1)
    prev.weight.copy_(prev.weight.double() * c.view(shape))
    if prev.bias is not None:
        prev.bias.copy_(prev.bias.double() * c)
    bn.running_mean.copy_(bn.running_mean.double() * c)
    bn.running_var.copy_(var * c * c)
    bn.weight.copy_(torch.sqrt(bn.running_var.double() + bn.eps))
    return 1


# --------------------------------------------------------------------------------------------- transport
# How channel vectors are normalised before the cost (``normalization`` in the config): the plan only
# depends on relative distances, so this decides which layers' differences count how much.
NORMALIZATIONS: Registry = Registry("intra-fusion cost normalisation")


@NORMALIZATIONS.register("layer")
def _per_layer(block: torch.Tensor) -> torch.Tensor:
    """Each layer's block (n, d) divided by its mean channel norm: every layer counts about equally."""
    return block / block.norm(dim=1).mean().clamp_min(1e-12)


@NORMALIZATIONS.register("channel")
def _per_channel(block: torch.Tensor) -> torch.Tensor:
    """Each channel's vector to unit norm: only directions count (scale is ignored)."""
    return block / block.norm(dim=1, keepdim=True).clamp_min(1e-12)


@NORMALIZATIONS.register("none")
def _no_normalization(block: torch.Tensor) -> torch.Tensor:
    return block


def _cost(x: torch.Tensor, keep: Sequence[int], p: float) -> torch.Tensor:
    """(n, m) float64 CPU: ``||x_j - x_keep[k]||_p``. Computed in float32 on the model's device: the l1 cost
    is the expensive part (n * m * d) and the plan only needs its ordering; exact ties stay exact zeros."""
    x = x.float()
    return torch.cdist(x, x[list(keep)], p=p).double().cpu()


def transport_plan(x: torch.Tensor, keep: Sequence[int], a: torch.Tensor, b: torch.Tensor, p: float) -> torch.Tensor:
    """Exact OT plan (n, m) from the n channels ``x`` (n, d) to the kept ones ``x[keep]``.

    Cost ``C_jk = ||x_j - x_keep[k]||_p``; rows of the plan sum to ``a`` (n,), columns to ``b`` (m,)
    (both sum to 1). Solved in float64 with POT's network simplex ``ot.emd``; returned on the CPU.
    """
    cost = _cost(x, keep, p).numpy()
    a64 = a.double().cpu().numpy()
    b64 = b.double().cpu().numpy()
    a64, b64 = a64 / a64.sum(), b64 / b64.sum()  # emd wants equal total mass to the last bit
    plan = ot.emd(a64, b64, np.ascontiguousarray(cost), numItermax=1_000_000)
    return torch.from_numpy(plan)


def nearest_plan(x: torch.Tensor, keep: Sequence[int], a: torch.Tensor, b: torch.Tensor, p: float) -> torch.Tensor:
    """Semi-relaxed OT plan (n, m): rows sum to ``a``, the target marginal is left free (``b`` unused).

    Its optimum in closed form: every channel sends all its mass to its nearest kept channel (a kept channel
    to itself, at cost 0). Merges only what is close, however few channels a step removes."""
    cost = _cost(x, keep, p)
    cost[torch.as_tensor(list(keep)), torch.arange(len(keep))] = -1.0  # kept channels stay themselves (ties)
    plan = torch.zeros_like(cost)
    plan[torch.arange(len(x)), cost.argmin(1)] = a.double().cpu()
    return plan


# How the plan is solved (``transport`` in the config): fn(x (n, d), keep, a (n,), b (m,), p) -> plan (n, m)
TRANSPORTS: Registry = Registry("intra-fusion transport")
TRANSPORTS.register("emd")(transport_plan)
TRANSPORTS.register("nearest")(nearest_plan)


def _marginal(scores: torch.Tensor) -> torch.Tensor:
    """Probabilities from scores (n,); a small floor keeps every channel's mass positive."""
    scores = scores.double().clamp_min(0)
    if not torch.isfinite(scores).all() or scores.sum() <= 0:
        return torch.full_like(scores, 1.0 / len(scores))
    scores = scores + 1e-6 * scores.mean()
    return scores / scores.sum()


# --------------------------------------------------------------------------------------------- groups
@dataclass
class _Slot:
    """One layer's part of a group: ``idx`` (n, s) holds the layer indices of each group channel
    (s > 1 where a flatten spreads a channel over several input features). ``scale`` (n, s) is the BN
    factor ``gamma / sqrt(var + eps)`` folded into a producer and its BN (1 without a BN)."""

    module: tnn.Module
    role: str  # producer (output rows) | consumer (input columns) | norm (BatchNorm channels)
    idx: torch.Tensor
    scale: Optional[torch.Tensor] = None


def _index_table(idxs: Sequence[int], roots: Sequence[Optional[int]], n: int, name: str) -> torch.Tensor:
    per_root: List[List[int]] = [[] for _ in range(n)]
    for i, r in zip(idxs, roots):
        if r is None:
            raise PruningError(f"intra_fusion cannot map the channels of {name} back to its group")
        per_root[r].append(int(i))
    sizes = {len(v) for v in per_root}
    if len(sizes) != 1 or 0 in sizes:
        raise PruningError(f"intra_fusion needs every channel of a group to map to the same number of indices in "
                           f"{name}; found {sorted(sizes)}")
    return torch.tensor(per_root, dtype=torch.long)  # (n, s)


def group_slots(full_group: tp.Group, dg: tp.DependencyGraph, n: int) -> List[_Slot]:
    """The producer, consumer and BN slots of a *full* group (all n channels) with their BN scales;
    unsupported layers raise :class:`PruningError`."""
    slots: List[_Slot] = []
    seen = set()
    for item in full_group.items:
        dep, module = item.dep, item.dep.target.module
        name = dg._module2name.get(module, type(module).__name__)
        if isinstance(module, _BATCHNORMS):
            role = "norm"
        elif isinstance(module, _CONVS + (tnn.Linear,)):
            if isinstance(module, _CONVS) and module.groups != 1:
                raise PruningError(f"intra_fusion does not support grouped/depthwise convolutions ({name})")
            role = "producer" if dg.is_out_channel_pruning_fn(dep.handler) else "consumer"
        elif isinstance(module, tnn.Module) and not any(True for _ in module.parameters(recurse=False)) \
                and not any(True for _ in module.buffers(recurse=False)):
            continue  # activations, pooling, additions, flatten: nothing to fuse
        else:
            raise PruningError(f"intra_fusion does not support {type(module).__name__} layers in a pruned group "
                               f"({name}); supported: Conv1d/2d/3d (groups=1), Linear, and BatchNorm directly "
                               "after one of them")
        if (module, role) not in seen:
            seen.add((module, role))
            slots.append(_Slot(module, role, _index_table(item.idxs, item.root_idxs, n, name)))
    if not any(s.role == "producer" for s in slots):
        raise PruningError("intra_fusion found a group without a conv/linear producing its channels")
    producers = {s.module: s for s in slots if s.role == "producer"}
    for s in slots:
        if s.role != "norm":
            continue
        bn = s.module
        prev = _folds_into(bn, dg)
        if prev not in producers or producers[prev].idx.shape != s.idx.shape or not bn.affine \
                or not bn.track_running_stats:
            raise PruningError(f"intra_fusion cannot fold BatchNorm {dg._module2name.get(bn, '')}: it must directly "
                               "follow a conv/linear of the same group whose output only it reads, with affine "
                               "weights and running statistics")
        s.scale = (bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps))[s.idx]  # (n, s)
        producers[prev].scale = s.scale
    for s in slots:
        if s.role == "producer" and s.scale is None:
            s.scale = torch.ones(s.idx.shape, dtype=torch.float64, device=s.module.weight.device)
    return slots


def _expand(scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(n, s) -> broadcastable against (n, s, *rest)."""
    return scale.reshape(scale.shape + (1,) * (like.dim() - scale.dim()))


def _folded(s: _Slot) -> Dict[str, torch.Tensor]:
    """The slot's channels with BN folded in (float64, leading dims (n, s)): producer ``weight``/``bias``
    times the scale; BN ``mean`` and ``std`` of the folded pre-activation and its ``beta``."""
    mod = s.module
    if s.role == "producer":
        w = mod.weight.detach()[s.idx].double()
        out = {"weight": w * _expand(s.scale, w)}
        if mod.bias is not None:
            out["bias"] = mod.bias.detach()[s.idx].double() * s.scale
        return out
    std = mod.running_var.detach()[s.idx].double().clamp_min(0).sqrt()
    return {"mean": mod.running_mean[s.idx].double() * s.scale, "std": std * s.scale.abs(),
            "beta": mod.bias.detach()[s.idx].double()}


def channel_vectors(slots: Sequence[_Slot], normalize: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """(n, d): each channel's BN-folded producer parameters, one block per layer (conv/linear rows with their
    bias; a BN's folded shift ``beta - scale * mean``), each block normalised, then concatenated."""
    blocks = []
    for s in slots:
        if s.role == "consumer":
            continue
        n, f = s.idx.shape[0], _folded(s)
        parts = [f["weight"], f.get("bias")] if s.role == "producer" else [f["beta"] - f["mean"]]
        blocks.append(torch.cat([t.reshape(n, -1) for t in parts if t is not None], dim=1))
    return torch.cat([normalize(b) for b in blocks], dim=1)


@torch.no_grad()
def fuse_slots(slots: Sequence[_Slot], keep: Sequence[int], produce: torch.Tensor, consume: torch.Tensor) -> None:
    """Write the fused kept channels in place.

    In BN-folded form, producer rows/biases and BN beta/mean are combined with ``produce`` (n, m), consumer
    columns with ``consume`` (n, m). The result is unfolded again with each kept channel's own BN scale, so an
    unfused channel keeps its parameters exactly and the criterion keeps seeing the network as trained.
    """

    def unfold(values: torch.Tensor, s: _Slot) -> torch.Tensor:  # folded (m, s, ...) / kept channels' scales
        u = s.scale[keep]
        u = torch.where(u.abs() > 1e-12, u, torch.ones_like(u))  # a zero BN scale: keep the row folded
        return values / _expand(u, values)

    for s in slots:
        mod, kept_idx = s.module, s.idx[keep]
        if s.role == "consumer":
            w = mod.weight.data
            cols = w[:, s.idx].double()  # (out, n, s, *rest)
            w[:, kept_idx] = torch.einsum("jk,ojs...->oks...", consume, cols).to(w.dtype)
            continue
        fused = {k: torch.einsum("jk,js...->ks...", produce, v) for k, v in _folded(s).items()}
        if s.role == "producer":
            mod.weight.data[kept_idx] = unfold(fused["weight"], s).to(mod.weight.dtype)
            if mod.bias is not None:
                mod.bias.data[kept_idx] = unfold(fused["bias"], s).to(mod.bias.dtype)
            continue
        # The std of a combination of channels is unknown without data: the sum of the stds is its upper
        # bound (reached for perfectly correlated channels, the ones fusion merges). Eval mode does not
        # depend on it: gamma is set so that gamma / sqrt(var + eps) is the kept channel's scale again.
        u = s.scale[keep]
        u = torch.where(u.abs() > 1e-12, u, torch.ones_like(u))
        var = (fused["std"] / u.abs()) ** 2
        mod.running_mean[kept_idx] = (fused["mean"] / u).to(mod.running_mean.dtype)
        mod.running_var[kept_idx] = var.to(mod.running_var.dtype)
        mod.weight.data[kept_idx] = (u * torch.sqrt(var + mod.eps)).to(mod.weight.dtype)
        mod.bias.data[kept_idx] = fused["beta"].to(mod.bias.dtype)


# --------------------------------------------------------------------------------------------- the hook
class IntraFusion:
    """Group hook of ``method=intra_fusion``: fuses each group's pruned channels into its kept ones.

    Args:
        importance: the method's criterion (any Torch-Pruning importance); it picks the kept channels
            through the pruner and, with ``marginals='importance'``, weighs the transport.
        scaling: ``paper`` or ``exact`` (module docstring).
        marginals: ``uniform`` or ``importance`` (source: all channels' scores; target: the kept ones').
        cost_p: p of the p-norm cost.
        normalization: name in :data:`NORMALIZATIONS`.
        fold_bn: fold every BN into the network once before pruning (else per group, unfolded afterwards).
        transport: name in :data:`TRANSPORTS`: ``emd`` (exact OT, both marginals) or ``nearest``.
    """

    def __init__(self, importance: Optional[tp.importance.Importance] = None, scaling: str = "paper",
                 marginals: str = "uniform", cost_p: float = 1.0, normalization: str = "layer",
                 fold_bn: bool = False, transport: str = "emd") -> None:
        if scaling not in ("paper", "exact"):
            raise PruningError(f"intra_fusion scaling must be 'paper' or 'exact', got {scaling!r}")
        if marginals not in ("uniform", "importance"):
            raise PruningError(f"intra_fusion marginals must be 'uniform' or 'importance', got {marginals!r}")
        if marginals == "importance" and importance is None:
            raise PruningError("intra_fusion marginals='importance' needs an importance criterion")
        self.importance, self.scaling, self.marginals, self.cost_p = importance, scaling, marginals, float(cost_p)
        self.normalize = NORMALIZATIONS.get(normalization)
        self.fold_bn = bool(fold_bn)
        self.transport = TRANSPORTS.get(transport)
        self._mass: Dict[tnn.Module, torch.Tensor] = {}  # per group: original channels each channel stands for
        self.last_plan: Optional[torch.Tensor] = None  # (n, m) of the last fused group, for inspection/tests

    def prepare(self, model: tnn.Module, pruner: tp.pruner.BasePruner) -> None:
        """Check every prunable group is made of supported layers (fail before any change); fold BN if asked."""
        dg = pruner.DG
        groups = list(dg.get_all_groups(ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types))
        for group in groups:
            group_slots(group, dg, len(group[0].idxs))
        if self.fold_bn:
            log.info("intra_fusion: folded %d BatchNorm layers", fold_batchnorm(model, None, dg=dg))

    def full_group(self, group: tp.Group, dg: tp.DependencyGraph) -> tp.Group:
        root, handler = group[0].dep.target.module, group[0].dep.handler
        n = dg.get_out_channels(root) if dg.is_out_channel_pruning_fn(handler) else dg.get_in_channels(root)
        return dg.get_pruning_group(root, handler, list(range(n)))

    def before_prune(self, group: tp.Group, idxs: List[int], pruner: tp.pruner.BasePruner) -> None:
        full = self.full_group(group, pruner.DG)
        self.fuse(full, idxs, pruner.DG)

    def fuse(self, full: tp.Group, pruned: Sequence[int], dg: tp.DependencyGraph) -> torch.Tensor:
        """Fuse the channels ``pruned`` of the full group ``full`` into the others; returns the plan (n, m)."""
        n = len(full[0].idxs)
        drop = {int(i) for i in pruned}
        keep = [i for i in range(n) if i not in drop]
        if not drop or not keep:
            return torch.eye(n, dtype=torch.float64)[:, keep]
        slots = group_slots(full, dg, n)
        x = channel_vectors(slots, self.normalize)  # (n, d)
        key = next(s.module for s in slots if s.role == "producer")  # the same module object at every step
        mass = self._mass.get(key)
        if mass is None or len(mass) != n:  # first time (or the widths changed outside this hook)
            mass = torch.ones(n, dtype=torch.float64)
        if self.marginals == "importance":
            a = _marginal(self.importance(full).detach().double().cpu())
        else:  # uniform over the *original* channels: a channel that absorbed others weighs as much as they did
            a = mass / mass.sum()
        b = a[keep] / a[keep].sum()
        plan = self.transport(x, keep, a, b, self.cost_p)  # (n, m)
        produce = plan / plan.sum(0, keepdim=True)  # columns sum to 1: kept = convex combination of sources
        consume = produce if self.scaling == "paper" else plan / plan.sum(1, keepdim=True)  # rows sum to 1
        device = next(s.module.weight.device for s in slots)
        fuse_slots(slots, keep, produce.to(device), consume.to(device))
        # each kept channel now stands for the original channels whose mass it received (in that order after
        # Torch-Pruning removes the others)
        self._mass[key] = (plan / plan.sum(1, keepdim=True)).T @ mass
        self.last_plan = plan
        return plan


@GROUP_HOOKS.register("intra_fusion")
def _intra_fusion(cfg: Mapping[str, Any], importance: tp.importance.Importance) -> IntraFusion:
    keys = ("scaling", "marginals", "cost_p", "normalization", "fold_bn", "transport")
    return IntraFusion(importance, **{k: cfg[k] for k in keys if k in cfg})
