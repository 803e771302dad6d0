"""Unstructured pruning: global L1 magnitude and N:M sparsity of conv and linear weights (docs/design.md section 6).

Pruned weights are set to exactly zero in the ordinary state dict (no re-parametrisation, so pruned networks
still convert to graphs, save and reload like any other); fine-tuning keeps them zero by masking their
gradients (:func:`keep_zeros`): with zero gradient, SGD's momentum and weight decay and AdamW's update of
a zero weight are all zero. The classifier is never pruned, as in structured pruning.

- ``magnitude``: the ``fraction`` of prunable weights with the smallest |w| are zeroed, ranked over the
  whole network (``scope: global``) or within each layer (``scope: layer``); the count is exact.
- ``nm``: in every run of ``m`` consecutive weights along a layer's reduction dimension (input channels,
  taken in (out, kh, kw, in) order as sparse tensor cores read a channels-last convolution), the ``m - n``
  smallest are zeroed; sparsity ``(m - n) / m``. Layers whose input-channel count is not a multiple of ``m``
  (e.g. the RGB stem) are left dense, and the reported sparsity says so.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import torch

from utils.architecture import is_zoo_model, zoo

PRUNABLE = (torch.nn.Conv2d, torch.nn.Linear)


def classifier_of(model: torch.nn.Module) -> torch.nn.Module | None:
    """The zoo family's classifier, or the last linear layer of a non-zoo model."""
    if is_zoo_model(model):
        return zoo().classifier(model)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return linears[-1] if linears else None


def prunable_weights(model: torch.nn.Module) -> List[Tuple[str, torch.nn.Parameter]]:
    """``(module name, weight)`` of every conv and linear layer except the classifier."""
    head = classifier_of(model)
    return [(name, m.weight) for name, m in model.named_modules() if isinstance(m, PRUNABLE) and m is not head]


def sparsity(model: torch.nn.Module) -> float:
    """Fraction of exactly-zero weights among the prunable ones."""
    weights = [w for _, w in prunable_weights(model)]
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / max(total, 1)


@torch.no_grad()
def magnitude_prune(model: torch.nn.Module, fraction: float, scope: str = "global") -> float:
    """Zero the ``fraction`` smallest-|w| prunable weights (already-zero ones count); returns the sparsity."""
    weights = [w for _, w in prunable_weights(model)]
    groups = [weights] if scope == "global" else [[w] for w in weights]
    for group in groups:
        flat = torch.cat([w.detach().abs().flatten() for w in group])
        k = int(round(fraction * flat.numel()))
        if k == 0:
            continue
        drop = torch.zeros_like(flat, dtype=torch.bool)
        drop[torch.topk(flat, k, largest=False, sorted=False).indices] = True
        offset = 0
        for w in group:
            w.masked_fill_(drop[offset:offset + w.numel()].view_as(w), 0.0)
            offset += w.numel()
    return sparsity(model)


def _channels_last(w: torch.Tensor) -> torch.Tensor:
    return w.permute(0, 2, 3, 1) if w.dim() == 4 else w  # (O, I, kh, kw) -> (O, kh, kw, I)


def nm_keep_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor | None:
    """Boolean mask (shape of ``w``) keeping the ``n`` largest |w| of every ``m`` along the input channels,
    or None when the input-channel count is not a multiple of ``m``."""
    if w.shape[1] % m:
        return None
    cl = _channels_last(w.detach().abs())
    runs = cl.reshape(-1, m)  # (O * kh * kw * I / m, m)
    keep = torch.zeros_like(runs, dtype=torch.bool)
    keep.scatter_(1, torch.topk(runs, n, dim=1).indices, True)
    keep = keep.view(cl.shape)
    return keep.permute(0, 3, 1, 2) if w.dim() == 4 else keep


@torch.no_grad()
def nm_prune(model: torch.nn.Module, n: int, m: int) -> Tuple[float, List[str]]:
    """Apply the N:M pattern to every prunable layer that admits it; returns (sparsity, dense layer names)."""
    if not 0 <= n <= m:
        raise ValueError(f"N:M sparsity needs 0 <= n <= m, got {n}:{m}")
    dense = []
    for name, w in prunable_weights(model):
        keep = nm_keep_mask(w, n, m)
        if keep is None:
            dense.append(name)
        else:
            w.mul_(keep)
    return sparsity(model), dense


def keep_zeros(model: torch.nn.Module) -> Callable[[], None]:
    """An ``after_backward`` hook for :func:`utils.train.fit` that keeps the current zeros at zero."""
    masks = [(w, w.detach() != 0) for _, w in prunable_weights(model)]

    def hook(*_args) -> None:
        for w, mask in masks:
            if w.grad is not None:
                w.grad.mul_(mask)

    return hook


@torch.no_grad()
def nonzero_macs(model: torch.nn.Module, example_input: torch.Tensor) -> Dict[str, int]:
    """Multiply-accumulates of the conv and linear layers, dense and counting only non-zero weights.

    A weight of a conv is used once per output position (grouped convs included), a linear weight once
    per input row, so the count is ``weights * positions`` per layer."""
    counts = {"dense": 0, "nonzero": 0}
    hooks = []

    def count(module, inputs, output):
        conv = isinstance(module, torch.nn.Conv2d)
        positions = output[0, 0].numel() if conv else output[0].numel() // output.shape[-1]
        counts["dense"] += module.weight.numel() * positions
        counts["nonzero"] += int((module.weight != 0).sum()) * positions

    for m in model.modules():
        if isinstance(m, PRUNABLE):
            hooks.append(m.register_forward_hook(count))
    was_training = model.training
    try:
        model.eval()(example_input[:1])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return counts


def sparsity_regularizer(n: int | None, m: int | None, alpha: float, reg: float) -> Callable[[torch.nn.Module], None]:
    """Meta-training counterpart of ``GroupNormPruner.regularize`` for unstructured sparsity.

    Adds ``reg * s * w`` to each prunable weight's gradient, with ``s`` growing from 1 for the most
    important weights to ``alpha`` for the least: per layer ``alpha ** ((max|w| - |w|) / (max|w| - min|w|))``
    for magnitude pruning; for N:M, ``alpha`` on the weights the pattern would drop and 1 on those it keeps."""

    def regularize(model: torch.nn.Module) -> None:
        with torch.no_grad():
            for _, w in prunable_weights(model):
                a = w.detach().abs()
                keep = nm_keep_mask(w, n, m) if n is not None else None
                if n is not None and keep is None:
                    continue  # a layer the pattern leaves dense
                if keep is not None:
                    scale = torch.where(keep, torch.ones_like(a), torch.full_like(a, alpha))
                else:
                    scale = alpha ** ((a.max() - a) / (a.max() - a.min()).clamp_min(1e-12))
                if w.grad is None:
                    w.grad = torch.zeros_like(w)
                w.grad.add_(reg * scale * w.detach())

    return regularize
