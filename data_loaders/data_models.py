"""The data-model store: trained, lightly pruned networks of one architecture, in HDF5 shards.

File layout (one file per shard, ``shard_<index>.h5``; ``merge_shards`` writes one file of the same form)::

    /                     attrs: format, header (JSON: task, model, dataset, method, num_classes, and the
                          settings that made the models: ``main.generate.store_settings``)
    /slot00007/           one data model; attrs: arch (JSON, nn.models.describe_model), info (JSON),
                          keys (JSON: state-dict order)
    /slot00007/state/<k>  one dataset per state-dict entry, native dtype and shape

A store is refused (:func:`check_header`) by any run whose settings differ from those in its header, naming
the differing keys, so data models made under other settings (another regulariser, a debug run, other
schedules) are never reused without a word.

A shard only ever grows by whole data models, and each append rewrites the file atomically (a copy with
the new model is renamed over the old one), so an interrupted generation never leaves a half-written model
or a broken file behind. ``DataModelSet`` reads shards (or a merged file), checks that they were made for
the expected task/architecture, and caches every rebuilt network and its graph, so an epoch of
meta-training decodes and converts nothing twice.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import h5py
import numpy as np
import torch

from nn.models import create_model
from utils import distributed as du
from utils.convert import model_to_graph
from utils.io import make_tempfile

STORE_FORMAT = "gmp-data-models-v1"


class DataModelStoreError(ValueError):
    """A data-model file is missing, unreadable, or made for another task/architecture."""


@dataclass
class DataModelRecord:
    slot: int
    arch: Dict[str, Any]
    info: Dict[str, Any]
    state: "Dict[str, torch.Tensor]"


def _slot_name(slot: int) -> str:
    return f"slot{slot:05d}"


def _open(path: Path, mode: str = "r") -> h5py.File:
    try:
        return h5py.File(path, mode)
    except FileNotFoundError:
        raise DataModelStoreError(f"{path} does not exist: generate data models first "
                                  "(python -m generate_dataset ...)") from None
    except OSError as err:
        raise DataModelStoreError(f"{path} cannot be read as HDF5 ({err}); it is truncated or corrupt. Delete "
                                  "it and re-run the generation of that shard (other shards are unaffected).") from err


def read_header(path: Path) -> Dict[str, Any]:
    with _open(path) as f:
        if f.attrs.get("format") != STORE_FORMAT:
            raise DataModelStoreError(f"{path} is not a data-model file of this project "
                                      f"(format {f.attrs.get('format')!r}, expected {STORE_FORMAT!r})")
        return json.loads(f.attrs["header"])


def _leaves(value: Any, prefix: str) -> Dict[str, Any]:
    """``{"a.b.c": leaf}`` of nested mappings (lists and scalars are leaves)."""
    if isinstance(value, Mapping) and value:
        return {k: v for key, sub in value.items() for k, v in _leaves(sub, f"{prefix}.{key}").items()}
    return {prefix: value}


def settings_diff(have: Optional[Mapping[str, Any]], want: Mapping[str, Any]) -> Dict[str, tuple]:
    """``{dotted key: (stored, requested)}`` for every setting under the top-level keys of ``want`` that differs."""
    have = have or {}
    diff: Dict[str, tuple] = {}
    for top, value in want.items():
        mine, theirs = _leaves(have.get(top), top), _leaves(value, top)
        for key in sorted(set(mine) | set(theirs)):
            if mine.get(key) != theirs.get(key):
                diff[key] = (mine.get(key), theirs.get(key))
    return diff


ANOTHER_STORE = ("set data_models_tag=<name> to make a separate store for these settings, or delete {dir} "
                 "to remake it")


def check_header(path: Path, header: Mapping[str, Any], expect: Optional[Mapping[str, Any]]) -> None:
    """Refuse a file whose header disagrees with ``expect``: the plain keys (task, model, ...) by value, the
    ``settings`` key leaf by leaf (only the settings that ``expect`` names), listing every difference."""
    expect = dict(expect or {})
    settings = expect.pop("settings", None)
    wrong = {k: (header.get(k), v) for k, v in expect.items() if header.get(k) != v}
    if wrong:
        detail = ", ".join(f"{k}={have!r} (expected {want!r})" for k, (have, want) in wrong.items())
        raise DataModelStoreError(f"{path} holds data models made for something else: {detail}. Point to the "
                                  "data models of this task/method, or generate them.")
    if settings is None:
        return
    if header.get("settings") is None:
        raise DataModelStoreError(f"{path} does not record the settings its data models were made with (an older "
                                  "store), so they cannot be checked against this run: "
                                  + ANOTHER_STORE.format(dir=path.parent))
    diff = settings_diff(header["settings"], settings)
    if diff:
        shown = "; ".join(f"{k}: stored {a!r}, asked {b!r}" for k, (a, b) in list(diff.items())[:6])
        more = f" (and {len(diff) - 6} more)" if len(diff) > 6 else ""
        raise DataModelStoreError(f"{path} holds data models made with other settings ({shown}{more}): "
                                  + ANOTHER_STORE.format(dir=path.parent))


class ShardWriter:
    """Appends finished data models to one shard file; knows which slots are already there."""

    def __init__(self, path: str | os.PathLike, header: Mapping[str, Any]) -> None:
        self.path, self.header = Path(path), dict(header)
        if self.path.exists():
            check_header(self.path, read_header(self.path), self.header)
        else:
            self._atomic(lambda f: None)

    def finished_slots(self) -> List[int]:
        with _open(self.path) as f:
            return sorted(int(name[4:]) for name in f if name.startswith("slot"))

    def append(self, *records: DataModelRecord) -> None:
        """Add finished data models in one atomic file replacement."""
        def add(f: h5py.File) -> None:
            for record in records:
                _write_record(f, record)

        self._atomic(add)

    def _atomic(self, change) -> None:
        _replace_file(self.path, self.header, change)


def _replace_file(path: Path, header: Mapping[str, Any], change) -> None:
    """Apply ``change`` to a copy of ``path`` (a new file if there is none) and rename it over ``path``.

    An exception in ``change`` leaves ``path`` as it was. In a distributed job only rank 0 writes (``utils.io``)."""
    if not du.is_main():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_tempfile(path)
    try:
        if path.exists():
            shutil.copyfile(path, tmp)
        with h5py.File(tmp, "a") as f:
            f.attrs["format"] = STORE_FORMAT
            f.attrs["header"] = json.dumps(dict(header), sort_keys=True)
            change(f)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_shard(path: str | os.PathLike, header: Mapping[str, Any], records: Iterable[DataModelRecord]) -> int:
    """Write a new shard file from ``records``, streamed one at a time, and return how many were written.

    The file appears only once every record is written: if producing a record fails, nothing is left."""
    path = Path(path)
    if path.exists():
        raise DataModelStoreError(f"{path} exists already; a new shard is never written over an old one")
    count = 0

    def add(f: h5py.File) -> None:
        nonlocal count
        for record in records:
            _write_record(f, record)
            count += 1

    _replace_file(path, header, add)
    return count


def read_descriptions(path: str | os.PathLike) -> Dict[int, Dict[str, Any]]:
    """``{slot: {"arch": ..., "info": ...}}`` of one file, without reading any tensor."""
    path = Path(path)
    read_header(path)
    with _open(path) as f:
        return {int(name[4:]): {"arch": json.loads(f[name].attrs["arch"]), "info": json.loads(f[name].attrs["info"])}
                for name in sorted(f) if name.startswith("slot")}


def _write_record(f: h5py.File, record: DataModelRecord) -> None:
    name = _slot_name(record.slot)
    if name in f:
        raise DataModelStoreError(f"slot {record.slot} is already stored in {f.filename}")
    group = f.create_group(name)
    group.attrs["arch"] = json.dumps(record.arch, sort_keys=True)
    group.attrs["info"] = json.dumps(record.info, sort_keys=True, default=float)
    group.attrs["keys"] = json.dumps(list(record.state))
    state = group.create_group("state")
    for key, value in record.state.items():
        state.create_dataset(key, data=value.detach().cpu().numpy())


def _read_record(group: h5py.Group, slot: int) -> DataModelRecord:
    keys = json.loads(group.attrs["keys"])
    state = {k: torch.from_numpy(np.asarray(group["state"][k][()])) for k in keys}
    return DataModelRecord(slot, json.loads(group.attrs["arch"]), json.loads(group.attrs["info"]), state)


def read_records(path: str | os.PathLike, expect: Optional[Mapping[str, Any]] = None) -> List[DataModelRecord]:
    """Every data model in one file, in slot order."""
    path = Path(path)
    check_header(path, read_header(path), expect)
    with _open(path) as f:
        try:
            return [_read_record(f[name], int(name[4:])) for name in sorted(f) if name.startswith("slot")]
        except (KeyError, OSError, ValueError) as err:
            raise DataModelStoreError(f"{path}: a data model cannot be read ({err}); the file is damaged") from err


def merge_shards(paths: Sequence[str | os.PathLike], out: str | os.PathLike) -> int:
    """Combine shard files into one file (atomically, no prompt); returns the number of data models."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise DataModelStoreError("no shard files to merge")
    header = read_header(paths[0])
    for p in paths[1:]:
        check_header(p, read_header(p), header)
    records = [r for p in paths for r in read_records(p)]
    slots = [r.slot for r in records]
    if len(set(slots)) != len(slots):
        dup = sorted({s for s in slots if slots.count(s) > 1})
        raise DataModelStoreError(f"slots {dup} appear in more than one shard; shards must use distinct index=...")
    out = Path(out)
    if out.exists():
        out.unlink()
    ShardWriter(out, header).append(*sorted(records, key=lambda r: r.slot))
    return len(records)


