"""The schema of the settings: every key of the ``metanetwork``, ``task.meta_train``, ``task.visualize`` and
``benchmark`` sections, declared once with its type, its default, a one-line meaning and the rule its value
must meet; the YAML files of ``configs/`` set values only.

:func:`register` puts each schema into Hydra's config store (group ``schema``); the primary configs list them
ahead of the files they type (``- schema@task.meta_train: meta_train``), so Hydra fills in every default,
converts each value to its type and refuses a key that is not declared, before anything runs. Code reads the
sections as typed objects (``utils.config_schema.settings``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Type


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class Rule:
    """``check(value)`` must hold; ``valid`` says what is valid in words; ``example`` is a valid value."""

    check: Callable[[Any], bool]
    valid: str
    example: str


def list_of(rule: Rule, non_empty: bool = True) -> Rule:
    def check(v: Any) -> bool:
        return isinstance(v, (list, tuple)) and (len(v) > 0 or not non_empty) and all(rule.check(x) for x in v)
    return Rule(check, f"a {'non-empty ' if non_empty else ''}list, each {rule.valid}", f"[{rule.example}]")


INT_AT_LEAST_1 = Rule(lambda v: _is_int(v) and v >= 1, "an integer >= 1", "3")
INT_AT_LEAST_0 = Rule(lambda v: _is_int(v) and v >= 0, "an integer >= 0", "0")
POSITIVE = Rule(lambda v: _is_number(v) and v > 0, "a number > 0", "0.01")
NON_NEGATIVE = Rule(lambda v: _is_number(v) and v >= 0, "a number >= 0", "0.0005")
AT_LEAST_1 = Rule(lambda v: _is_number(v) and v >= 1, "a number >= 1", "16")
SPEED_UP = Rule(lambda v: _is_number(v) and v > 1, "a speed-up > 1", "2.0")
FRACTION = Rule(lambda v: _is_number(v) and 0 < v < 1, "a number in (0, 1)", "0.5")
FRACTION_OR_0 = Rule(lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1) (0: off)", "0.9")
SEED = Rule(_is_int, "an integer", "0")
MILESTONES = Rule(lambda v: isinstance(v, (list, tuple)) and all(_is_int(x) and x >= 0 for x in v)
                  and list(v) == sorted(v), "a list of increasing integers >= 0 (may be empty)", "[6, 9]")


def _one_of(*choices: str) -> Rule:
    return Rule(lambda v: v in choices, "one of " + ", ".join(choices), choices[-1])


EPOCH_LIST = Rule(lambda v: v is None or (isinstance(v, (list, tuple)) and len(v) > 0
                                          and all(_is_int(x) and x >= 0 for x in v)),
                  "null or a non-empty list of epochs >= 0", "[2, 4, 8]")

SPEED_UPS_OR_NONE = list_of(SPEED_UP, non_empty=False)


def setting(default: Any, meaning: str, rule: Rule | None = None) -> Any:
    """A schema field: its default (a list or dict is copied per instance), its meaning in one line, and the
    :class:`Rule` its value must meet (checked by :func:`check_config` with the other rules)."""
    metadata = {"meaning": meaning, "rule": rule}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=type(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass
class MetanetworkSettings:
    """``configs/metanetwork/<name>.yaml``: the metanetwork's architecture (nn/metanetwork/model.py)."""

    name: str = setting("graph_metanetwork", "registry name; none runs every stage on the original weights (the baseline)")
    num_layers: int = setting(8, "message-passing layers", INT_AT_LEAST_1)
    hidden_dim: int = setting(64, "hidden channels of every node and edge state", INT_AT_LEAST_1)
    node_ratio: float = setting(0.01, "scale r of the residual edit x + r * dec(h) of node features", NON_NEGATIVE)
    edge_ratio: float = setting(0.01, "scale r of the residual edit of edge features", NON_NEGATIVE)
    checkpoint: bool = setting(False, "recompute each layer in backward instead of keeping its edge states")
    activation: str = setting("silu", "activation of every MLP", _one_of("relu", "tanh", "silu"))
    layer: str = setting("fast", "fast | pyg (the same rule; reference) | multiplicative (the published layer's rule)",
                         _one_of("fast", "pyg", "multiplicative"))
    backend: Optional[str] = setting(None, "scatter backend of the fast layer: null picks torch_scatter when installed")
    kernels: bool = setting(True, "let the fast layer use its fused C kernels where they apply (float32 on CPU)")
    edit: str = setting("additive", "additive (published: w + r dec) | relative_scale (per-channel scale of a layer)",
                        _one_of("additive", "relative_scale"))
    magnitude_features: bool = setting(False, "feed per-node log weight norms and the in-layer rank to the node encoder")


@dataclass
class PruneAwareSettings:
    """``task.meta_train.prune_aware``: the task loss of the output network pruned to a target by the criterion."""

    weight: float = setting(0.0, "0: off (the published objective); > 0: the term is added with this weight", NON_NEGATIVE)
    targets: List[float] = setting([], "speed-ups to prune to, one drawn per step (needed when weight > 0)",
                                   SPEED_UPS_OR_NONE)
    batch_norm: str = setting("stored", "stored: the pruned network's BatchNorms keep the original's running "
                              "statistics; batch: they use each batch's own (the statistics a fine-tune would "
                              "re-estimate, adaptive BN)", _one_of("batch", "stored"))


