"""The metanetwork: shapes, near-identity at init, equivariance, finiteness, gradients, implementations agree."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nn.metanetwork import GraphMetanetwork, build_metanetwork
from nn.metanetwork import scatter as sc
from nn.metanetwork.layers import EdgeMessageLayer, MultiplicativeEdgeLayer, PyGEdgeMessageLayer, direction_sign
from utils.convert.graph import NODE_HIDDEN, NODE_INPUT, NODE_OUTPUT, GraphLayout, NetworkGraph

EDGE_DIMS = {"conv3x3": 9, "conv1x1": 1, "linear": 1, "identity": 1}
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "metanetwork"
ATOL = 1e-5  # float32 equivariance / implementation tolerance (summation order differs)


def synthetic_graph(num_nodes: int = 40, seed: int = 0, num_isolated: int = 3) -> NetworkGraph:
    """Random typed edges; nodes 0-3 are inputs (zero in-degree), the last ``num_isolated`` are isolated."""
    g = torch.Generator().manual_seed(seed)
    live = num_nodes - num_isolated
    node_type = torch.full((num_nodes,), NODE_HIDDEN, dtype=torch.long)
    node_type[:4] = NODE_INPUT
    node_type[live - 5:live] = NODE_OUTPUT
    counts = {"conv3x3": 120, "conv1x1": 30, "linear": 25, "identity": 10}
    edge_index = {}
    for t, count in counts.items():
        src = torch.randint(0, live, (count,), generator=g)
        dst = torch.randint(4, live, (count,), generator=g)  # inputs never receive an edge
        edge_index[t] = torch.stack([src, dst])
    layout = GraphLayout(num_nodes=num_nodes, node_type=node_type, node_slots=tuple(f"s{i}" for i in range(5)),
                         node_fill=torch.zeros(5), edge_index=edge_index, edge_dims=dict(EDGE_DIMS),
                         constant_edges={"identity": 1.0}, params=[], extras=[], state_keys=[])
    edges = {t: torch.randn(counts[t], EDGE_DIMS[t], generator=g) for t in counts}
    edges["identity"] = torch.ones(counts["identity"], 1)
    return NetworkGraph(layout, torch.randn(num_nodes, 5, generator=g), edges, {})


# the published additive edit, the per-channel scale with magnitude features (model.py's docstring), and the
# published layer's multiplicative rule with the digits default's relative scale
VARIANTS = {"additive": {},
            "multiplicative": {"layer": "multiplicative", "edit": "relative_scale", "magnitude_features": True},
            # the shipped default of the digits and Fashion-MNIST tasks
            "shipped": {"layer": "fast", "edit": "relative_scale", "magnitude_features": True}}


def make_meta(graph: NetworkGraph, **kw) -> GraphMetanetwork:
    torch.manual_seed(0)
    cfg = dict(hidden_dim=16, num_layers=3, node_ratio=0.01, edge_ratio=0.02)
    cfg.update(kw)
    meta = GraphMetanetwork.from_graph(graph, **cfg)
    if hasattr(meta, "scale_dec"):  # zero at initialisation (s = 1); make the scales real for these tests
        torch.nn.init.normal_(meta.scale_dec[-1].weight, std=0.3)
    return meta


def permuted(graph: NetworkGraph, perm: torch.Tensor) -> NetworkGraph:
    """Node ``i`` of the result is node ``perm[i]`` of ``graph``; edges are relabelled, not reordered."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(len(perm))
    lay = graph.layout
    layout = GraphLayout(num_nodes=lay.num_nodes, node_type=lay.node_type[perm], node_slots=lay.node_slots,
                         node_fill=lay.node_fill, edge_index={t: inv[ei] for t, ei in lay.edge_index.items()},
                         edge_dims=lay.edge_dims, constant_edges=lay.constant_edges, params=[], extras=[],
                         state_keys=[])
    return NetworkGraph(layout, graph.node_features[perm], dict(graph.edge_features), {})


def loss_of(out: NetworkGraph) -> torch.Tensor:
    w = torch.Generator().manual_seed(1)
    total = (out.node_features * torch.randn(out.node_features.shape, generator=w)).sum()
    for t in sorted(out.edge_features):
        total = total + (out.edge_features[t] * torch.randn(out.edge_features[t].shape, generator=w)).sum()
    return total


