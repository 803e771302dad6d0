"""Optimisers and learning-rate schedules, built from the ``optim`` config group and a stage's schedule."""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping

import torch

from utils.registry import Registry

OPTIMIZERS: Registry[Callable[..., torch.optim.Optimizer]] = Registry("optimizer")


@OPTIMIZERS.register("sgd")
def _sgd(params: Iterable, cfg: Mapping[str, Any], lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=float(cfg.get("momentum", 0.9)),
                           weight_decay=float(cfg.get("weight_decay", 0.0)), nesterov=bool(cfg.get("nesterov", False)))


@OPTIMIZERS.register("adamw")
def _adamw(params: Iterable, cfg: Mapping[str, Any], lr: float) -> torch.optim.Optimizer:
    betas = tuple(cfg.get("betas", (0.9, 0.999)))
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=float(cfg.get("weight_decay", 0.01)))


def build_optimizer(params: Iterable, cfg: Mapping[str, Any], lr: float) -> torch.optim.Optimizer:
    """``cfg.name`` picks the optimiser (``sgd`` | ``adamw``); ``lr`` comes from the stage's schedule."""
    return OPTIMIZERS.get(cfg["name"])(params, cfg, lr)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: Mapping[str, Any], epochs: int):
    """Per-epoch LR schedule: ``multistep`` (milestones, gamma) or ``cosine`` with linear warm-up.

    Milestones beyond ``epochs`` (a run shortened by ``debug``) simply never fire.
    """
    kind = schedule.get("scheduler", "multistep")
    if kind == "multistep":
        milestones = sorted(int(m) for m in schedule.get("milestones", []))
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=float(schedule.get("gamma", 0.1)))
    if kind == "cosine":
        warmup = int(schedule.get("warmup_epochs", 0))
        min_factor = float(schedule.get("min_lr_factor", 0.0))

        def factor(epoch: int) -> float:
            if epoch < warmup:
                return (epoch + 1) / (warmup + 1)
            t = (epoch - warmup) / max(1, epochs - warmup)
            return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * t))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    raise ValueError(f"schedule.scheduler={kind!r} is not known; use 'multistep' or 'cosine'")
