"""The numeric settings that a run reads, checked before any work starts.

A bad value (``task.meta_train.batches_per_step=0``, ``task.schedules.pretrain.lr=-1``, an empty seed list)
would otherwise crash deep inside a run, or run and produce nonsense. :func:`check_config` checks every
key of :data:`RULES` that the config has and raises :class:`ConfigError` naming the key, the value, what
is valid and a valid override; entry points turn that into one line and exit status 2.

Keys may contain ``*``, which stands for every child of that node (``task.schedules.*.epochs`` covers
the pretrain, fine-tuning and other schedules of a task).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Tuple

from omegaconf import DictConfig, ListConfig, OmegaConf


class ConfigError(ValueError):
    """A configuration value that cannot work, with the override that fixes it in the message."""


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


def _list_of(rule: Rule, non_empty: bool = True) -> Rule:
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
SEED = Rule(_is_int, "an integer", "0")
MILESTONES = Rule(lambda v: isinstance(v, (list, tuple)) and all(_is_int(x) and x >= 0 for x in v)
                  and list(v) == sorted(v), "a list of increasing integers >= 0 (may be empty)", "[6, 9]")


def _one_of(*choices: str) -> Rule:
    return Rule(lambda v: v in choices, "one of " + ", ".join(choices), choices[-1])


EPOCH_LIST = Rule(lambda v: v is None or (isinstance(v, (list, tuple)) and len(v) > 0
                                          and all(_is_int(x) and x >= 0 for x in v)),
                  "null or a non-empty list of epochs >= 0", "[2, 4, 8]")

RULES: Dict[str, Rule] = {
    "task.batch_size": INT_AT_LEAST_1,
    "task.eval_batch_size": INT_AT_LEAST_1,
    "task.schedules.*.epochs": INT_AT_LEAST_1,
    "task.schedules.*.lr": POSITIVE,
    "task.schedules.*.milestones": MILESTONES,
    "task.data_models.num": INT_AT_LEAST_1,
    "task.data_models.val_fraction": FRACTION,
    "task.meta_train.epochs": INT_AT_LEAST_1,
    "task.meta_train.lr": POSITIVE,
    "task.meta_train.weight_decay": NON_NEGATIVE,
    "task.meta_train.milestones": MILESTONES,
    "task.meta_train.alpha": AT_LEAST_1,
    "task.meta_train.pruner_reg": NON_NEGATIVE,
    "task.meta_train.batch_size": INT_AT_LEAST_1,
    "task.meta_train.batches_per_step": INT_AT_LEAST_1,
    "task.meta_train.max_bad_steps": INT_AT_LEAST_1,
    "task.pruning.initial_speed_up": SPEED_UP,
    "task.pruning.target_speed_ups": _list_of(SPEED_UP),
    "task.pruning.initial_sparsity": FRACTION,
    "task.visualize.max_speed_up": SPEED_UP,
    "task.visualize.max_sparsity": FRACTION,
    "task.visualize.eval_every": INT_AT_LEAST_1,
    "task.quickstart.epochs": _list_of(INT_AT_LEAST_1),
    "task.quickstart.target_index": INT_AT_LEAST_0,
    "benchmark.seeds": _list_of(SEED),
    "benchmark.speed_ups": _list_of(SPEED_UP),
    "benchmark.meta_seed": SEED,
    "benchmark.meta_epochs": EPOCH_LIST,
    "benchmark.target_index": INT_AT_LEAST_0,
    "method.reg": NON_NEGATIVE,
    # the metanetwork's rule and edit (nn/metanetwork/model.py); a retired option lands here too
    "metanetwork.layer": _one_of("fast", "pyg", "multiplicative"),
    "metanetwork.edit": _one_of("additive", "relative_scale"),
}


def _walk(node: Any, parts: List[str], prefix: str) -> Iterator[Tuple[str, Any]]:
    """``(full key, value)`` for every key of ``node`` matching the dotted pattern ``parts``."""
    if not parts:
        yield prefix, node
        return
    if not isinstance(node, DictConfig):
        return
    head, rest = parts[0], parts[1:]
    children = list(node.keys()) if head == "*" else [head]
    for child in children:
        if child in node:
            yield from _walk(node[child], rest, f"{prefix}.{child}" if prefix else str(child))


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def check_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first key of :data:`RULES` whose value is not valid."""
    for pattern, rule in RULES.items():
        for key, value in _walk(cfg, pattern.split("."), ""):
            value = _plain(value)
            if not rule.check(value):
                raise ConfigError(f"{key}={value!r} is not valid: it must be {rule.valid}, "
                                  f"e.g. {key}={rule.example}")
