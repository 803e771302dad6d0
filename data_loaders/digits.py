"""The embedded default dataset: scikit-learn's handwritten digits (offline, no download).

``sklearn.datasets.load_digits()`` ships 1,797 real 8 x 8 greyscale images of the digits 0-9 with
pixel values 0..16. We scale them to [0, 1], upscale to ``image_size`` (default 32) with bilinear
interpolation and replicate the grey channel ``channels`` times (default 3) so that CIFAR models take
them unchanged. Images are stored as one float32 tensor (N, C, S, S).

There is no official test split, so we hold one out, stratified, with a **fixed** seed
(``TEST_SEED``, independent of ``split_seed``): the test split is the same in every run, and only the
validation split (carved from the remaining images) moves with ``split_seed``.

Config keys: ``image_size`` (32), ``channels`` (3), ``test_size`` (0.2: fraction or count),
``augment`` (random crop with ``image_size // 8`` zero padding, no flip). ``root`` is not used.
Mean/std are computed over the non-test images (the same for every channel).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from data_loaders.base import (
    DATASETS,
    DatasetSource,
    TensorImageDataset,
    cfg_int,
    channel_stats,
)
from data_loaders.splits import resolve_holdout_count, stratified_split
from data_loaders.transforms import tensor_eval_transform, tensor_train_transform

TEST_SEED = 0  # fixed on purpose: changing it would change every reported test accuracy


def digit_images(image_size: int = 32, channels: int = 3) -> tuple[torch.Tensor, np.ndarray]:
    """All 1,797 digits as (N, channels, image_size, image_size) float32 in [0, 1] and (N,) int64 labels."""
    from sklearn.datasets import load_digits  # imported here: sklearn costs ~1 s to import

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)  # (N, 1, 8, 8)
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.clamp_(0.0, 1.0).expand(-1, channels, -1, -1).contiguous()
    return x, digits.target.astype(np.int64)


@DATASETS.register("digits")
def digits(cfg: Mapping[str, Any]) -> DatasetSource:
    """scikit-learn digits: 10 classes, 1,797 images, (channels, image_size, image_size)."""
    image_size = cfg_int(cfg, "image_size", 32)
    channels = cfg_int(cfg, "channels", 3)
    if image_size < 8 or channels < 1:
        raise ValueError(f"digits needs image_size >= 8 and channels >= 1, got {image_size}, {channels}")
    images, labels = digit_images(image_size, channels)
    test_count = resolve_holdout_count(cfg.get("test_size", 0.2), len(labels), "test_size")
    pool_idx, test_idx = stratified_split(labels, test_count, seed=TEST_SEED)
    pool = TensorImageDataset(images[torch.from_numpy(pool_idx)], labels[pool_idx])
    test = TensorImageDataset(images[torch.from_numpy(test_idx)], labels[test_idx])
    mean, std = channel_stats(pool.images)
    return DatasetSource(
        train=pool, test=test, train_labels=labels[pool_idx], num_classes=10,
        image_size=image_size, in_channels=channels, mean=mean, std=std,
        train_transform=tensor_train_transform(image_size, mean, std, padding=max(image_size // 8, 1),
                                               flip=False),
        eval_transform=tensor_eval_transform(mean, std),
    )
