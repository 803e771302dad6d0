"""Progressive structural pruning to a target speed-up with Torch-Pruning groups (docs/design.md section 6).

Global pruning with a linear schedule of ``steps`` small steps towards ratio 1.0 and no per-layer cap (a
method's ``max_pruning_ratio`` sets one);
the classifier keeps its outputs. After every step the speed-up ``base_macs / macs`` is recomputed with
the exact fast counter, and pruning stops at the first step that reaches the target: the result is never
below the target and overshoots by at most one step. ``base_macs`` is the *unpruned* network's count, so a
network that was already initially pruned is measured against its original.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
import torch_pruning as tp

from utils import distributed as du
from utils.architecture import is_zoo_model, zoo
from utils.pruning.macs import MacCounter
from utils.pruning.methods import PruningError, PruningMethod

log = logging.getLogger(__name__)


__all__ = ["PruneResult", "PruningError", "build_pruner", "loss_gradients", "max_speed_up", "progressive_prune",
           "prune_step", "pruning_kwargs"]


@dataclass
class PruneResult:
    speed_up: float
    macs: int
    base_macs: int
    params: int
    steps: int
    seconds: float
    history: List[Dict[str, float]] = field(default_factory=list)  # per step: step, macs, speed_up


def pruning_kwargs(model: torch.nn.Module) -> Dict[str, Any]:
    """Arguments that keep a zoo model describable (classifier ignored, ViT heads kept whole)."""
    if is_zoo_model(model):
        return zoo().pruning_kwargs(model)
    last_linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1:]
    return {"ignored_layers": last_linear}


def _after_pruning(model: torch.nn.Module) -> None:
    if is_zoo_model(model):
        zoo().after_pruning(model)


def build_pruner(model: torch.nn.Module, method: PruningMethod, example_input: torch.Tensor,
                 steps: int) -> tp.pruner.BasePruner:
    return method.pruner_cls(
        model, example_input, importance=method.importance, global_pruning=method.global_pruning,
        pruning_ratio=1.0, iterative_steps=steps, max_pruning_ratio=method.max_pruning_ratio,
        **pruning_kwargs(model), **method.pruner_kwargs,
    )


def group_regularizer(pruner: tp.pruner.BasePruner, **kwargs: Any) -> Callable[[torch.nn.Module], None]:
    """``pruner.regularize`` (Torch-Pruning's group-sparsity gradient, ``kwargs`` e.g. ``alpha``) over the
    groups of more than one channel.

    Torch-Pruning scales a group's penalty by ``alpha ** ((max - imp) / (max - min))`` of its channels'
    importances; a group cut down to one channel has ``max == min``, so the scale is 0/0 and every gradient
    of the step NaN (a lightly pruned target network with a one-channel layer: the loss became NaN after the
    first fine-tuning step). Such a group cannot shrink further anyway, so it is left out."""
    groups = pruner._groups
    shrinkable = [g for g in groups if len(g[0].idxs) > 1]  # once: the pruner is never stepped, its groups stay

    def regularize(model: torch.nn.Module) -> None:
        pruner._groups = shrinkable
        try:
            pruner.regularize(model, **kwargs)
        finally:
            pruner._groups = groups
    return regularize


def max_speed_up(model: torch.nn.Module, method: PruningMethod, example_input: torch.Tensor, base_macs: int) -> float:
    """Estimate of the largest reachable speed-up: every group pruned to ~5% of its channels (on a copy), or to
    what the method's per-layer cap leaves when that is more.

    At least one channel per group is kept (one per head for attention); the estimate errs on the high
    side, so it never rejects a target the schedule could reach."""
    least = max(0.05, 1.0 - method.max_pruning_ratio)
    probe = copy.deepcopy(model)
    kw = pruning_kwargs(probe)
    unwrapped = kw.get("unwrapped_parameters")
    dg = tp.DependencyGraph().build_dependency(probe, example_inputs=example_input, unwrapped_parameters=unwrapped)
    heads = kw.get("out_channel_groups", {})
    for group in dg.get_all_groups(ignored_layers=kw.get("ignored_layers", []),
                                   root_module_types=[torch.nn.Conv2d, torch.nn.Linear]):
        n = len(group[0].idxs)
        per = next((heads[dep.target.module] for dep, _ in group if dep.target.module in heads), 1)
        width = n // per  # channels per head (per = 1: the whole group)
        keep = max(1, math.ceil(least * width))
        idxs = [h * width + j for h in range(per) for j in range(keep, width)]
        if idxs:
            group.prune(idxs=idxs)
    _after_pruning(probe)
    return base_macs / MacCounter(probe, example_input)()


def prune_step(pruner: tp.pruner.BasePruner, method: PruningMethod) -> None:
    """One pruner step; with a group hook, each group passes through it right before it is pruned."""
    hook = method.group_hook
    if hook is None:
        pruner.step()
        return
    for group in pruner.step(interactive=True):
        hook.before_prune(group, list(group[0].idxs), pruner)  # group[0] is the root layer: idxs == channels
        group.prune()


def loss_gradients(method: PruningMethod, batches: Callable[[], Any], device: torch.device) -> Callable:
    """A ``calibrate(model)`` that fills the gradients a data-driven criterion (Taylor, Hessian) reads.

    In a distributed job each rank reads its own batches and the gradients are averaged over the ranks, so
    every rank ranks the channels alike and prunes the same ones. The Hessian criterion keeps per-sample
    statistics inside its importance object, which cannot be averaged: it is refused there."""
    if method.per_sample_gradients and du.is_distributed():
        raise PruningError(f"method={method.name} keeps per-sample statistics that cannot be synchronised across "
                           "ranks; prune with one process (python -m main ...) or pick another method")

    def calibrate(model: torch.nn.Module) -> None:
        model.zero_grad(set_to_none=True)
        imp = method.importance
        if method.per_sample_gradients:
            imp.zero_grad()
        for i, (x, y) in enumerate(batches()):
            if i >= method.calibration_batches:
                break
            x, y = x.to(device), y.to(device)
            if method.per_sample_gradients:  # Torch-Pruning's Hessian estimate accumulates per-sample grads
                for j in range(min(len(x), 32)):
                    model.zero_grad(set_to_none=True)
                    F.cross_entropy(model(x[j:j + 1]), y[j:j + 1]).backward()
                    imp.accumulate_grad(model)
            else:
                F.cross_entropy(model(x), y).backward()
        du.average_gradients(model)

    return calibrate


def progressive_prune(
    model: torch.nn.Module,
    target_speed_up: float,
    method: PruningMethod,
    example_input: torch.Tensor,
    base_macs: Optional[int] = None,
    steps: int = 200,
    calibrate: Optional[Callable[[torch.nn.Module], None]] = None,
    on_step: Optional[Callable[[int, float], None]] = None,
) -> PruneResult:
    """Prune ``model`` in place until ``base_macs / macs >= target_speed_up``; see the module docstring.

    Args:
        calibrate: called before each step for criteria that need gradients (see :func:`loss_gradients`).
        on_step: called after each step with (step, speed-up), e.g. to record an accuracy curve.
    """
    t0 = time.time()
    example_input = example_input[:1]
    counter = MacCounter(model, example_input)
    macs = counter()
    base_macs = int(base_macs or macs)
    history = [{"step": 0, "macs": macs, "speed_up": base_macs / macs}]
    if base_macs / macs >= target_speed_up:
        return PruneResult(base_macs / macs, macs, base_macs, counter.params(), 0, time.time() - t0, history)
    if method.needs_gradients and calibrate is None:
        raise PruningError(f"method {method.name} needs gradients from data: pass calibrate=loss_gradients(...)")
    reachable = max_speed_up(model, method, example_input, base_macs)
    if target_speed_up > reachable:
        raise PruningError(
            f"a {target_speed_up:g}x speed-up is unreachable for this network: even keeping 5% of every group's "
            f"channels gives only {reachable:.2f}x (relative to {base_macs / 1e6:.2f} M MACs). "
            "Choose a smaller target.")
    model.eval()
    pruner = build_pruner(model, method, example_input, steps)
    if method.group_hook is not None:
        method.group_hook.prepare(model, pruner)
    for step in range(1, steps + 1):
        if calibrate is not None:
            calibrate(model)
        prune_step(pruner, method)
        _after_pruning(model)
        macs = counter()
        history.append({"step": step, "macs": macs, "speed_up": base_macs / macs})
        if on_step is not None:
            on_step(step, base_macs / macs)
        if base_macs / macs >= target_speed_up:
            break
    else:
        raise PruningError(f"the {steps}-step schedule ended at {base_macs / macs:.2f}x, below the "
                           f"{target_speed_up:g}x target; the network was changed in place: restart from its checkpoint")
    model.zero_grad(set_to_none=True)
    log.info("pruned to %.3fx (%d steps, %.2f M MACs) with %s in %.2fs", base_macs / macs, step, macs / 1e6,
             method.name, time.time() - t0)
    return PruneResult(base_macs / macs, macs, base_macs, counter.params(), step, time.time() - t0, history)