class _FixedScale(torch.nn.Module):
    """Stands in for ``scale_dec``: the given ``u`` per node, whatever the states."""

    def __init__(self, u: torch.Tensor) -> None:
        super().__init__()
        self.u = u

    def forward(self, hn: torch.Tensor) -> torch.Tensor:
        return self.u[:, None]


def test_relative_scale_is_the_identity_at_init_and_turns_channels_down_within_their_layer():
    """At initialisation the scaled edit equals the additive one, and so does any u that is equal over a layer;
    otherwise every parameter of a hidden channel (its edges in and out, its node slots) is multiplied by
    s = exp(u - the largest u among its siblings, the nodes fed by the same producers); inputs and outputs
    keep s = 1."""
    graph = synthetic_graph()
    torch.manual_seed(0)
    plain = GraphMetanetwork.from_graph(graph, hidden_dim=16, num_layers=2, node_ratio=0.01, edge_ratio=0.02)
    torch.manual_seed(0)
    scaled = GraphMetanetwork.from_graph(graph, hidden_dim=16, num_layers=2, node_ratio=0.01, edge_ratio=0.02,
                                         edit="relative_scale")
    a, b = plain(graph), scaled(graph)
    assert torch.equal(a.node_features, b.node_features)
    assert all(torch.equal(a.edge_features[t], b.edge_features[t]) for t in a.edge_features)
    n = graph.num_nodes
    scaled.scale_dec = _FixedScale(torch.full((n,), -0.5))  # the same u everywhere: nothing is turned down
    c = scaled(graph)
    torch.testing.assert_close(c.node_features, a.node_features)
    u = torch.linspace(-1.0, 0.0, n)
    scaled.scale_dec = _FixedScale(u)
    c = scaled(graph)
    src, dst = torch.cat([graph.edge_index[t] for t in graph.edge_index if t != "identity"], dim=1).tolist()
    producers = {v: {p for p, d in zip(src, dst) if d == v} for v in range(n)}
    expected = torch.ones(n)
    for v in range(n):
        siblings = {d for p, d in zip(src, dst) if p in producers[v]}
        if graph.node_type[v] == NODE_HIDDEN and siblings:
            expected[v] = torch.exp(u[v] - u[sorted(siblings)].max())
    assert (expected < 1).any() and (expected == 1).any()
    torch.testing.assert_close(c.node_features, a.node_features * expected[:, None])
    s3, d3 = graph.edge_index["conv3x3"]
    torch.testing.assert_close(c.edge_features["conv3x3"], a.edge_features["conv3x3"] * (expected[s3] * expected[d3])[:, None])
    assert torch.equal(c.edge_features["identity"], graph.edge_features["identity"])


