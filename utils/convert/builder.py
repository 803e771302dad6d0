"""Accumulates nodes, typed edges and per-channel slots while a traced network is walked.

Everything here is vectorised over channels: the only Python loops run over layers and parameters.
Edges are recorded per layer as :class:`~utils.convert.graph.EdgeBlock` s (channel ids, not edge ids),
so tracing costs memory in the number of channels, not of weights.
Summed parametric branches are merged with an alias table (``alias[dropped] = kept``) that is resolved
once in :meth:`GraphBuilder.finalize`; slots (``bn0``, ``bn1``, ...) are numbered after merging, so a
residual sum's main-branch BatchNorm and downsample BatchNorm get separate slots on the same nodes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from utils.convert.graph import NODE_HIDDEN, NODE_OUTPUT, EdgeBlock, EdgeIndex, GraphLayout, ParamMap

# Neutral content of an unused slot: scales and variances 1, everything else 0.
_NEUTRAL_ONE = ("weight", "running_var")
_KIND_ORDER = {"bias": 0, "bn": 1, "ln": 2, "qkv_bias": 3}


def write_rows(out: torch.Tensor, tensor: torch.Tensor, recipe: str, args: Tuple[int, ...]) -> None:
    """Copy a weight tensor into its edge-feature rows ``out`` (one row per edge) in place, exactly.

    The copy goes straight from the tensor (through views) into the graph's final buffer: no per-layer
    intermediate, so a graph costs its features' bytes and nothing more.
    """
    if recipe == "rows":  # (O, I, *k) -> (O*I, prod(k)); linear after flatten: (O, C*s) -> (O*C, s)
        out.copy_(tensor.reshape(args[0], args[1]))
    elif recipe == "qkv":  # in_proj (3E, E) -> (E*E, 3): edge (j <- i) carries (Wq[j,i], Wk[j,i], Wv[j,i])
        e = args[0]
        out.view(e, e, 3).copy_(tensor.reshape(3, e, e).permute(1, 2, 0))
    else:
        raise ValueError(f"unknown row recipe {recipe!r}")


def tensor_of(rows: torch.Tensor, recipe: str, args: Tuple[int, ...], shape: Sequence[int]) -> torch.Tensor:
    """The weight tensor of its edge-feature ``rows``, as a view where the layout allows (inverse of
    :func:`write_rows`, differentiable)."""
    if recipe == "rows":
        return rows.reshape(shape)
    if recipe == "qkv":
        e = args[0]
        return rows.reshape(e, e, 3).permute(2, 0, 1).reshape(shape)
    raise ValueError(f"unknown row recipe {recipe!r}")


@dataclass
class _Attach:
    kind: str  # "bias" | "bn" | "ln" | "qkv_bias"
    nodes: torch.Tensor  # long (C,), raw (pre-merge) node ids
    entries: Mapping[str, Tuple[str, slice]]  # slot suffix -> (state-dict key, slice of that tensor)


class GraphBuilder:
    """Mutable state of one trace; :meth:`finalize` turns it into a :class:`GraphLayout`."""

    def __init__(self) -> None:
        self.num_nodes = 0
        self._types: List[torch.Tensor] = []
        self._alias_from: List[torch.Tensor] = []
        self._alias_to: List[torch.Tensor] = []
        self._edges: Dict[str, List[EdgeBlock]] = {}
        self.edge_dims: Dict[str, int] = {}
        self.constant_edges: Dict[str, float] = {}
        self._edge_params: List[ParamMap] = []
        self._attach: List[_Attach] = []
        self.module_nodes: Dict[str, torch.Tensor] = {}
        self.outside: set[str] = set()  # parameters deliberately kept outside the graph

    def new_nodes(self, count: int, node_type: int = NODE_HIDDEN) -> torch.Tensor:
        ids = torch.arange(self.num_nodes, self.num_nodes + count)
        self._types.append(torch.full((count,), node_type, dtype=torch.long))
        self.num_nodes += count
        return ids

    def merge(self, keep: torch.Tensor, drop: torch.Tensor) -> None:
        """Channels ``drop[i]`` and ``keep[i]`` are the same channel (two branches summed)."""
        self._alias_from.append(drop)
        self._alias_to.append(keep)

    def _add_edges(self, edge_type: str, dim: int, block: EdgeBlock) -> int:
        if self.edge_dims.setdefault(edge_type, dim) != dim:
            raise ValueError(f"edge type {edge_type} used with {dim} and {self.edge_dims[edge_type]} features")
        lst = self._edges.setdefault(edge_type, [])
        start = sum(b.count for b in lst)
        lst.append(block)
        return start

    def _add_weight_block(self, edge_type: str, dim: int, block: EdgeBlock, key: str, shape: Sequence[int],
                          recipe: str, args: Tuple[int, ...]) -> None:
        if edge_type in self.constant_edges:
            raise ValueError(f"edge type {edge_type} is constant; weights need another type")
        start = self._add_edges(edge_type, dim, block)
        self._edge_params.append(ParamMap(key, "edges", tuple(shape), edge_type, start, block.count, recipe,
                                          tuple(args)))

    def add_weight_edges(self, edge_type: str, dim: int, src: torch.Tensor, dst: torch.Tensor, key: str,
                         shape: Sequence[int], recipe: str = "rows", args: Tuple[int, ...] = ()) -> None:
        """Edges ``src[r] -> dst[r]`` whose features are the rows of state-dict entry ``key`` (row r <-> edge r).

        For a dense or grouped layer prefer :meth:`add_dense_weight_edges`, which stores channels, not edges.
        """
        if src.shape != dst.shape or src.dim() != 1:
            raise ValueError(f"{key}: src and dst must be 1-D and of equal length, got {tuple(src.shape)} and "
                             f"{tuple(dst.shape)}")
        self._add_weight_block(edge_type, dim, EdgeBlock(src[:, None], dst[:, None]), key, shape, recipe, args)

    def add_dense_weight_edges(self, edge_type: str, dim: int, src: torch.Tensor, dst: torch.Tensor, key: str,
                               shape: Sequence[int], recipe: str = "rows", args: Tuple[int, ...] = (),
                               groups: int = 1) -> None:
        """Every consumer in ``dst`` reads every producer in ``src`` (within each of ``groups`` equal, consecutive
        parts of both): edge ``r`` is (consumer ``r // I``, producer ``r % I``) of its group, ``I`` producers per
        group, which is the element order of a ``(O, I, ...)`` weight, so its rows are the edges' features."""
        if src.numel() % groups or dst.numel() % groups:
            raise ValueError(f"{key}: {src.numel()} producers and {dst.numel()} consumers in {groups} groups")
        block = EdgeBlock(src.reshape(groups, -1), dst.reshape(groups, -1))
        self._add_weight_block(edge_type, dim, block, key, shape, recipe, args)

    def add_constant_edges(self, edge_type: str, src: torch.Tensor, dst: torch.Tensor, value: float = 1.0) -> None:
        """Edges ``src[r] -> dst[r]`` that carry a constant (identity shortcuts): structure, not parameters."""
        self.constant_edges[edge_type] = value
        self._add_edges(edge_type, 1, EdgeBlock(src[:, None], dst[:, None]))

    def attach(self, kind: str, nodes: torch.Tensor, entries: Mapping[str, Tuple[str, slice]]) -> None:
        """Per-channel parameters of ``nodes``: suffix -> (state-dict key, slice of its flat tensor)."""
        self._attach.append(_Attach(kind, nodes, dict(entries)))

    # ------------------------------------------------------------------------------------------------
    def _resolve(self) -> torch.Tensor:
        """Raw node id -> compact final id (merged channels share one id; creation order is kept)."""
        alias = torch.arange(self.num_nodes)
        if self._alias_from:
            alias[torch.cat(self._alias_from)] = torch.cat(self._alias_to)
            while True:  # follow chains a -> b -> c; converges in a few vectorised steps
                nxt = alias[alias]
                if torch.equal(nxt, alias):
                    break
                alias = nxt
        roots, compact = torch.unique(alias, sorted=True, return_inverse=True)
        return compact

    def finalize(self, state: Mapping[str, torch.Tensor], buffers: set, output_nodes: Optional[torch.Tensor],
                 arch: Optional[dict]) -> GraphLayout:
        remap = self._resolve()
        num_nodes = int(remap.max().item()) + 1 if self.num_nodes else 0
        raw_types = torch.cat(self._types) if self._types else torch.zeros(0, dtype=torch.long)
        node_type = torch.full((num_nodes,), NODE_HIDDEN, dtype=torch.long)
        node_type[remap] = raw_types  # merged channels are all hidden
        if output_nodes is not None:
            node_type[remap[output_nodes]] = NODE_OUTPUT

        edge_index = EdgeIndex({t: [EdgeBlock(remap[b.src], remap[b.dst]) for b in lst]
                                for t, lst in self._edges.items()})

        # Number the slots after merging: k-th layer of a kind writing into the same channels -> slot k.
        counters: Dict[str, torch.Tensor] = {}
        placed: List[Tuple[str, int, str, str, slice, torch.Tensor]] = []
        for a in self._attach:
            nodes = remap[a.nodes]
            cnt = counters.setdefault(a.kind, torch.zeros(num_nodes, dtype=torch.long))
            slot = int(cnt[nodes].max().item())
            cnt[nodes] = slot + 1
            for suffix, (key, sl) in a.entries.items():
                placed.append((a.kind, slot, suffix, key, sl, nodes))
        columns = sorted({(k, s, suf) for k, s, suf, *_ in placed}, key=lambda c: (_KIND_ORDER[c[0]], c[1], c[2]))
        names = tuple(f"{k}{s}" if k == "bias" else f"{k}{s}.{suf}" for k, s, suf in columns)
        col_of = {c: i for i, c in enumerate(columns)}
        fill = torch.tensor([1.0 if n.rsplit(".", 1)[-1] in _NEUTRAL_ONE else 0.0 for n in names])

        node_maps: Dict[str, List[Tuple[slice, torch.Tensor, int]]] = {}
        for kind, slot, suffix, key, sl, nodes in placed:
            node_maps.setdefault(key, []).append((sl, nodes, col_of[(kind, slot, suffix)]))
        params: List[ParamMap] = []
        by_key = {p.name: p for p in self._edge_params}
        mapped = set(by_key) | set(node_maps)
        for key, value in state.items():
            if key in by_key:
                params.append(by_key[key])
            elif key in node_maps:
                parts = sorted(node_maps[key], key=lambda p: p[0].start or 0)
                nodes = torch.cat([n for _, n, _ in parts])
                cols = torch.cat([torch.full_like(n, c) for _, n, c in parts])
                if nodes.numel() != value.numel():
                    raise AssertionError(f"{key}: {nodes.numel()} slots for {value.numel()} values")
                params.append(ParamMap(key, "nodes", tuple(value.shape), nodes=nodes, columns=cols,
                                       is_buffer=key in buffers))
        extras = [k for k in state if k not in mapped]
        return GraphLayout(
            num_nodes=num_nodes, node_type=node_type, node_slots=names, node_fill=fill, edge_index=edge_index,
            edge_dims=dict(self.edge_dims), constant_edges=dict(self.constant_edges), params=params, extras=extras,
            state_keys=list(state), module_nodes={k: remap[v] for k, v in self.module_nodes.items()}, arch=arch,
        )
