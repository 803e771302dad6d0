"""SVHN (Street View House Numbers, cropped digits) from the official MATLAB files.

Expected layout::

    <root>/train_32x32.mat   73,257 images
    <root>/test_32x32.mat    26,032 images

Each file holds ``X`` (32, 32, 3, N) uint8 and ``y`` (N, 1) with labels 1..10, where **10 means the
digit 0**; we map it to 0 so labels are the digits themselves. (The optional ``extra_32x32.mat`` is
not used.)

Config keys: ``root`` (required), ``augment`` (RandomCrop(32, padding=4), no flip: a mirrored digit
is not a digit); ``image_size`` must be 32 or absent. The validation split is carved from train.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import scipy.io
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
from data_loaders.transforms import SVHN_MEAN, SVHN_STD, tensor_eval_transform, tensor_train_transform

SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")


def _read_mat(path: Path) -> TensorImageDataset:
    """One .mat file -> images (N, 3, 32, 32) uint8 and labels (N,) in 0..9."""
    try:
        mat = scipy.io.loadmat(str(path), variable_names=["X", "y"])
    except Exception as err:  # truncated files raise ValueError, OSError, MatReadError, ...
        raise DatasetCorruptError(
            f"cannot read SVHN file {path}: {type(err).__name__}: {err}. The file is truncated or not an "
            f"SVHN .mat file; download it again from {SVHN_URL}") from err
    if "X" not in mat or "y" not in mat:
        raise DatasetCorruptError(f"SVHN file {path} lacks the variables 'X' and 'y' (found {sorted(mat)})")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1).astype(np.int64)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != y.shape[0]:
        raise DatasetCorruptError(f"SVHN file {path}: expected X (32, 32, 3, N) uint8 and N labels, "
                                  f"got X {x.shape} {x.dtype} and {y.shape[0]} labels")
    if y.size and (y.min() < 0 or y.max() > 10):
        raise DatasetCorruptError(f"SVHN file {path}: labels must be in 1..10, found {y.min()}..{y.max()}")
    y[y == 10] = 0
    # (H, W, C, N) -> (N, C, H, W); copy so the tensor owns contiguous memory
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1)))
    return TensorImageDataset(images, y)


@DATASETS.register("svhn")
def svhn(cfg: Mapping[str, Any]) -> DatasetSource:
    """SVHN cropped digits: 10 classes (label = digit), (3, 32, 32)."""
    check_native_size(cfg, "svhn", 32)
    root = resolve_root(cfg, "svhn")
    how_to = (f"download {' and '.join(SVHN_FILES)} from {SVHN_URL} (format 2, cropped digits) into {root}, "
              f"e.g. `wget -P {root} {SVHN_URL}train_32x32.mat {SVHN_URL}test_32x32.mat`.")
    train_path, test_path = require_files("svhn", root, SVHN_FILES, how_to)
    train, test = _read_mat(train_path), _read_mat(test_path)
    return DatasetSource(
        train=train, test=test, train_labels=train.labels.numpy(), num_classes=10,
        image_size=32, in_channels=3, mean=SVHN_MEAN, std=SVHN_STD,
        train_transform=tensor_train_transform(32, SVHN_MEAN, SVHN_STD, padding=4, flip=False),
        eval_transform=tensor_eval_transform(SVHN_MEAN, SVHN_STD),
    )