def test_magnitude_features_rank_channels_among_siblings():
    """Two producers feeding three consumers: the consumers' rank runs 0 (weakest) .. 1 (strongest)."""
    lay = GraphLayout(num_nodes=5, node_type=torch.tensor([0, 0, 1, 1, 1]), node_slots=("s0",),
                      node_fill=torch.zeros(1), edge_index={"linear": torch.tensor([[0, 1, 0, 1, 0, 1],
                                                                                    [2, 2, 3, 3, 4, 4]])},
                      edge_dims={"linear": 1}, constant_edges={}, params=[], extras=[], state_keys=[])
    w = torch.tensor([[1.0], [1.0], [2.0], [2.0], [3.0], [3.0]])
    meta = GraphMetanetwork(1, {"linear": 1}, 8, 1, 0.01, 0.01, magnitude_features=True)
    mag = meta._magnitudes(torch.zeros(5, 1), lay.edge_index, {"linear": w}, ["linear"])
    torch.testing.assert_close(mag[2:, 2], torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(mag[2:, 0], torch.log(torch.tensor([1.0, 4.0, 9.0])))
    torch.testing.assert_close(mag[:2, 1], torch.log(torch.tensor([14 / 3, 14 / 3])))
    assert torch.equal(mag[:2, 0], torch.zeros(2))  # inputs have no incoming edge


def test_shapes_every_edge_type():
    graph = synthetic_graph()
    out = make_meta(graph)(graph)
    assert out.node_features.shape == graph.node_features.shape
    assert set(out.edge_features) == set(EDGE_DIMS)
    for t, f in graph.edge_features.items():
        assert out.edge_features[t].shape == f.shape
    assert torch.equal(out.edge_features["identity"], graph.edge_features["identity"])  # constant: unchanged


@pytest.mark.parametrize("ratio", [0.05, 0.002])
def test_near_identity_at_init(ratio):
    graph = synthetic_graph()
    out = make_meta(graph, node_ratio=ratio, edge_ratio=ratio)(graph)
    # decoders read LayerNorm-ed states, so |dec| is O(1): the edit is at most a few times the ratio
    assert (out.node_features - graph.node_features).abs().max() <= 5 * ratio
    for t in graph.edge_features:
        diff = (out.edge_features[t] - graph.edge_features[t]).abs().max()
        assert diff <= 5 * ratio
    assert (out.edge_features["conv3x3"] - graph.edge_features["conv3x3"]).abs().max() > 0


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_node_permutation_equivariance(variant):
    graph = synthetic_graph()
    meta = make_meta(graph, **VARIANTS[variant])
    perm = torch.randperm(graph.num_nodes, generator=torch.Generator().manual_seed(3))
    out, out_p = meta(graph), meta(permuted(graph, perm))
    torch.testing.assert_close(out_p.node_features, out.node_features[perm], atol=ATOL, rtol=0)
    for t in graph.edge_features:  # edges were relabelled in place, so edge rows correspond 1:1
        torch.testing.assert_close(out_p.edge_features[t], out.edge_features[t], atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_edge_order_invariance(variant):
    graph = synthetic_graph()
    meta = make_meta(graph, **VARIANTS[variant])
    g = torch.Generator().manual_seed(4)
    perms = {t: torch.randperm(f.shape[0], generator=g) for t, f in graph.edge_features.items()}
    lay = graph.layout
    shuffled = NetworkGraph(
        GraphLayout(num_nodes=lay.num_nodes, node_type=lay.node_type, node_slots=lay.node_slots,
                    node_fill=lay.node_fill, edge_index={t: ei[:, perms[t]] for t, ei in lay.edge_index.items()},
                    edge_dims=lay.edge_dims, constant_edges=lay.constant_edges, params=[], extras=[], state_keys=[]),
        graph.node_features, {t: f[perms[t]] for t, f in graph.edge_features.items()}, {})
    out, out_s = meta(graph), meta(shuffled)
    torch.testing.assert_close(out_s.node_features, out.node_features, atol=ATOL, rtol=0)
    for t in graph.edge_features:
        torch.testing.assert_close(out_s.edge_features[t], out.edge_features[t][perms[t]], atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_isolated_and_source_nodes_are_finite(variant):
    graph = synthetic_graph(num_isolated=5)
    meta = make_meta(graph, **VARIANTS[variant])
    out = meta(graph)
    assert torch.isfinite(out.node_features).all()
    assert all(torch.isfinite(f).all() for f in out.edge_features.values())
    loss_of(out).backward()
    assert all(torch.isfinite(p.grad).all() for p in meta.parameters())
    # a graph with no edges at all still works
    h, e = EdgeMessageLayer(8)(torch.randn(5, 8), torch.zeros(0, 8), torch.zeros(2, 0, dtype=torch.long))
    assert torch.isfinite(h).all() and e.shape == (0, 8)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradients_reach_every_parameter(variant):
    graph = synthetic_graph()
    meta = make_meta(graph, **VARIANTS[variant])
    loss_of(meta(graph)).backward()
    for name, p in meta.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("activation", ["silu", "tanh"])
def test_message_activation_is_the_same_at_every_position(activation, dtype):
    """A row and its duplicate at the end of the tensor (where ATen's contiguous loop switches from its
    vectorised body to the scalar formula) get bit-identical activations, for every length and width."""
    from nn.metanetwork.fused import message_activation

    fn = message_activation(activation)
    g = torch.Generator().manual_seed(0)
    for width in (5, 7, 8, 16):
        for rows in range(2, 40):
            x = torch.randn(rows, width, dtype=dtype, generator=g) * 3
            x[-1] = x[0]
            y = fn(x)
            assert y.is_contiguous() and y.shape == x.shape
            assert torch.equal(y[0], y[-1]), (width, rows)
    torch.testing.assert_close(fn(x), ACTIVATIONS_REF[activation](x), atol=1e-6, rtol=1e-6)


ACTIVATIONS_REF = {"silu": lambda x: x * torch.sigmoid(x), "tanh": torch.tanh}


@pytest.mark.parametrize("activation", ["silu", "relu", "tanh"])
@pytest.mark.parametrize("hdim,e", [(8, 200), (7, 204), (5, 210)])
def test_fast_layer_matches_pyg_reference(activation, hdim, e):
    """float64, duplicate edges (exact max/min ties) at the start and at the very end of the edge list, where
    ATen's scalar tail would compute them differently from their twins (widths 7 and 5 put a tail there
    under AVX2, width 8 under AVX-512): both layers must see the same ties on every CPU."""
    torch.manual_seed(0)
    n = 30
    h = torch.randn(n, hdim, dtype=torch.double, requires_grad=True)
    x = torch.randn(e, hdim, dtype=torch.double, requires_grad=True)
    index = torch.randint(0, n - 4, (2, e))  # the last 4 nodes are isolated
    index = torch.cat([index, index[:, :5]], dim=1)  # duplicate edges: exact max/min ties
    x = torch.cat([x, x[:5]])
    fast = EdgeMessageLayer(hdim, activation).double()
    ref = PyGEdgeMessageLayer(hdim, activation).double()
    ref.load_state_dict(fast.state_dict())
    outs_f, outs_r = fast(h, x, index), ref(h, x, index)
    weights = [torch.randn_like(o) for o in outs_f]
    inputs_f = [h] + list(fast.parameters())
    grads_f = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs_f, weights)), inputs_f)
    grads_r = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs_r, weights)), [h] + list(ref.parameters()))
    for a, b in zip(outs_f + tuple(grads_f), outs_r + tuple(grads_r)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if "layer" not in VARIANTS[v]])
