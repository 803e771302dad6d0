"""The graph metanetwork: a network graph in, the same graph with edited features out (docs/design.md section 4).

Pipeline for a graph with ``N`` nodes of ``F`` features and edge types ``t`` with ``E_t x F_t`` features::

    h = node_enc(x) + type_emb(node_type)                    # (N, H)
    e = cat_t edge_enc_t(e_t)                                # (E, H), E = sum_t E_t; edge_index likewise
    for layer in layers: h, e = layer(h, e, edge_index)      # EdgeMessageLayer, both edge directions
    x_out   = x   + node_ratio * node_dec(LN(h))             # (N, F)
    e_t_out = e_t + edge_ratio * edge_dec_t(LN(e)[rows of t])  # (E_t, F_t); constant types pass through

The decoders see LayerNorm-ed states, so at initialisation ``|x_out - x|`` is of the order of the ratio.
Constant edge types (``GraphLayout.constant_edges``, e.g. identity shortcuts) are encoded (they carry
structure) but have no decoder: their features are returned unchanged, so no parameter goes unused.

Two options make "shrink this channel" easy to say, which the additive edit cannot (to zero a weight it
must output exactly ``-w / r``, for every weight of the channel):

* ``edit="relative_scale"``: a per-channel scale ``s = exp(u - max of u over the channels of the node's
  layer)`` ``(N,)``, ``u = scale_dec(LN(h))`` (siblings: the nodes fed by the same producers; last layer zero
  at initialisation, so ``s = 1``; fixed to 1 on input and output nodes, which are never pruned), multiplies
  every parameter of the channel after the additive edit: the edges into it and out of it
  (``e_out = (e + r dec(e)) * s[producer] * s[consumer]``) and its non-buffer node slots (BN/LN weight and
  bias, conv/linear bias). One number per channel turns a channel down. The strongest channel of every layer
  keeps ``s = 1``, so the scale can turn channels down only *relative to their layer*: it cannot shrink all
  channels together, which a magnitude criterion cannot use and which the sparsity term alone otherwise
  prefers under AdamW. (An unbounded scale ``1 + u`` did exactly that and was retired: docs/results.md.)
* ``magnitude_features=True``: the node encoder also reads ``log`` of the mean squared weight of the edges into
  and out of each node, and the node's rank between the weakest and the strongest channel of its layer
  ``(N, 3)``, so the size of a channel, which a magnitude criterion ranks, is an input.

Both are per-node functions of equivariant states, so the metanetwork stays equivariant.
"""
from __future__ import annotations

import logging
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint as _checkpoint

