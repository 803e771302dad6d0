"""CIFAR ResNets (He et al., 2016, Sec. 4.2): depth 6n+2, three stages of n BasicBlocks.

Registered as resnet8 (n=1, for fast tests), resnet20, resnet32, resnet44, resnet56 and resnet110.

Widths::

    {"stem": int,                      # conv1 output, default 16
     "stages": [w1, w2, w3],           # residual-stream width of each stage, default 16/32/64
     "blocks": [[h, ...] x 3]}         # hidden width (conv1 output) of each block, default = stage width

Stage 1 adds its input (the stem) through identity shortcuts, so ``stem`` must equal ``stages[0]``.
Whether a block has a 1x1 downsample shortcut is fixed by the *default* architecture (first block of
stages 2 and 3), not by the widths: a pruned stage keeps the same kind of shortcut.
"""
from __future__ import annotations

from typing import Any, List

import torch
import torch.nn as tnn

from nn.models.registry import ModelFamily, Widths, register_model

DEFAULT_STAGE_WIDTHS = (16, 32, 64)


class BasicBlock(tnn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU: (B, in_ch, H, W) -> (B, out_ch, H/s, W/s).

    Args:
        in_ch: input channels (residual width of the previous block or the stem).
        hidden: conv1 output channels.
        out_ch: residual width of this block's stage.
        stride: stride of conv1 and of the downsample shortcut.
        downsample: use a 1x1 conv + BN shortcut instead of the identity.
    """

    def __init__(self, in_ch: int, hidden: int, out_ch: int, stride: int = 1, downsample: bool = False) -> None:
        super().__init__()
        self.conv1 = tnn.Conv2d(in_ch, hidden, 3, stride=stride, padding=1, bias=False)
        self.bn1 = tnn.BatchNorm2d(hidden)
        self.relu = tnn.ReLU(inplace=True)
        self.conv2 = tnn.Conv2d(hidden, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = tnn.BatchNorm2d(out_ch)
        self.downsample: tnn.Module | None = None
        if downsample:
            self.downsample = tnn.Sequential(
                tnn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), tnn.BatchNorm2d(out_ch)
            )
        elif stride != 1 or in_ch != out_ch:
            raise ValueError(f"identity shortcut needs stride 1 and in_ch == out_ch, got {stride}, {in_ch}->{out_ch}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)  # (B, out_ch, H/s, W/s)
        out = self.relu(self.bn1(self.conv1(x)))  # (B, hidden, H/s, W/s)
        out = self.bn2(self.conv2(out))  # (B, out_ch, H/s, W/s)
        return self.relu(out + identity)


class CifarResNet(tnn.Module):
    """ResNet for 32x32 images: (B, 3, H, W) -> logits (B, num_classes).

    Args:
        depth: 6n+2 (8, 20, 32, 44, 56, 110).
        num_classes: classifier outputs.
        widths: see the module docstring; validated by :func:`nn.models.create_model`.
    """

    def __init__(self, depth: int, num_classes: int, widths: Widths) -> None:
        super().__init__()
        n = _blocks_per_stage(depth)
        stem, stages, blocks = widths["stem"], widths["stages"], widths["blocks"]
        self.conv1 = tnn.Conv2d(3, stem, 3, stride=1, padding=1, bias=False)
        self.bn1 = tnn.BatchNorm2d(stem)
        self.relu = tnn.ReLU(inplace=True)
        in_ch = stem
        for i in range(3):
            layer = []
            for j in range(n):
                first_of_later_stage = i > 0 and j == 0
                stride = 2 if first_of_later_stage else 1
                # The default net changes shape (16->32, 32->64, stride 2) exactly here.
                layer.append(BasicBlock(in_ch, blocks[i][j], stages[i], stride, downsample=first_of_later_stage))
                in_ch = stages[i]
            self.add_module(f"layer{i + 1}", tnn.Sequential(*layer))
        self.avgpool = tnn.AdaptiveAvgPool2d(1)
        self.fc = tnn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, tnn.Conv2d):
                tnn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, tnn.BatchNorm2d):
                tnn.init.ones_(m.weight)
                tnn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # (B, stem, H, W)
        x = self.layer3(self.layer2(self.layer1(x)))  # (B, stages[2], H/4, W/4)
        x = torch.flatten(self.avgpool(x), 1)  # (B, stages[2])
        return self.fc(x)  # (B, num_classes)


def _blocks_per_stage(depth: int) -> int:
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
    return (depth - 2) // 6


class CifarResNetFamily(ModelFamily):
    """Family spec of :class:`CifarResNet` at one depth."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.n = _blocks_per_stage(depth)

    def default_widths(self, **kwargs: Any) -> Widths:
        return {
            "stem": DEFAULT_STAGE_WIDTHS[0],
            "stages": list(DEFAULT_STAGE_WIDTHS),
            "blocks": [[w] * self.n for w in DEFAULT_STAGE_WIDTHS],
        }

    def check_coupling(self, widths: Widths, **kwargs: Any) -> None:
        if widths["stem"] != widths["stages"][0]:
            raise ValueError(
                f"widths['stem'] ({widths['stem']}) must equal widths['stages'][0] ({widths['stages'][0]}): "
                "the first stage adds the stem output through identity shortcuts"
            )

    def build(self, num_classes: int, widths: Widths, **kwargs: Any) -> tnn.Module:
        return CifarResNet(self.depth, num_classes, widths)

    def read_widths(self, model: tnn.Module) -> Widths:
        layers: List[tnn.Sequential] = [model.layer1, model.layer2, model.layer3]
        return {
            "stem": model.conv1.out_channels,
            "stages": [layer[0].conv2.out_channels for layer in layers],
            "blocks": [[block.conv1.out_channels for block in layer] for layer in layers],
        }

    def classifier(self, model: tnn.Module) -> tnn.Linear:
        return model.fc


def _register(depth: int) -> None:
    register_model(f"resnet{depth}")(lambda: CifarResNetFamily(depth))


for _depth in (8, 20, 32, 44, 56, 110):
    _register(_depth)
