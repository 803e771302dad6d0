"""Metanetwork speed and memory: forward and forward+backward on the graphs of real networks.

    python bench/metanetwork.py                          # ResNet-56 (fast + PyG reference), VGG-19, ResNet-50
    python bench/metanetwork.py --only resnet56 --reps 5
    python bench/metanetwork.py --per-layer                # one layer of the ResNet-56 graph against the machine's limits
    OMP_NUM_THREADS=1 python bench/metanetwork.py --only resnet56 --threads 1   # on a busy shared machine

The fast layer runs the fused C kernels of ``nn/metanetwork/kernels.py`` on CPU (built once per hidden width
into ``~/.cache/graph_meta_pruning/kernels``, ~1 s, before the timed iterations); ``METANETWORK_KERNELS=0``
times the blocked torch loop instead. VGG-19 and ResNet-50 run forward and forward+backward with
per-layer activation checkpointing.

Each configuration runs in a fresh subprocess so that its peak memory (``ru_maxrss`` on CPU,
``torch.cuda.max_memory_allocated`` on CUDA) is its own. Times are the minimum over ``--reps`` repetitions
after one warm-up (the first iteration, printed as ``cold``, pays for first-touch page faults and allocator
growth; on a shared machine the minimum is the least disturbed figure). Graphs come from
``utils.convert.model_to_graph`` on ``nn.models.create_model(...)``; synthetic graphs of the same sizes are
used when the converter is unavailable (the output says which).

``--per-layer`` times one message-passing layer (H = 64) on the ResNet-56 graph's edges, forward and
forward+backward, with the C kernels and with the torch path (``kernels=False``), and sets each against the
machine's limits in the same run: the FLOPs a layer must do (its ``E x H x H`` edge product and the
per-edge element work; the backward counted as twice the forward) against the fp32 peak
(``--peak-gflops``, default: cores x the CPU's maximum clock x 32 FLOPs per cycle, two 256-bit FMA pipes),
and the bytes it must move at least (edge rows read and written, the saved pre-activations, indices)
against the copy bandwidth measured here (a 256 MB ``copy_``). The node tables it gathers from and
scatters into (``N x H`` each, 10 of them) are counted once, as if they stayed in cache.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

# name: (model, hidden, layers, checkpoint, layer impls, mode)
CONFIGS = {
    "resnet56": ("resnet56", 64, 8, False, ("fast", "pyg"), "fwd+bwd"),
    "vgg19": ("vgg19_bn", 32, 8, True, ("fast",), "fwd+bwd"),
    "resnet50": ("resnet50", 16, 6, True, ("fast",), "fwd+bwd"),
}
SYNTHETIC = {  # nodes, {edge type: (count, width)}
    "resnet56": (2045, {"conv3x3": (94256, 9), "conv1x1": (2560, 1), "identity": (912, 1), "linear": (640, 1)}),
    "vgg19_bn": (5507, {"conv3x3": (2230000, 9), "linear": (51200, 1)}),
    "resnet50": (26560, {"conv1x1": (10500000, 1), "conv3x3": (4200000, 9), "conv7x7": (9408, 49),
                         "identity": (1000, 1), "linear": (2048000, 1)}),
}


def load_graph(model_name: str):
    try:
        from nn.models import create_model
        from utils.convert import model_to_graph
        return model_to_graph(create_model(model_name)), "real"
    except ImportError:
        from utils.convert.graph import GraphLayout, NetworkGraph
        n, types = SYNTHETIC[model_name]
        g = torch.Generator().manual_seed(0)
        layout = GraphLayout(n, torch.ones(n, dtype=torch.long), tuple(f"s{i}" for i in range(9)), torch.zeros(9),
                             {t: torch.randint(0, n, (2, c), generator=g) for t, (c, _) in types.items()},
                             {t: d for t, (_, d) in types.items()}, {"identity": 1.0} if "identity" in types else {},
                             [], [], [])
        return NetworkGraph(layout, torch.randn(n, 9), {t: torch.randn(c, d) for t, (c, d) in types.items()}, {}), \
            "synthetic"


def worker(args: argparse.Namespace) -> None:
    from nn.metanetwork import GraphMetanetwork

    torch.set_num_threads(args.threads or torch.get_num_threads())
    device = torch.device(args.device)
    model_name, hidden, layers, ckpt, _, _ = CONFIGS[args.config]
    t0 = time.perf_counter()
    graph, kind = load_graph(model_name)
    convert_s = time.perf_counter() - t0
    graph = graph.to(device)  # the layout's index tensors too
    torch.manual_seed(0)
    meta = GraphMetanetwork.from_graph(graph, hidden_dim=hidden, num_layers=layers, node_ratio=0.01,
                                       edge_ratio=0.01, checkpoint=ckpt, layer=args.layer).to(device)
    for layer in meta.layers:  # time the reference as a straightforward layer: plain activation of messages
        if hasattr(layer, "tie_safe"):
            layer.tie_safe = False
    rss_graph = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def fwd() -> None:
        with torch.no_grad():
            meta(graph)
        sync()

    def fwd_bwd() -> None:
        out = meta(graph)
        loss = out.node_features.square().sum() + sum(f.square().sum() for f in out.edge_features.values())
        del out
        loss.backward()
        meta.zero_grad(set_to_none=True)
        sync()

    result = {"config": args.config, "layer": args.layer, "graph": kind, "nodes": graph.num_nodes,
              "edges": graph.layout.num_edges, "params": meta.num_parameters(), "convert_s": convert_s,
              "checkpoint": ckpt, "threads": torch.get_num_threads(), "device": str(device)}
    for name, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        if name == "fwd+bwd" and args.mode == "fwd":
            continue
        times = []
        for _ in range(1 + args.reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        result[name] = min(times[1:]) if args.reps else times[0]
        result[name + "_cold"] = times[0]
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        result["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        result["rss_before_gib"] = rss_graph
    print("RESULT " + json.dumps(result), flush=True)


def layer_costs(num_nodes: int, num_edges: int, hidden: int) -> dict:
    """FLOPs and the least bytes of one layer's forward (``fwd``) and forward+backward (``fwd+bwd``)."""
    E, N, H = num_edges, num_nodes, hidden
    # per edge: layer norm (5H), the edge product (2 H^2), both directions' sums (4H), two activations
    # (~20H each with the exp polynomial), two rows of statistics (6H each), the gated update (6H);
    # per node: five H x H maps and the 4H -> H post map twice
    flops = E * (2 * H * H + 73 * H) + N * (5 + 8) * 2 * H * H
    fwd_bytes = E * (4 * H * 2 + 4 * 2 * H + 16) + 10 * N * H * 4  # e in, e_new out, pre out, src/dst; node tables
    return {"fwd": (flops, fwd_bytes), "fwd+bwd": (3 * flops, fwd_bytes + E * (4 * H * 4 + 4 * 2 * H + 16))}


