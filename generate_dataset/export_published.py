"""Export a data-model store to the published code's layout, to compare both codes on the same data models.

    python -m generate_dataset.export_published data_models/resnet56_on_CIFAR10/group_l2_max --out <folder>

Writes a Hugging Face ``datasets`` folder (``save_to_disk``), one row per data model in slot order (file by file), with the
published code's state-dict keys (:mod:`data_loaders.published_layout`) and its metric columns: ``train_acc``,
``train_loss``, ``val_acc``, ``val_loss`` (this project's validation split) and ``current_speed_up``. The
published code loads it with ``Dataset.load_from_disk``. The folder appears only when every row is
written (the rows go to ``<folder>.partial`` first); an existing folder is never overwritten.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

from data_loaders.data_models import DataModelStoreError, read_descriptions, read_records, store_files
from data_loaders.published_layout import PublishedLayout, layout_for, to_published_row
from main.import_published import require_published_extra
from main.run_modes import ConfigError


def _layout_of(arch: Dict[str, Any], info: Dict[str, Any], slot: int) -> PublishedLayout:
    """The published layout of one data model; an error if the published network would compute another function."""
    image_size = int(info["config"]["dataset"]["image_size"])
    layout = layout_for(arch["name"], image_size)
    wrong = {k: (arch["kwargs"].get(k), v) for k, v in layout.required_kwargs.items() if arch["kwargs"].get(k) != v}
    if wrong:
        detail = ", ".join(f"{k}={have} (the published network has {k}={want})" for k, (have, want) in wrong.items())
        raise DataModelStoreError(f"slot {slot} is a {arch['name']} with {detail} on {image_size}x{image_size} "
                                  "inputs: in the published code its weights would compute another function")
    return layout


def _rows(files: Tuple[Path, ...]) -> Iterator[Dict[str, Any]]:
    for record in (r for path in files for r in read_records(path)):  # one file in memory at a time
        info = record.info
        metrics = {"train_acc": info["train_acc"], "train_loss": info["train_loss"], "val_acc": info["val_acc"],
                   "val_loss": info["val_loss"], "current_speed_up": info["speed_up"]}
        yield to_published_row(_layout_of(record.arch, info, record.slot), record.state, metrics)


def export_published(inputs: List[Path], out: Path) -> int:
    """Write the data models of ``inputs`` (a store directory or its files) to ``out``; returns the row count."""
    datasets = require_published_extra()
    files = store_files(inputs[0]) if len(inputs) == 1 and inputs[0].is_dir() else inputs
    if not files:
        raise DataModelStoreError(f"no data-model files in {inputs[0]}")
    if out.exists():
        raise ConfigError(f"{out} exists; give a new folder (an export never overwrites one)")
    descriptions = {p: read_descriptions(p) for p in files}
    for described in descriptions.values():  # every row is checked before anything is written
        for slot, d in described.items():
            _layout_of(d["arch"], d["info"], slot)
    files = sorted(files, key=lambda p: min(descriptions[p], default=0))  # slot order: shards hold slot ranges
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="export_cache_", dir=out.parent) as cache:
        # A tuple, not a list (datasets would shard a list); a fresh fingerprint spares hashing every tensor.
        rows = datasets.Dataset.from_generator(_rows, gen_kwargs={"files": tuple(files)}, cache_dir=cache,
                                               fingerprint=uuid.uuid4().hex)
        n = len(rows)
        rows.save_to_disk(str(partial))
        del rows
    partial.rename(out)
    return n


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", type=Path, help="a store directory, or its .h5 files")
    parser.add_argument("--out", type=Path, required=True, help="the datasets folder to write (must not exist)")
    args = parser.parse_args(argv)
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        n = export_published(args.inputs, args.out)
    except (DataModelStoreError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {n} data models to {args.out} (load with datasets.load_from_disk)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
