"""ImageNet (ILSVRC-2012) from the standard class-folder layout::

    <root>/train/<wnid>/*.JPEG    1,281,167 images in 1,000 folders
    <root>/val/<wnid>/*.JPEG      50,000 images in the same 1,000 folders

The official validation archive is flat (``ILSVRC2012_val_00000001.JPEG`` ...); it must first be sorted
into one folder per class. The official *val* folder is our **test** split; our validation split is
carved from train (see ``splits.py``) and uses the eval transform.

Config keys: ``root`` (required), ``image_size`` (default 224), ``augment`` (RandomResizedCrop +
flip). Eval: Resize(image_size * 256 / 224) + CenterCrop(image_size). Any image ImageFolder accepts
(.JPEG, .png, ...) is read and converted to RGB (a few ImageNet files are greyscale or CMYK).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image
from torchvision.datasets import ImageFolder

from data_loaders.base import (
    DATASETS,
    DatasetCorruptError,
    DatasetNotFoundError,
    DatasetSource,
    resolve_root,
)
from data_loaders.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    imagenet_eval_transform,
    imagenet_train_transform,
)

IMAGENET_URL = "https://image-net.org/download-images"


def _how_to(root: Path) -> str:
    return (
        f"download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from {IMAGENET_URL} (free account). "
        f"Train: `mkdir -p {root}/train && tar xf ILSVRC2012_img_train.tar -C {root}/train "
        f"&& cd {root}/train "
        f"&& for f in *.tar; do mkdir -p ${{f%.tar}} && tar xf $f -C ${{f%.tar}} && rm $f; done`. "
        f"Val: `mkdir -p {root}/val && tar xf ILSVRC2012_img_val.tar -C {root}/val`, then sort the flat val "
        f"images into one folder per class (wnid), e.g. with the valprep.sh script of the PyTorch ImageNet "
        f"example or the labels in ILSVRC2012_devkit_t12.tar.gz."
    )


def _load_rgb(path: str) -> Image.Image:
    """ImageFolder loader that names the file when an image cannot be decoded."""
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            return image.convert("RGB")  # convert() forces decoding while the file is open
    except Exception as err:
        raise DatasetCorruptError(f"cannot decode image {path}: {type(err).__name__}: {err}") from err


def _check_folders(root: Path) -> None:
    """Raise one error listing every missing split folder, not just the first."""
    missing = [str(root / split) for split in ("train", "val") if not (root / split).is_dir()]
    if missing:
        raise DatasetNotFoundError(
            f"imagenet: missing folder(s) {', '.join(missing)}.\n"
            f"Expected {root}/train/<wnid>/*.JPEG and {root}/val/<wnid>/*.JPEG (one folder per class).\n"
            f"How to obtain them: {_how_to(root)}")


def _image_folder(folder: Path, root: Path, split: str) -> ImageFolder:
    try:
        # transform=None: items stay PIL images; the train/eval transform is applied per split view
        return ImageFolder(str(folder), loader=_load_rgb)
    except FileNotFoundError as err:  # no class folders, or class folders without images
        hint = (" The official val archive is flat; it must be sorted into class folders." if split == "val"
                else "")
        raise DatasetNotFoundError(
            f"imagenet: {folder} does not have the class-folder layout {folder}/<wnid>/*.JPEG "
            f"({err}).{hint}\n"
            f"How to obtain it: {_how_to(root)}") from err


@DATASETS.register("imagenet")
def imagenet(cfg: Mapping[str, Any]) -> DatasetSource:
    """ImageNet from class folders: (3, image_size, image_size), classes = train folders (1,000)."""
    root = resolve_root(cfg, "imagenet")
    image_size = int(cfg.get("image_size") or 224)
    _check_folders(root)
    train = _image_folder(root / "train", root, "train")
    test = _image_folder(root / "val", root, "val")
    if test.classes != train.classes:
        only_train = sorted(set(train.classes) - set(test.classes))[:5]
        only_val = sorted(set(test.classes) - set(train.classes))[:5]
        raise DatasetNotFoundError(
            f"imagenet: {root}/val has {len(test.classes)} class folders but {root}/train has "
            f"{len(train.classes)}; they must be the same wnids (only in train: {only_train}, only in val: "
            f"{only_val}). Was the official val archive sorted into class folders?\n"
            f"How to obtain it: {_how_to(root)}")
    return DatasetSource(
        train=train, test=test, train_labels=np.asarray(train.targets, dtype=np.int64),
        num_classes=len(train.classes), image_size=image_size, in_channels=3,
        mean=IMAGENET_MEAN, std=IMAGENET_STD,
        train_transform=imagenet_train_transform(image_size),
        eval_transform=imagenet_eval_transform(image_size),
    )