def copy_bandwidth() -> float:
    """Bytes per second of a 256 MB float32 ``copy_`` (read + write), best of 5."""
    a, b = torch.ones(64 * 2**20), torch.empty(64 * 2**20)
    b.copy_(a)
    best = min(_timed(lambda: b.copy_(a)) for _ in range(5))
    return 2 * a.numel() * 4 / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def peak_gflops() -> float:
    """Threads x maximum clock x 32 fp32 FLOPs per cycle (two 256-bit FMA pipes), the clock from ``lscpu``
    or ``/proc/cpuinfo`` (2.45 GHz where neither says)."""
    mhz = 0.0
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith(("CPU max MHz", "CPU MHz")) and not mhz:
                mhz = float(line.split(":")[1])
        if not mhz:
            with open("/proc/cpuinfo") as f:
                mhz = float(next((ln for ln in f if ln.startswith("cpu MHz")), "x: 0").split(":")[1])
    except (OSError, ValueError):
        pass
    return torch.get_num_threads() * (mhz or 2450.0) / 1000 * 32


def per_layer(args: argparse.Namespace) -> None:
    from nn.metanetwork import EdgeMessageLayer

    torch.set_num_threads(args.threads or torch.get_num_threads())
    graph, kind = load_graph("resnet56")
    N, H = graph.num_nodes, 64
    index = torch.cat([graph.edge_index[t] for t in graph.edge_index], dim=1)
    E = index.shape[1]
    peak, bandwidth = args.peak_gflops or peak_gflops(), copy_bandwidth()
    print(f"one layer, H={H}, on the {kind} ResNet-56 graph: {N:,} nodes, {E:,} edges; threads "
          f"{torch.get_num_threads()}, fp32 peak {peak:.0f} GFLOPS (--peak-gflops), copy bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s (measured)")
    torch.manual_seed(0)
    h, e = torch.randn(N, H), torch.randn(E, H)
    costs = layer_costs(N, E, H)
    for kernels in (True, False):
        layer = EdgeMessageLayer(H, "silu", kernels=kernels)
        hg, eg = h.clone().requires_grad_(), e.clone().requires_grad_()

        def fwd() -> None:
            with torch.no_grad():
                layer(h, e, index)

        def fwd_bwd() -> None:
            hn, en = layer(hg, eg, index)
            (hn.square().sum() + en.square().sum()).backward()
            layer.zero_grad(set_to_none=True)

        for name, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            fn()  # warm-up (builds the kernels)
            best = min(_timed(fn) for _ in range(max(args.reps, 1)))
            flops, nbytes = costs[name]
            print(f"  {'C kernels' if kernels else 'torch path':>10} {name:>7}: {1000 * best:7.1f} ms  "
                  f"{flops / best / 1e9:6.1f} GFLOPS ({100 * flops / best / 1e9 / peak:4.1f}% of peak)  "
                  f"{nbytes / best / 1e9:5.1f} GB/s ({100 * nbytes / best / bandwidth:4.1f}% of copy bandwidth)")


