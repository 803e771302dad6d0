"""Entry points: a dataset config -> train / val / test datasets -> DataLoaders.

Common config keys (all datasets; dataset-specific keys are documented in each dataset module):

* ``name``: registry name (``list_datasets()``); unknown names raise ``UnknownNameError``.
* ``root``: dataset folder (CIFAR, SVHN, ImageNet; ignored by ``digits`` and ``synthetic``).
* ``val_size`` (default 0.1): fraction in (0, 1) or integer count of *training* examples held out as
  the validation split (an integer 0 gives an empty validation split).
* ``split_seed`` (default 0): seed of the stratified validation split. The split depends only on the
  training labels and this seed, so it is identical across runs and machines.
* ``train_size`` (default null: all): fraction in (0, 1) or integer count of the training examples left
  after carving validation to train on: a fixed, stratified subset (seed ``SUBSET_SEED``, independent of
  ``split_seed``), for runs that cannot afford the whole training split.
* ``augment`` (default True): training augmentation on/off. Validation and test never augment.
* ``image_size``: ImageNet (default 224), digits and synthetic (default 32); CIFAR/SVHN must be 32.
* ``num_classes`` (optional): if given, must equal the dataset's class count (for ImageNet: the number
  of class folders), so a half-extracted folder or a wrong config fails here, not in the model head.

Validation is carved from the official training data; ``train`` and ``val`` index disjoint subsets of
it that together cover all of it, and ``val`` uses the eval transform (no augmentation). ``test`` is the
official test split (ImageNet: the official val folder; digits: a fixed held-out split).
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping

import numpy as np

import torch
from torch.utils.data import DataLoader, DistributedSampler

from data_loaders.base import DATASETS, DatasetSplits, TransformedSubset
from data_loaders.splits import carve_validation, resolve_holdout_count, stratified_split
from utils import distributed as du


SUBSET_SEED = 0  # fixed: the training subset of a train_size must not move between runs


def training_subset(train_idx: np.ndarray, labels: np.ndarray, size: float | int) -> np.ndarray:
    """``train_idx`` cut to ``size`` (fraction or count) indices, stratified by ``labels`` and fixed."""
    count = resolve_holdout_count(size, len(train_idx), "train_size")
    _, chosen = stratified_split(labels[train_idx], count, seed=SUBSET_SEED)
    return train_idx[chosen]


def list_datasets() -> List[str]:
    """Sorted names of all registered datasets."""
    return DATASETS.names()


def build_datasets(cfg: Mapping[str, Any]) -> DatasetSplits:
    """Build the train / val / test splits described by ``cfg`` (a dict or an omegaconf DictConfig).

    Returns:
        DatasetSplits whose datasets yield ``(image (C, S, S) float32 normalised, int label)``.
    """
    name = cfg["name"]
    source = DATASETS.get(name)(cfg)
    expected = cfg.get("num_classes")
    if expected is not None and int(expected) != source.num_classes:
        raise ValueError(f"{name}: the config says num_classes={expected} but the data has "
                         f"{source.num_classes} classes (root={cfg.get('root')})")
    augment = bool(cfg.get("augment", True))
    val_size = cfg.get("val_size", 0.1)
    train_idx, val_idx = carve_validation(source.train_labels, val_size, int(cfg.get("split_seed", 0)))
    if cfg.get("train_size") is not None:
        train_idx = training_subset(train_idx, source.train_labels, cfg["train_size"])
    train_transform = source.train_transform if augment else source.eval_transform
    return DatasetSplits(
        train=TransformedSubset(source.train, train_idx, train_transform),
        val=TransformedSubset(source.train, val_idx, source.eval_transform),
        test=TransformedSubset(source.test, None, source.eval_transform),
        num_classes=source.num_classes,
        image_size=source.image_size,
        in_channels=source.in_channels,
        mean=tuple(source.mean),
        std=tuple(source.std),
    )


def build_loaders(splits: DatasetSplits, batch_size: int, eval_batch_size: int | None = None,
                  num_workers: int = 0, seed: int = 0, pin_memory: bool = False) -> Dict[str, DataLoader]:
    """DataLoaders ``{"train", "val", "test", "train_eval"}`` for ``splits``.

    ``train`` is shuffled by a generator seeded with ``seed`` (same seed -> same batch order; with
    workers, the generator also seeds each worker's augmentation RNG) and keeps its last partial batch.
    ``val``/``test`` are not shuffled and use ``eval_batch_size`` (default: ``batch_size``); ``train_eval``
    is the training split with the eval transform, for measuring training accuracy and loss.
    Workers persist across epochs when ``num_workers > 0`` so they are not re-forked every epoch.
    With ``num_workers=0`` augmentation draws from the global torch RNG: seed it for exact repeats.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    eval_batch_size = eval_batch_size or batch_size
    common = dict(num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0)
    return {
        "train": DataLoader(splits.train, batch_size=batch_size, shuffle=True, drop_last=False,
                            generator=torch.Generator().manual_seed(seed), **common),
        "val": DataLoader(splits.val, batch_size=eval_batch_size, shuffle=False, **common),
        "test": DataLoader(splits.test, batch_size=eval_batch_size, shuffle=False, **common),
        "train_eval": DataLoader(TransformedSubset(splits.train.base, splits.train.indices, splits.val.transform),
                                 batch_size=eval_batch_size, shuffle=False, **common),
    }


def sharded_loaders(splits: DatasetSplits, batch_size: int, eval_batch_size: int, num_workers: int = 0, seed: int = 0,
                    pin_memory: bool = False) -> dict[str, DataLoader]:
    """DataLoaders ``{"train", "val", "test", "train_eval"}`` where each rank reads its own share.

    ``batch_size`` is the *global* batch (what a schedule's learning rate was tuned for); each rank loads
    ``batch_size / world_size``. ``train`` shuffles with a ``DistributedSampler`` seeded by ``seed`` (``fit``
    calls ``set_epoch`` so the order changes every epoch and a resumed run sees the same order).
    """
    rank, world = du.get_rank(), du.get_world_size()
    if batch_size % world:
        raise ValueError(f"the global batch size {batch_size} is not divisible by the {world} ranks; "
                         f"set task.batch_size to a multiple of {world}")
    common = {"num_workers": num_workers, "pin_memory": pin_memory, "persistent_workers": num_workers > 0}
    per_rank_eval = max(1, eval_batch_size // world)
    train_eval = TransformedSubset(splits.train.base, splits.train.indices, splits.val.transform)
    return {
        "train": DataLoader(splits.train, batch_size=batch_size // world, drop_last=False,
                            sampler=DistributedSampler(splits.train, world, rank, shuffle=True, seed=seed), **common),
        **{name: DataLoader(ds, batch_size=per_rank_eval, sampler=du.ShardSampler(ds, rank, world), **common)
           for name, ds in (("val", splits.val), ("test", splits.test), ("train_eval", train_eval))},
    }