def test_fast_model_matches_pyg_model_float32(variant):
    graph = synthetic_graph()
    fast, ref = make_meta(graph, **VARIANTS[variant]), make_meta(graph, layer="pyg", **VARIANTS[variant])
    ref.load_state_dict(fast.state_dict())
    out_f, out_r = fast(graph), ref(graph)
    loss_of(out_f).backward()
    loss_of(out_r).backward()
    torch.testing.assert_close(out_f.node_features, out_r.node_features, atol=ATOL, rtol=0)
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("activation", ["silu", "relu", "tanh"])
def test_edge_pass_gradcheck(activation):
    """The blocked custom Function (several blocks, tied max/min, empty segments) against finite differences."""
    from nn.metanetwork.fused import EdgePass

    torch.manual_seed(0)
    n, hdim = 10, 4
    index = torch.randint(0, 8, (2, 30))  # nodes 8 and 9 are isolated: empty segments both ways
    index = torch.cat([index, index[:, :4]], dim=1)  # duplicate edges: exact ties of max and min
    e = torch.randn(30, hdim, dtype=torch.double)
    e = torch.cat([e, e[:4]]).requires_grad_()
    ps, pt, a, b = (torch.randn(n, hdim, dtype=torch.double, requires_grad=True) for _ in range(4))
    weight = torch.randn(hdim, hdim, dtype=torch.double, requires_grad=True)

    def fn(*tensors):
        return EdgePass.apply(*tensors, index[0], index[1], n, activation, "torch", 7, True)  # 5 blocks

    assert torch.autograd.gradcheck(fn, (e, ps, pt, a, b, weight), fast_mode=True)


