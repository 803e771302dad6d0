"""Network <-> graph conversion (docs/design.md section 3): exact, differentiable, traced once per architecture.

    graph = model_to_graph(model)              # NetworkGraph; see utils/convert/graph.py for its fields
    state = graph_to_state_dict(graph)         # differentiable in graph.node_features / edge_features
    model2 = graph_to_model(graph)             # a fresh network with exactly the same tensors

The layout (nodes, edges, the map from every state-dict entry to its feature slots) is derived from a
torch.fx trace plus the per-module adapters in ``adapters.py``, and cached per (architecture, widths,
input size): after the first call, converting is one copy of every weight into its edge type's feature
buffer and one scatter/gather per per-channel tensor, with no Python loop over channels or edges. The
layout stores edges per channel and builds ``edge_index`` only when it is read (by the metanetwork), so
conversion itself costs about the weights' bytes once more.
"""
from __future__ import annotations

import copy
import json
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import torch

from utils.architecture import is_zoo_model, zoo
from utils.convert.adapters import UnsupportedLayerError, passthrough, register_module_adapter
from utils.convert.builder import tensor_of, write_rows
from utils.convert.graph import (
    NODE_ATTENTION,
    NODE_HIDDEN,
    NODE_INPUT,
    NODE_OUTPUT,
    NODE_TYPE_NAMES,
    GraphLayout,
    NetworkGraph,
    ParamMap,
)
from utils.convert.trace import trace_layout

__all__ = [
    "NetworkGraph", "GraphLayout", "ParamMap", "UnsupportedLayerError", "NODE_INPUT", "NODE_HIDDEN",
    "NODE_ATTENTION", "NODE_OUTPUT", "NODE_TYPE_NAMES", "model_to_graph", "graph_to_state_dict",
    "graph_to_model", "get_layout", "register_module_adapter", "passthrough", "clear_cache",
]

_CACHE: "OrderedDict[Tuple, GraphLayout]" = OrderedDict()
_CACHE_SIZE = 32


def _arch_of(model: torch.nn.Module) -> Optional[dict]:
    return zoo().describe(model) if is_zoo_model(model) else None  # zoo models rebuild from their description


def _example(model: torch.nn.Module, example_input: Optional[torch.Tensor]) -> torch.Tensor:
    if example_input is not None:
        return example_input[:1]
    size = getattr(model, "image_size", 32)  # torchvision ViTs fix their input size; CNNs take any
    first = next(model.parameters())
    return torch.zeros(1, 3, size, size, dtype=first.dtype, device=first.device)


def get_layout(model: torch.nn.Module, example_input: Optional[torch.Tensor] = None) -> GraphLayout:
    """The cached :class:`GraphLayout` of ``model`` (traced on first use for its architecture and widths)."""
    example = _example(model, example_input)
    arch = _arch_of(model)
    shapes = tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())
    key = (type(model).__qualname__, json.dumps(arch, sort_keys=True), shapes, tuple(example.shape))
    layout = _CACHE.get(key)
    if layout is None:
        layout = trace_layout(model, example, arch)
        _CACHE[key] = layout
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return layout


def clear_cache() -> None:
    _CACHE.clear()


def _edge_blocks(layout: GraphLayout) -> Dict[str, list]:
    blocks = getattr(layout, "_edge_blocks", None)
    if blocks is None:
        blocks = {}
        for p in layout.params:
            if p.kind == "edges":
                blocks.setdefault(p.source, []).append(p)
        for lst in blocks.values():
            lst.sort(key=lambda p: p.start)
        layout._edge_blocks = blocks  # type: ignore[attr-defined]
    return blocks


def _index(p: ParamMap, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    cache = p.__dict__.setdefault("_on", {})
    if device not in cache:
        cache[device] = (p.nodes.to(device), p.columns.to(device))
    return cache[device]


def model_to_graph(model: torch.nn.Module, example_input: Optional[torch.Tensor] = None) -> NetworkGraph:
    """The graph of ``model``; the features are copies of its current parameters and buffers."""
    layout = get_layout(model, example_input)
    state = model.state_dict()
    ref = next(v for v in state.values() if v.is_floating_point())
    node_features = layout.node_fill.to(ref).expand(layout.num_nodes, len(layout.node_slots)).clone()
    for p in layout.params:
        if p.kind == "nodes":
            nodes, cols = _index(p, ref.device)
            node_features[nodes, cols] = state[p.name].reshape(-1).to(ref.dtype)
    edge_features = {}
    blocks = _edge_blocks(layout)
    for t in layout.edge_index:  # each type's features are written once, into their final buffer
        count = layout.edge_count(t)
        if t in layout.constant_edges:
            edge_features[t] = torch.full((count, 1), layout.constant_edges[t], dtype=ref.dtype, device=ref.device)
            continue
        rows = torch.empty(count, layout.edge_dims[t], dtype=ref.dtype, device=ref.device)
        for p in blocks[t]:
            write_rows(rows[p.start: p.start + p.count], state[p.name], p.recipe, p.recipe_args)
        edge_features[t] = rows
    extras = {k: state[k].clone() for k in layout.extras}
    return NetworkGraph(layout, node_features, edge_features, extras)


def graph_to_state_dict(graph: NetworkGraph) -> "OrderedDict[str, torch.Tensor]":
    """State dict of the network a graph describes, in the network's own key order.

    Edge-backed tensors are views of ``graph.edge_features`` and per-channel tensors are gathers from
    ``graph.node_features``, so gradients flow from the state dict back to the graph's features (except
    into buffers such as BN running statistics, which are returned detached).
    """
    layout = graph.layout
    out: Dict[str, torch.Tensor] = {}
    for p in layout.params:
        if p.kind == "edges":
            rows = graph.edge_features[p.source][p.start: p.start + p.count]
            out[p.name] = tensor_of(rows, p.recipe, p.recipe_args, p.shape)
        else:
            nodes, cols = _index(p, graph.node_features.device)
            value = graph.node_features[nodes, cols].reshape(p.shape)
            out[p.name] = value.detach() if p.is_buffer else value
    out.update(graph.extras)
    return OrderedDict((k, out[k]) for k in layout.state_keys)


def graph_to_model(graph: NetworkGraph, template: Optional[torch.nn.Module] = None) -> torch.nn.Module:
    """A network holding the graph's weights: rebuilt from the zoo description, or a copy of ``template``."""
    if template is not None:
        model = copy.deepcopy(template)
    elif graph.layout.arch is not None:
        model = zoo().build(graph.layout.arch)
    else:
        raise ValueError("this graph is not of a zoo model: pass template=<a model of the same architecture>")
    state = OrderedDict((k, v.detach()) for k, v in graph_to_state_dict(graph).items())
    metadata = getattr(model.state_dict(), "_metadata", None)
    if metadata is not None:  # per-module versions: some modules (e.g. MNASNet) check them when loading
        state._metadata = metadata  # type: ignore[attr-defined]
    model.load_state_dict(state, strict=True)
    return model.to(graph.node_features.device)
