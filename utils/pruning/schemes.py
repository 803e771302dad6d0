"""Pruning schemes: what "prune to a target" means for a method, so every run mode serves every method.

A method config's ``structure`` key picks the scheme (default ``channels``):

- ``channels``: structural pruning of DepGraph groups with the method's criterion; the target and x-axis is
  the speed-up ``MACs(unpruned) / MACs`` (:mod:`utils.pruning.progressive`).
- ``unstructured``: zeroed weights, global L1 magnitude (``pattern: magnitude``) or N:M (``pattern: nm``);
  the target and x-axis is the sparsity, the fraction of zeroed conv/linear weights
  (:mod:`utils.pruning.unstructured`).

Generation (initial pruning), meta-training (the sparsity regulariser), ``run=visualize`` (curves),
``run=pruning_final`` (target, fine-tuning hooks, metrics) all go through :func:`scheme_for`.
"""
from __future__ import annotations

import abc
from typing import Any, Callable, Dict, Iterator, Mapping, Optional

import torch
import torch_pruning as tp
from omegaconf import DictConfig

from configs.schema import MetaTrainSettings, VisualizeSettings

from utils import distributed as du
from utils.pruning.macs import MacCounter
from utils.pruning.methods import build_method
from utils.pruning.progressive import (PruningError, build_pruner, group_regularizer, loss_gradients, max_speed_up,
                                       progressive_prune, pruning_kwargs)
from utils.pruning import unstructured as us
from utils.registry import Registry

Batches = Callable[[], Iterator]
OnStep = Optional[Callable[[int, float], None]]
SCHEMES: Registry[type] = Registry("pruning structure (method.structure)")


class PruningScheme(abc.ABC):
    """One way of pruning, configured by a method config."""

    axis: str  # metrics key of the target quantity ("speed_up" or "sparsity")
    axis_label: str

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        self.cfg = cfg
        self.name = str(cfg.get("name"))

    @abc.abstractmethod
    def initial_target(self, task: DictConfig) -> float:
        """The target of a data model's initial pruning."""

    @abc.abstractmethod
    def check_target(self, model: torch.nn.Module, target: float, example: torch.Tensor, base_macs: int) -> None:
        """Raise :class:`PruningError` early for a target this network cannot reach."""

    @abc.abstractmethod
    def prune(self, model: torch.nn.Module, target: float, example: torch.Tensor, base_macs: int,
              batches: Batches, device: torch.device, on_step: OnStep = None) -> Dict[str, Any]:
        """Prune in place to ``target``; ``on_step(step, position)`` after each step. Returns a summary."""

    @abc.abstractmethod
    def curve_limit(self, vis: VisualizeSettings) -> float:
        """Where ``run=visualize`` stops pruning (``task.visualize``)."""

    def position(self, model: torch.nn.Module, example: torch.Tensor, base_macs: int) -> float:
        return float(self.measure(model, example, base_macs)[self.axis])

    def measure(self, model: torch.nn.Module, example: torch.Tensor, base_macs: int) -> Dict[str, Any]:
        counter = MacCounter(model, example[:1])
        macs = counter()
        return {"speed_up": base_macs / macs, "macs": macs, "params": counter.params(), "sparsity": us.sparsity(model)}

    def has_finetune_hook(self, stage: str) -> bool:
        """Whether the fine-tuning ``stage`` trains with an ``after_backward`` hook (see :meth:`finetune_hook`)."""
        return False

    def finetune_hook(self, model: torch.nn.Module, example: torch.Tensor, stage: str) -> Optional[Callable]:
        """An ``after_backward`` hook for the fine-tuning ``stage`` (None: plain training)."""
        return None

    @abc.abstractmethod
    def meta_regularizer(self, model: torch.nn.Module, example: torch.Tensor,
                         mt: MetaTrainSettings) -> Callable[[torch.nn.Module], None]:
        """Adds the sparsity gradient of meta-training to the gradients of ``model``'s weights."""


