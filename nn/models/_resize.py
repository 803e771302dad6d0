"""Make a layer "like this one but with these channel counts".

Families that reuse torchvision classes (whose constructors do not take per-layer widths) build the
default model and swap layers for resized copies. A copy keeps every hyper-parameter of the original
(kernel, stride, padding, bias, eps, momentum, device, dtype); its weights are freshly initialised with
PyTorch's defaults, so callers re-apply their family's init scheme where it differs.
"""
from __future__ import annotations

import torch.nn as tnn


def _factory(module: tnn.Module) -> dict:
    """Device and dtype of a module's first parameter, so the copy lives where the original did."""
    p = next(module.parameters(), None)
    return {} if p is None else {"device": p.device, "dtype": p.dtype}


def conv_like(conv: tnn.Conv2d, in_channels: int, out_channels: int) -> tnn.Conv2d:
    """A fresh ``Conv2d`` with ``conv``'s settings and weight shape (out_channels, in_channels, kH, kW)."""
    if conv.groups != 1:
        # Grouped/depthwise convs tie in and out channels; no family here needs them.
        raise ValueError(f"conv_like supports groups=1 only, got groups={conv.groups}")
    if (in_channels, out_channels) == (conv.in_channels, conv.out_channels):
        return conv
    return tnn.Conv2d(
        in_channels,
        out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=1,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        **_factory(conv),
    )


def bn_like(bn: tnn.BatchNorm2d, num_features: int) -> tnn.BatchNorm2d:
    """A fresh ``BatchNorm2d`` over ``num_features`` channels with ``bn``'s eps/momentum/affine flags."""
    if num_features == bn.num_features:
        return bn
    return type(bn)(
        num_features,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
        **_factory(bn),
    )


def linear_like(linear: tnn.Linear, in_features: int, out_features: int) -> tnn.Linear:
    """A fresh ``Linear`` with weight shape (out_features, in_features) and ``linear``'s bias flag."""
    if (in_features, out_features) == (linear.in_features, linear.out_features):
        return linear
    return tnn.Linear(in_features, out_features, bias=linear.bias is not None, **_factory(linear))


def layernorm_like(ln: tnn.LayerNorm, dim: int) -> tnn.LayerNorm:
    """A fresh ``LayerNorm`` over the last dimension ``dim`` with ``ln``'s eps and affine flags."""
    if tuple(ln.normalized_shape) == (dim,):
        return ln
    return tnn.LayerNorm(
        dim,
        eps=ln.eps,
        elementwise_affine=ln.elementwise_affine,
        bias=ln.bias is not None,
        **_factory(ln),
    )


def replace(root: tnn.Module, name: str, new: tnn.Module) -> bool:
    """Put ``new`` at dotted path ``name`` of ``root``; returns whether the module actually changed.

    The ``bool`` lets callers re-initialise only what was replaced (unchanged layers keep the weights
    and init of the original constructor).
    """
    if root.get_submodule(name) is new:
        return False
    root.set_submodule(name, new)
    return True
