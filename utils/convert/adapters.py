"""Per-module-type adapters: how one leaf module turns its input channels into nodes, edges and slots.

An adapter is ``fn(walk, name, module, inputs) -> value`` where ``inputs`` are the walked values of the
module's positional arguments (a :class:`Chan` for a tensor whose channels are graph nodes) and the
return value describes the output. Register one for a new layer type with::

    from utils.convert import register_module_adapter

    @register_module_adapter(MyLayer)
    def _my_layer(walk, name, module, inputs):
        x = walk.expect_chan(name, inputs[0], axis=1, consume=True)  # its input channels
        out = walk.builder.new_nodes(module.out_channels)   # its output channels
        # every output channel reads every input channel: edge r = (output r // C_in, input r % C_in)
        walk.builder.add_dense_weight_edges("conv3x3", 9, x.nodes, out, f"{name}.weight", module.weight.shape)
        return walk.produced(name, out, axis=1)

Channel-preserving layers (activations, pooling, dropout) are registered with :func:`passthrough`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, Sequence

import torch
import torch.nn as tnn

from utils.convert.graph import NODE_ATTENTION

ModuleAdapter = Callable[[Any, str, tnn.Module, Sequence[Any]], Any]
MODULE_ADAPTERS: Dict[type, ModuleAdapter] = {}


@dataclass
class Chan:
    """A tensor whose ``axis`` holds channels ``nodes`` (each repeated ``mult`` times contiguously, after a
    flatten). ``fresh``: produced by a parametric layer and not yet read by one (so summing it with another
    fresh branch merges their channels); ``sid`` identifies the channel set for that bookkeeping."""

    nodes: torch.Tensor
    axis: int  # non-negative
    ndim: int
    sid: int
    mult: int = 1
    fresh: bool = False


@dataclass
class Outside:
    """A value computed only from parameters, constants and shapes (e.g. ViT's expanded class token)."""

    params: FrozenSet[str] = field(default_factory=frozenset)


class UnsupportedLayerError(NotImplementedError):
    """The network uses a layer or operation the converter has no adapter for."""


def register_module_adapter(*module_types: type) -> Callable[[ModuleAdapter], ModuleAdapter]:
    """Decorator registering an adapter for one or more ``nn.Module`` types (subclasses match too)."""

    def deco(fn: ModuleAdapter) -> ModuleAdapter:
        for t in module_types:
            MODULE_ADAPTERS[t] = fn
        return fn

    return deco


def find_module_adapter(module: tnn.Module) -> ModuleAdapter | None:
    for cls in type(module).__mro__:  # most specific registered type wins
        if cls in MODULE_ADAPTERS:
            return MODULE_ADAPTERS[cls]
    return None


def _passthrough(walk, name, module, inputs):
    return inputs[0]


def passthrough(*module_types: type) -> None:
    """Register layers that act on each channel separately (or on space only): channels pass through."""
    register_module_adapter(*module_types)(_passthrough)


passthrough(tnn.ReLU, tnn.ReLU6, tnn.GELU, tnn.SiLU, tnn.Sigmoid, tnn.Tanh, tnn.Hardswish, tnn.Hardsigmoid,
            tnn.LeakyReLU, tnn.ELU, tnn.Mish, tnn.Dropout, tnn.Dropout2d, tnn.Identity, tnn.MaxPool2d, tnn.AvgPool2d,
            tnn.AdaptiveAvgPool2d, tnn.AdaptiveMaxPool2d)


@register_module_adapter(tnn.Flatten)
def _flatten(walk, name, module, inputs):
    return walk.reshaped(name, inputs[0])


@register_module_adapter(tnn.Conv2d)
def _conv2d(walk, name: str, conv: tnn.Conv2d, inputs):
    x = walk.expect_chan(name, inputs[0], axis=1, mult=1, consume=True)
    o, ig, kh, kw = conv.weight.shape
    g = conv.groups
    out = walk.builder.new_nodes(o)
    # Edge r = (output channel r // ig, input channel of its group r % ig): the weight's own element order,
    # so the weight is exactly the edge features' rows. Grouped/depthwise convs connect within groups only.
    walk.builder.add_dense_weight_edges(f"conv{kh}x{kw}", kh * kw, x.nodes, out, f"{name}.weight",
                                        conv.weight.shape, "rows", (o * ig, kh * kw), groups=g)
    if conv.bias is not None:
        walk.builder.attach("bias", out, {"": (f"{name}.bias", slice(None))})
    return walk.produced(name, out, axis=1)


@register_module_adapter(tnn.Linear)
def _linear(walk, name: str, lin: tnn.Linear, inputs):
    x = walk.expect_chan(name, inputs[0], axis=-1, consume=True)
    o, i = lin.weight.shape
    c, s = x.nodes.numel(), x.mult  # after a flatten each channel feeds s consecutive inputs
    if c * s != i:
        raise UnsupportedLayerError(f"{name}: Linear has {i} inputs but its input carries {c} channels x {s}")
    out = walk.builder.new_nodes(o)  # dense bipartite block: edge r = (output r // c, input r % c)
    walk.builder.add_dense_weight_edges("linear" if s == 1 else f"linear_x{s}", s, x.nodes, out, f"{name}.weight",
                                        lin.weight.shape, "rows", (o * c, s))
    if lin.bias is not None:
        walk.builder.attach("bias", out, {"": (f"{name}.bias", slice(None))})
    return walk.produced(name, out, axis=-1)


@register_module_adapter(tnn.BatchNorm1d, tnn.BatchNorm2d)
def _batchnorm(walk, name: str, bn: tnn.modules.batchnorm._BatchNorm, inputs):
    x = walk.expect_chan(name, inputs[0], axis=1, mult=1)
    entries = {}
    if bn.affine:
        entries.update(weight=(f"{name}.weight", slice(None)), bias=(f"{name}.bias", slice(None)))
    if bn.track_running_stats:
        entries.update(running_mean=(f"{name}.running_mean", slice(None)),
                       running_var=(f"{name}.running_var", slice(None)))
    if entries:
        walk.builder.attach("bn", x.nodes, entries)
    return x


@register_module_adapter(tnn.LayerNorm)
def _layernorm(walk, name: str, ln: tnn.LayerNorm, inputs):
    x = walk.expect_chan(name, inputs[0], axis=-1, mult=1)
    if tuple(ln.normalized_shape) != (x.nodes.numel(),):
        raise UnsupportedLayerError(f"{name}: LayerNorm over {tuple(ln.normalized_shape)} is not over the channels")
    if ln.elementwise_affine:
        entries = {"weight": (f"{name}.weight", slice(None))}
        if ln.bias is not None:
            entries["bias"] = (f"{name}.bias", slice(None))
        walk.builder.attach("ln", x.nodes, entries)
    return x


@register_module_adapter(tnn.MultiheadAttention)
def _mha(walk, name: str, mha: tnn.MultiheadAttention, inputs):
    if len(inputs) < 3 or not all(isinstance(v, Chan) for v in inputs[:3]) or not (
            inputs[0].sid == inputs[1].sid == inputs[2].sid):
        raise UnsupportedLayerError(f"{name}: only self-attention (query = key = value) is supported")
    if not (mha._qkv_same_embed_dim and mha.batch_first):
        raise UnsupportedLayerError(f"{name}: needs a packed in_proj (kdim = vdim = embed_dim) and batch_first=True")
    x = walk.expect_chan(name, inputs[0], axis=-1, mult=1, consume=True)
    e = mha.embed_dim
    # One attention node per (q, k, v) channel triple; permuting them consistently within heads keeps the
    # function, so the triple is one edge with 3 features from every residual channel.
    att = walk.builder.new_nodes(e, NODE_ATTENTION)
    c = x.nodes.numel()
    walk.builder.add_dense_weight_edges("attn_qkv", 3, x.nodes, att, f"{name}.in_proj_weight",
                                        mha.in_proj_weight.shape, "qkv", (e,))
    if mha.in_proj_bias is not None:
        walk.builder.attach("qkv_bias", att, {k: (f"{name}.in_proj_bias", slice(i * e, (i + 1) * e))
                                              for i, k in enumerate("qkv")})
    walk.builder.module_nodes[f"{name}.in_proj"] = att
    out = walk.builder.new_nodes(e)
    walk.builder.add_dense_weight_edges("linear", 1, att, out, f"{name}.out_proj.weight",
                                        mha.out_proj.weight.shape, "rows", (e * e, 1))
    if mha.out_proj.bias is not None:
        walk.builder.attach("bias", out, {"": (f"{name}.out_proj.bias", slice(None))})
    return (walk.produced(name, out, axis=-1), Outside())
