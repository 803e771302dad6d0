"""One message-passing layer of the metanetwork, in two implementations with the same parameters.

Update rule (docs/design.md section 4). Nodes ``h`` ``(N, H)``, edges ``e`` ``(E, H)``, ``edge_index`` ``(2, E)``
(row 0 = producer/source, row 1 = consumer/target)::

    hn, en = LayerNorm(h), LayerNorm(e)                     # no affine parameters
    # pass along the edges (s -> t) and against them (t -> s) with the same weights; the reverse pass
    # flips the sign of the second half of the edge channels so the two directions stay distinguishable:
    #   e_fwd = en,   e_bwd = en * sign,   sign = (+1,...,+1, -1,...,-1)
    m_e   = act(msg([hn_source, hn_target, e_dir]))        # (E, H), msg: Linear(3H -> H)
    a     = [mean, std, max, min] of m_e over the target    # (N, 4H); an empty segment gives 0
    h_new = h + post(a_fwd) + post(a_bwd)                   # post: Linear(4H -> H)
    u     = act(gate_src(hn_source)) * act(gate_dst(hn_target)) * e_dir
    e_new = e + u_fwd + sign * u_bwd

:class:`EdgeMessageLayer` is the fast version; :class:`PyGEdgeMessageLayer` is the straightforward PyTorch
Geometric ``MessagePassing`` version, kept as the reference it is tested and benchmarked against. Both
have the parameters ``msg``, ``post``, ``gate_src``, ``gate_dst``, so one state dict loads into either.

What makes the fast version fast (and small):

* Linear maps of node states are applied to the ``N`` nodes before gathering to the ``E`` edges
  (``(W hn)[src]`` instead of ``W (hn[src])``): only the edge part of ``msg`` is an ``E x H x H`` product,
  and the two halves of the edge channels are multiplied separately, ``p1 +/- p2`` giving both directions
  (the same for the weight and input gradients in backward).
* All edge-sized work (layer norm of the edges, messages of both directions, activation, the four
  aggregations, the gated edge update, and all of their gradients) is one autograd Function,
  :class:`nn.metanetwork.fused.EdgePass`, that runs over blocks of ~4k edges so the ~40 ops per block work
  in cache instead of streaming 25 MB tensors through DRAM, saves only the pre-activations, and computes
  the aggregation gradient as one expression from node-level coefficients. Fused aten backward kernels
  (``silu_backward``) and float masks (not bool, whose mixed-dtype arithmetic is slow) keep each step one op.
* Reductions are unsorted scatters (``index_add_`` / ``scatter_reduce_``) or torch_scatter, see
  :mod:`nn.metanetwork.scatter`.
* On CPU in float32 (the default ``kernels=True``) the Function runs fused C kernels instead of the block
  loop (:mod:`nn.metanetwork.kernels`): one pass per edge row with everything in registers, no edge-sized
  temporaries, edge ranges in parallel threads. The blocked torch loop remains for CUDA, float64 and
  machines without a C compiler.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

with warnings.catch_warnings():  # PyG 2.8 scripts helpers with torch.jit.script on import, deprecated in torch 2.14
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
    from torch_geometric.nn import MessagePassing

from nn.metanetwork import scatter as sc
from nn.metanetwork.fused import ACTIVATIONS, edge_pass, message_activation


def get_activation(name: str) -> Callable[[Tensor], Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {name!r}; valid: {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name][0]


def direction_sign(hidden_dim: int, device=None, dtype=None) -> Tensor:
    """``(H,)``: +1 on the first half of the edge channels, -1 on the second half (reverse pass)."""
    sign = torch.ones(hidden_dim, device=device, dtype=dtype)
    sign[hidden_dim // 2:] = -1
    return sign


def check_hidden_dim(hidden_dim: int) -> None:
    if hidden_dim < 2:
        raise ValueError(f"hidden_dim must be >= 2 (half the edge channels flip sign), got {hidden_dim}")


class _LayerParams:
    """Mixin: the parameters shared by both implementations (same names, shapes and init)."""

    hidden_dim: int
    activation: str

    def _build_params(self, hidden_dim: int, activation: str) -> None:
        check_hidden_dim(hidden_dim)
        get_activation(activation)
        self.hidden_dim, self.activation = hidden_dim, activation
        self.msg = torch.nn.Linear(3 * hidden_dim, hidden_dim)  # input [h_source, h_target, e]
        self.post = torch.nn.Linear(4 * hidden_dim, hidden_dim)  # input [mean, std, max, min]
        self.gate_src = torch.nn.Linear(hidden_dim, hidden_dim)
        self.gate_dst = torch.nn.Linear(hidden_dim, hidden_dim)

    def act(self, x: Tensor) -> Tensor:
        return ACTIVATIONS[self.activation][0](x)

    def extra_repr(self) -> str:
        return f"hidden_dim={self.hidden_dim}, activation={self.activation}"


class EdgeMessageLayer(_LayerParams, torch.nn.Module):
    """Fast layer: ``(h (N, H), e (E, H), edge_index (2, E)) -> (h_new (N, H), e_new (E, H))``.

    See the module docstring for the update rule and why it is fast. ``backend`` picks the scatter
    implementation (None: torch_scatter when installed); ``block``: edges per block of
    :class:`~nn.metanetwork.fused.EdgePass` (None: about 1 MB per ``(block, H)`` tensor on CPU, all on CUDA);
    ``kernels``: use the fused C kernels where they apply (False: always the blocked torch loop).
    """

    def __init__(self, hidden_dim: int, activation: str = "silu", backend: Optional[str] = None,
                 block: Optional[int] = None, kernels: bool = True) -> None:
        torch.nn.Module.__init__(self)
        self._build_params(hidden_dim, activation)
        self.backend, self.block, self.kernels = backend, block, kernels

    def forward(self, h: Tensor, e: Tensor, edge_index: Tensor) -> Tuple[Tensor, Tensor]:
        H = self.hidden_dim
        hn = F.layer_norm(h, (H,))
        w_src, w_dst, w_edge = self.msg.weight.split(H, dim=1)  # (H, H) each
        ps = F.linear(hn, w_src, self.msg.bias)  # (N, H): message term of the source node (+ bias)
        pt = F.linear(hn, w_dst)  # (N, H): message term of the target node
        a, b = self.act(self.gate_src(hn)), self.act(self.gate_dst(hn))  # (N, H): edge-update gates
        agg_fwd, agg_bwd, e_new = edge_pass(e, ps, pt, a, b, w_edge, edge_index, self.activation,
                                            self.backend, self.block, self.kernels)
        return h + self.post(agg_fwd) + self.post(agg_bwd), e_new


class PyGEdgeMessageLayer(_LayerParams, MessagePassing):
    """Straightforward reference: a PyG ``MessagePassing`` layer with the same parameters and rule.

    ``message`` / ``edge_update`` work on gathered ``(E, ...)`` tensors and autograd keeps every
    intermediate; this is the implementation the fast layer is tested and benchmarked against.
    """

    def __init__(self, hidden_dim: int, activation: str = "silu", tie_safe: bool = True) -> None:
        MessagePassing.__init__(self, aggr=["mean", "std", "max", "min"], node_dim=0)
        self._build_params(hidden_dim, activation)
        # tie_safe: messages through fused.message_activation, so duplicate edges tie on every CPU as in the
        # fast layer (tests); False: the plain activation, as a straightforward layer would (timings)
        self.tie_safe = tie_safe

    def forward(self, h: Tensor, e: Tensor, edge_index: Tensor) -> Tuple[Tensor, Tensor]:
        H = self.hidden_dim
        hn, en = F.layer_norm(h, (H,)), F.layer_norm(e, (H,))
        sign = direction_sign(H, e.device, e.dtype)
        reverse = edge_index.flip(0)
        h_new = h + self.propagate(edge_index, x=hn, e=en) + self.propagate(reverse, x=hn, e=en * sign)
        u_fwd = self.edge_updater(edge_index, x=hn, e=en)
        u_bwd = self.edge_updater(reverse, x=hn, e=en * sign)
        return h_new, e + u_fwd + sign * u_bwd

    def message(self, x_i: Tensor, x_j: Tensor, e: Tensor) -> Tensor:  # x_j: source, x_i: target
        act = message_activation(self.activation) if self.tie_safe else self.act
        return act(self.msg(torch.cat([x_j, x_i, e], dim=-1)))

    def update(self, aggr_out: Tensor) -> Tensor:  # (N, 4H) -> (N, H)
        return self.post(aggr_out)

    def edge_update(self, x_i: Tensor, x_j: Tensor, e: Tensor) -> Tensor:
        return self.act(self.gate_src(x_j)) * self.act(self.gate_dst(x_i)) * e


class MultiplicativeEdgeLayer(torch.nn.Module):
    """The published layer's rule: messages and edge updates multiplicative in the *unnormalised* edge state.

    Only the node states are LayerNorm-ed; an edge state stays proportional to its encoded weight, gated per
    channel pair, so the size of a weight reaches the node states through the messages::

        hn    = LayerNorm(h)                                           # no affine parameters
        m_fwd = act(msg_dst(hn_t)) * act(msg_src(hn_s)) * e            # aggregated at the target t
        m_bwd = act(msg_dst(hn_s)) * act(msg_src(hn_t)) * (e * sign)   # against the edge: at the source s
        h_new = h + post([mean, std, max, min](m_fwd)) + post([mean, std, max, min](m_bwd))
        e_new = e + act(gate_src(hn_s)) * act(gate_dst(hn_t)) * e
                  + sign * act(gate_src(hn_t)) * act(gate_dst(hn_s)) * (e * sign)

    ``layer="multiplicative"`` of :class:`~nn.metanetwork.model.GraphMetanetwork`. It is written with plain
    gathers and the reductions of :mod:`nn.metanetwork.scatter` (autograd keeps the edge-sized
    intermediates): meant for the ablation against the fast layer on small graphs, not for CIFAR-size ones.
    """

    def __init__(self, hidden_dim: int, activation: str = "silu", backend: Optional[str] = None) -> None:
        super().__init__()
        check_hidden_dim(hidden_dim)
        self.act = get_activation(activation)
        self.hidden_dim, self.activation, self.backend = hidden_dim, activation, backend
        self.msg_src = torch.nn.Linear(hidden_dim, hidden_dim)
        self.msg_dst = torch.nn.Linear(hidden_dim, hidden_dim)
        self.post = torch.nn.Linear(4 * hidden_dim, hidden_dim)
        self.gate_src = torch.nn.Linear(hidden_dim, hidden_dim)
        self.gate_dst = torch.nn.Linear(hidden_dim, hidden_dim)

    def _aggregate(self, m: Tensor, index: Tensor, num_nodes: int) -> Tensor:
        parts = [fn(m, index, num_nodes, self.backend) for fn in (sc.segment_mean, sc.segment_std,
                                                                   sc.segment_max, sc.segment_min)]
        return self.post(torch.cat(parts, dim=1))

    def forward(self, h: Tensor, e: Tensor, edge_index: Tensor) -> Tuple[Tensor, Tensor]:
        H, N = self.hidden_dim, h.shape[0]
        hn = F.layer_norm(h, (H,))
        src, dst = edge_index[0], edge_index[1]
        sign = direction_sign(H, e.device, e.dtype)
        xs, zd = self.act(self.msg_src(hn)), self.act(self.msg_dst(hn))  # (N, H)
        e_bwd = e * sign
        h_new = h + self._aggregate(zd[dst] * xs[src] * e, dst, N) + self._aggregate(zd[src] * xs[dst] * e_bwd, src, N)
        a, b = self.act(self.gate_src(hn)), self.act(self.gate_dst(hn))
        return h_new, e + a[src] * b[dst] * e + sign * (a[dst] * b[src] * e_bwd)

    def extra_repr(self) -> str:
        return f"hidden_dim={self.hidden_dim}, activation={self.activation}"
