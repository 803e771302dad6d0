"""Train and eval transforms.

In-memory datasets (CIFAR, SVHN, digits, synthetic) keep their images as one uint8 or float tensor
(N, C, H, W) and transform single (C, H, W) tensors with ``torchvision.transforms.v2``: no PIL round
trip per sample, which is what makes CPU data loading cheap (about 60 us per CIFAR sample).
ImageNet decodes JPEGs with PIL, so its pipeline starts on PIL images.

All pipelines end with ``ToDtype(float32, scale=True)`` (uint8 / 255; float input is assumed to be in
[0, 1] already and left unscaled) and ``Normalize(mean, std)``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torchvision.transforms import v2

# Per-channel statistics of the official training sets, on the [0, 1] scale.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
SVHN_MEAN = (0.4377, 0.4438, 0.4728)
SVHN_STD = (0.1980, 0.2010, 0.1970)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_normalised_float(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def tensor_eval_transform(mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """(C, H, W) uint8 or [0, 1] float tensor -> normalised float32 (C, H, W); deterministic."""
    return v2.Compose(_to_normalised_float(mean, std))


def tensor_train_transform(image_size: int, mean: Sequence[float], std: Sequence[float],
                           padding: int = 4, flip: bool = True) -> v2.Compose:
    """Random crop of ``image_size`` after zero padding, optional horizontal flip, then normalise.

    The standard CIFAR recipe is ``padding=4, flip=True``; digit datasets (SVHN, digits) use
    ``flip=False`` because a mirrored digit is a different (or no) digit.
    """
    steps: list[v2.Transform] = [v2.RandomCrop(image_size, padding=padding)]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps + _to_normalised_float(mean, std))


def imagenet_train_transform(image_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                             std: Sequence[float] = IMAGENET_STD) -> v2.Compose:
    """PIL image -> RandomResizedCrop(image_size) + horizontal flip -> normalised (3, S, S) float32."""
    return v2.Compose([
        v2.RandomResizedCrop(image_size, antialias=True),  # crop and resize on PIL: cheaper than on tensors
        v2.RandomHorizontalFlip(),
        v2.PILToTensor(),
        *_to_normalised_float(mean, std),
    ])


def imagenet_eval_transform(image_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                            std: Sequence[float] = IMAGENET_STD) -> v2.Compose:
    """PIL image -> Resize(image_size * 256 / 224) + CenterCrop(image_size) -> normalised float32.

    The 256/224 ratio is the standard ImageNet protocol (resize the short side to 256, crop 224).
    """
    return v2.Compose([
        v2.Resize(int(image_size * 256 / 224), antialias=True),
        v2.CenterCrop(image_size),
        v2.PILToTensor(),
        *_to_normalised_float(mean, std),
    ])