@dataclass
class MetaTrainSettings:
    """``task.meta_train``: meta-training's optimiser, schedule and objective (main/meta_train.py)."""

    epochs: int = setting(8, "meta-training epochs (one checkpoint each)", INT_AT_LEAST_1)
    optimizer: str = setting("adamw", "adamw (published) | nsgd (SGD, momentum 0.9, gradient clipped to norm 1)",
                             _one_of("nsgd", "adamw"))
    lr: float = setting(1e-3, "learning rate of the metanetwork", POSITIVE)
    weight_decay: float = setting(5e-4, "weight decay of the metanetwork", NON_NEGATIVE)
    milestones: List[int] = setting([], "epochs after which the learning rate is multiplied by gamma", MILESTONES)
    gamma: float = setting(0.1, "learning-rate factor at each milestone", POSITIVE)
    alpha: float = setting(4.0, "sparsity-gradient scale range alpha^0 .. alpha^1 across a group's channels", AT_LEAST_1)
    pruner_reg: float = setting(10.0, "the sparsity penalty's weight (GroupNormPruner reg)", NON_NEGATIVE)
    batch_size: int = setting(128, "training images per batch of a data-model step", INT_AT_LEAST_1)
    batches_per_step: int = setting(4, "batches whose dL/dW is accumulated per data-model step", INT_AT_LEAST_1)
    max_bad_steps: int = setting(5, "non-finite steps in a row before meta-training stops with an error", INT_AT_LEAST_1)
    prune_aware: PruneAwareSettings = setting(PruneAwareSettings(), "the prune-aware term (off by default)")
    accuracy_floor: float = setting(0.0, "a fraction of the original's no-fine-tune validation accuracy: "
                                    "meta-training stops after the first epoch whose output network falls below "
                                    "it, and only epochs at or above it are selected; 0: off (published)", FRACTION_OR_0)


@dataclass
class VisualizeSettings:
    """``task.visualize``: the no-fine-tune pruning curves of each metanetwork epoch (main/visualize.py)."""

    max_speed_up: float = setting(3.0, "curves (and knees) end at this speed-up", SPEED_UP)
    max_sparsity: float = setting(0.9, "unstructured methods: curves end at this sparsity", FRACTION)
    eval_every: int = setting(2, "evaluate the accuracy every k pruning steps", INT_AT_LEAST_1)
    select_by: str = setting("knee", "knee (of the no-fine-tune curve) | target (val acc once pruned to "
                             "select_target and fine-tuned) | adaptive_bn (val acc pruned one-shot to the "
                             "task's targets with re-estimated BatchNorm statistics, measured in meta-training)",
                             _one_of("target", "adaptive_bn", "knee"))
    select_target: Optional[float] = setting(None, "a speed-up: also prune each epoch's network to it and fine-tune")
    data_model: int = setting(0, "which validation data model the curves are drawn for", INT_AT_LEAST_0)


@dataclass
class BenchmarkSettings:
    """``configs/benchmark/<name>.yaml``: run=benchmark's methods, seeds and speed-ups (main/benchmark.py)."""

    seeds: List[int] = setting([0, 1, 2, 3, 4], "one target network and one cell per method, target and seed",
                               list_of(SEED))
    speed_ups: List[float] = setting([2.0], "the target speed-ups", list_of(SPEED_UP))
    reference_method: str = setting("group_l2_max", "criterion of the data models, the metanetwork and the target networks")
    compare_to: str = setting("group_l2_max", "the method label every row's paired difference is taken against")
    meta_seed: int = setting(0, "the metanetwork is meta-trained once, with this seed", SEED)
    tune_seed: Optional[int] = setting(None, "grids are chosen on this seed's validation accuracy (null: the first seed)")
    meta_epochs: Optional[List[int]] = setting(None, "candidate metanetwork epochs (null: the quarters of meta-training)",
                                               EPOCH_LIST)
    workers: int = setting(1, "cells run at once, each in its own process", INT_AT_LEAST_1)
    target_index: int = setting(100, "slot of the target networks (outside the data-model slots)", INT_AT_LEAST_0)
    methods: Dict[str, Any] = setting({}, "label -> {method, metanetwork, grid}, or null to drop an inherited label")


# the sections with a schema, by their dotted key in the composed config
SECTIONS: Dict[str, Type[Any]] = {"metanetwork": MetanetworkSettings, "task.meta_train": MetaTrainSettings,
                                  "task.visualize": VisualizeSettings, "benchmark": BenchmarkSettings}


def register() -> None:
    """Store each section's schema in Hydra's config store as ``schema/<name>`` (done once, on import of
    :mod:`configs`)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for section, schema in SECTIONS.items():
        store.store(group="schema", name=section.rpartition(".")[2], node=schema)
