"""Shared fixtures: tiny data and a tiny network, CPU only, a few threads."""
from __future__ import annotations

import pytest
import torch

import configs  # noqa: F401  (registers the config resolvers, e.g. first_set, for tests that compose configs on their own)
from data_loaders import build_datasets, build_loaders

torch.set_num_threads(2)


class TinyNet(torch.nn.Module):
    """conv-bn-relu -> 4x4 average pool -> linear; a few thousand parameters."""

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(width)
        self.fc = torch.nn.Linear(width * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, num_classes)
        h = torch.relu(self.bn(self.conv(x)))
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(h, 4).flatten(1))


@pytest.fixture
def synthetic_loaders():
    cfg = {"name": "synthetic", "num_train": 128, "num_test": 32, "image_size": 16, "val_size": 0.25,
           "split_seed": 0, "augment": True}
    splits = build_datasets(cfg)
    return build_loaders(splits, batch_size=32, eval_batch_size=64, seed=0)


@pytest.fixture
def tiny_net():
    torch.manual_seed(0)
    return TinyNet()
