"""ImageNet ResNets from torchvision (resnet18, resnet50), resizable to arbitrary widths.

The models are torchvision's own classes, so module names and state-dict keys are torchvision's (a
checkpoint trained with torchvision loads as is). torchvision's constructor has no per-block widths, so
other widths are made by building the default model and swapping every conv/BN/Linear for a resized copy
(:mod:`nn.models._resize`), re-initialised the way torchvision initialises it.

Widths::

    {"stem": int,                        # conv1 output (default 64)
     "stages": [w1, w2, w3, w4],         # residual width of layer1..layer4 (Bottleneck: conv3 output)
     "blocks": [[entry per block] per stage]}
    # BasicBlock entry: [conv1_out]; Bottleneck entry: [conv1_out, conv2_out]

resnet18's layer1[0] has an identity shortcut, so its ``stem`` must equal ``stages[0]``; resnet50's
layer1[0] has a downsample (64 -> 256), so its stem is free. As in the CIFAR family, which blocks have a
downsample is fixed by the default architecture.
"""
from __future__ import annotations

from typing import Any, Callable, List, Sequence

import torch.nn as tnn
import torchvision
from torchvision.models.resnet import Bottleneck

from nn.models._resize import bn_like, conv_like, linear_like, replace
from nn.models.registry import ModelFamily, Widths, register_model

STAGES = ("layer1", "layer2", "layer3", "layer4")
PLANES = (64, 128, 256, 512)


def _reinit(module: tnn.Module) -> None:
    """torchvision's ResNet init, applied to a freshly created conv or BN."""
    if isinstance(module, tnn.Conv2d):
        tnn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(module, tnn.BatchNorm2d):
        tnn.init.ones_(module.weight)
        tnn.init.zeros_(module.bias)


class TorchvisionResNetFamily(ModelFamily):
    """Family spec of a torchvision ResNet.

    Args:
        builder: torchvision constructor, e.g. ``torchvision.models.resnet18``.
        layers: blocks per stage, e.g. (2, 2, 2, 2).
        bottleneck: Bottleneck blocks (expansion 4, three convs) instead of BasicBlocks.
    """

    def __init__(self, builder: Callable[..., tnn.Module], layers: Sequence[int], bottleneck: bool) -> None:
        self.builder = builder
        self.layers = tuple(layers)
        self.bottleneck = bottleneck
        self.expansion = 4 if bottleneck else 1

    def default_widths(self, **kwargs: Any) -> Widths:
        convs_per_entry = 2 if self.bottleneck else 1
        return {
            "stem": 64,
            "stages": [p * self.expansion for p in PLANES],
            "blocks": [[[p] * convs_per_entry for _ in range(n)] for p, n in zip(PLANES, self.layers)],
        }

    def has_downsample(self, stage: int, block: int) -> bool:
        """Whether block ``block`` of stage ``stage`` has a 1x1 shortcut in the default architecture."""
        return block == 0 and (stage > 0 or self.expansion != 1)

    def check_coupling(self, widths: Widths, **kwargs: Any) -> None:
        if not self.has_downsample(0, 0) and widths["stem"] != widths["stages"][0]:
            raise ValueError(
                f"widths['stem'] ({widths['stem']}) must equal widths['stages'][0] ({widths['stages'][0]}): "
                "layer1[0] adds the stem output through an identity shortcut"
            )

    def build(self, num_classes: int, widths: Widths, **kwargs: Any) -> tnn.Module:
        model = self.builder(weights=None, num_classes=num_classes)
        if widths != self.default_widths():
            self._resize(model, num_classes, widths)
        return model

    def _resize(self, model: tnn.Module, num_classes: int, widths: Widths) -> None:
        """Swap every layer whose shape differs from ``widths`` for a re-initialised resized copy."""
        fresh: List[tnn.Module] = []

        def swap(name: str, new: tnn.Module) -> None:
            if replace(model, name, new):
                fresh.append(new)

        stem = widths["stem"]
        swap("conv1", conv_like(model.conv1, 3, stem))
        swap("bn1", bn_like(model.bn1, stem))
        in_ch = stem
        for i, stage in enumerate(STAGES):
            out_ch = widths["stages"][i]
            for j, block in enumerate(getattr(model, stage)):
                prefix = f"{stage}.{j}"
                # Channel chain through the block: in -> entry[0] (-> entry[1]) -> residual width.
                chain = [in_ch, *widths["blocks"][i][j], out_ch]
                for k in range(len(chain) - 1):
                    conv, bn = f"conv{k + 1}", f"bn{k + 1}"
                    swap(f"{prefix}.{conv}", conv_like(getattr(block, conv), chain[k], chain[k + 1]))
                    swap(f"{prefix}.{bn}", bn_like(getattr(block, bn), chain[k + 1]))
                if block.downsample is not None:
                    swap(f"{prefix}.downsample.0", conv_like(block.downsample[0], in_ch, out_ch))
                    swap(f"{prefix}.downsample.1", bn_like(block.downsample[1], out_ch))
                in_ch = out_ch
        swap("fc", linear_like(model.fc, in_ch, num_classes))
        for module in fresh:
            _reinit(module)

    def read_widths(self, model: tnn.Module) -> Widths:
        stages: List[tnn.Sequential] = [getattr(model, s) for s in STAGES]
        last = "conv3" if self.bottleneck else "conv2"
        return {
            "stem": model.conv1.out_channels,
            "stages": [getattr(layer[0], last).out_channels for layer in stages],
            "blocks": [[_entry(block) for block in layer] for layer in stages],
        }

    def classifier(self, model: tnn.Module) -> tnn.Linear:
        return model.fc


def _entry(block: tnn.Module) -> List[int]:
    """Hidden widths of one block: [conv1_out] (BasicBlock) or [conv1_out, conv2_out] (Bottleneck)."""
    if isinstance(block, Bottleneck):
        return [block.conv1.out_channels, block.conv2.out_channels]
    return [block.conv1.out_channels]


@register_model("resnet18")
def resnet18() -> ModelFamily:
    return TorchvisionResNetFamily(torchvision.models.resnet18, (2, 2, 2, 2), bottleneck=False)


@register_model("resnet50")
def resnet50() -> ModelFamily:
    return TorchvisionResNetFamily(torchvision.models.resnet50, (3, 4, 6, 3), bottleneck=True)
