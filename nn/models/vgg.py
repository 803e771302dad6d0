"""VGG-19 with BatchNorm for CIFAR (Simonyan & Zisserman, 2015; BN variant), registered as vgg19_bn.

16 conv3x3 (padding 1) + BN + ReLU layers in five blocks, each of the first ``max_pools`` blocks followed by a
2x2 max-pool, then a global average pool and a single ``Linear`` classifier. With the default five pools the
last feature map of a 32x32 input is already 1x1 (the average pool is an identity there). The published
method's VGG-19 pools only after the first three blocks on 32x32 inputs (four on 64x64), so blocks 4 and
5 run at 4x4: ``max_pools=3`` is that network (same function, same MACs), which the ``VGG19_on_CIFAR100``
task uses so that its speed-ups and data models are comparable with the published ones.

Widths::

    {"convs": [16 ints]}   # output channels of each conv, default 64,64,128,128,256x4,512x8

Every conv feeds only the next one, so the widths are independent; the classifier reads ``convs[-1]``.
Option (a model kwarg): ``max_pools`` (0-5, default 5).
"""
from __future__ import annotations

from typing import Any, List, Union

import torch
import torch.nn as tnn

from nn.models.registry import ModelFamily, Widths, register_model

# "M" is a 2x2 max-pool; ints are the default conv widths.
VGG19_CONFIG: List[Union[int, str]] = [
    64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
]


class VGG(tnn.Module):
    """VGG with BN for small images: (B, 3, H, W) -> logits (B, num_classes).

    Args:
        config: layer plan, ints are conv positions and "M" max-pools (see ``VGG19_CONFIG``).
        convs: output channels of each conv, one per int in ``config``.
        num_classes: classifier outputs.
        max_pools: how many of the plan's "M" positions, counted from the input, get a max-pool.
    """

    def __init__(self, config: List[Union[int, str]], convs: List[int], num_classes: int,
                 max_pools: int | None = None) -> None:
        super().__init__()
        layers: List[tnn.Module] = []
        in_ch, widths = 3, iter(convs)
        pools_left = config.count("M") if max_pools is None else max_pools
        for item in config:
            if item == "M":
                # A skipped pool stays as an Identity: state-dict keys do not depend on max_pools.
                layers.append(tnn.MaxPool2d(kernel_size=2, stride=2) if pools_left > 0 else tnn.Identity())
                pools_left -= 1
                continue
            out_ch = next(widths)
            layers += [tnn.Conv2d(in_ch, out_ch, 3, padding=1), tnn.BatchNorm2d(out_ch), tnn.ReLU(inplace=True)]
            in_ch = out_ch
        self.features = tnn.Sequential(*layers)
        self.avgpool = tnn.AdaptiveAvgPool2d(1)
        self.classifier = tnn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, tnn.Conv2d):
                tnn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                tnn.init.zeros_(m.bias)
            elif isinstance(m, tnn.BatchNorm2d):
                tnn.init.ones_(m.weight)
                tnn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (B, convs[-1], H/2^max_pools, W/2^max_pools)
        x = torch.flatten(self.avgpool(x), 1)  # (B, convs[-1])
        return self.classifier(x)  # (B, num_classes)


class VGGFamily(ModelFamily):
    """Family spec of :class:`VGG` for one layer plan."""

    allowed_kwargs = frozenset({"max_pools"})

    def __init__(self, config: List[Union[int, str]]) -> None:
        self.config = list(config)

    def default_widths(self, **kwargs: Any) -> Widths:
        return {"convs": [c for c in self.config if c != "M"]}

    def build(self, num_classes: int, widths: Widths, **kwargs: Any) -> tnn.Module:
        pools = self.config.count("M")
        max_pools = kwargs.get("max_pools", pools)
        if isinstance(max_pools, bool) or not isinstance(max_pools, int) or not 0 <= max_pools <= pools:
            raise ValueError(f"max_pools must be an int from 0 to {pools}, got {max_pools!r}")
        return VGG(self.config, widths["convs"], num_classes, max_pools)

    def read_widths(self, model: tnn.Module) -> Widths:
        return {"convs": [m.out_channels for m in model.features if isinstance(m, tnn.Conv2d)]}

    def classifier(self, model: tnn.Module) -> tnn.Linear:
        return model.classifier


@register_model("vgg19_bn")
def vgg19_bn() -> ModelFamily:
    return VGGFamily(VGG19_CONFIG)