from nn.metanetwork.layers import EdgeMessageLayer, MultiplicativeEdgeLayer, PyGEdgeMessageLayer, get_activation
from utils.convert.graph import NODE_INPUT, NODE_OUTPUT, NetworkGraph

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
        layer: "fast" (:class:`EdgeMessageLayer`) or "pyg" (the reference :class:`PyGEdgeMessageLayer`), the same
            rule; "multiplicative" (:class:`MultiplicativeEdgeLayer`): the published layer's rule, edge states
            never normalised inside the layers and messages multiplicative in them.
        backend: scatter backend of the fast layer (None: torch_scatter when installed, else plain torch).
        kernels: let the fast layer use the fused C kernels of :mod:`nn.metanetwork.kernels` where they apply
            (float32 on CPU); False forces the eager torch path.
        edit: "additive" (published: ``w + r dec``) or "relative_scale" (module docstring).
        magnitude_features: feed per-node log mean squared in/out weights to the node encoder.
        scaled_columns: bool ``(F,)``, the node-feature columns a channel scale multiplies (default: all);
            :meth:`from_graph` passes the non-buffer columns.
    """

    def __init__(self, node_in: int, edge_dims: Dict[str, int], hidden_dim: int, num_layers: int,
                 node_ratio: float, edge_ratio: float, num_node_types: int = 4, checkpoint: bool = False,
                 activation: str = "silu", constant_edges: Iterable[str] = (), layer: str = "fast",
                 backend: Optional[str] = None, kernels: bool = True, edit: str = "additive",
                 magnitude_features: bool = False, scaled_columns: Optional[Iterable[bool]] = None) -> None:
        super().__init__()
        get_activation(activation)
        if edit not in EDITS:
            raise ValueError(f"Unknown edit {edit!r}; valid: {', '.join(EDITS)}")
        self.edit, self.magnitude_features = edit, bool(magnitude_features)
        self.edge_types = list(edge_dims)
        self.edge_dims = dict(edge_dims)
        self.constant_edges = [t for t in self.edge_types if t in set(constant_edges)]
        self.hidden_dim, self.num_layers = hidden_dim, num_layers
        self.node_ratio, self.edge_ratio = float(node_ratio), float(edge_ratio)
        self.checkpoint = checkpoint
        self.node_enc = MLP(node_in + (3 if self.magnitude_features else 0), hidden_dim, hidden_dim, activation)
        self.type_emb = torch.nn.Embedding(num_node_types, hidden_dim)
        self.edge_enc = torch.nn.ModuleDict({t: MLP(d, hidden_dim, hidden_dim, activation) for t, d in edge_dims.items()})
        layers = {"fast": lambda: EdgeMessageLayer(hidden_dim, activation, backend, kernels=kernels),
                  "pyg": lambda: PyGEdgeMessageLayer(hidden_dim, activation),
                  "multiplicative": lambda: MultiplicativeEdgeLayer(hidden_dim, activation, backend)}
        if layer not in layers:
            raise ValueError(f"Unknown layer {layer!r}; valid: {', '.join(map(repr, layers))}")
        self.layers = torch.nn.ModuleList(layers[layer]() for _ in range(num_layers))
        self.node_dec = MLP(hidden_dim, hidden_dim, node_in, activation)
        self.edge_dec = torch.nn.ModuleDict({t: MLP(hidden_dim, hidden_dim, d, activation)
                                             for t, d in edge_dims.items() if t not in self.constant_edges})
        if edit != "additive":
            self.scale_dec = MLP(hidden_dim, hidden_dim, 1, activation)
            torch.nn.init.zeros_(self.scale_dec[-1].weight)
            torch.nn.init.zeros_(self.scale_dec[-1].bias)
            cols = torch.ones(node_in, dtype=torch.bool) if scaled_columns is None else \
                torch.as_tensor(list(scaled_columns), dtype=torch.bool)
            self.register_buffer("scaled_columns", cols, persistent=False)
        log.info("GraphMetanetwork: %d layers x %d hidden, %s parameters (edge types: %s)", num_layers,
                 hidden_dim, f"{self.num_parameters():,}", ", ".join(self.edge_types))

    @classmethod
    def from_graph(cls, graph: NetworkGraph, **cfg) -> "GraphMetanetwork":
        """Infer ``node_in``, ``edge_dims`` and ``constant_edges`` from ``graph``; ``cfg`` gives the rest."""
        layout = graph.layout
        cfg.setdefault("constant_edges", tuple(layout.constant_edges))
        cfg.setdefault("scaled_columns", (~layout.buffer_columns).tolist())
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

        Every tensor is on the same device (``NetworkGraph.to`` moves a graph's layout with its features).

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
        enc_in = node_features
        if self.magnitude_features:
            enc_in = torch.cat([node_features, self._magnitudes(node_features, edge_index, edge_features, types)], 1)
        h = self.node_enc(enc_in) + self.type_emb(node_type)
        e = torch.cat([self.edge_enc[t](edge_features[t]) for t in types], dim=0) if types else \
            node_features.new_zeros(0, self.hidden_dim)  # (E, H)
        index = torch.cat([edge_index[t] for t in types], dim=1) if types else \
            torch.zeros(2, 0, dtype=torch.long, device=device)  # (2, E)
        for layer in self.layers:
            if self.checkpoint and torch.is_grad_enabled():
                h, e = _checkpoint(layer, h, e, index, use_reentrant=False)
            else:
                h, e = layer(h, e, index)
        H = self.hidden_dim
        hn = F.layer_norm(h, (H,))
        del h
        x_out = node_features + self.node_ratio * self.node_dec(hn)
        scale = None  # (N,)
        if self.edit != "additive":
            scale = self._channel_scale(hn, node_type, [edge_index[t] for t in types
                                                         if t not in self.constant_edges])
        if scale is not None:
            x_out = x_out * torch.where(self.scaled_columns, scale.unsqueeze(1), x_out.new_ones(()))
        del hn
        # split, not sliced: the backward of a split is one cat, where each slice's would zero and copy an
        # (E, H) gradient
        parts = F.layer_norm(e, (H,)).split([edge_features[t].shape[0] for t in types])
        out: Dict[str, Tensor] = {}
        for t, part in zip(types, parts):
            if t in self.edge_dec:
                out[t] = edge_features[t] + self.edge_ratio * self.edge_dec[t](part)
                if scale is not None:
                    src, dst = edge_index[t]
                    out[t] = out[t] * (scale[src] * scale[dst]).unsqueeze(1)
        return x_out, {t: out.get(t, edge_features[t]) for t in edge_features}

    def _channel_scale(self, hn: Tensor, node_type: Tensor, index: List[Tensor]) -> Tensor:
        """``(N,)`` channel scales, exactly 1 on input and output nodes: ``exp(u - max of u over the node's
        layer)``, with ``u = scale_dec(hn)``."""
        fixed = (node_type == NODE_INPUT) | (node_type == NODE_OUTPUT)
        u = self.scale_dec(hn).squeeze(1)
        top = sibling_extreme(u, index, "amax")
        scale = torch.exp(u - torch.where(torch.isfinite(top), top, u))
        return torch.where(fixed, hn.new_ones(()), scale)

    def _magnitudes(self, node_features: Tensor, edge_index: Dict[str, Tensor], edge_features: Dict[str, Tensor],
                    types) -> Tensor:
        """``(N, 3)`` magnitude features of each node, from the non-constant edges (0 where a node has none):

        log mean squared weight into the node and out of it, and where the node's incoming norm lies between
        the smallest and the largest of its *siblings* (the nodes fed by the same producers, i.e. the other
        channels of its layer), in [0, 1]: the rank that group-magnitude pruning and its penalty act on.
        """
        n = node_features.shape[0]
        sums = node_features.new_zeros(2, n)
        counts = node_features.new_zeros(2, n)
        kept = [t for t in types if t not in self.constant_edges]
        for t in kept:
            sq = edge_features[t].detach().square().mean(1)  # (E_t,)
            index = edge_index[t]
            for k, nodes in enumerate((index[1], index[0])):  # into the consumer, out of the producer
                sums[k].index_add_(0, nodes, sq)
                counts[k].index_add_(0, nodes, torch.ones_like(sq))
        has = counts > 0
        mean_sq = sums / counts.clamp(min=1)
        log_sq = torch.where(has, torch.log(mean_sq + 1e-12), sums.new_zeros(()))
        norm = mean_sq[0].sqrt()
        ext = [sibling_extreme(norm, [edge_index[t] for t in kept], r) for r in ("amax", "amin")]
        span = (ext[0] - ext[1]).nan_to_num(0.0, 0.0, 0.0)
        rel = torch.where(has[0] & (span > 0), (norm - ext[1]) / span.clamp(min=1e-30), norm.new_ones(()))
        return torch.stack([log_sq[0], log_sq[1], rel.clamp(0, 1)], dim=1)


def sibling_extreme(values: Tensor, edge_index: List[Tensor], reduce: str) -> Tensor:
    """``(N,)``: the max (``reduce="amax"``) or min of ``values`` over each node's *siblings*, the nodes fed by
    the same producers (the channels of its layer, itself included), in two hops: every producer takes the
    extreme over its consumers, every node the extreme over its producers. Nodes without producers get
    -inf (+inf). Differentiable (the gradient goes to the extreme); equivariant."""
    fill = -float("inf") if reduce == "amax" else float("inf")
    at_producer = values.new_full(values.shape, fill)
    for src, dst in edge_index:
        at_producer = at_producer.scatter_reduce(0, src, values[dst], reduce)
    sibling = values.new_full(values.shape, fill)
    for src, dst in edge_index:
        sibling = sibling.scatter_reduce(0, dst, at_producer[src], reduce)
    return sibling


EDITS = ("additive", "relative_scale")
