"""VGG-19 with BatchNorm for CIFAR (Simonyan & Zisserman, 2015; BN variant), registered as vgg19_bn.

16 conv3x3 (padding 1) + BN + ReLU layers in five blocks separated by 2x2 max-pooling, then a global
average pool and a single ``Linear`` classifier. On 32x32 inputs the last feature map is already 1x1,
so the average pool is an identity there; it lets any input of at least 32x32 work.

Widths::

    {"convs": [16 ints]}   # output channels of each conv, default 64,64,128,128,256x4,512x8

Every conv feeds only the next one, so the widths are independent; the classifier reads ``convs[-1]``.
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
    """

    def __init__(self, config: List[Union[int, str]], convs: List[int], num_classes: int) -> None:
        super().__init__()
        layers: List[tnn.Module] = []
        in_ch, widths = 3, iter(convs)
        for item in config:
            if item == "M":
                layers.append(tnn.MaxPool2d(kernel_size=2, stride=2))
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
        x = self.features(x)  # (B, convs[-1], H/32, W/32)
        x = torch.flatten(self.avgpool(x), 1)  # (B, convs[-1])
        return self.classifier(x)  # (B, num_classes)


class VGGFamily(ModelFamily):
    """Family spec of :class:`VGG` for one layer plan."""

    def __init__(self, config: List[Union[int, str]]) -> None:
        self.config = list(config)

    def default_widths(self, **kwargs: Any) -> Widths:
        return {"convs": [c for c in self.config if c != "M"]}

    def build(self, num_classes: int, widths: Widths, **kwargs: Any) -> tnn.Module:
        return VGG(self.config, widths["convs"], num_classes)

    def read_widths(self, model: tnn.Module) -> Widths:
        return {"convs": [m.out_channels for m in model.features if isinstance(m, tnn.Conv2d)]}

    def classifier(self, model: tnn.Module) -> tnn.Linear:
        return model.classifier


@register_model("vgg19_bn")
def vgg19_bn() -> ModelFamily:
    return VGGFamily(VGG19_CONFIG)
