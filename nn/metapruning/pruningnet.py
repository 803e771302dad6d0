"""The PruningNet of MetaPruning (Liu et al., ICCV 2019): one network that stands in for every width choice.

A candidate is a *choice vector* ``c`` (one index per gene into ``ratios``); gene ``g`` then has
``round(ratios[c_g] * default_g)`` channels. For each conv a small MLP maps the width ratios of its input
and output, ``(r_in, r_out)``, to the weight of the full-width conv, which is cropped to the first
``(c_out, c_in)`` filters and channels. Each BN keeps one BatchNorm per width choice (the statistics of a
layer differ a lot between widths); the classifier is shared and cropped. Trained with a fresh random
choice vector every step, the PruningNet then scores any candidate in one forward pass, without training it.
"""
from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence

import torch
import torch.nn as tnn
import torch.nn.functional as F

from nn.metapruning.families import ConvSpec, FamilyAdapter, LayerOps
from nn.models import create_model
from utils.pruning.macs import MacCounter
from utils.train import batchnorms_in_train_mode

Choice = tuple[int, ...]


class WidthSpace:
    """The searchable widths: per gene, the channel count of each ratio.

    Args:
        defaults: default channels of each gene (the unpruned network).
        ratios: ascending width ratios in (0, 1]; the last must be 1 so the widest choice is the default.
    """

    def __init__(self, defaults: Sequence[int], ratios: Sequence[float]) -> None:
        ratios = [float(r) for r in ratios]
        if not ratios or sorted(ratios) != ratios or ratios[0] <= 0 or ratios[-1] != 1.0:
            raise ValueError(f"width ratios must ascend within (0, 1] and end at 1.0, got {ratios}")
        self.defaults, self.ratios = [int(d) for d in defaults], ratios
        self.table = [[max(1, round(r * d)) for r in ratios] for d in self.defaults]  # (genes, choices)

    @property
    def num_genes(self) -> int:
        return len(self.defaults)

    @property
    def num_choices(self) -> int:
        return len(self.ratios)

    def channels(self, choice: Sequence[int]) -> list[int]:
        return [self.table[g][k] for g, k in enumerate(choice)]

    def full(self) -> Choice:
        return (self.num_choices - 1,) * self.num_genes

    def narrowest(self) -> Choice:
        return (0,) * self.num_genes

    def sample(self, rng: random.Random) -> Choice:
        return tuple(rng.randrange(self.num_choices) for _ in range(self.num_genes))


class WeightGenerator(tnn.Module):
    """``(r_in, r_out)`` -> full conv weight (out, in, k, k): ``Linear(2, h)``-ReLU-``Linear(h, out*in*k*k)``.

    The second layer's output is scaled by ``1/sqrt(h)`` with basis weights at the zoo's Kaiming scale, so
    the generated weight starts at the usual scale and SGD moves it about as fast as a plain conv weight.
    """

    def __init__(self, spec: ConvSpec, hidden: int) -> None:
        super().__init__()
        self.shape = (spec.out_default, spec.in_default, spec.kernel, spec.kernel)
        self.hidden = hidden
        self.fc1 = tnn.Linear(2, hidden)
        self.fc2 = tnn.Linear(hidden, math.prod(self.shape), bias=False)
        tnn.init.normal_(self.fc1.weight, std=0.5)
        tnn.init.ones_(self.fc1.bias)  # hidden units start active and close to 1 for every ratio
        std = math.sqrt(2.0 / (spec.out_default * spec.kernel * spec.kernel))  # Kaiming, fan_out (as the zoo)
        tnn.init.normal_(self.fc2.weight, std=std)

    def forward(self, ratios: torch.Tensor, out_ch: int, in_ch: int) -> torch.Tensor:
        h = F.relu(self.fc1(ratios))  # (hidden,)
        weight = (self.fc2(h) / math.sqrt(self.hidden)).view(self.shape)  # (out, in, k, k)
        return weight[:out_ch, :in_ch]


def _key(name: str) -> str:
    return name.replace(".", "_")  # ModuleDict keys cannot contain dots


