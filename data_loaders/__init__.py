"""Image datasets for training and pruning target networks.

``build_datasets(cfg)`` turns a dataset config into train / val / test splits, ``build_loaders``
into DataLoaders. Registered datasets: cifar10, cifar100, svhn, imagenet (files under ``cfg.root``),
digits (scikit-learn's embedded digits, the offline default), fashion_mnist (the official IDX files;
the CPU test bed) and synthetic (for tests).
See ``data_loaders/build.py`` for the common config keys and each dataset module for its own.
"""
from data_loaders.base import (
    DATASETS,
    DatasetCorruptError,
    DatasetNotFoundError,
    DatasetSource,
    DatasetSplits,
    TensorImageDataset,
    TransformedSubset,
)
from data_loaders.build import build_datasets, build_loaders, list_datasets, sharded_loaders

# importing the dataset modules registers them in DATASETS
from data_loaders import cifar, digits, fashion_mnist, imagenet, svhn, synthetic  # noqa: E402,F401  isort: skip

__all__ = [
    "DATASETS",
    "DatasetCorruptError",
    "DatasetNotFoundError",
    "DatasetSource",
    "DatasetSplits",
    "TensorImageDataset",
    "TransformedSubset",
    "build_datasets",
    "build_loaders",
    "list_datasets",
    "sharded_loaders",
]