def describe(r: dict) -> str:
    times = "  ".join(f"{k} {r[k]:7.2f}s (cold {r[k + '_cold']:.2f}s)" for k in ("fwd", "fwd+bwd") if k in r)
    mem = f"peak {r['peak_gib']:.2f} GiB" + (f" (graph+model {r['rss_before_gib']:.2f})" if "rss_before_gib" in r else "")
    return (f"{r['config']:>9} {r['layer']:>4} [{r['graph']} graph: {r['nodes']:,} nodes, {r['edges']:,} edges, "
            f"{r['params']:,} params{', checkpoint' if r['checkpoint'] else ''}]  {times}  {mem}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--timeout", type=int, default=600, help="seconds per configuration")
    parser.add_argument("--per-layer", action="store_true", help="one layer against the machine's limits")
    parser.add_argument("--peak-gflops", type=float, default=0.0, help="fp32 peak (default: from lscpu)")
    parser.add_argument("--worker", nargs=3, metavar=("CONFIG", "LAYER", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.config, args.layer, args.mode = args.worker
        return worker(args)
    if args.per_layer:
        return per_layer(args)
    print(f"device={args.device} threads={args.threads or torch.get_num_threads()} torch={torch.__version__}")
    for config in args.only:
        *_, impls, mode = CONFIGS[config]
        results = {}
        for layer in impls:
            reps = args.reps if config == "resnet56" else min(args.reps, 1)
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", config, layer, mode, "--reps", str(reps),
                   "--device", args.device, "--threads", str(args.threads)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                print(f"{config:>9} {layer:>4} skipped: over {args.timeout}s")
                continue
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                print(f"{config:>9} {layer:>4} failed (rc {proc.returncode}): {proc.stderr.strip()[-400:]}")
                continue
            results[layer] = json.loads(line[0][7:])
            print(describe(results[layer]), flush=True)
        if "fast" in results and "pyg" in results:
            for k in ("fwd", "fwd+bwd"):
                print(f"{config:>9} speed-up of the fast layer over the PyG reference, {k}: "
                      f"{results['pyg'][k] / results['fast'][k]:.1f}x (cold: "
                      f"{results['pyg'][k + '_cold'] / results['fast'][k + '_cold']:.1f}x)")


if __name__ == "__main__":
    main()