class PruningNet(tnn.Module):
    """Weight-generating stand-in for every width choice of one zoo family.

    ``forward(x (B, 3, H, W), choice) -> logits (B, num_classes)``.

    Args:
        adapter: the family's genes, layers and forward (:func:`nn.metapruning.families.adapter_for`).
        num_classes: classifier outputs.
        ratios: the width ratios of :class:`WidthSpace`.
        hidden: hidden units of each weight-generating MLP (its parameters are ``hidden`` x conv weight).
    """

    def __init__(self, adapter: FamilyAdapter, num_classes: int, ratios: Sequence[float], hidden: int = 32) -> None:
        super().__init__()
        self.adapter, self.space = adapter, WidthSpace(adapter.defaults, ratios)
        self.num_classes = num_classes
        self.specs = {c.name: c for c in adapter.convs}
        self.norm_genes = {n.name: n.gene for n in adapter.norms}
        self.generators = tnn.ModuleDict({_key(c.name): WeightGenerator(c, hidden) for c in adapter.convs})
        self.norms = tnn.ModuleDict({_key(n.name): tnn.ModuleList(tnn.BatchNorm2d(ch) for ch in self.space.table[n.gene])
                                     for n in adapter.norms})
        self.head = tnn.Linear(adapter.defaults[adapter.head_gene], num_classes)

    def _ratio(self, gene: int | None, choice: Choice) -> float:
        return 1.0 if gene is None else self.space.ratios[choice[gene]]

    def generate(self, choice: Choice) -> dict[str, torch.Tensor]:
        """Conv name -> cropped weight (c_out, c_in, k, k) for ``choice``."""
        channels, device = self.space.channels(choice), self.head.weight.device
        out = {}
        for name, spec in self.specs.items():
            r = torch.tensor([self._ratio(spec.in_gene, choice), self._ratio(spec.out_gene, choice)], device=device)
            c_in = spec.in_default if spec.in_gene is None else channels[spec.in_gene]
            out[name] = self.generators[_key(name)](r, channels[spec.out_gene], c_in)
        return out

    def norm_for(self, name: str, choice: Choice) -> tnn.BatchNorm2d:
        return self.norms[_key(name)][choice[self.norm_genes[name]]]

    def active_norms(self, choice: Choice) -> list[tnn.BatchNorm2d]:
        return [self.norm_for(name, choice) for name in self.norm_genes]

    def forward(self, x: torch.Tensor, choice: Choice, weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        ops = _BoundOps(self, choice, self.generate(choice) if weights is None else weights)
        return self.adapter.forward(ops, x)

    def export_state(self, choice: Choice) -> dict[str, torch.Tensor]:
        """The zoo state dict of the network at ``choice`` with the generated weights and this choice's BNs."""
        weights, channels = self.generate(choice), self.space.channels(choice)
        state: dict[str, torch.Tensor] = {}
        for name, w in weights.items():
            state[f"{name}.weight"] = w.detach().clone()
            if self.specs[name].bias:
                state[f"{name}.bias"] = torch.zeros(w.shape[0], device=w.device)
        for name in self.norm_genes:
            for k, v in self.norm_for(name, choice).state_dict().items():
                state[f"{name}.{k}"] = v.detach().clone()
        c = channels[self.adapter.head_gene]
        state[f"{self.adapter.head}.weight"] = self.head.weight[:, :c].detach().clone()
        state[f"{self.adapter.head}.bias"] = self.head.bias.detach().clone()
        return state

    def export(self, model_name: str, choice: Choice, **kwargs) -> tnn.Module:
        """A plain zoo network at ``choice``'s widths carrying the generated weights (same device)."""
        model = create_model(model_name, num_classes=self.num_classes, widths=self.widths(choice), **kwargs)
        model.load_state_dict(self.export_state(choice), strict=True)
        return model.to(self.head.weight.device)

    def widths(self, choice: Choice) -> dict:
        return self.adapter.widths(self.space.channels(choice))


class _BoundOps(LayerOps):
    def __init__(self, net: PruningNet, choice: Choice, weights: dict[str, torch.Tensor]) -> None:
        self.net, self.choice, self.weights = net, choice, weights

    def conv(self, name: str, x: torch.Tensor) -> torch.Tensor:
        spec = self.net.specs[name]
        return F.conv2d(x, self.weights[name], stride=spec.stride, padding=spec.padding)

    def norm(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.net.norm_for(name, self.choice)(x)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.net.head.weight[:, :x.shape[1]], self.net.head.bias)


class RandomWidthNet(tnn.Module):
    """What the training loop trains: a fresh uniformly random choice per training batch, full width in eval.

    Draws from torch's global RNG, which ``utils.train.fit`` seeds per epoch, so a resumed training run
    samples the same widths as an uninterrupted one. In eval mode (the loop's per-epoch validation) the
    full-width BNs normalise with the batch's statistics: their running statistics were gathered under
    random neighbouring widths and mean little before recalibration.
    """

    def __init__(self, net: PruningNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        space = self.net.space
        if not self.training:
            norms = self.net.active_norms(space.full())
            momenta = [bn.momentum for bn in norms]
            for bn in norms:  # batch statistics; momentum 0 leaves the running statistics untouched
                bn.train()
                bn.momentum = 0.0
            try:
                return self.net(x, space.full())
            finally:
                for bn, m in zip(norms, momenta):
                    bn.eval()
                    bn.momentum = m
        choice = tuple(torch.randint(space.num_choices, (space.num_genes,)).tolist())
        return self.net(x, choice)


class FixedWidthNet(tnn.Module):
    """The PruningNet frozen at one choice, its weights generated once (for ``utils.train.evaluate``)."""

    def __init__(self, net: PruningNet, choice: Choice) -> None:
        super().__init__()
        self.net, self.choice = net, choice
        with torch.no_grad():
            self.weights = net.generate(choice)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x, self.choice, self.weights)


@torch.no_grad()
def recalibrate_bn(net: PruningNet, choice: Choice, batches: Iterable[torch.Tensor]) -> None:
    """Re-estimate the running statistics of ``choice``'s BNs on training images (cumulative average).

    The statistics gathered while training with random widths belong to mixed neighbouring layers, so
    MetaPruning recomputes them for each candidate before scoring it.
    """
    was_training = net.training
    with batchnorms_in_train_mode(net.active_norms(choice), None, reset=True):  # exact average since the reset
        net.train()
        weights = net.generate(choice)
        for x in batches:
            net(x, choice, weights)
    net.train(was_training)


class MacTable:
    """Exact MACs of the zoo network at any choice, without building it.

    One meta-device zoo network at default widths is traced once by :class:`utils.pruning.macs.MacCounter`;
    a query writes the choice's channel counts into its modules' channel attributes and re-counts, which is
    what the counter does after in-place pruning. Equal to counting the exported network (tested).
    """

    def __init__(self, net: PruningNet, model_name: str, example: torch.Tensor, **kwargs) -> None:
        self.space, adapter = net.space, net.adapter
        with torch.device("meta"):
            self.model = create_model(model_name, num_classes=net.num_classes, **kwargs)
        self.counter = MacCounter(self.model, example.to("meta"))
        if not self.counter.exact:
            raise ValueError(f"{model_name} cannot be traced for MAC counting at input {tuple(example.shape)}")
        modules = dict(self.model.named_modules())
        self.convs = [(modules[c.name], c.in_gene, c.out_gene) for c in adapter.convs]
        self.norms = [(modules[n.name], n.gene) for n in adapter.norms]
        self.head = (modules[adapter.head], adapter.head_gene)
        self.cache: dict[Choice, int] = {}

    def __call__(self, choice: Choice) -> int:
        choice = tuple(int(k) for k in choice)
        if choice not in self.cache:
            ch = self.space.channels(choice)
            for conv, g_in, g_out in self.convs:
                if g_in is not None:
                    conv.in_channels = ch[g_in]
                conv.out_channels = ch[g_out]
            for bn, g in self.norms:
                bn.num_features = ch[g]
            self.head[0].in_features = ch[self.head[1]]
            self.cache[choice] = self.counter()
        return self.cache[choice]
