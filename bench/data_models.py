"""Data-model store: time to load one ResNet-56 data model with its graph, first and cached access.

    python bench/data_models.py [--models 4] [--arch resnet56]

Builds a temporary store of lightly pruned (untrained: loading does not care) networks, then times
opening the store, the first access of each data model (decode, rebuild, trace and convert) and the
access in later epochs (cached). Target: <= 50 ms per ResNet-56 data model with its graph after the first epoch.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from data_loaders.data_models import DataModelRecord, DataModelSet, ShardWriter
from nn.models import create_model, describe_model
from utils.pruning.methods import build_method
from utils.pruning.progressive import progressive_prune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--arch", default="resnet56")
    args = parser.parse_args()
    method = build_method(OmegaConf.create({"name": "random", "importance": "random"}))
    with tempfile.TemporaryDirectory() as tmp:
        writer = ShardWriter(Path(tmp) / "shard_000.h5", {"model": args.arch})
        for slot in range(args.models):
            torch.manual_seed(slot)
            model = create_model(args.arch).eval()
            progressive_prune(model, 1.32, method, torch.zeros(1, 3, 32, 32))
            writer.append(DataModelRecord(slot, describe_model(model), {"slot": slot}, model.state_dict()))
        size = (Path(tmp) / "shard_000.h5").stat().st_size / 2**20
        t = time.perf_counter()
        data = DataModelSet([Path(tmp) / "shard_000.h5"])
        open_s = time.perf_counter() - t
        first, later = [], []
        for i in range(len(data)):
            t = time.perf_counter()
            _ = data[i].graph
            first.append(time.perf_counter() - t)
        for _ in range(3):
            for i in range(len(data)):
                t = time.perf_counter()
                item = data[i]
                _ = item.model, item.graph
                later.append(time.perf_counter() - t)
    print(f"{args.models} {args.arch} data models, {size:.1f} MiB on disk: open + decode all {1000 * open_s:.0f} ms; "
          f"first access (rebuild + trace + convert) median {1000 * statistics.median(first):.0f} ms; "
          f"later epochs median {1e6 * statistics.median(later):.1f} us per data model with its graph")


if __name__ == "__main__":
    main()
