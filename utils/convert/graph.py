"""The graph of a network: channels are nodes, weights are typed edges (docs/design.md section 3).

A :class:`NetworkGraph` is two things:

* **features** that change from network to network of the same architecture (and that the metanetwork
  reads and rewrites): ``node_features`` ``(N, F)`` and, per edge type, ``edge_features[t]`` ``(E_t, F_t)``;
* a :class:`GraphLayout` that only depends on the architecture and its widths, traced once and cached:
  node count and types, the names of the node-feature columns, ``edge_index[t]`` ``(2, E_t)`` (row 0 =
  producer channel, row 1 = consumer channel), and the recipe that maps every parameter and buffer of the
  network to its feature slots and back.

Fields (``N`` nodes, ``F`` node-feature columns, ``E_t`` edges of type ``t`` with ``F_t`` features each):

===================  =====================================  ==============================================
field                shape / type                           meaning
===================  =====================================  ==============================================
``node_features``    float ``(N, F)``                       per-channel parameters, one column per slot
``edge_features``    dict ``t -> (E_t, F_t)``               one row per (consumer, producer) weight pair
``edge_index``       mapping ``t -> long (2, E_t)``         ``[producer; consumer]`` node ids (built on first
                                                            access, see :class:`EdgeIndex`)
``node_type``        long ``(N,)``                          ``NODE_INPUT`` / ``HIDDEN`` / ``ATTENTION`` /
                                                            ``OUTPUT``
``node_slots``       tuple of ``F`` str                     column names, e.g. ``bn0.weight``, ``bias0``
``extras``           dict name -> tensor                    state-dict entries kept outside the graph
                                                            (``num_batches_tracked``, ViT class token and
                                                            position embedding), copied unchanged
===================  =====================================  ==============================================

Edge types: ``conv{kh}x{kw}`` (a ``kh*kw`` kernel slice per edge), ``linear`` (one value),
``linear_x{s}`` (a linear layer after flattening ``s`` spatial positions per channel: ``s`` values),
``attn_qkv`` (the query, key and value weights from a residual channel to an attention channel) and
``identity`` (a non-parametric shortcut, feature 1.0; not a parameter, ignored when mapping back).

Node-feature slots: ``bn{k}.{weight,bias,running_mean,running_var}``, ``ln{k}.{weight,bias}``,
``bias{k}`` (conv/linear bias) and ``qkv_bias.{q,k,v}``; ``k`` counts the layers of that kind writing into
the same channels (a residual sum of a main branch and a downsample branch has ``bn0`` and ``bn1``).
Buffer slots (BN running statistics, see ``GraphLayout.buffer_columns``) are mapped back detached: eval-mode
BatchNorm has no gradient with respect to them. A slot that a node does not use holds a neutral value (1 for BN/LN weights and running variances, 0
otherwise) and is ignored when mapping back.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch

NODE_INPUT, NODE_HIDDEN, NODE_ATTENTION, NODE_OUTPUT = 0, 1, 2, 3
NODE_TYPE_NAMES = ("input", "hidden", "attention", "output")


@dataclass
class EdgeBlock:
    """Edges of one layer, stored per channel rather than per edge: within group ``k``, every consumer
    ``dst[k, j]`` reads every producer ``src[k, i]``; edges run over groups, then consumers, then
    producers (the order of a weight's elements). A dense layer is one group, a grouped convolution one
    group per convolution group, and pairwise edges (identity shortcuts) one group per pair.
    """

    src: torch.Tensor  # long (G, I)
    dst: torch.Tensor  # long (G, O)

    @property
    def count(self) -> int:
        return int(self.src.shape[0] * self.src.shape[1] * self.dst.shape[1])

    def fill(self, out: torch.Tensor) -> None:
        """Write this block's ``[producer; consumer]`` ids into ``out`` ``(2, count)`` in place."""
        g, i, o = self.src.shape[0], self.src.shape[1], self.dst.shape[1]
        out[0].view(g, o, i).copy_(self.src[:, None, :].expand(g, o, i))
        out[1].view(g, o, i).copy_(self.dst[:, :, None].expand(g, o, i))


class EdgeIndex(Mapping):
    """``edge_index[t]`` ``(2, E_t)`` of a traced layout, built from its :class:`EdgeBlock` s on first access.

    Converting a network to a graph and back never needs the edge ids, which take 16 bytes per edge (4x a
    float32 weight): only the metanetwork does. So a layout keeps per-channel blocks, O(channels), and each
    edge type's index is written straight into its final tensor when first read, then kept.
    """

    def __init__(self, blocks: Dict[str, List[EdgeBlock]]) -> None:
        self.blocks = blocks
        self._built: Dict[str, torch.Tensor] = {}

    def count(self, edge_type: str) -> int:
        return sum(b.count for b in self.blocks[edge_type])

    @property
    def device(self) -> torch.device:
        return next((b.src.device for bl in self.blocks.values() for b in bl), torch.device("cpu"))

    def to(self, device: torch.device) -> "EdgeIndex":
        """The same index on ``device``: its blocks moved, the types already built moved, the rest built
        there when first read."""
        moved = EdgeIndex({t: [EdgeBlock(b.src.to(device), b.dst.to(device)) for b in bl] for t, bl in self.blocks.items()})
        moved._built = {t: i.to(device) for t, i in self._built.items()}
        return moved

    def __getitem__(self, edge_type: str) -> torch.Tensor:
        index = self._built.get(edge_type)
        if index is None:
            index = torch.empty(2, self.count(edge_type), dtype=torch.long, device=self.device)
            start = 0
            for b in self.blocks[edge_type]:
                b.fill(index[:, start: start + b.count])
                start += b.count
            self._built[edge_type] = index
        return index

    def __iter__(self) -> Iterator[str]:
        return iter(self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)


@dataclass
class ParamMap:
    """Where one state-dict entry lives in the graph.

    ``kind == "edges"``: rows ``[start, start + count)`` of ``edge_features[source]``, obtained from the
    tensor by ``to_rows`` and mapped back by ``from_rows`` (pure reshapes/permutes: exact and differentiable).
    ``kind == "nodes"``: the flattened tensor is ``node_features[nodes, columns]`` (one slot per element).
    """

    name: str
    kind: str  # "edges" | "nodes"
    shape: Tuple[int, ...]
    source: str = ""  # edge type, for kind == "edges"
    start: int = 0
    count: int = 0
    recipe: str = "rows"  # how the tensor is laid out as rows; see utils/convert/layout.py
    recipe_args: Tuple[int, ...] = ()
    nodes: Optional[torch.Tensor] = None  # long (numel,), for kind == "nodes"
    columns: Optional[torch.Tensor] = None  # long (numel,), for kind == "nodes"
    is_buffer: bool = False  # BN running statistics: mapped back without gradient


@dataclass
class GraphLayout:
    """Architecture-dependent part of a graph: traced once per (architecture, widths) and cached."""

    num_nodes: int
    node_type: torch.Tensor  # long (N,)
    node_slots: Tuple[str, ...]
    node_fill: torch.Tensor  # float (F,): neutral value of each slot
    edge_index: Mapping[str, torch.Tensor]  # t -> long (2, E_t); an EdgeIndex when traced
    edge_dims: Dict[str, int]  # t -> F_t
    constant_edges: Dict[str, float]  # edge types that carry a constant (identity shortcuts)
    params: List[ParamMap]  # state-dict entries in state-dict order
    extras: List[str]  # state-dict entries kept outside the graph
    state_keys: List[str]  # every state-dict key, in order
    module_nodes: Dict[str, torch.Tensor] = field(default_factory=dict)  # module -> its output channels' nodes
    arch: Optional[Dict[str, Any]] = None  # nn.models.describe_model(...) for zoo models, else None

    def to(self, device: torch.device | str) -> "GraphLayout":
        """This layout with its index tensors on ``device`` (edge ids, node types, fill values, module
        nodes). The copy is made once per device and kept, so moving graph after graph copies nothing more;
        the per-parameter node indices have their own per-device cache (``utils.convert._index``)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device == self.node_type.device:
            return self
        copies = self.__dict__.setdefault("_copies", {self.node_type.device: self})
        if device not in copies:
            index = (self.edge_index.to(device) if isinstance(self.edge_index, EdgeIndex)
                     else {t: i.to(device) for t, i in self.edge_index.items()})
            moved = replace(self, node_type=self.node_type.to(device), node_fill=self.node_fill.to(device),
                            edge_index=index, module_nodes={k: v.to(device) for k, v in self.module_nodes.items()})
            moved.__dict__["_copies"] = copies  # every copy finds the others, the original included
            copies[device] = moved
        return copies[device]

    @property
    def buffer_columns(self) -> torch.Tensor:
        """Bool ``(F,)``: node-feature columns holding buffers (BN running statistics), not parameters."""
        return torch.tensor([n.endswith(("running_mean", "running_var")) for n in self.node_slots], dtype=torch.bool)

    def edge_count(self, edge_type: str) -> int:
        """``E_t``, without building the edge ids."""
        if isinstance(self.edge_index, EdgeIndex):
            return self.edge_index.count(edge_type)
        return int(self.edge_index[edge_type].shape[1])

    @property
    def num_edges(self) -> int:
        return sum(self.edge_count(t) for t in self.edge_index)


@dataclass
class NetworkGraph:
    """A network as a graph: per-network features plus the shared :class:`GraphLayout`."""

    layout: GraphLayout
    node_features: torch.Tensor  # (N, F)
    edge_features: Dict[str, torch.Tensor]  # t -> (E_t, F_t)
    extras: Dict[str, torch.Tensor]

    @property
    def num_nodes(self) -> int:
        return self.layout.num_nodes

    @property
    def edge_index(self) -> Mapping[str, torch.Tensor]:
        return self.layout.edge_index

    @property
    def node_type(self) -> torch.Tensor:
        return self.layout.node_type

    @property
    def node_slots(self) -> Tuple[str, ...]:
        return self.layout.node_slots

    def replace(self, node_features: torch.Tensor, edge_features: Dict[str, torch.Tensor]) -> "NetworkGraph":
        """Same layout and extras, new features (e.g. the metanetwork's output)."""
        return NetworkGraph(self.layout, node_features, dict(edge_features), self.extras)

    def to(self, device: torch.device | str) -> "NetworkGraph":
        """Every tensor on ``device``: features, extras and the layout's index tensors (see ``GraphLayout.to``)."""
        return NetworkGraph(
            self.layout.to(device), self.node_features.to(device),
            {t: f.to(device) for t, f in self.edge_features.items()},
            {k: v.to(device) for k, v in self.extras.items()},
        )

    def __repr__(self) -> str:
        edges = ", ".join(f"{t}: {self.layout.edge_count(t)}x{self.layout.edge_dims[t]}" for t in self.edge_index)
        return f"NetworkGraph(nodes={self.num_nodes}, node_features={tuple(self.node_features.shape)}, edges={{{edges}}})"