@pytest.mark.parametrize("checkpoint", [False, True])
def test_tied_extremes_across_blocks(checkpoint):
    """Duplicate edges tie max/min exactly; with blocks (and under activation checkpointing, which allows
    one unpacking of the saved tensors) the gradients still match the PyG reference."""
    from torch.utils.checkpoint import checkpoint as ckpt

    torch.manual_seed(0)
    n, hdim = 12, 8
    index = torch.randint(0, n - 2, (2, 60))
    index = torch.cat([index, index[:, :10]], dim=1)
    h = torch.randn(n, hdim, dtype=torch.double, requires_grad=True)
    x = torch.randn(60, hdim, dtype=torch.double)
    x = torch.cat([x, x[:10]]).requires_grad_()
    fast, ref = EdgeMessageLayer(hdim, block=16).double(), PyGEdgeMessageLayer(hdim).double()
    ref.load_state_dict(fast.state_dict())
    outs_f = ckpt(fast, h, x, index, use_reentrant=False) if checkpoint else fast(h, x, index)
    outs_r = ref(h, x, index)
    weights = [torch.randn_like(o) for o in outs_f]
    grads_f = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs_f, weights)), [h, x] + list(fast.parameters()))
    grads_r = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs_r, weights)), [h, x] + list(ref.parameters()))
    for a, b in zip(tuple(grads_f), tuple(grads_r)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("block", [1, 16, None])
def test_blocks_do_not_change_the_result(block):
    torch.manual_seed(0)
    n, e, hdim = 30, 200, 8
    h = torch.randn(n, hdim, dtype=torch.double, requires_grad=True)
    x = torch.randn(e, hdim, dtype=torch.double, requires_grad=True)
    index = torch.randint(0, n - 4, (2, e))
    blocked, ref = EdgeMessageLayer(hdim, block=block).double(), PyGEdgeMessageLayer(hdim).double()
    ref.load_state_dict(blocked.state_dict())
    outs_f, outs_r = blocked(h, x, index), ref(h, x, index)
    weights = [torch.randn_like(o) for o in outs_f]
    grads_f = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs_f, weights)), [h, x] + list(blocked.parameters()))
    grads_r = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs_r, weights)), [h, x] + list(ref.parameters()))
    for a, b in zip(outs_f + tuple(grads_f), outs_r + tuple(grads_r)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def _kernels_available() -> bool:
    from nn.metanetwork.kernels import get_kernels
    return get_kernels(8, "silu", torch.float32, torch.device("cpu")) is not None


@pytest.mark.skipif(not _kernels_available(), reason="no C compiler for the fused kernels")
@pytest.mark.parametrize("activation", ["silu", "relu", "tanh"])
@pytest.mark.parametrize("hdim,threads", [(8, 1), (7, 2), (16, 2)])
def test_c_kernels_match_pyg_reference(activation, hdim, threads):
    """The fused C kernels (float32; one or two edge ranges in parallel) against the PyG reference in float64,
    with duplicate edges (exact max/min ties; relu adds many tied zeros), isolated nodes and an odd width.

    (The eager float32 path is not the reference here: aten computes an activation in its vectorised body or
    its scalar tail depending on the element's position, so with odd widths two duplicate edges can differ in
    the last bit and a tie goes unnoticed; the kernels compute every element the same way.)
    """
    torch.manual_seed(0)
    n, num_edges = 60, 3000
    index = torch.randint(0, n - 4, (2, num_edges))
    index = torch.cat([index, index[:, :200]], dim=1)
    h = torch.randn(n, hdim, dtype=torch.double, requires_grad=True)
    x = torch.randn(num_edges, hdim, dtype=torch.double)
    x = torch.cat([x, x[:200]]).requires_grad_()
    fast, ref = EdgeMessageLayer(hdim, activation), PyGEdgeMessageLayer(hdim, activation).double()
    ref.load_state_dict(fast.state_dict())
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        outs_k = fast(h.float(), x.float(), index)
        with torch.no_grad():
            outs_nograd = fast(h.float(), x.float(), index)
    finally:
        torch.set_num_threads(old_threads)
    outs_r = ref(h, x, index)
    weights = [torch.randn_like(o) for o in outs_r]
    grads_k = torch.autograd.grad(sum((o * w.float()).sum() for o, w in zip(outs_k, weights)),
                                  [h, x] + list(fast.parameters()))
    grads_r = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs_r, weights)), [h, x] + list(ref.parameters()))
    for a, b in zip(outs_k, outs_nograd):
        assert torch.equal(a, b)
    for a, b in zip(outs_k, outs_r):
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=1e-5)
    for a, b in zip(grads_k, grads_r):
        torch.testing.assert_close(a.double(), b, atol=2e-4, rtol=1e-4)


