"""Pruning criteria, built from a ``configs/method/*.yaml`` config through a registry.

A method config names an ``importance`` kind (``group_magnitude``, ``random``, ``bn_scale``, ``taylor``,
``lamp``, ``fpgm``, ``hessian``) plus its options; :func:`build_method` turns it into a
:class:`PruningMethod`: the Torch-Pruning importance object, the pruner class (``BasePruner``, or
``GroupNormPruner`` for sparse learning) and whether the criterion needs gradients from data first.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping

import torch_pruning as tp

from utils.registry import Registry

IMPORTANCES: Registry[Callable[[Mapping[str, Any]], tp.importance.Importance]] = Registry("pruning importance")


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
    )
    if cfg.get("name") == "sparse_learning":
        # DepGraph + SL: GroupNormPruner's regularize() is applied while training, then it prunes.
        method.pruner_cls = tp.pruner.GroupNormPruner
        method.pruner_kwargs = {"reg": float(cfg.get("reg", 5e-4)), "alpha": float(cfg.get("alpha", 4))}
    if method.needs_gradients and method.calibration_batches < 1:
        method.calibration_batches = 1
    return method
