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

import dataclasses
from typing import Any, Mapping, Optional

from nn.metanetwork.layers import EdgeMessageLayer, PyGEdgeMessageLayer
from nn.metanetwork.model import GraphMetanetwork
from configs.schema import MetanetworkSettings
from utils.config_schema import typed_settings
from utils.convert.graph import NetworkGraph
from utils.registry import Registry

METANETWORKS: Registry = Registry("metanetwork")
METANETWORKS.register("graph_metanetwork")(GraphMetanetwork)

def build_metanetwork(cfg: MetanetworkSettings | Mapping[str, Any], graph: NetworkGraph) -> Optional[GraphMetanetwork]:
    """Metanetwork for graphs like ``graph`` from a ``configs/metanetwork`` entry; None for ``name: none``.

    ``cfg`` is a :class:`~configs.schema.MetanetworkSettings`, or a dict or DictConfig of its keys (the
    schema fills in the rest); a key it does not declare raises ``ConfigError``.
    """
    s = cfg if isinstance(cfg, MetanetworkSettings) else typed_settings(cfg, MetanetworkSettings, "metanetwork")
    if s.name in (None, "none"):
        return None
    kwargs = {k: v for k, v in dataclasses.asdict(s).items() if k != "name"}
    return METANETWORKS.get(s.name).from_graph(graph, **kwargs)


__all__ = ["EdgeMessageLayer", "GraphMetanetwork", "METANETWORKS", "PyGEdgeMessageLayer", "build_metanetwork"]
