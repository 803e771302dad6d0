"""Fashion-MNIST (Zalando): 60,000 training and 10,000 test images, 28 x 28 grey, 10 classes of clothing.

The four official files, gzipped or not, in the IDX format::

    train-images-idx3-ubyte[.gz]   magic 0x00000803, count, 28, 28, then count * 784 uint8 pixels
    train-labels-idx1-ubyte[.gz]   magic 0x00000801, count, then count uint8 labels in 0..9
    t10k-images-idx3-ubyte[.gz]    the same for the 10,000 test images
    t10k-labels-idx1-ubyte[.gz]

They are looked for, in this order, in ``<data_dir>/fashion_mnist/``, in torchvision's layout
``<data_dir>/FashionMNIST/raw/``, and in ``system_dir`` (``/usr/share/datasets/fashion-mnist/``, where the
Debian package ``dataset-fashion-mnist`` puts them). The first folder that has all four is used.
``download: true`` fetches them with torchvision's downloader into ``<data_dir>/FashionMNIST/raw/`` when no
folder has them.

Every file's magic number, counts and image shape are checked: a truncated or foreign file is an error
naming it. The grey channel is replicated ``channels`` times (default 3) so the CIFAR models take the
images unchanged. The test split is always the official 10,000 images; validation is carved from the
training split (``val_size``), and ``train_size`` (see ``data_loaders/build.py``) may train on a fixed,
stratified subset of the rest.

Config keys: ``root`` (the data dir), ``system_dir``, ``download``, ``channels`` (3), ``augment`` (random
crop with 2 pixels of zero padding and a horizontal flip: a mirrored garment is the same garment);
``image_size`` must be 28 or absent.
"""
from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch

from data_loaders.base import (
    DATASETS,
    DatasetCorruptError,
    DatasetNotFoundError,
    DatasetSource,
    TensorImageDataset,
    cfg_int,
    check_native_size,
    resolve_root,
)
from data_loaders.transforms import tensor_eval_transform, tensor_train_transform

SIZE = 28
IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801
FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
         "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
# Per-pixel statistics of the 60,000 official training images, on the [0, 1] scale.
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530


def _file_in(folder: Path, stem: str) -> Optional[Path]:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as err:  # a truncated gzip raises EOFError, a non-gzip file BadGzipFile
        raise DatasetCorruptError(f"cannot read Fashion-MNIST file {path}: {type(err).__name__}: {err}. It is "
                                  "truncated or not an IDX file; get it again (see the dataset's docstring)") from err


def read_idx(path: Path, magic: int) -> np.ndarray:
    """One IDX file -> uint8 array: (N, 28, 28) for images (``IDX3`` magic), (N,) for labels (``IDX1``)."""
    data = _read_bytes(path)
    dims = 3 if magic == IMAGES_MAGIC else 1
    header = 4 * (1 + dims)
    if len(data) < header:
        raise DatasetCorruptError(f"Fashion-MNIST file {path} is {len(data)} bytes, shorter than its header")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise DatasetCorruptError(f"Fashion-MNIST file {path} has magic number {found:#010x}, expected {magic:#010x} "
                                  f"({'images' if dims == 3 else 'labels'}); it is not that IDX file")
    shape = tuple(int.from_bytes(data[4 * (i + 1): 4 * (i + 2)], "big") for i in range(dims))
    if dims == 3 and shape[1:] != (SIZE, SIZE):
        raise DatasetCorruptError(f"Fashion-MNIST file {path} holds {shape[1]}x{shape[2]} images, expected 28x28")
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise DatasetCorruptError(f"Fashion-MNIST file {path} announces {shape[0]} items ({expected} bytes) but holds "
                                  f"{len(data) - header} bytes; it is truncated or damaged")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _candidates(cfg: Mapping[str, Any]) -> list[Path]:
    root = resolve_root(cfg, "fashion_mnist")
    system = cfg.get("system_dir", SYSTEM_DIR)
    return [root / "fashion_mnist", root / "FashionMNIST" / "raw"] + ([Path(str(system))] if system else [])


def _missing_message(folders: list[Path]) -> str:
    lines = ["fashion_mnist: no folder holds the four official files (gzipped or not):"]
    for folder in folders:
        have = [stem for stem in FILES.values() if _file_in(folder, stem)]
        lines.append(f"  {folder}: " + (f"only {', '.join(have)}" if have else "none"))
    lines.append(f"Files: {', '.join(s + '.gz' for s in FILES.values())}. Get them with "
                 "`apt-get install dataset-fashion-mnist` (Debian; puts them in /usr/share/datasets/fashion-mnist), "
                 "or with dataset.download=true (torchvision's downloader, needs internet).")
    return "\n".join(lines)


def _download(root: Path) -> None:
    from torchvision.datasets import FashionMNIST  # imported here: only this path needs it

    try:
        FashionMNIST(str(root), download=True)
    except Exception as err:  # URLError, HTTPError, RuntimeError("Error downloading ..."), socket errors
        raise DatasetNotFoundError(f"fashion_mnist: dataset.download=true failed ({type(err).__name__}: {err}); "
                                   "without internet, install the Debian package dataset-fashion-mnist") from err


def find_files(cfg: Mapping[str, Any]) -> Dict[str, Path]:
    """``{role: path}`` of the four files from the first folder that has all of them (downloading if asked)."""
    folders = _candidates(cfg)
    for attempt in range(2):
        for folder in folders:
            found = {role: _file_in(folder, stem) for role, stem in FILES.items()}
            if all(found.values()):
                return found  # type: ignore[return-value]
        if attempt == 0 and cfg.get("download", False):
            _download(resolve_root(cfg, "fashion_mnist"))
        else:
            break
    raise DatasetNotFoundError(_missing_message(folders))


def _split(images: Path, labels: Path) -> TensorImageDataset:
    x, y = read_idx(images, IMAGES_MAGIC), read_idx(labels, LABELS_MAGIC)
    if x.shape[0] != y.shape[0]:
        raise DatasetCorruptError(f"Fashion-MNIST: {images} holds {x.shape[0]} images but {labels} holds "
                                  f"{y.shape[0]} labels; one of them is from another set or damaged")
    if y.size and y.max() > 9:
        raise DatasetCorruptError(f"Fashion-MNIST file {labels}: labels must be in 0..9, found up to {y.max()}")
    return TensorImageDataset(torch.from_numpy(x.copy()).unsqueeze(1), y.astype(np.int64))  # (N, 1, 28, 28)


@DATASETS.register("fashion_mnist")
def fashion_mnist(cfg: Mapping[str, Any]) -> DatasetSource:
    """Fashion-MNIST: 10 classes, (channels, 28, 28), the official 10,000 test images."""
    check_native_size(cfg, "fashion_mnist", SIZE)
    channels = cfg_int(cfg, "channels", 3)
    if channels < 1:
        raise ValueError(f"fashion_mnist needs channels >= 1, got {channels}")
    files = find_files(cfg)
    train = _split(files["train_images"], files["train_labels"])
    test = _split(files["test_images"], files["test_labels"])
    for split in (train, test):  # grey replicated: (N, channels, 28, 28) uint8
        split.images = split.images.expand(-1, channels, -1, -1).contiguous()
    mean, std = (FASHION_MEAN,) * channels, (FASHION_STD,) * channels
    return DatasetSource(
        train=train, test=test, train_labels=train.labels.numpy(), num_classes=10,
        image_size=SIZE, in_channels=channels, mean=mean, std=std,
        train_transform=tensor_train_transform(SIZE, mean, std, padding=2, flip=True),
        eval_transform=tensor_eval_transform(mean, std),
    )
