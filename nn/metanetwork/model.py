"""The graph metanetwork: a network graph in, the same graph with edited features out (DESIGN.md section 4).

Pipeline for a graph with ``N`` nodes of ``F`` features and edge types ``t`` with ``E_t x F_t`` features::

    h = node_enc(x) + type_emb(node_type)                    # (N, H)
    e = cat_t edge_enc_t(e_t)                                # (E, H), E = sum_t E_t; edge_index likewise
    for layer in layers: h, e = layer(h, e, edge_index)      # EdgeMessageLayer, both edge directions
    x_out   = x   + node_ratio * node_dec(LN(h))             # (N, F)
    e_t_out = e_t + edge_ratio * edge_dec_t(LN(e)[rows of t])  # (E_t, F_t); constant types pass through

The decoders see LayerNorm-ed states, so at initialisation ``|x_out - x|`` is of the order of the ratio.
Constant edge types (``GraphLayout.constant_edges``, e.g. identity shortcuts) are encoded (they carry
structure) but have no decoder: their features are returned unchanged, so no parameter goes unused.
"""
from __future__ import annotations

import logging
from typing import Dict, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint as _checkpoint

from nn.metanetwork.layers import EdgeMessageLayer, PyGEdgeMessageLayer, get_activation
from utils.convert.graph import NetworkGraph

log = logging.getLogger(__name__)


