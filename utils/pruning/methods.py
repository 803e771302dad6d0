"""Pruning criteria, built from a ``configs/method/*.yaml`` config through a registry.

A method config names an ``importance`` kind (``group_magnitude``, ``random``, ``bn_scale``, ``taylor``,
``lamp``, ``fpgm``, ``hessian``) plus its options; :func:`build_method` turns it into a
:class:`PruningMethod`: the Torch-Pruning importance object, the pruner class (``BasePruner``, or
``GroupNormPruner`` for sparse learning) and whether the criterion needs gradients from data first.

A method config may also name a ``group_hook`` (registered in :data:`GROUP_HOOKS`, e.g. ``intra_fusion``):
an object that changes *how* a group is pruned rather than *which* channels go. Progressive pruning calls
its ``prepare(model, pruner)`` once and its ``before_prune(group, idxs, pruner)`` for every group right
before Torch-Pruning removes the channels ``idxs`` (interactive pruning).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol

import torch
import torch_pruning as tp

from utils.registry import Registry

IMPORTANCES: Registry[Callable[[Mapping[str, Any]], tp.importance.Importance]] = Registry("pruning importance")


class PruningError(ValueError):
    """The requested pruning cannot be done (e.g. an unreachable speed-up, an unsupported layer type)."""


class GroupHook(Protocol):
    """Changes how each group is pruned (see the module docstring); built from the method config."""

    def prepare(self, model: torch.nn.Module, pruner: tp.pruner.BasePruner) -> None:
        """Called once after the pruner is built and before the first step (e.g. to fold BatchNorm)."""

    def before_prune(self, group: tp.Group, idxs: List[int], pruner: tp.pruner.BasePruner) -> None:
        """Called with a group and its to-be-pruned channel indices (root layer) before ``group.prune()``."""


# name -> fn(method config, importance) -> GroupHook
GROUP_HOOKS: Registry[Callable[[Mapping[str, Any], tp.importance.Importance], GroupHook]] = Registry("group hook")


@dataclass
class PruningMethod:
    """Everything a pruner needs to know about a criterion."""

    name: str
    importance: tp.importance.Importance
    pruner_cls: type = tp.pruner.BasePruner
    pruner_kwargs: Dict[str, Any] = field(default_factory=dict)
    needs_gradients: bool = False  # Taylor: gradients of a loss; Hessian: per-sample accumulated gradients
    per_sample_gradients: bool = False
    calibration_batches: int = 0
    global_pruning: bool = True
    max_pruning_ratio: float = 1.0  # per-layer cap (Torch-Pruning's): no layer loses more than this share of its channels
    group_hook: Optional[GroupHook] = None  # e.g. Intra-Fusion: fuse the pruned channels into the kept ones


def _normalizer(cfg: Mapping[str, Any], default: Any = "mean") -> Any:
    return cfg.get("normalizer", default)


@IMPORTANCES.register("group_magnitude")
def _group_magnitude(cfg):
    return tp.importance.GroupMagnitudeImportance(p=int(cfg.get("p", 2)), group_reduction=cfg.get("group_reduction", "mean"),
                                                  normalizer=_normalizer(cfg))


@IMPORTANCES.register("random")
def _random(cfg):
    return tp.importance.RandomImportance()


@IMPORTANCES.register("bn_scale")
def _bn_scale(cfg):
    return tp.importance.BNScaleImportance(normalizer=_normalizer(cfg))


@IMPORTANCES.register("taylor")
def _taylor(cfg):
    return tp.importance.GroupTaylorImportance(normalizer=_normalizer(cfg))


@IMPORTANCES.register("lamp")
def _lamp(cfg):
    return tp.importance.LAMPImportance(p=int(cfg.get("p", 2)))


@IMPORTANCES.register("fpgm")
def _fpgm(cfg):
    return tp.importance.FPGMImportance(p=int(cfg.get("p", 2)))


@IMPORTANCES.register("hessian")
def _hessian(cfg):
    return tp.importance.GroupHessianImportance(normalizer=_normalizer(cfg))


def build_method(cfg: Mapping[str, Any]) -> PruningMethod:
    """A :class:`PruningMethod` from a method config (unknown ``importance`` kinds list the valid ones)."""
    kind = cfg.get("importance")
    importance = IMPORTANCES.get(kind)(cfg)
    method = PruningMethod(
        name=str(cfg.get("name", kind)), importance=importance,
        needs_gradients=kind in ("taylor", "hessian"), per_sample_gradients=kind == "hessian",
        calibration_batches=int(cfg.get("calibration_batches", 0) or 0),
        global_pruning=bool(cfg.get("global_pruning", True)),
        max_pruning_ratio=float(cfg.get("max_pruning_ratio", 1.0)),
    )
    if not 0.0 < method.max_pruning_ratio <= 1.0:
        raise PruningError(f"method.max_pruning_ratio={method.max_pruning_ratio}: the per-layer cap is a share of a "
                           "layer's channels in (0, 1], e.g. method.max_pruning_ratio=0.8")
    if cfg.get("regularize", False):
        # DepGraph + SL: GroupNormPruner's regularize() is applied while training, then it prunes.
        method.pruner_cls = tp.pruner.GroupNormPruner
        method.pruner_kwargs = {"reg": float(cfg.get("reg", 5e-4)), "alpha": float(cfg.get("alpha", 4))}
    if cfg.get("group_hook"):
        method.group_hook = GROUP_HOOKS.get(cfg["group_hook"])(cfg, importance)
    if method.needs_gradients and method.calibration_batches < 1:
        method.calibration_batches = 1
    return method