def store_files(directory: str | os.PathLike) -> List[Path]:
    """The merged file of a store directory if there is one, else its shards."""
    directory = Path(directory)
    merged = directory / "data_models.h5"
    if merged.exists():
        return [merged]
    return sorted(directory.glob("shard_*.h5"))


@dataclass
class DataModel:
    """One data model, decoded once: the network, its info, and (lazily) its graph."""

    slot: int
    model: torch.nn.Module
    info: Dict[str, Any]
    _graph: Any = None

    @property
    def graph(self):
        if self._graph is None:
            self._graph = model_to_graph(self.model)
        return self._graph


class DataModelSet:
    """Data models of a store directory (or explicit files), split into ``train``/``val`` by slot order.

    The last ``round(val_fraction * n)`` slots (at least one when there are two or more models) form the
    validation split used for selection; every item is decoded, rebuilt and converted once and cached.
    """

    def __init__(self, files: Iterable[str | os.PathLike], split: str = "all", val_fraction: float = 0.2,
                 expect: Optional[Mapping[str, Any]] = None) -> None:
        files = [Path(p) for p in files]
        if not files:
            raise DataModelStoreError("no data-model files found: generate them first (python -m generate_dataset)")
        records = sorted((r for p in files for r in read_records(p, expect)), key=lambda r: r.slot)
        n_val = min(len(records) - 1, max(1, round(val_fraction * len(records)))) if len(records) > 1 else 0
        if split == "train":
            records = records[: len(records) - n_val]
        elif split == "val":
            records = records[len(records) - n_val:]
        elif split != "all":
            raise ValueError(f"split={split!r}; use train, val or all")
        self.records = records
        self._cache: Dict[int, DataModel] = {}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> DataModel:
        if i not in self._cache:
            r = self.records[i]
            arch = r.arch
            model = create_model(arch["name"], num_classes=arch["num_classes"], widths=arch["widths"], **arch["kwargs"])
            model.load_state_dict(r.state, strict=True)
            self._cache[i] = DataModel(r.slot, model.eval(), r.info)
        return self._cache[i]

    @property
    def slots(self) -> List[int]:
        return [r.slot for r in self.records]