class MLP(torch.nn.Sequential):
    """``Linear(in, hidden) -> act -> Linear(hidden, out)``."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, activation: str) -> None:
        act = {"silu": torch.nn.SiLU, "relu": torch.nn.ReLU, "tanh": torch.nn.Tanh}[activation]
        super().__init__(torch.nn.Linear(in_dim, hidden_dim), act(), torch.nn.Linear(hidden_dim, out_dim))


class GraphMetanetwork(torch.nn.Module):
    """Equivariant message-passing GNN that edits a :class:`NetworkGraph` (see the module docstring).

    Args:
        node_in: node-feature width ``F``.
        edge_dims: edge type -> feature width ``F_t``; one encoder (and decoder) per type.
        hidden_dim: ``H``; num_layers: ``L``.
        node_ratio, edge_ratio: scale of the residual edits of node and edge features.
        num_node_types: size of the node-type embedding (input / hidden / attention / output).
        checkpoint: recompute each layer in backward (``torch.utils.checkpoint``) instead of keeping its
            edge-sized activations: memory ~ ``L`` saved edge states instead of ``~3 L`` (input and two pre-activations per layer).
        activation: "silu" (default), "relu" or "tanh".
        constant_edges: edge types whose features are constant (no decoder, passed through).
        layer: "fast" (:class:`EdgeMessageLayer`) or "pyg" (the reference :class:`PyGEdgeMessageLayer`).
        backend: scatter backend of the fast layer (None: torch_scatter when installed, else plain torch).
        kernels: let the fast layer use the fused C kernels of :mod:`nn.metanetwork.kernels` where they apply
            (float32 on CPU); False forces the eager torch path.
    """

    def __init__(self, node_in: int, edge_dims: Dict[str, int], hidden_dim: int, num_layers: int,
                 node_ratio: float, edge_ratio: float, num_node_types: int = 4, checkpoint: bool = False,
                 activation: str = "silu", constant_edges: Iterable[str] = (), layer: str = "fast",
                 backend: Optional[str] = None, kernels: bool = True) -> None:
        super().__init__()
        get_activation(activation)
        self.edge_types = list(edge_dims)
        self.edge_dims = dict(edge_dims)
        self.constant_edges = [t for t in self.edge_types if t in set(constant_edges)]
        self.hidden_dim, self.num_layers = hidden_dim, num_layers
        self.node_ratio, self.edge_ratio = float(node_ratio), float(edge_ratio)
        self.checkpoint = checkpoint
        self.node_enc = MLP(node_in, hidden_dim, hidden_dim, activation)
        self.type_emb = torch.nn.Embedding(num_node_types, hidden_dim)
        self.edge_enc = torch.nn.ModuleDict({t: MLP(d, hidden_dim, hidden_dim, activation) for t, d in edge_dims.items()})
        if layer == "fast":
            self.layers = torch.nn.ModuleList(EdgeMessageLayer(hidden_dim, activation, backend, kernels=kernels)
                                              for _ in range(num_layers))
        elif layer == "pyg":
            self.layers = torch.nn.ModuleList(PyGEdgeMessageLayer(hidden_dim, activation) for _ in range(num_layers))
        else:
            raise ValueError(f"Unknown layer {layer!r}; valid: 'fast', 'pyg'")
        self.node_dec = MLP(hidden_dim, hidden_dim, node_in, activation)
        self.edge_dec = torch.nn.ModuleDict({t: MLP(hidden_dim, hidden_dim, d, activation)
                                             for t, d in edge_dims.items() if t not in self.constant_edges})
        log.info("GraphMetanetwork: %d layers x %d hidden, %s parameters (edge types: %s)", num_layers,
                 hidden_dim, f"{self.num_parameters():,}", ", ".join(self.edge_types))

    @classmethod
    def from_graph(cls, graph: NetworkGraph, **cfg) -> "GraphMetanetwork":
        """Infer ``node_in``, ``edge_dims`` and ``constant_edges`` from ``graph``; ``cfg`` gives the rest."""
        layout = graph.layout
        cfg.setdefault("constant_edges", tuple(layout.constant_edges))
        return cls(int(graph.node_features.shape[1]), dict(layout.edge_dims), **cfg)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, graph: NetworkGraph) -> NetworkGraph:
        """The edited graph (same layout and extras, new node and edge features)."""
        x, edges = self.forward_features(graph.node_features, graph.edge_index, graph.edge_features, graph.node_type)
        return graph.replace(x, edges)

    def forward_features(self, node_features: Tensor, edge_index: Dict[str, Tensor],
                         edge_features: Dict[str, Tensor], node_type: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        """Tensor-level forward.

        Args:
            node_features: ``(N, F)``; node_type: long ``(N,)``.
            edge_index: type -> long ``(2, E_t)`` (producer; consumer); edge_features: type -> ``(E_t, F_t)``.
        Returns:
            ``(node_features_out (N, F), {type: (E_t, F_t)})`` with the same edge types as the input.
        """
        device = node_features.device
        types = [t for t in edge_features if edge_features[t].shape[0] > 0]
        unknown = [t for t in edge_features if t not in self.edge_enc]
        if unknown:
            raise KeyError(f"Edge types {unknown} have no encoder; this metanetwork knows {self.edge_types}")
        h = self.node_enc(node_features) + self.type_emb(node_type.to(device))
        e = torch.cat([self.edge_enc[t](edge_features[t]) for t in types], dim=0) if types else \
            node_features.new_zeros(0, self.hidden_dim)  # (E, H)
        index = torch.cat([edge_index[t].to(device) for t in types], dim=1) if types else \
            torch.zeros(2, 0, dtype=torch.long, device=device)  # (2, E)
        for layer in self.layers:
            if self.checkpoint and torch.is_grad_enabled():
                h, e = _checkpoint(layer, h, e, index, use_reentrant=False)
            else:
                h, e = layer(h, e, index)
        H = self.hidden_dim
        x_out = node_features + self.node_ratio * self.node_dec(F.layer_norm(h, (H,)))
        del h
        e = F.layer_norm(e, (H,))
        out: Dict[str, Tensor] = {}
        start = 0
        for t in types:
            rows = edge_features[t].shape[0]
            if t in self.edge_dec:
                out[t] = edge_features[t] + self.edge_ratio * self.edge_dec[t](e[start:start + rows])
            else:
                out[t] = edge_features[t]
            start += rows
        return x_out, {t: out.get(t, edge_features[t]) for t in edge_features}
