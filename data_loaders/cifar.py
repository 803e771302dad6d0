"""CIFAR-10 and CIFAR-100 from the official python-pickle archives.

Expected layout (what the official archives extract to)::

    <root>/cifar-10-batches-py/data_batch_1 ... data_batch_5, test_batch
    <root>/cifar-100-python/train, test

``root`` may also point directly at the batches folder. Each pickle is a dict with ``b"data"``
(N, 3072) uint8 (1024 red, then 1024 green, then 1024 blue values, row-major 32 x 32) and
``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` (CIFAR-100).

We read the pickles ourselves instead of using ``torchvision.datasets.CIFAR10``: torchvision checks
MD5 sums, which rejects the tiny files the tests write, and converts every sample through PIL.

Config keys: ``root`` (required), ``augment`` (RandomCrop(32, padding=4) + horizontal flip);
``image_size`` must be 32 or absent.
50,000 train / 10,000 test images; the validation split is carved from train (see ``splits.py``).
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Mapping, Sequence, Tuple

import numpy as np
import torch

from data_loaders.base import (
    DATASETS,
    DatasetCorruptError,
    DatasetSource,
    TensorImageDataset,
    check_native_size,
    require_files,
    resolve_root,
)
from data_loaders.transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    tensor_eval_transform,
    tensor_train_transform,
)

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


def _how_to(archive: str, root: Path) -> str:
    return (f"download {archive} from {CIFAR_URL} and run `tar xzf {archive} -C {root}` "
            f"(it creates the folder above).")


def _find_folder(root: Path, subdir: str, names: Sequence[str]) -> Path:
    """``root/subdir`` normally; ``root`` itself when the batches were extracted (or linked) there."""
    if not (root / subdir).is_dir() and all((root / n).exists() for n in names):
        return root
    return root / subdir


def _read_batch(path: Path, label_key: str) -> Tuple[np.ndarray, np.ndarray]:
    """One pickle -> (images (N, 3, 32, 32) uint8, labels (N,) int64); corrupt files name themselves."""
    try:
        with open(path, "rb") as f:
            # the official pickles were written by Python 2: byte-string keys, hence encoding="bytes"
            entry = pickle.load(f, encoding="bytes")
    except Exception as err:  # truncated downloads raise EOFError, UnpicklingError, ValueError, ...
        raise DatasetCorruptError(
            f"cannot read CIFAR batch {path}: {type(err).__name__}: {err}. The file is truncated or not a "
            f"CIFAR python pickle; download and extract it again.") from err
    if not isinstance(entry, dict):
        raise DatasetCorruptError(f"CIFAR batch {path} holds a {type(entry).__name__}, expected a dict")
    # accept str keys too (files re-pickled under Python 3)
    entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
    if "data" not in entry or label_key not in entry:
        raise DatasetCorruptError(f"CIFAR batch {path} lacks the keys 'data' and {label_key!r} "
                                  f"(found {sorted(map(str, entry))}); is it the right CIFAR version?")
    data = np.asarray(entry["data"])
    labels = np.asarray(entry[label_key], dtype=np.int64).reshape(-1)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise DatasetCorruptError(f"CIFAR batch {path}: expected data (N, 3072) uint8 and N labels, got data "
                                  f"{data.shape} {data.dtype} and {labels.shape[0]} labels")
    return data.reshape(-1, 3, 32, 32), labels


def _load(files: Sequence[Path], label_key: str, num_classes: int) -> TensorImageDataset:
    parts = [_read_batch(p, label_key) for p in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetCorruptError(f"labels in {[str(p) for p in files]} fall outside [0, {num_classes})")
    return TensorImageDataset(torch.from_numpy(images), labels)


def _build_cifar(cfg: Mapping[str, Any], name: str, subdir: str, archive: str, train_names: Sequence[str],
                 test_names: Sequence[str], label_key: str, num_classes: int,
                 mean: Tuple[float, ...], std: Tuple[float, ...]) -> DatasetSource:
    check_native_size(cfg, name, 32)
    root = resolve_root(cfg, name)
    names = list(train_names) + list(test_names)
    folder = _find_folder(root, subdir, names)
    paths = require_files(name, folder, names, _how_to(archive, root),
                          note=f"(`root` may be the folder that contains {subdir}/ or {subdir}/ itself.)")
    train = _load(paths[: len(train_names)], label_key, num_classes)
    test = _load(paths[len(train_names):], label_key, num_classes)
    return DatasetSource(
        train=train, test=test, train_labels=train.labels.numpy(), num_classes=num_classes,
        image_size=32, in_channels=3, mean=mean, std=std,
        train_transform=tensor_train_transform(32, mean, std, padding=4, flip=True),
        eval_transform=tensor_eval_transform(mean, std),
    )


@DATASETS.register("cifar10")
def cifar10(cfg: Mapping[str, Any]) -> DatasetSource:
    """CIFAR-10: 10 classes, 50,000 train / 10,000 test, (3, 32, 32)."""
    return _build_cifar(cfg, "cifar10", "cifar-10-batches-py", "cifar-10-python.tar.gz",
                        [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels", 10,
                        CIFAR10_MEAN, CIFAR10_STD)


@DATASETS.register("cifar100")
def cifar100(cfg: Mapping[str, Any]) -> DatasetSource:
    """CIFAR-100 (fine labels): 100 classes, 50,000 train / 10,000 test, (3, 32, 32)."""
    return _build_cifar(cfg, "cifar100", "cifar-100-python", "cifar-100-python.tar.gz",
                        ["train"], ["test"], "fine_labels", 100, CIFAR100_MEAN, CIFAR100_STD)
