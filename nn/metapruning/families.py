"""What MetaPruning needs to know about a zoo family: its width genes, its layers and its forward pass.

A *gene* is one independently searchable width. Widths that the architecture couples share one gene: in a
CIFAR ResNet every block of a stage adds into the same residual stream, so the stem, the ``conv2`` of every
block and the downsample shortcut of a stage all read one stage gene (``check_coupling`` of the zoo demands
``stem == stages[0]``); only each block's hidden width (``conv1`` output) is free. In VGG every conv is free.

Layers are named exactly like the zoo model's modules (``layer2.0.conv1``, ``features.3``, ``fc``), so the
same description builds the PruningNet, counts MACs on a zoo network and exports generated weights into a
zoo state dict with ``strict=True``. Adapters are registered by zoo family class, not by model name, so every
depth of a family is supported at once.
"""
from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from nn.models import get_family, list_models
from nn.models.cifar_resnet import CifarResNetFamily
from nn.models.registry import ModelFamily, Widths
from nn.models.vgg import VGGFamily
from utils.registry import Registry


@dataclass(frozen=True)
class ConvSpec:
    """A conv whose weight the PruningNet generates; ``in_gene=None`` means the image channels."""

    name: str
    in_gene: int | None
    out_gene: int
    in_default: int
    out_default: int
    kernel: int
    stride: int = 1
    padding: int = 1
    bias: bool = False  # the zoo conv has a bias; it is exported as zero (a BN follows, which absorbs it)


@dataclass(frozen=True)
class NormSpec:
    """A BatchNorm after a conv; the PruningNet keeps one per width choice of ``gene``."""

    name: str
    gene: int


