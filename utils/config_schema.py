"""The settings a run reads, as typed objects, and the checks made before any work starts.

The ``metanetwork``, ``task.meta_train``, ``task.visualize`` and ``benchmark`` sections have a schema each
(:mod:`configs.schema`, one dataclass per section). Code reads them with :func:`settings`
(``settings(cfg, "task.meta_train").lr``), never with ``cfg.get(key, default)``; a key the schema does not
declare, or a value of the wrong type, is a :class:`ConfigError` naming the key and the closest declared one.

A bad value (``task.meta_train.batches_per_step=0``, ``task.schedules.pretrain.lr=-1``, an empty seed list)
would otherwise crash deep inside a run, or run and produce nonsense. :func:`check_config` checks every
key of :data:`RULES` that the config has and raises :class:`ConfigError` naming the key, the value, what
is valid and a valid override; entry points turn that into one line and exit status 2.

Keys may contain ``*``, which stands for every child of that node (``task.schedules.*.epochs`` covers
the pretrain, fine-tuning and other schedules of a task).
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Dict, Iterator, List, Tuple, Type

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from configs.schema import (FRACTION, INT_AT_LEAST_0, INT_AT_LEAST_1, MILESTONES, NON_NEGATIVE, POSITIVE, SECTIONS,
                            SPEED_UP, Rule, list_of)


class ConfigError(ValueError):
    """A configuration value that cannot work, with the override that fixes it in the message."""


def _nested(f: dataclasses.Field) -> Type[Any] | None:
    """The schema of a field that is itself a section of settings (e.g. ``prune_aware``), else None."""
    sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
    return type(sub) if dataclasses.is_dataclass(sub) else None


def _schema_rules(schema: Type[Any], prefix: str) -> Iterator[Tuple[str, Rule]]:
    for f in dataclasses.fields(schema):
        if _nested(f) is not None:
            yield from _schema_rules(_nested(f), f"{prefix}.{f.name}")
        elif f.metadata.get("rule") is not None:
            yield f"{prefix}.{f.name}", f.metadata["rule"]


RULES: Dict[str, Rule] = {
    "task.batch_size": INT_AT_LEAST_1,
    "task.eval_batch_size": INT_AT_LEAST_1,
    "task.schedules.*.epochs": INT_AT_LEAST_1,
    "task.schedules.*.lr": POSITIVE,
    "task.schedules.*.milestones": MILESTONES,
    "task.data_models.num": INT_AT_LEAST_1,
    "task.data_models.val_fraction": FRACTION,
    "task.pruning.initial_speed_up": SPEED_UP,
    "task.pruning.target_speed_ups": list_of(SPEED_UP),
    "task.pruning.initial_sparsity": FRACTION,
    "task.quickstart.epochs": list_of(INT_AT_LEAST_1),
    "task.quickstart.target_index": INT_AT_LEAST_0,
    "method.reg": NON_NEGATIVE,
    # the sections' rules, from their schema (a retired metanetwork.edit or layer lands here too)
    **{key: rule for section, schema in SECTIONS.items() for key, rule in _schema_rules(schema, section)},
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


def _check(key: str, value: Any, rule: Rule) -> None:
    if not rule.check(value):
        raise ConfigError(f"{key}={value!r} is not valid: it must be {rule.valid}, e.g. {key}={rule.example}")


def check_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first key of :data:`RULES` whose value is not valid, then for a key
    of a :data:`SECTIONS` section that its schema does not declare or a value of the wrong type."""
    for pattern, rule in RULES.items():
        for key, value in _walk(cfg, pattern.split("."), ""):
            _check(key, _plain(value), rule)
    for section in SECTIONS:
        if OmegaConf.select(cfg, section) is not None:
            settings(cfg, section)


def _unknown_keys(schema: Type[Any], values: Dict[str, Any], prefix: str) -> Iterator[Tuple[str, List[str]]]:
    """``(dotted key, close declared names)`` for every key of ``values`` that ``schema`` does not declare."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in values.items():
        if key not in fields:
            yield f"{prefix}.{key}", difflib.get_close_matches(str(key), list(fields), n=2)
            continue
        if _nested(fields[key]) is not None and isinstance(value, dict):
            yield from _unknown_keys(_nested(fields[key]), value, f"{prefix}.{key}")


def typed_settings(values: Any, schema: Type[Any], section: str) -> Any:
    """``values`` (a mapping; None for none) as an instance of the dataclass ``schema``: the defaults filled in,
    each value converted to its declared type. A key the schema does not declare, or a value that does not
    convert, raises :class:`ConfigError` naming ``section.key``."""
    plain = _plain(values) if values is not None else {}
    if not isinstance(plain, dict):
        raise ConfigError(f"{section} must be a mapping of settings, got {plain!r}")
    for key, close in _unknown_keys(schema, plain, section):
        hint = f" Did you mean {' or '.join(f'`{key.rpartition(chr(46))[0]}.{c}`' for c in close)}?" if close else ""
        raise ConfigError(f"{key} is not a setting of {section}.{hint} Declared: "
                          f"{', '.join(f.name for f in dataclasses.fields(schema))}")
    try:
        typed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), plain))
    except OmegaConfBaseException as err:
        key = f"{section}.{err.full_key}" if getattr(err, "full_key", None) else section
        raise ConfigError(f"{key}: {str(err).splitlines()[0]}") from None
    for key, rule in _schema_rules(schema, section):  # each value meets its rule, wherever it is read
        value = typed
        for part in key[len(section) + 1:].split("."):
            value = getattr(value, part)
        _check(key, value, rule)
    return typed


def settings(cfg: DictConfig, section: str) -> Any:
    """The typed settings of ``section`` (a key of :data:`SECTIONS`, e.g. ``"task.meta_train"``) of ``cfg``:
    an instance of its schema with the defaults of every key the config leaves out."""
    return typed_settings(OmegaConf.select(cfg, section), SECTIONS[section], section)
