"""Merge the shards of a data-model store into one file, without a prompt.

    python -m generate_dataset.merge data_models/resnet56_on_CIFAR10/group_l2_max
    python -m generate_dataset.merge shard_000.h5 shard_001.h5 --out merged.h5

With a directory, every ``shard_*.h5`` in it is merged into ``<dir>/data_models.h5`` (which loaders then
prefer over the shards). Shards must come from the same task, model, data set and method, and must not
hold the same slot twice; the merged file is written atomically.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_loaders.data_models import DataModelStoreError, merge_shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", type=Path, help="a store directory, or shard files")
    parser.add_argument("--out", type=Path, help="merged file (default: <dir>/data_models.h5)")
    args = parser.parse_args(argv)
    if len(args.inputs) == 1 and args.inputs[0].is_dir():
        shards = sorted(args.inputs[0].glob("shard_*.h5"))
        out = args.out or args.inputs[0] / "data_models.h5"
    else:
        shards, out = args.inputs, args.out
        if out is None:
            parser.error("--out is required when merging explicit shard files")
    try:
        n = merge_shards(shards, out)
    except DataModelStoreError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"merged {n} data models from {len(shards)} shard(s) into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