class FamilyAdapter(abc.ABC):
    """Genes, layers and a functional forward of one zoo family.

    Attributes:
        gene_names: one name per gene (for logs and the search state).
        defaults: default channel count of each gene (the unpruned network).
        convs, norms: every conv and BN of the zoo network, named like its modules.
        head: name of the classifier ``Linear``; ``head_gene`` feeds it.
    """

    gene_names: list[str]
    defaults: list[int]
    convs: list[ConvSpec]
    norms: list[NormSpec]
    head: str
    head_gene: int

    @abc.abstractmethod
    def widths(self, channels: Sequence[int]) -> Widths:
        """Zoo widths description of the network with ``channels[g]`` channels for gene ``g``."""

    @abc.abstractmethod
    def forward(self, ops: LayerOps, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, num_classes), calling ``ops.conv/norm/linear`` by layer name."""


class LayerOps(abc.ABC):
    """The layer calls an adapter's forward makes; the PruningNet binds them to generated weights."""

    @abc.abstractmethod
    def conv(self, name: str, x: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def norm(self, name: str, x: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def linear(self, x: torch.Tensor) -> torch.Tensor: ...


ADAPTERS: Registry[Callable[[ModelFamily], FamilyAdapter]] = Registry("MetaPruning family adapter")


class ResNetAdapter(FamilyAdapter):
    """CIFAR ResNet (any depth 6n+2): genes = 3 stage widths (coupled stream) + 3n block hidden widths."""

    def __init__(self, family: CifarResNetFamily) -> None:
        n, stages = family.n, family.default_widths()["stages"]
        self.n = n
        self.gene_names = [f"stage{i + 1}" for i in range(3)] + [f"layer{i + 1}.{j}" for i in range(3) for j in range(n)]
        self.defaults = list(stages) + [stages[i] for i in range(3) for _ in range(n)]
        self.convs = [ConvSpec("conv1", None, 0, 3, stages[0], 3)]
        self.norms = [NormSpec("bn1", 0)]
        for i in range(3):
            for j in range(n):
                p, hidden, stride = f"layer{i + 1}.{j}", 3 + i * n + j, 2 if i > 0 and j == 0 else 1
                prev = i if j > 0 or i == 0 else i - 1  # gene of the residual stream entering the block
                self.convs += [ConvSpec(f"{p}.conv1", prev, hidden, stages[prev], stages[i], 3, stride),
                               ConvSpec(f"{p}.conv2", hidden, i, stages[i], stages[i], 3)]
                self.norms += [NormSpec(f"{p}.bn1", hidden), NormSpec(f"{p}.bn2", i)]
                if i > 0 and j == 0:
                    self.convs.append(ConvSpec(f"{p}.downsample.0", prev, i, stages[prev], stages[i], 1, stride, 0))
                    self.norms.append(NormSpec(f"{p}.downsample.1", i))
        self.head, self.head_gene = "fc", 2

    def widths(self, channels: Sequence[int]) -> Widths:
        c = [int(v) for v in channels]
        return {"stem": c[0], "stages": c[:3], "blocks": [c[3 + i * self.n: 3 + (i + 1) * self.n] for i in range(3)]}

    def forward(self, ops: LayerOps, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(ops.norm("bn1", ops.conv("conv1", x)))  # (B, stage1, H, W)
        for i in range(3):
            for j in range(self.n):
                p = f"layer{i + 1}.{j}"
                shortcut = x
                if i > 0 and j == 0:
                    shortcut = ops.norm(f"{p}.downsample.1", ops.conv(f"{p}.downsample.0", x))
                out = F.relu(ops.norm(f"{p}.bn1", ops.conv(f"{p}.conv1", x)))  # (B, hidden, H/s, W/s)
                x = F.relu(ops.norm(f"{p}.bn2", ops.conv(f"{p}.conv2", out)) + shortcut)  # (B, stage, H/s, W/s)
        return ops.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class VGGAdapter(FamilyAdapter):
    """VGG with BN: one gene per conv; module names follow ``VGG.features`` (conv, BN, ReLU, pools)."""

    def __init__(self, family: VGGFamily) -> None:
        self.plan: list[Any] = []  # ("conv", conv name, norm name) or ("pool",)
        self.convs, self.norms, self.gene_names, self.defaults = [], [], [], []
        index, in_ch = 0, 3
        for item in family.config:
            if item == "M":
                self.plan.append(("pool",))
                index += 1
                continue
            gene = len(self.defaults)
            self.gene_names.append(f"conv{gene + 1}")
            self.defaults.append(int(item))
            self.convs.append(ConvSpec(f"features.{index}", gene - 1 if gene else None, gene, in_ch, int(item), 3, bias=True))
            self.norms.append(NormSpec(f"features.{index + 1}", gene))
            self.plan.append(("conv", f"features.{index}", f"features.{index + 1}"))
            index, in_ch = index + 3, int(item)
        self.head, self.head_gene = "classifier", len(self.defaults) - 1

    def widths(self, channels: Sequence[int]) -> Widths:
        return {"convs": [int(v) for v in channels]}

    def forward(self, ops: LayerOps, x: torch.Tensor) -> torch.Tensor:
        for step in self.plan:
            x = F.max_pool2d(x, 2) if step[0] == "pool" else F.relu(ops.norm(step[2], ops.conv(step[1], x)))
        return ops.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


ADAPTERS.register(CifarResNetFamily.__name__)(ResNetAdapter)
ADAPTERS.register(VGGFamily.__name__)(VGGAdapter)


def supported_models() -> list[str]:
    """Zoo model names whose family has an adapter."""
    return [m for m in list_models() if type(get_family(m)).__name__ in ADAPTERS]


def adapter_for(model_name: str) -> FamilyAdapter:
    """The adapter of a zoo model; other models raise ``ValueError`` naming the supported ones."""
    family = get_family(model_name)
    kind = type(family).__name__
    if kind not in ADAPTERS:
        raise ValueError(f"MetaPruning has no PruningNet for model={model_name} ({kind}); supported models: "
                         f"{', '.join(supported_models())}")
    return ADAPTERS.get(kind)(family)
