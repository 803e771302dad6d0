"""How the machinery in ``utils`` reaches the model zoo without importing it.

``utils`` is the bottom layer: conversion, checkpoints and pruning must not import ``nn``, which builds on
them. Yet for a *zoo model* (one that carries the attribute :data:`ARCH_ATTR`, set by
``nn.models.create_model``) they need the zoo's knowledge: a JSON description to rebuild it from, the
rebuild itself, the pruning hints of its family and its classifier. The zoo hands these over once, when
``nn.models`` is imported, through :func:`register_zoo`; ``utils`` asks :func:`zoo`. Models without
:data:`ARCH_ATTR` are handled generically by the callers (a template to copy, the last linear layer).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Protocol

import torch

#: Attribute every zoo model carries: ``{"name", "num_classes", "kwargs"}``.
ARCH_ATTR = "zoo_arch"


class Zoo(Protocol):
    """What ``utils`` needs of a model zoo."""

    def describe(self, model: torch.nn.Module) -> Dict[str, Any]:
        """JSON description (``name``, ``num_classes``, ``kwargs``, ``widths``) from which :meth:`build` rebuilds it."""

    def build(self, arch: Mapping[str, Any]) -> torch.nn.Module:
        """A freshly initialised model of the described architecture."""

    def pruning_kwargs(self, model: torch.nn.Module) -> Dict[str, Any]:
        """Torch-Pruning arguments that keep the model describable (ignored layers, ...)."""

    def after_pruning(self, model: torch.nn.Module) -> None:
        """Repair attributes that in-place pruning leaves stale."""

    def classifier(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model's classifier layer."""


_registered: Zoo | None = None


def register_zoo(hooks: Zoo) -> None:
    """Make ``hooks`` the zoo that :func:`zoo` returns (``nn.models`` calls this when imported)."""
    global _registered
    _registered = hooks


def is_zoo_model(model: torch.nn.Module) -> bool:
    return hasattr(model, ARCH_ATTR)


def zoo() -> Zoo:
    """The registered zoo; an error that says what to import when there is none."""
    if _registered is None:
        raise RuntimeError("no model zoo is registered: `import nn.models` before saving, loading, converting or "
                           "pruning a zoo model (the project's entry points and data-model loaders do this)")
    return _registered