def _capabilities() -> list:
    """The ATen CPU capabilities this machine can run, lowest first (``ATEN_CPU_CAPABILITY`` values)."""
    native = torch.backends.cpu.get_cpu_capability().lower()
    order = ["default", "avx2", "avx512"]
    return order[:order.index(native) + 1] if native in order else ["default", native]


@pytest.mark.slow
@pytest.mark.parametrize("capability", _capabilities())
def test_ties_agree_under_every_cpu_capability(capability):
    """The torch path, the C kernels and the PyG reference agree on ties whatever vectorised kernels ATen
    picks: the tie tests of this file, in a fresh process with ``ATEN_CPU_CAPABILITY`` set, and on x86 with
    the C kernels built for the same level (``x86-64`` for default, ``x86-64-v3`` for AVX2), as a CPU of
    that level would build them."""
    import os
    import platform
    import subprocess
    import sys

    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    if platform.machine() in ("x86_64", "AMD64") and capability in ("default", "avx2"):
        env["METANETWORK_KERNEL_MARCH"] = {"default": "x86-64", "avx2": "x86-64-v3"}[capability]
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                           env=env, capture_output=True, text=True, check=True)
    assert probe.stdout.strip().lower() == capability  # the setting took effect in the child
    tests = ("test_message_activation_is_the_same_at_every_position or test_fast_layer_matches_pyg_reference or "
             "test_edge_pass_gradcheck or test_tied_extremes_across_blocks or test_blocks_do_not_change_the_result or "
             "test_c_kernels_match_pyg_reference")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", tests],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout


def test_kernels_can_be_disabled(monkeypatch):
    from nn.metanetwork.kernels import get_kernels
    monkeypatch.setenv("METANETWORK_KERNELS", "0")
    assert get_kernels(8, "silu", torch.float32, torch.device("cpu")) is None
    monkeypatch.delenv("METANETWORK_KERNELS")
    assert get_kernels(8, "silu", torch.float64, torch.device("cpu")) is None  # float64 runs eagerly


def test_scatter_reductions_plain_torch():
    x = torch.tensor([[1.0], [3.0], [-2.0], [5.0]])
    index = torch.tensor([0, 0, 2, 2])  # node 1 is empty
    assert sc.segment_mean(x, index, 3, "torch").flatten().tolist() == [2.0, 0.0, 1.5]
    assert sc.segment_max(x, index, 3, "torch").flatten().tolist() == [3.0, 0.0, 5.0]
    assert sc.segment_min(x, index, 3, "torch").flatten().tolist() == [1.0, 0.0, -2.0]
    torch.testing.assert_close(sc.segment_std(x, index, 3, "torch").flatten(), torch.tensor([1.0, 0.0, 3.5]))