@SCHEMES.register("channels")
class ChannelScheme(PruningScheme):
    axis, axis_label = "speed_up", "speed-up (MACs of the unpruned network / MACs)"

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg)
        self.method = build_method(cfg)

    def initial_target(self, task: DictConfig) -> float:
        return float(task.pruning.initial_speed_up)

    def curve_limit(self, vis):
        return float(vis.max_speed_up)

    def check_target(self, model, target, example, base_macs) -> None:
        current = base_macs / MacCounter(model, example[:1])()
        if target <= current + 1e-9:
            raise PruningError(f"target={target:g} is not above this network's current speed-up ({current:.2f}x): "
                               f"give a speed-up above it, e.g. target={max(2.0, round(current + 1)):g}")
        reachable = max_speed_up(model, self.method, example, base_macs)
        if target > reachable:
            raise PruningError(f"a {target:g}x speed-up is unreachable for this network (at most about "
                               f"{reachable:.2f}x); choose a smaller index=...")

    def prune(self, model, target, example, base_macs, batches, device, on_step=None) -> Dict[str, Any]:
        du.sync_rng()  # a distributed job prunes on every rank in lockstep: random criteria must agree
        calibrate = loss_gradients(self.method, batches, device) if self.method.needs_gradients else None
        r = progressive_prune(model, target, self.method, example, base_macs=base_macs, calibrate=calibrate,
                              on_step=on_step)
        return {"speed_up": r.speed_up, "macs": r.macs, "steps": r.steps}

    def has_finetune_hook(self, stage):
        return bool(self.cfg.get("regularize", False)) and stage == "finetune_after_metanetwork"

    def finetune_hook(self, model, example, stage):
        if self.has_finetune_hook(stage):
            return group_regularizer(build_pruner(model, self.method, example, steps=1))  # DepGraph + SL
        return None

    def meta_regularizer(self, model, example, mt):
        importance = tp.importance.GroupMagnitudeImportance(p=int(self.cfg.get("p", 2)), normalizer=None,
                                                            group_reduction="mean")
        pruner = tp.pruner.GroupNormPruner(model, example, importance=importance, reg=float(mt.pruner_reg),
                                           alpha=float(mt.alpha), **pruning_kwargs(model))
        return group_regularizer(pruner, alpha=float(mt.alpha))


@SCHEMES.register("unstructured")
class UnstructuredScheme(PruningScheme):
    axis, axis_label = "sparsity", "sparsity (fraction of zeroed conv/linear weights)"

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg)
        self.pattern = str(cfg.get("pattern", "magnitude"))
        if self.pattern not in ("magnitude", "nm"):
            raise PruningError(f"method {self.name}: pattern={self.pattern!r}; use pattern: magnitude or pattern: nm")
        self.m = int(cfg.get("m", 4))
        self.n = int(cfg.get("n", 2))
        self.scope = str(cfg.get("scope", "global"))

    def _n_for(self, target: float) -> int:
        n = self.m - round(target * self.m)
        if abs((self.m - n) / self.m - target) > 1e-6 or not 0 < n < self.m:
            valid = ", ".join(f"{k / self.m:g}" for k in range(1, self.m))
            raise PruningError(f"N:M sparsity with m={self.m} gives sparsities {valid} ({self.m - 1}:{self.m} ... "
                               f"1:{self.m}); {target:g} is not one of them: choose index=<one of those>")
        return n

    def initial_target(self, task: DictConfig) -> float:
        if self.pattern == "nm":
            return (self.m - self.n) / self.m
        return float(task.pruning.get("initial_sparsity", 0.3))

    def curve_limit(self, vis):
        return (self.m - 1) / self.m if self.pattern == "nm" else float(vis.max_sparsity)

    def check_target(self, model, target, example, base_macs) -> None:
        if self.pattern == "nm":
            self._n_for(target)
        elif not 0.0 < target < 1.0:
            raise PruningError(f"unstructured pruning targets a sparsity in (0, 1), got {target:g}: e.g. index=0.7")

    def prune(self, model, target, example, base_macs, batches, device, on_step=None) -> Dict[str, Any]:
        self.check_target(model, target, example, base_macs)
        if self.pattern == "nm":  # one pattern per step, denser first: the curve of an N:M network
            n_target, step = self._n_for(target), 0
            for step, n in enumerate(range(self.m - 1, n_target - 1, -1), 1):
                reached, dense = us.nm_prune(model, n, self.m)
                if on_step is not None:
                    on_step(step, reached)
            return {"sparsity": reached, "pattern": f"{n_target}:{self.m}", "dense_layers": dense, "steps": step}
        steps = int(self.cfg.get("curve_steps", 20))
        start = us.sparsity(model)
        levels = [start + (target - start) * (i + 1) / steps for i in range(steps)] if on_step else [target]
        for step, level in enumerate(levels, 1):
            reached = us.magnitude_prune(model, level, self.scope)
            if on_step is not None:
                on_step(step, reached)
        return {"sparsity": reached, "pattern": f"magnitude/{self.scope}", "steps": len(levels)}

    def measure(self, model, example, base_macs) -> Dict[str, Any]:
        out = super().measure(model, example, base_macs)
        out.update({f"{k}_conv_linear_macs": v for k, v in us.nonzero_macs(model, example).items()})
        return out

    def has_finetune_hook(self, stage):
        # after pruning (and the initial pruning of data models) the zeros must stay zero
        return stage in ("finetune_initial", "finetune_after_pruning")

    def finetune_hook(self, model, example, stage):
        return us.keep_zeros(model) if self.has_finetune_hook(stage) else None

    def meta_regularizer(self, model, example, mt):
        nm = (self.n, self.m) if self.pattern == "nm" else (None, None)
        return us.sparsity_regularizer(*nm, alpha=float(mt.alpha), reg=float(mt.pruner_reg))


def scheme_for(method_cfg: Mapping[str, Any]) -> PruningScheme:
    """The :class:`PruningScheme` of a method config (``structure``: channels | unstructured)."""
    return SCHEMES.get(str(method_cfg.get("structure", "channels")))(method_cfg)
