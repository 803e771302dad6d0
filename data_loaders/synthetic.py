"""A tiny, deterministic, learnable image dataset for tests and smoke runs.

Each class ``k`` has a fixed random template: a (channels, 4, 4) uniform random image upsampled
bilinearly to ``image_size`` (smooth blobs, so a few pixels of crop shift keep the class visible). An
example of class ``k`` is its template plus Gaussian pixel noise (std ``noise``), clipped to [0, 1]
and stored as uint8 (N, C, S, S), the same storage as CIFAR. Labels are balanced and shuffled.

Everything is drawn from one ``torch.Generator`` seeded with ``data_seed``: templates first, then the
train set, then the test set, so the same seed always gives the same tensors, and train and test
share the templates (the test set is learnable from the train set).

Config keys: ``data_seed`` (0; independent of ``split_seed``), ``num_train`` (256), ``num_test`` (64), ``num_classes`` (10),
``image_size`` (32), ``channels`` (3), ``noise`` (0.25), ``augment`` (random crop with
``image_size // 8`` padding, no flip). ``root`` is not used. Mean/std are computed on the train set.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from data_loaders.base import DATASETS, DatasetSource, TensorImageDataset, cfg_int, channel_stats
from data_loaders.transforms import tensor_eval_transform, tensor_train_transform


def class_templates(num_classes: int, channels: int, image_size: int,
                    generator: torch.Generator) -> torch.Tensor:
    """(num_classes, channels, image_size, image_size) float32 smooth random templates in [0, 1]."""
    coarse = torch.rand(num_classes, channels, 4, 4, generator=generator)
    return F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)


def sample_images(templates: torch.Tensor, n: int, noise: float,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n noisy copies of the templates: (n, C, S, S) uint8 images and (n,) int64 balanced labels."""
    num_classes = templates.shape[0]
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=generator)]
    x = templates[labels] + noise * torch.randn(n, *templates.shape[1:], generator=generator)
    images = (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return images, labels


@DATASETS.register("synthetic")
def synthetic(cfg: Mapping[str, Any]) -> DatasetSource:
    """Class templates plus noise; see the module docstring for the keys and their defaults."""
    num_train = cfg_int(cfg, "num_train", 256)
    num_test = cfg_int(cfg, "num_test", 64)
    num_classes = cfg_int(cfg, "num_classes", 10)
    image_size = cfg_int(cfg, "image_size", 32)
    channels = cfg_int(cfg, "channels", 3)
    noise = float(cfg.get("noise", 0.25))
    if min(num_train, num_test, num_classes, image_size, channels) < 1:
        raise ValueError("synthetic: num_train, num_test, num_classes, image_size and channels must be >= 1")

    generator = torch.Generator().manual_seed(cfg_int(cfg, "data_seed", 0))
    templates = class_templates(num_classes, channels, image_size, generator)
    train = TensorImageDataset(*sample_images(templates, num_train, noise, generator))
    test = TensorImageDataset(*sample_images(templates, num_test, noise, generator))
    mean, std = channel_stats(train.images)
    return DatasetSource(
        train=train, test=test, train_labels=train.labels.numpy(), num_classes=num_classes,
        image_size=image_size, in_channels=channels, mean=mean, std=std,
        train_transform=tensor_train_transform(image_size, mean, std, padding=max(image_size // 8, 1),
                                               flip=False),
        eval_transform=tensor_eval_transform(mean, std),
    )
