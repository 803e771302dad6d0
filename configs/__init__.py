"""The Hydra config tree with its schema (:mod:`configs.schema`), and a loader for one option of a plain config group outside a Hydra app."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from configs import schema

CONFIG_DIR = Path(__file__).resolve().parent


def _first_set(*values):
    """``${first_set:${shard},${index},0}``: the first of the values that is not null."""
    return next((v for v in values if v is not None), None)


if not OmegaConf.has_resolver("first_set"):  # the entry points import this package before Hydra composes
    OmegaConf.register_new_resolver("first_set", _first_set)
schema.register()  # the typed sections (schema/<name>), listed in the defaults of configs/main.yaml


def load_group_option(group: str, name: str) -> DictConfig:
    """``configs/<group>/<name>.yaml`` as Hydra would compose it for ``<group>=<name>``.

    Resolves a defaults list that names other options of the same group (``- metapruning``, ``_self_``),
    which is all the plain groups (method, metanetwork) use. Raises FileNotFoundError listing the options."""
    path = CONFIG_DIR / group / f"{name}.yaml"
    if not path.exists():
        options = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise FileNotFoundError(f"{group}={name}: no such option; valid: {', '.join(options)}")
    own = OmegaConf.load(path)
    defaults = own.pop("defaults", None) or ["_self_"]
    merged = OmegaConf.create()
    for entry in defaults:
        if entry == "_self_":
            merged = OmegaConf.merge(merged, own)
        elif isinstance(entry, str):
            merged = OmegaConf.merge(merged, load_group_option(group, entry))
        else:
            raise ValueError(f"{path}: only same-group defaults are supported here, got {entry!r}")
    if "_self_" not in defaults:  # Hydra appends _self_ last when it is not listed
        merged = OmegaConf.merge(merged, own)
    return merged
