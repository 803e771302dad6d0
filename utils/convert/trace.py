"""Walk a torch.fx trace of a network and build its graph layout.

The network is traced symbolically (leaf modules from ``torch.nn`` stay opaque), shapes are propagated
with one forward pass in eval mode (so nothing in the model changes), and every fx node is given a value:
a :class:`Chan` for tensors whose channels are graph nodes, :class:`Outside` for values computed from
parameters and shapes only, tuples, or plain constants. Leaf modules go to the adapters in
``adapters.py``; functions and tensor methods go to the handlers below. Anything else that touches
channels fails with :class:`UnsupportedLayerError` naming the layer.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Callable, Dict, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from utils.convert.adapters import Chan, Outside, UnsupportedLayerError, find_module_adapter
from utils.convert.builder import GraphBuilder
from utils.convert.graph import NODE_INPUT, GraphLayout

Handler = Callable[["Walk", Sequence[Any], Dict[str, Any]], Any]
HANDLERS: Dict[Any, Handler] = {}  # keys: functions, or method names as strings


def handles(*targets: Any) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        for t in targets:
            HANDLERS[t] = fn
        return fn

    return deco


def _walk_values(obj: Any):
    if isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _walk_values(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _walk_values(o)
    else:
        yield obj


class Walk:
    """State of one walk over an fx graph."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.builder = GraphBuilder()
        self.consumed: set[int] = set()
        self._sid = 0
        self.node: Optional[fx.Node] = None

    # -- helpers used by adapters and handlers ---------------------------------------------------------
    def where(self) -> str:
        stack = self.node.meta.get("nn_module_stack") if self.node is not None else None
        path = list(stack.values())[-1][0] if stack else ""
        return f"{path or '<top level>'} (fx node {self.node.name if self.node is not None else '?'})"

    def new_sid(self) -> int:
        self._sid += 1
        return self._sid

    def _meta_shape(self, node: Any) -> tuple:
        meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        if isinstance(meta, (tuple, list)) and not hasattr(meta, "shape"):  # tuple output, e.g. attention
            meta = next((m for m in meta if hasattr(m, "shape")), None)
        if meta is None:
            raise UnsupportedLayerError(f"{self.where()}: no shape information for {node}")
        return tuple(meta.shape)

    def out_shape(self) -> tuple:
        return self._meta_shape(self.node)

    def in_shape(self, i: int = 0) -> tuple:
        return self._meta_shape(self.node.args[i])

    def expect_chan(self, name: str, value: Any, axis: int, mult: Optional[int] = None,
                    consume: bool = False) -> Chan:
        if not isinstance(value, Chan):
            raise UnsupportedLayerError(f"{name}: its input is not a tensor of traced channels ({type(value).__name__})")
        if value.axis != axis % value.ndim:
            raise UnsupportedLayerError(f"{name}: expects channels on axis {axis}, found them on axis {value.axis}")
        if mult is not None and value.mult != mult:
            raise UnsupportedLayerError(f"{name}: its input holds {value.mult} values per channel (after a flatten)")
        if consume:
            self.consumed.add(value.sid)
        return value

    def produced(self, name: str, nodes: torch.Tensor, axis: int) -> Chan:
        """Output channels ``nodes`` of parametric layer ``name`` (fresh: may merge with another branch)."""
        ndim = len(self.out_shape())
        self.builder.module_nodes[name] = nodes
        return Chan(nodes, axis % ndim, ndim, self.new_sid(), 1, fresh=True)

    def like(self, x: Chan, axis: int, mult: int, ndim: int) -> Chan:
        return Chan(x.nodes, axis, ndim, x.sid, mult, x.fresh)

    def reshaped(self, where: str, x: Any) -> Any:
        """Follow the channel axis through a reshape/view/flatten using the traced shapes."""
        if not isinstance(x, Chan):
            return x
        a_shape, b_shape = self.in_shape(0), self.out_shape()
        c = x.nodes.numel()
        lead, block = math.prod(a_shape[: x.axis]), x.mult * math.prod(a_shape[x.axis + 1:])
        for b in range(len(b_shape)):
            if math.prod(b_shape[:b]) != lead or b_shape[b] % c:
                continue
            mult = b_shape[b] // c
            if mult * math.prod(b_shape[b + 1:]) == block:
                return self.like(x, b, mult, len(b_shape))
        raise UnsupportedLayerError(f"{where}: reshape {a_shape} -> {b_shape} splits the {c} channels across axes")

    # -- the walk ----------------------------------------------------------------------------------------
    def value(self, arg: Any, env: Dict[fx.Node, Any]) -> Any:
        return fx.node.map_aggregate(arg, lambda a: env[a] if isinstance(a, fx.Node) else a)

    def run(self) -> Optional[torch.Tensor]:
        env: Dict[fx.Node, Any] = {}
        output_nodes = None
        for node in self.gm.graph.nodes:
            self.node = node
            if node.op == "placeholder":
                shape = self.out_shape()
                env[node] = Chan(self.builder.new_nodes(shape[1], NODE_INPUT), 1, len(shape), self.new_sid())
            elif node.op == "get_attr":
                env[node] = Outside(frozenset({node.target}))
            elif node.op == "call_module":
                module = self.modules[node.target]
                adapter = find_module_adapter(module)
                inputs = self.value(node.args, env)
                if adapter is None:
                    if not any(isinstance(v, Chan) for v in _walk_values(inputs)):
                        env[node] = Outside()
                        continue
                    raise UnsupportedLayerError(
                        f"module {node.target!r} ({type(module).__module__}.{type(module).__qualname__}) has no graph "
                        "adapter. Register one with @utils.convert.register_module_adapter("
                        f"{type(module).__name__}) (see utils/convert/adapters.py), or with "
                        "utils.convert.passthrough(...) if it acts on each channel separately."
                    )
                env[node] = adapter(self, node.target, module, inputs)
            elif node.op in ("call_function", "call_method"):
                args, kwargs = self.value(node.args, env), self.value(node.kwargs, env)
                handler = HANDLERS.get(node.target)
                if handler is None:
                    if any(isinstance(v, Chan) for v in _walk_values((args, kwargs))):
                        op = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.target)
                        raise UnsupportedLayerError(
                            f"{self.where()}: operation {op!r} on traced channels is not supported. Add a handler "
                            "with @utils.convert.trace.handles(...) (see utils/convert/trace.py).")
                    env[node] = Outside(frozenset().union(*[v.params for v in _walk_values((args, kwargs))
                                                            if isinstance(v, Outside)]))
                else:
                    env[node] = handler(self, args, kwargs)
            elif node.op == "output":
                out = self.value(node.args[0], env)
                chans = [v for v in _walk_values(out) if isinstance(v, Chan)]
                output_nodes = torch.cat([c.nodes for c in chans]) if chans else None
        return output_nodes


