"""Building blocks shared by every dataset: errors, the dataset registry and the containers.

A dataset module (``cifar.py``, ``svhn.py``, ...) registers a factory ``fn(cfg) -> DatasetSource`` in
``DATASETS``. A :class:`DatasetSource` is the dataset *before* splitting: the full official training
set and test set as raw items (no transform applied), the training labels (used to carve a stratified
validation split) and the train/eval transforms. :func:`data_loaders.build.build_datasets` turns it
into a :class:`DatasetSplits` (train / val / test views with the right transform each).

Keeping the raw data separate from the transforms is what lets the validation subset, carved from the
*training* data, use the *eval* transform: it is just another view of the same raw items.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from utils.registry import Registry

DATASETS: Registry[Callable[[Mapping[str, Any]], "DatasetSource"]] = Registry("dataset")

Transform = Callable[[Any], torch.Tensor]


class DatasetNotFoundError(FileNotFoundError):
    """Dataset files or folders are missing; the message says what was expected where and how to get it."""


class DatasetCorruptError(ValueError):
    """A dataset file exists but cannot be read (truncated download, wrong format); names the file."""


@dataclass
class DatasetSource:
    """A dataset before splitting, as produced by a registered factory.

    Attributes:
        train: the full official training set; ``train[i]`` is ``(raw image, int label)`` where the raw
            image is a uint8/float tensor (C, H, W) for in-memory datasets or a PIL image for ImageNet.
        test: the official test set, same item format.
        train_labels: (N_train,) int labels of ``train``, used to stratify the validation split.
        train_transform: raw image -> augmented, normalised float tensor (C, H, W).
        eval_transform: raw image -> normalised float tensor (C, H, W), deterministic.
    """

    train: Dataset
    test: Dataset
    train_labels: np.ndarray
    num_classes: int
    image_size: int
    in_channels: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    train_transform: Transform
    eval_transform: Transform


@dataclass
class DatasetSplits:
    """The three splits a training run uses, plus what a model needs to know about the images.

    ``train``, ``val`` and ``test`` yield ``(image, label)`` with ``image`` a normalised float32 tensor
    of shape (in_channels, image_size, image_size) and ``label`` an int in ``[0, num_classes)``.
    ``val`` is carved from the official training data but uses the eval transform; ``test`` is the
    official test split (for ImageNet: the official val folder).
    """

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    image_size: int
    in_channels: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]


class TensorImageDataset(Dataset):
    """In-memory images kept as one tensor, so no per-sample PIL conversion is needed.

    Args:
        images: (N, C, H, W) uint8 in [0, 255] or float32 in [0, 1].
        labels: (N,) integer labels.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | np.ndarray) -> None:
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        if images.ndim != 4 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"expected images (N, C, H, W) and labels (N,), got {tuple(images.shape)} "
                             f"and {tuple(labels.shape)}")
        self.images = images.contiguous()
        self.labels = labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


class TransformedSubset(Dataset):
    """A view of ``base`` restricted to ``indices`` (all items if None) with ``transform`` applied.

    ``indices`` is kept as a public (n,) int64 array so callers can check or save the split.
    """

    def __init__(self, base: Dataset, indices: Sequence[int] | np.ndarray | None,
                 transform: Transform) -> None:
        self.base = base
        n = len(base)  # type: ignore[arg-type]
        self.indices = np.arange(n, dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        image, label = self.base[int(self.indices[index])]
        return self.transform(image), int(label)


# ---------------------------------------------------------------------------------------------------
# helpers for dataset modules
# ---------------------------------------------------------------------------------------------------


def resolve_root(cfg: Mapping[str, Any], dataset: str) -> Path:
    """The absolute dataset folder from ``cfg.root``; relative paths are taken from the current directory."""
    root = cfg.get("root")
    if root is None or str(root) == "":
        raise DatasetNotFoundError(f"{dataset}: no dataset folder given; set `root` in the dataset config "
                                   f"(e.g. dataset.root=/data/{dataset}).")
    return Path(str(root)).expanduser().resolve()


def require_files(dataset: str, folder: Path, names: Sequence[str], how_to: str,
                  note: str = "") -> list[Path]:
    """Return ``folder/name`` for every name, or raise :class:`DatasetNotFoundError` listing what is missing.

    Args:
        how_to: how to obtain the files (URL and extraction command), appended to the message.
        note: an optional extra line (e.g. which alternative folder layouts are accepted).
    """
    paths = [folder / name for name in names]
    missing = [p for p in paths if not p.exists()]
    if missing:
        lines = [f"{dataset}: {len(missing)} of {len(paths)} expected files are missing in {folder}"]
        lines += [f"  {p}{'   <- MISSING' if p in missing else ''}" for p in paths]
        if note:
            lines.append(note)
        lines.append(f"How to obtain them: {how_to}")
        raise DatasetNotFoundError("\n".join(lines))
    return paths


def channel_stats(images: torch.Tensor) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Per-channel mean and std of (N, C, H, W) images, on the [0, 1] scale (uint8 is divided by 255)."""
    x = images.to(torch.float64)
    if images.dtype == torch.uint8:
        x = x / 255.0
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-6)  # a constant channel must not divide by zero
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def cfg_int(cfg: Mapping[str, Any], key: str, default: int) -> int:
    """``int(cfg[key])`` with a default, rejecting fractional values instead of silently truncating."""
    value = cfg.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or float(value) != int(value):
        raise ValueError(f"dataset config `{key}` must be an integer, got {value!r}")
    return int(value)


def check_native_size(cfg: Mapping[str, Any], dataset: str, size: int) -> int:
    """Datasets stored at a fixed resolution reject a different ``image_size`` instead of ignoring it."""
    requested = cfg.get("image_size")
    if requested is not None and int(requested) != size:
        raise ValueError(f"{dataset} images are {size}x{size}; got image_size={requested}. "
                         f"Remove image_size or set it to {size}.")
    return size
