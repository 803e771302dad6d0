"""The metanetwork: a message-passing GNN that edits a network graph (docs/design.md section 4).

Usage::

    from nn.metanetwork import GraphMetanetwork, build_metanetwork
    meta = build_metanetwork(cfg.metanetwork, graph)     # None for `metanetwork: none`
    new_graph = meta(graph)                              # same layout, edited features

Modules: :mod:`~nn.metanetwork.scatter` (segment reductions), :mod:`~nn.metanetwork.layers` (the fast
layer and its PyG reference), :mod:`~nn.metanetwork.fused` (the layer's edge work as one autograd Function),
:mod:`~nn.metanetwork.kernels` (its fused C kernels on CPU), :mod:`~nn.metanetwork.model` (encoders, layers,
decoders).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from nn.metanetwork.layers import EdgeMessageLayer, PyGEdgeMessageLayer
from nn.metanetwork.model import GraphMetanetwork
from utils.convert.graph import NetworkGraph
from utils.registry import Registry

METANETWORKS: Registry = Registry("metanetwork")
METANETWORKS.register("graph_metanetwork")(GraphMetanetwork)

# keys of configs/metanetwork/*.yaml passed to the class (besides `name`)
_CONFIG_KEYS = ("num_layers", "hidden_dim", "node_ratio", "edge_ratio", "checkpoint", "activation", "layer",
                "backend", "kernels", "edit", "magnitude_features")


def build_metanetwork(cfg: Mapping[str, Any], graph: NetworkGraph) -> Optional[GraphMetanetwork]:
    """Metanetwork for graphs like ``graph`` from a ``configs/metanetwork`` entry; None for ``name: none``.

    ``cfg`` is a dict or DictConfig with ``name`` and the keys of :class:`GraphMetanetwork` (``num_layers``,
    ``hidden_dim``, ``node_ratio``, ``edge_ratio``, optional ``checkpoint``, ``activation``).
    """
    name = cfg["name"]
    if name in (None, "none"):
        return None
    unknown = sorted(set(cfg) - set(_CONFIG_KEYS) - {"name"})
    if unknown:
        raise KeyError(f"Unknown metanetwork config keys {unknown}; valid: {', '.join(_CONFIG_KEYS)}")
    kwargs = {k: cfg[k] for k in _CONFIG_KEYS if k in cfg and cfg[k] is not None}
    return METANETWORKS.get(name).from_graph(graph, **kwargs)


__all__ = ["EdgeMessageLayer", "GraphMetanetwork", "METANETWORKS", "PyGEdgeMessageLayer", "build_metanetwork"]