def test_torch_scatter_matches_plain_torch():
    pytest.importorskip("torch_scatter")
    graph = synthetic_graph()
    plain, fast_ts = make_meta(graph, backend="torch"), make_meta(graph, backend="torch_scatter")
    out_p, out_t = plain(graph), fast_ts(graph)
    loss_of(out_p).backward()
    loss_of(out_t).backward()
    torch.testing.assert_close(out_t.node_features, out_p.node_features, atol=ATOL, rtol=0)
    for p, q in zip(plain.parameters(), fast_ts.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layer", ["fast", "pyg"])
def test_checkpointing_gives_same_outputs_and_gradients(layer):
    graph = synthetic_graph()
    plain, ckpt = make_meta(graph, layer=layer), make_meta(graph, layer=layer, checkpoint=True)
    out_p, out_c = plain(graph), ckpt(graph)
    loss_of(out_p).backward()
    loss_of(out_c).backward()
    torch.testing.assert_close(out_c.node_features, out_p.node_features, atol=1e-6, rtol=0)
    for p, q in zip(plain.parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5)


def test_forward_features_matches_forward():
    graph = synthetic_graph()
    meta = make_meta(graph)
    x, edges = meta.forward_features(graph.node_features, graph.edge_index, graph.edge_features, graph.node_type)
    out = meta(graph)
    assert torch.equal(x, out.node_features)
    assert all(torch.equal(edges[t], out.edge_features[t]) for t in edges)


def test_build_from_config_files():
    from omegaconf import OmegaConf
    graph = synthetic_graph()
    assert build_metanetwork(OmegaConf.load(CONFIGS / "none.yaml"), graph) is None
    meta = build_metanetwork(OmegaConf.load(CONFIGS / "resnet56.yaml"), graph)
    assert (meta.num_layers, meta.hidden_dim, meta.edge_ratio) == (8, 64, 0.01)
    assert set(meta.edge_dec) == {"conv3x3", "conv1x1", "linear"}  # no decoder for the constant type
    with pytest.raises(ValueError, match="hidden_dims is not a setting.*Did you mean `metanetwork.hidden_dim`"):
        build_metanetwork({"name": "graph_metanetwork", "hidden_dims": 3}, graph)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_equivariance_on_a_converted_resnet8(variant):
    """Permute the channels of ``layer1.0.conv1`` in the network (function-preserving: conv1 rows, bn1, conv2
    columns); the metanetwork's output network must be the equally permuted output network."""
    convert = pytest.importorskip("utils.convert")
    from nn.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet8").eval()
    for m in model.modules():  # non-trivial BN statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    graph = convert.model_to_graph(model)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(5))
    block = model.layer1[0]
    with torch.no_grad():
        block.conv1.weight.copy_(block.conv1.weight[perm])
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(block.bn1, name).copy_(getattr(block.bn1, name)[perm])
        block.conv2.weight.copy_(block.conv2.weight[:, perm])
    graph_p = convert.model_to_graph(model)
    meta = make_meta(graph, hidden_dim=16, num_layers=2, **VARIANTS[variant])
    with torch.no_grad():
        state = convert.graph_to_state_dict(meta(graph))
        state_p = convert.graph_to_state_dict(meta(graph_p))
    expected = dict(state)
    expected["layer1.0.conv1.weight"] = state["layer1.0.conv1.weight"][perm]
    for name in ("weight", "bias", "running_mean", "running_var"):
        expected[f"layer1.0.bn1.{name}"] = state[f"layer1.0.bn1.{name}"][perm]
    expected["layer1.0.conv2.weight"] = state["layer1.0.conv2.weight"][:, perm]
    assert state_p.keys() == expected.keys()
    # The in-layer rank feature (norm - min) / (max - min) of the magnitude features amplifies float32
    # summation-order differences by up to 1 / (relative span of the layer's norms): measured up to 1e-4
    # relative with 1 thread. A wrong permutation gives differences of order 1.
    atol, rtol = (ATOL, 0.0) if variant == "additive" else (1e-4, 1e-3)
    for key in expected:
        torch.testing.assert_close(state_p[key], expected[key], atol=atol, rtol=rtol, msg=key)
    # and the edit is real: the output network differs from the input network
    assert (state["layer1.0.conv2.weight"] - model.state_dict()["layer1.0.conv2.weight"][:, perm.argsort()]).abs().max() > 0


def test_multiplicative_layer_follows_its_rule_edge_by_edge():
    """The published rule, written out per node and per edge with Python loops, on a small random graph."""
    torch.manual_seed(0)
    H, N, E = 6, 7, 15
    layer = MultiplicativeEdgeLayer(H).double()
    h, e = torch.randn(N, H, dtype=torch.float64), torch.randn(E, H, dtype=torch.float64)
    index = torch.randint(0, N - 1, (2, E))  # node N-1 has no edge at all
    h_new, e_new = layer(h, e, index)
    act, sign = torch.nn.functional.silu, direction_sign(H, dtype=torch.float64)
    hn = torch.nn.functional.layer_norm(h, (H,))
    f = {name: (lambda x, m=getattr(layer, name): act(m(x))) for name in ("msg_src", "msg_dst", "gate_src", "gate_dst")}

    def pna(msgs):
        if not msgs:
            return torch.zeros(4 * H, dtype=torch.float64)
        m = torch.stack(msgs)
        var = m.var(0, unbiased=False)  # PyG's std: 0 where the variance is below its eps
        std = torch.where(var > sc.STD_EPS, var.clamp(min=sc.STD_EPS).sqrt(), torch.zeros_like(var))
        return torch.cat([m.mean(0), std, m.max(0).values, m.min(0).values])

    for n in range(N):
        fwd = [f["msg_dst"](hn[n]) * f["msg_src"](hn[s]) * e[k] for k, (s, t) in enumerate(index.T.tolist()) if t == n]
        bwd = [f["msg_dst"](hn[n]) * f["msg_src"](hn[t]) * e[k] * sign
               for k, (s, t) in enumerate(index.T.tolist()) if s == n]
        torch.testing.assert_close(h_new[n], h[n] + layer.post(pna(fwd)) + layer.post(pna(bwd)))
    for k, (s, t) in enumerate(index.T.tolist()):
        expected = e[k] + f["gate_src"](hn[s]) * f["gate_dst"](hn[t]) * e[k] \
            + sign * f["gate_src"](hn[t]) * f["gate_dst"](hn[s]) * e[k] * sign
        torch.testing.assert_close(e_new[k], expected)


def test_multiplicative_layer_keeps_the_size_of_the_edge_state():
    """Scaling every edge state by c > 0 scales the edge update and the node update by c (the fast layer
    LayerNorms the edges, so there the size of a weight is normalised away)."""
    torch.manual_seed(1)
    H, N, E = 8, 10, 40
    # large edge states: every segment's variance is far above the std's eps, which would break the scaling
    h, e = torch.randn(N, H, dtype=torch.float64), 100 * torch.randn(E, H, dtype=torch.float64)
    index = torch.randint(0, N, (2, E))
    layer = MultiplicativeEdgeLayer(H).double()
    torch.nn.init.zeros_(layer.post.bias)  # so that the node update is linear in the aggregates
    (h1, e1), (h3, e3) = layer(h, e, index), layer(h, 3 * e, index)
    torch.testing.assert_close(e3, 3 * e1)
    torch.testing.assert_close(h3 - h, 3 * (h1 - h))
    fast = EdgeMessageLayer(H, kernels=False).double()
    torch.nn.init.zeros_(fast.post.bias)
    (g1, _), (g3, _) = fast(h, e, index), fast(h, 3 * e, index)
    torch.testing.assert_close(g3, g1)  # LayerNorm-ed edges: the node update does not see the scale


def _tensors(obj, seen=None):
    """Every tensor reachable from a graph or layout: its fields, dicts, lists and EdgeIndex blocks."""
    from utils.convert.graph import EdgeBlock, EdgeIndex
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
    elif isinstance(obj, EdgeIndex):
        yield from _tensors(obj.blocks)
        yield from _tensors(obj._built)
    elif isinstance(obj, (EdgeBlock, NetworkGraph, GraphLayout)):
        for name, v in vars(obj).items():
            if name not in ("_copies", "params"):  # other devices' copies; node indices: utils.convert._index
                yield from _tensors(v)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_graph_and_a_metanetwork_move_whole_to_the_meta_device(variant):
    """``NetworkGraph.to`` moves every tensor, the layout's edge ids and node types included, so a forward on
    another device copies nothing per call: on the ``meta`` device any tensor left on the CPU fails."""
    convert = pytest.importorskip("utils.convert")
    from nn.models import create_model

    graph = convert.model_to_graph(create_model("resnet8"))
    _ = graph.edge_index["conv3x3"]  # one type built on the CPU before the move, the others after it
    meta = make_meta(graph, hidden_dim=8, num_layers=2, **VARIANTS[variant]).to("meta")
    moved = graph.to("meta")
    devices = {t.device.type for t in _tensors(moved)}
    assert devices == {"meta"}, devices
    assert {moved.edge_index[t].device.type for t in moved.edge_index} == {"meta"}
    assert graph.to("meta").layout is moved.layout  # the device copy is made once and kept
    assert moved.layout.to("cpu") is graph.layout and graph.to("cpu").layout is graph.layout
    out = meta(moved)
    assert {t.device.type for t in _tensors(out)} == {"meta"}
    assert out.node_features.shape == graph.node_features.shape
    assert {t: f.shape for t, f in out.edge_features.items()} == {t: f.shape for t, f in graph.edge_features.items()}
