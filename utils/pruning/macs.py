"""Exact, fast MAC counting during progressive pruning.

Torch-Pruning's ``count_ops_and_params`` deep-copies the model and runs a hooked forward pass; over the
~200 small steps of progressive pruning that dominated the published loop. Pruning changes only channel
counts, never spatial sizes or sequence lengths, so :class:`MacCounter` traces the network once (torch.fx
plus shape propagation) and afterwards rebuilds each counted layer's input/output shapes from the layers'
current channel counts and calls Torch-Pruning's *own* per-layer counting hooks on meta tensors (no data,
no computation). The result equals ``count_ops_and_params`` exactly (tested on pruned networks).
"""
from __future__ import annotations

import logging
from typing import Callable, List, Optional, Tuple

import torch
import torch.fx as fx
import torch_pruning as tp
from torch.fx.passes.shape_prop import ShapeProp
from torch_pruning.utils import op_counter

log = logging.getLogger(__name__)

_Term = Callable[[], int]


def count_macs_params(model: torch.nn.Module, example_input: torch.Tensor) -> Tuple[int, int]:
    """Torch-Pruning's reference count (slow: deep copy + forward). MACs and parameters."""
    macs, params = tp.utils.count_ops_and_params(model, example_input)
    return int(macs), int(params)


def _shape(node: fx.Node) -> Tuple[int, ...]:
    meta = node.meta.get("tensor_meta")
    if isinstance(meta, (tuple, list)) and not hasattr(meta, "shape"):
        meta = next(m for m in meta if hasattr(m, "shape"))
    return tuple(meta.shape)


def _channels(module: torch.nn.Module) -> Optional[int]:
    """Current output channel count of a layer that has one (after in-place pruning)."""
    if isinstance(module, torch.nn.modules.conv._ConvNd):
        return module.out_channels
    if isinstance(module, torch.nn.Linear):
        return module.out_features
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
        return module.num_features
    if isinstance(module, torch.nn.LayerNorm):
        return module.normalized_shape[-1]
    if isinstance(module, torch.nn.MultiheadAttention):
        return module.embed_dim
    return None


class MacCounter:
    """``counter()`` -> current MACs of ``model`` as Torch-Pruning counts them, in microseconds."""

    def __init__(self, model: torch.nn.Module, example_input: torch.Tensor) -> None:
        self.model, self.example_input = model, example_input
        self.terms: List[_Term] = []
        self.exact = True
        try:
            self._trace()
        except Exception as err:  # untraceable network: fall back to the reference counter
            log.warning("fast MAC counting unavailable (%s); using Torch-Pruning's counter", err)
            self.exact = False

    def _trace(self) -> None:
        was_training = self.model.training
        self.model.eval()
        try:
            gm = fx.symbolic_trace(self.model)
            with torch.no_grad():
                ShapeProp(gm).propagate(self.example_input[:1])
        finally:
            self.model.train(was_training)
        modules = dict(self.model.named_modules())
        for node in gm.graph.nodes:
            if node.op != "call_module" or not op_counter.is_supported_instance(modules[node.target]):
                continue
            module = modules[node.target]
            hook = op_counter.MODULES_MAPPING.get(type(module)) or op_counter.CUSTOM_MODULES_MAPPING[type(module)]
            in_shapes = [_shape(a) for a in node.args if isinstance(a, fx.Node)]
            out_shape = _shape(node)
            if _channels(module) is not None:
                self.terms.append(self._parametric(module, hook, in_shapes, out_shape))
            else:  # activations and pooling: their numel scales with the channels of what feeds them
                source, traced = self._source(node.args[0], modules)
                self.terms.append(self._scaled(module, hook, in_shapes[0], out_shape, source, traced))

    def _source(self, node: fx.Node, modules) -> Tuple[Callable[[], int], int]:
        while True:
            if node.op == "placeholder":
                c = _shape(node)[1]
                return (lambda: c), c
            if node.op == "call_module" and _channels(modules[node.target]) is not None:
                m = modules[node.target]
                return (lambda: _channels(m)), _channels(m)
            args = [a for a in node.args if isinstance(a, fx.Node)]
            if not args or node.target in (torch.cat, torch.concat):
                raise ValueError(f"cannot follow the channels of {node.name}")
            node = args[0]

    @staticmethod
    def _call(module, hook, inputs, output) -> int:
        module.__flops__ = 0
        try:
            hook(module, inputs, output)
            return int(module.__flops__)
        finally:
            del module.__flops__

    def _parametric(self, module, hook, in_shapes, out_shape) -> _Term:
        def meta(shape, channels, axis):
            shape = list(shape)
            shape[axis] = channels
            return torch.empty(shape, device="meta")

        if isinstance(module, torch.nn.MultiheadAttention):
            def term() -> int:
                e = module.embed_dim
                qkv = tuple(meta(s, e, -1) for s in in_shapes[:3])
                return self._call(module, hook, qkv, (meta(out_shape, e, -1), None))
            return term
        axis = -1 if isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm)) else 1

        def term() -> int:
            c_in = module.in_channels if hasattr(module, "in_channels") else (
                module.in_features if isinstance(module, torch.nn.Linear) else _channels(module))
            return self._call(module, hook, (meta(in_shapes[0], c_in, axis),), meta(out_shape, _channels(module), axis))
        return term

    def _scaled(self, module, hook, in_shape, out_shape, source, traced) -> _Term:
        n_in, n_out = torch.Size(in_shape).numel() // traced, torch.Size(out_shape).numel() // traced

        def term() -> int:
            c = source()
            return self._call(module, hook, (torch.empty(n_in * c, device="meta"),), torch.empty(n_out * c, device="meta"))
        return term

    def __call__(self) -> int:
        if not self.exact:
            return count_macs_params(self.model, self.example_input[:1])[0]
        return sum(term() for term in self.terms)

    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())
