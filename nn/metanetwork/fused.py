"""The edge-sized work of one metanetwork layer as a single autograd Function, run over blocks of edges.

(On CPU in float32 the Function hands the edge loop to the fused C kernels of :mod:`nn.metanetwork.kernels`,
see ``_forward_kernel``; what follows describes the blocked torch loop used everywhere else.)

:class:`EdgePass` computes, for edges ``e`` ``(E, H)`` and node-level terms ``ps, pt, a, b`` ``(N, H)``
(already multiplied by their weights, see :class:`nn.metanetwork.layers.EdgeMessageLayer`)::

    en    = LayerNorm(e)                                         # no affine
    pre_f = ps[src] + pt[dst] + en @ W^T                         # pass along the edges, target dst
    pre_b = ps[dst] + pt[src] + (en * sign) @ W^T                # against them, target src; sign:
                                                                 # +1 on channels [0, H/2), -1 on the rest
    agg_f = [mean, std, max, min] of act(pre_f) over dst         # (N, 4H); 0 for an empty segment
    agg_b = the same of act(pre_b) over src
    e_new = e + en * (a[src] * b[dst] + a[dst] * b[src])         # = e + u_fwd + sign * u_bwd

Why it is one Function and why blocks: the layer is memory-bandwidth bound (an ``(E, H)`` float tensor of
a ResNet-56 graph is 25 MB, so every elementwise op on it is a pass over DRAM, and every fresh buffer of
that size page-faults). The edges are processed ``block`` rows at a time (``(block, H)`` tensors of about
1 MB), so the ~40 ops a block goes through (layer norm, gathers, matmuls, activation, masks, scatters)
work in cache; node-level statistics and gradients accumulate across blocks. The two directions of a
block are stacked into one ``(2 block, H)`` tensor and reduced into one ``(2N, H)`` table per statistic
(reverse targets offset by ``N``), so each op runs once for both. Autograd saves only ``e`` and the
pre-activations (one small tensor per block); ``en``, ``act(pre)``, its square, the max/min masks and the
gathered gates are recomputed block by block in backward. On CUDA the whole edge set is one block.

Gradients of mean/std/max/min are one expression built from node-level coefficients,
``g_m = A[t] + B[t] * m + G_max[t] * [m = max[t]] + G_min[t] * [m = min[t]]``. Tied extremes share the
gradient equally, as ``torch.scatter_reduce`` does: the backward loop counts the hits as it goes and
:func:`_share_ties` then corrects the gradients on the (few) edges into a segment with a tie.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from nn.metanetwork import scatter as sc
from nn.metanetwork.kernels import get_kernels

# activation name -> (f(x), g * f'(x) given g, x and y = f(x)): the fused aten backward kernels, one pass each
ACTIVATIONS: Dict[str, Tuple[Callable[[Tensor], Tensor], Callable[[Tensor, Tensor, Tensor], Tensor]]] = {
    "silu": (F.silu, lambda g, x, y: torch.ops.aten.silu_backward(g, x)),
    "relu": (torch.relu, lambda g, x, y: torch.ops.aten.threshold_backward(g, x, 0)),
    "tanh": (torch.tanh, lambda g, x, y: torch.ops.aten.tanh_backward(g, y)),
}

EXACT_ACTIVATIONS = {"relu"}  # computed exactly by every kernel: max(x, 0)


def _elementwise_same_everywhere(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """``fn`` computed so that an element's result depends on its value only, not on where it sits.

    Why: ATen's contiguous CPU loops run the vectorised body over ``2 * lanes`` elements at a time and the
    *scalar* formula on the remainder (the last ``numel % (2 * lanes)`` elements, and the end of each
    thread's chunk). The two round ``exp`` differently, and ``lanes`` depends on the CPU capability ATen
    picked (AVX-512, AVX2, ...). Two duplicate edges, whose messages must tie exactly in max/min, would
    then tie on one machine and differ in the last bit on another, and the gradient of the tie would go
    to one edge or be shared, depending on the machine. Over an input whose innermost stride is not 1,
    ATen runs the scalar formula on every element, so equal inputs give bit-equal outputs on any CPU.
    CUDA computes every element with the same formula already.
    """

    def apply(x: Tensor) -> Tensor:
        if x.device.type != "cpu" or x.numel() == 0:
            return fn(x)
        strided = x.new_empty(x.shape + (2,))[..., 0]  # same shape, innermost stride 2: the scalar loop
        strided.copy_(x)
        return fn(strided)  # a fresh contiguous result

    return apply


def message_activation(name: str) -> Callable[[Tensor], Tensor]:
    """The activation of messages (whose max/min ties must not depend on the CPU): see above."""
    fn = ACTIVATIONS[name][0]
    return fn if name in EXACT_ACTIVATIONS else _elementwise_same_everywhere(fn)


LN_EPS = 1e-5  # F.layer_norm's default
BLOCK_ELEMENTS = 2 ** 18  # floats per (block, H) tensor on CPU: 1 MB in float32, several fit in L2


def block_rows(num_rows: int, width: int, device: torch.device, block: Optional[int] = None) -> int:
    """Rows per block: ``block`` if given, all rows on CUDA, else ``BLOCK_ELEMENTS // width``."""
    if block is not None:
        return max(1, block)
    if device.type == "cuda":
        return max(1, num_rows)
    return max(256, BLOCK_ELEMENTS // max(1, width))


def _blocks(num_rows: int, rows: int):
    for start in range(0, num_rows, rows):
        yield slice(start, min(start + rows, num_rows))


def _block_index(src: Tensor, dst: Tensor, blk: slice, num_nodes: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Both directions of a block stacked: rows ``[:B]`` run along the edges, rows ``[B:]`` against them.

    Returns ``head`` (the source of each stacked row), ``tail`` (its target node) and ``slot`` (the target's
    row in a stacked ``(2N, H)`` table whose first ``N`` rows belong to the forward direction).
    """
    s, d = src[blk], dst[blk]
    return torch.cat([s, d]), torch.cat([d, s]), torch.cat([d, s + num_nodes])


class EdgePass(torch.autograd.Function):
    """``(e, ps, pt, a, b, W) -> (agg_f (N, 4H), agg_b (N, 4H), e_new (E, H))``; see the module docstring.

    Args (after the tensors): ``src``, ``dst`` long ``(E,)``, ``num_nodes``, ``activation`` name, scatter
    ``backend``, ``block`` rows (None: :func:`block_rows`), ``keep``: save the pre-activations for backward
    (False under ``torch.no_grad()``: forward-only calls then never hold an edge-sized buffer besides ``e_new``).

    Both directions of a block are stacked into one ``(2B, H)`` tensor and reduced into one ``(2N, H)`` table
    per statistic (the reverse direction's targets offset by ``N``), so each op runs once per block.
    """

    @staticmethod
    def forward(ctx, e: Tensor, ps: Tensor, pt: Tensor, a: Tensor, b: Tensor, weight: Tensor, src: Tensor,
                dst: Tensor, num_nodes: int, activation: str, backend: Optional[str], block: Optional[int],
                keep: bool, kernels: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
        kern = get_kernels(e.shape[1], activation, e.dtype, e.device) if kernels else None
        if kern is not None:
            return _forward_kernel(ctx, kern, e, ps, pt, a, b, weight, src, dst, num_nodes, keep)
        ctx.kern = None
        act = message_activation(activation)
        E, H = e.shape
        n2 = 2 * num_nodes
        rows = block_rows(E, H, e.device, block)
        # en @ W^T = p1 + p2 and (en * sign) @ W^T = p1 - p2, with p1, p2 the products of the two halves of
        # the edge channels: both directions for the flops of one product
        half = H // 2
        w1_t, w2_t = weight[:, :half].t(), weight[:, half:].t()  # (H/2, H)
        e_new = torch.empty_like(e)
        # stacked pre-activations (2B, H) per block, [forward rows; reverse rows], kept only for backward; a
        # list of blocks rather than one (2E, H) tensor, whose fresh pages would cost a page fault each time
        pre = []
        total, squares = e.new_zeros(n2, H), e.new_zeros(n2, H)  # running statistics, both directions
        mx, mn = e.new_full((n2, H), -float("inf")), e.new_full((n2, H), float("inf"))
        for blk in _blocks(E, rows):
            head, tail, slot = _block_index(src, dst, blk, num_nodes)
            B = blk.stop - blk.start
            en = F.layer_norm(e[blk], (H,), eps=LN_EPS)  # (B, H)
            p1, p2 = torch.mm(en[:, :half], w1_t), torch.mm(en[:, half:], w2_t)
            p = ps.index_select(0, head)  # (2B, H)
            p.add_(pt.index_select(0, tail)).view(2, B, H).add_(p1)
            p[:B].add_(p2)
            p[B:].sub_(p2)
            if keep:
                pre.append(p)
            m = act(p)
            sc.add_into_(total, slot, m, backend)
            sc.extreme_into_(mx, slot, m, "max", backend)
            sc.extreme_into_(mn, slot, m, "min", backend)
            sc.add_into_(squares, slot, m.square_(), backend)
            gate = a.index_select(0, head).mul_(b.index_select(0, tail))  # [a_s b_d; a_d b_s]
            torch.addcmul(e[blk], en, gate[:B].add_(gate[B:]), out=e_new[blk])
        deg = sc.degree(torch.cat([dst, src + num_nodes]), n2, e.dtype).unsqueeze(1)  # (2N, 1)
        empty, deg = deg == 0, deg.clamp(min=1)
        mean = total.div_(deg)
        std = squares.div_(deg).sub_(mean * mean).clamp_(min=sc.STD_EPS).sqrt_()  # as scatter.segment_std
        std.masked_fill_(std <= sc.STD_EPS ** 0.5, 0.0)
        mx.masked_fill_(empty, 0.0)
        mn.masked_fill_(empty, 0.0)
        agg = torch.cat([mean, std, mx, mn], dim=1)  # (2N, 4H)
        ctx.save_for_backward(e, ps, pt, a, b, weight, src, dst, deg, mean, std, mx, mn, *pre)
        ctx.num_nodes, ctx.activation, ctx.backend, ctx.rows = num_nodes, activation, backend, rows
        return agg[:num_nodes], agg[num_nodes:], e_new

    @staticmethod
    def backward(ctx, g_agg_f: Tensor, g_agg_b: Tensor, g_e_new: Tensor):
        if ctx.kern is not None:
            return _backward_kernel(ctx, g_agg_f, g_agg_b, g_e_new)
        e, ps, pt, a, b, weight, src, dst, deg, mean, std, mx, mn, *pre = ctx.saved_tensors
        n, backend, rows = ctx.num_nodes, ctx.backend, ctx.rows
        act, act_grad = message_activation(ctx.activation), ACTIVATIONS[ctx.activation][1]
        E, H = e.shape
        half = H // 2
        w1, w2 = weight[:, :half], weight[:, half:]  # (H, H/2), (H, H - H/2)
        # node-level coefficients (2N, H) of g_m = A[t] + B[t] m + G_max[t] [m = max[t]] + G_min[t] [m = min[t]]
        g_mean, g_std, g_max, g_min = torch.cat([g_agg_f, g_agg_b]).chunk(4, dim=1)
        # d std / d var = 1 / (2 std) where var > eps, else 0; d var / d m_e = 2 (m_e - mean) / deg
        g_var = torch.where(std > 0, g_std / (2 * std).clamp(min=1e-30), torch.zeros_like(std))
        coef_b = 2 * g_var / deg
        coef_a = g_mean / deg - coef_b * mean
        # hits of max and min per (slot, channel), counted on the way: every non-empty segment has >= 1; more
        # are ties, which share the gradient (the loop below assumes one hit; _share_ties corrects afterwards)
        cnt_max, cnt_min = torch.zeros_like(mx), torch.zeros_like(mn)
        g_e = torch.empty_like(e)
        g_ps, g_pt, g_a, g_b = (torch.zeros_like(a) for _ in range(4))
        g_w = weight.new_zeros(H, H)
        for blk, p in zip(_blocks(E, rows), pre):  # p: (2B, H)
            head, tail, slot = _block_index(src, dst, blk, n)
            B = blk.stop - blk.start
            ge_new = g_e_new[blk]
            en, mu, rstd = torch.native_layer_norm(e[blk], (H,), None, None, LN_EPS)
            m = act(p)
            g_m = coef_a.index_select(0, slot).addcmul_(coef_b.index_select(0, slot), m)
            for value, g_value, cnt in ((mx, g_max, cnt_max), (mn, g_min, cnt_min)):
                hit = value.index_select(0, slot)
                g_m.addcmul_(g_value.index_select(0, slot), torch.eq(m, hit, out=hit))
                sc.add_into_(cnt, slot, hit, backend)
            g_p = act_grad(g_m, p, m)  # (2B, H): gradient of the pre-activations
            sc.add_into_(g_ps, head, g_p, backend)
            sc.add_into_(g_pt, tail, g_p, backend)
            g_p1, g_p2 = g_p[:B] + g_p[B:], g_p[:B].sub_(g_p[B:])  # p1 enters both directions, p2 with sign
            g_w[:, :half].addmm_(g_p1.t(), en[:, :half])
            g_w[:, half:].addmm_(g_p2.t(), en[:, half:])
            g_en = torch.empty_like(en)
            torch.mm(g_p1, w1, out=g_en[:, :half])
            torch.mm(g_p2, w2, out=g_en[:, half:])
            # gate: e_new = e + en * (a_s b_d + a_d b_s); stacked, a[head] = [a_s; a_d], b[tail] = [b_d; b_s]
            a_h, b_t = a.index_select(0, head), b.index_select(0, tail)
            gate = torch.mul(a_h, b_t)
            g_en.addcmul_(ge_new, gate[:B].add_(gate[B:]))
            g_gate = (ge_new * en).unsqueeze(0)  # (1, B, H), the same for both stacked halves
            sc.add_into_(g_a, head, b_t.view(2, B, H).mul_(g_gate).view(2 * B, H), backend)
            sc.add_into_(g_b, tail, a_h.view(2, B, H).mul_(g_gate).view(2 * B, H), backend)
            g_e_blk = torch.ops.aten.native_layer_norm_backward(g_en, e[blk], (H,), mu, rstd, None, None,
                                                                 [True, False, False])[0]
            torch.add(g_e_blk, ge_new, out=g_e[blk])
        ties = (cnt_max > 1) | (cnt_min > 1)  # (2N, H)
        if bool(ties.any()):
            shares = [torch.where(cnt > 1, g / cnt - g, 0.0) for g, cnt in ((g_max, cnt_max), (g_min, cnt_min))]
            _share_ties(ties.any(1), shares, (e, weight, src, dst, mx, mn), pre, rows, n, act, act_grad,
                        (g_e, g_ps, g_pt, g_w))
        return g_e, g_ps, g_pt, g_a, g_b, g_w, None, None, None, None, None, None, None, None


def _forward_kernel(ctx, kern, e: Tensor, ps: Tensor, pt: Tensor, a: Tensor, b: Tensor, weight: Tensor, src: Tensor,
                    dst: Tensor, n: int, keep: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """:meth:`EdgePass.forward` with the fused C kernel: one pass over the edges, see :mod:`~nn.metanetwork.kernels`.

    Saves the pre-activations as one ``(E, 2H)`` tensor and the max/min hit counts, from which backward shares
    the gradient of tied extremes directly (no tie correction pass).
    """
    E, H = e.shape
    e, a, b = e.contiguous(), a.contiguous(), b.contiguous()
    pre = e.new_empty(E, 2 * H) if keep else None
    stats, e_new = kern.forward(e, ps.contiguous(), pt.contiguous(), a, b, weight.t().contiguous(), src, dst, pre)
    total, squares, mx, cnt_max, mn, cnt_min = stats.unbind(0)
    deg = torch.cat([torch.bincount(dst, minlength=n), torch.bincount(src, minlength=n)]).to(e.dtype).unsqueeze(1)
    empty, deg = deg == 0, deg.clamp(min=1)
    mean = total.div_(deg)
    std = squares.div_(deg).sub_(mean * mean).clamp_(min=sc.STD_EPS).sqrt_()  # as scatter.segment_std
    std.masked_fill_(std <= sc.STD_EPS ** 0.5, 0.0)
    mx.masked_fill_(empty, 0.0)
    mn.masked_fill_(empty, 0.0)
    agg = torch.cat([mean, std, mx, mn], dim=1)  # (2N, 4H)
    ctx.save_for_backward(e, a, b, weight, src, dst, deg, mean, std, mx, mn, cnt_max, cnt_min, pre)
    ctx.kern, ctx.num_nodes = kern, n
    return agg[:n], agg[n:], e_new


def _backward_kernel(ctx, g_agg_f: Tensor, g_agg_b: Tensor, g_e_new: Tensor):
    """:meth:`EdgePass.backward` with the fused C kernel (one pass over the edges)."""
    e, a, b, weight, src, dst, deg, mean, std, mx, mn, cnt_max, cnt_min, pre = ctx.saved_tensors
    g_mean, g_std, g_max, g_min = torch.cat([g_agg_f, g_agg_b]).chunk(4, dim=1)
    g_var = torch.where(std > 0, g_std / (2 * std).clamp(min=1e-30), torch.zeros_like(std))
    coef_b = 2 * g_var / deg
    coef_a = g_mean / deg - coef_b * mean
    # tied extremes share the gradient equally (as torch.scatter_reduce does): G / hits per segment and channel
    coef = torch.stack([coef_a, coef_b, mx, g_max / cnt_max.clamp(min=1), mn, g_min / cnt_min.clamp(min=1)])
    grads, g_w, g_e = ctx.kern.backward(e, g_e_new.contiguous(), pre, a, b, weight.contiguous(), src, dst, coef)
    g_ps, g_pt, g_a, g_b = grads.unbind(0)
    return g_e, g_ps, g_pt, g_a, g_b, g_w, None, None, None, None, None, None, None, None


def _share_ties(tied: Tensor, shares: List[Tensor], saved: Tuple[Tensor, ...], pre: List[Tensor], rows: int, n: int,
                act: Callable, act_grad: Callable, grads: Tuple[Tensor, Tensor, Tensor, Tensor]) -> None:
    """Correct the gradients for tied extremes, in place, on the few edges whose target has a tie.

    The block loop gave every hit of max (min) the node's whole gradient ``G``; a segment with ``c > 1`` hits
    should give each ``G / c``. ``shares`` holds ``G / c - G`` (0 without a tie) for max and min ``(2N, H)``;
    everything downstream of ``g_m`` is linear, so the correction runs the same chain on those edges only.
    The hits are decided on the *saved* pre-activations of forward (``pre``, one ``(2B, H)`` tensor per block),
    never on recomputed ones: a recomputation in another order of operations can differ in the last bit and
    miss a tie.
    """
    e, weight, src, dst, mx, mn = saved
    g_e, g_ps, g_pt, g_w = grads
    E, H = e.shape
    half = H // 2
    for blk, p in zip(_blocks(E, rows), pre):
        head, tail, slot = _block_index(src, dst, blk, n)
        sel = tied.index_select(0, slot).nonzero().squeeze(1)  # stacked rows whose target has a tie
        if sel.numel() == 0:
            continue
        B = blk.stop - blk.start
        p_sel, slot_sel = p.index_select(0, sel), slot.index_select(0, sel)
        m = act(p_sel)
        g_m = torch.zeros_like(m)
        for value, share in zip((mx, mn), shares):
            hit = value.index_select(0, slot_sel)
            g_m.addcmul_(share.index_select(0, slot_sel), torch.eq(m, hit, out=hit))
        g_p = act_grad(g_m, p_sel, m)
        g_ps.index_add_(0, head.index_select(0, sel), g_p)
        g_pt.index_add_(0, tail.index_select(0, sel), g_p)
        g_p2 = g_p * torch.where(sel < B, 1.0, -1.0).to(g_p.dtype).unsqueeze(1)  # reverse rows: sign on p2
        edges = sel.remainder(B).add_(blk.start)
        x = e.index_select(0, edges)
        en, mu, rstd = torch.native_layer_norm(x, (H,), None, None, LN_EPS)
        g_w[:, :half].addmm_(g_p.t(), en[:, :half])
        g_w[:, half:].addmm_(g_p2.t(), en[:, half:])
        g_en = torch.cat([g_p @ weight[:, :half], g_p2 @ weight[:, half:]], dim=1)
        g_x = torch.ops.aten.native_layer_norm_backward(g_en, x, (H,), mu, rstd, None, None, [True, False, False])[0]
        g_e.index_add_(0, edges, g_x)


def edge_pass(e: Tensor, ps: Tensor, pt: Tensor, a: Tensor, b: Tensor, weight: Tensor, edge_index: Tensor,
              activation: str, backend: Optional[str] = None, block: Optional[int] = None,
              kernels: bool = True) -> List[Tensor]:
    """Functional form of :class:`EdgePass`: ``[agg_f (N, 4H), agg_b (N, 4H), e_new (E, H)]``.

    ``kernels``: use the fused C kernels of :mod:`nn.metanetwork.kernels` where they apply (float32 on CPU).
    """
    src, dst = edge_index[0].contiguous(), edge_index[1].contiguous()
    keep = torch.is_grad_enabled() and any(t.requires_grad for t in (e, ps, pt, a, b, weight))
    return list(EdgePass.apply(e, ps, pt, a, b, weight, src, dst, ps.shape[0], activation, backend, block, keep,
                               kernels))