def trace_layout(model: torch.nn.Module, example_input: torch.Tensor, arch: Optional[dict] = None) -> GraphLayout:
    """Trace ``model`` once and build its :class:`GraphLayout` (no parameter of ``model`` changes)."""
    was_training = model.training
    model.eval()
    try:
        gm = fx.symbolic_trace(model)
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
        walk = Walk(gm)
        output_nodes = walk.run()
    finally:
        model.train(was_training)
    buffers = {k for k, _ in model.named_buffers()}
    layout = walk.builder.finalize(model.state_dict(), buffers, output_nodes, arch)
    unexplained = [k for k in layout.extras if k in dict(model.named_parameters()) and k not in walk.builder.outside]
    if unexplained:
        raise UnsupportedLayerError(f"parameters {unexplained} are used in a way the converter does not understand "
                                    "(not by a supported layer, nor added/concatenated outside the channels)")
    return layout


# -- handlers for functions and tensor methods -------------------------------------------------------------
def _first_chan(args: Sequence[Any]) -> Any:
    return next((a for a in _walk_values(args) if isinstance(a, Chan)), args[0] if args else None)


@handles(F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.leaky_relu, torch.sigmoid, torch.tanh,
         F.dropout, F.adaptive_avg_pool2d, F.avg_pool2d, F.max_pool2d, torch.nn.functional.adaptive_max_pool2d,
         "relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "float")
def _channelwise(walk: Walk, args, kwargs):
    return _first_chan(args)


@handles(operator.mul, operator.truediv, operator.neg, torch.mul, "mul", "div")
def _scale(walk: Walk, args, kwargs):
    others = [a for a in args if not isinstance(a, Chan)]
    if any(isinstance(o, Outside) and o.params for o in others) or sum(isinstance(a, Chan) for a in args) > 1:
        raise UnsupportedLayerError(f"{walk.where()}: multiplying channels by parameters or by each other "
                                    "is not supported")
    return _first_chan(args)


@handles(operator.add, operator.iadd, torch.add, "add", "add_")
def _add(walk: Walk, args, kwargs):
    a, b = args[0], args[1]
    chans = [v for v in (a, b) if isinstance(v, Chan)]
    for v in (a, b):
        if isinstance(v, Outside):
            walk.builder.outside |= v.params  # e.g. ViT's position embedding: copied, not a graph feature
    if len(chans) < 2:
        return chans[0] if chans else Outside(frozenset().union(*[v.params for v in (a, b) if isinstance(v, Outside)]))
    if (a.axis, a.mult, a.nodes.numel()) != (b.axis, b.mult, b.nodes.numel()):
        raise UnsupportedLayerError(f"{walk.where()}: adds tensors whose channels do not line up")
    if a.sid == b.sid:
        return a
    fresh_a, fresh_b = a.fresh and a.sid not in walk.consumed, b.fresh and b.sid not in walk.consumed
    if fresh_a and fresh_b:  # two parametric branches summed: the same channels
        walk.builder.merge(a.nodes, b.nodes)
        return a
    if fresh_a or fresh_b:  # a parametric branch plus a shortcut: identity edges into the branch's channels
        new, old = (a, b) if fresh_a else (b, a)
        walk.builder.add_constant_edges("identity", old.nodes, new.nodes)
        return new
    nodes = walk.builder.new_nodes(a.nodes.numel())
    walk.builder.add_constant_edges("identity", torch.cat([a.nodes, b.nodes]), torch.cat([nodes, nodes]))
    return Chan(nodes, a.axis, a.ndim, walk.new_sid(), a.mult, fresh=True)


@handles(torch.cat, torch.concat)
def _cat(walk: Walk, args, kwargs):
    tensors = list(args[0])
    ndim = len(walk.out_shape())
    dim = (args[1] if len(args) > 1 else kwargs.get("dim", 0)) % ndim
    chans = [t for t in tensors if isinstance(t, Chan)]
    for t in tensors:
        if isinstance(t, Outside):
            walk.builder.outside |= t.params  # e.g. ViT's class token, concatenated along the tokens
    if not chans:
        return Outside()
    if chans[0].axis == dim:
        if len(chans) != len(tensors) or len({c.mult for c in chans}) != 1:
            raise UnsupportedLayerError(f"{walk.where()}: concatenates channels with non-channel tensors")
        return Chan(torch.cat([c.nodes for c in chans]), dim, ndim, walk.new_sid(), chans[0].mult, fresh=False)
    if any(c.sid != chans[0].sid for c in chans):
        raise UnsupportedLayerError(f"{walk.where()}: concatenates tensors with different channels along axis {dim}")
    return chans[0]


@handles(torch.flatten, torch.reshape, "flatten", "reshape", "view")
def _reshape(walk: Walk, args, kwargs):
    return walk.reshaped(walk.where(), args[0])


@handles("permute")
def _permute(walk: Walk, args, kwargs):
    x = args[0]
    if not isinstance(x, Chan):
        return x
    dims = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
    dims = [d % x.ndim for d in dims]
    return walk.like(x, dims.index(x.axis), x.mult, x.ndim)


@handles(torch.transpose, "transpose")
def _transpose(walk: Walk, args, kwargs):
    x, d0, d1 = args[0], args[1] % len(walk.out_shape()), args[2] % len(walk.out_shape())
    if not isinstance(x, Chan):
        return x
    axis = d1 if x.axis == d0 else d0 if x.axis == d1 else x.axis
    return walk.like(x, axis, x.mult, x.ndim)


@handles(operator.getitem)
def _getitem(walk: Walk, args, kwargs):
    base, index = args
    if isinstance(base, (tuple, list)):
        return base[index]
    if not isinstance(base, Chan):
        return base if isinstance(base, Outside) else Outside()
    index = index if isinstance(index, tuple) else (index,)
    if Ellipsis in index:
        i = index.index(Ellipsis)
        fill = base.ndim - sum(1 for e in index if e is not None and e is not Ellipsis)
        index = index[:i] + (slice(None),) * fill + index[i + 1:]
    in_axis, out_axis = 0, 0
    for entry in index:
        if entry is None:
            out_axis += 1
            continue
        if in_axis == base.axis:
            if entry != slice(None):
                raise UnsupportedLayerError(f"{walk.where()}: indexes into the channel axis")
            return walk.like(base, out_axis, base.mult, len(walk.out_shape()))
        in_axis += 1
        out_axis += 0 if isinstance(entry, int) else 1
    return walk.like(base, out_axis + (base.axis - in_axis), base.mult, len(walk.out_shape()))


@handles("expand")
def _expand(walk: Walk, args, kwargs):
    x = args[0]
    if isinstance(x, Chan) and walk.out_shape()[x.axis] != walk.in_shape(0)[x.axis]:
        raise UnsupportedLayerError(f"{walk.where()}: expands the channel axis")
    return x


@handles(torch.mean, "mean")
def _mean(walk: Walk, args, kwargs):
    x = args[0]
    if not isinstance(x, Chan):
        return x
    dims = args[1] if len(args) > 1 else kwargs.get("dim")
    dims = [dims] if isinstance(dims, int) else list(dims or range(x.ndim))
    dims = [d % x.ndim for d in dims]
    if x.axis in dims:
        raise UnsupportedLayerError(f"{walk.where()}: averages over the channel axis")
    keep = (args[2] if len(args) > 2 else kwargs.get("keepdim", False))
    axis = x.axis if keep else x.axis - sum(d < x.axis for d in dims)
    return walk.like(x, axis, x.mult, len(walk.out_shape()))


@handles(getattr, "size", "dim", torch._assert)
def _query(walk: Walk, args, kwargs):
    return Outside()  # shapes and checks: no channels
