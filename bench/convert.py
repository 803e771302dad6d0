"""Network <-> graph conversion speed and memory: the first (tracing) call and the cached calls.

    python bench/convert.py                       # resnet56 vgg19_bn resnet50 vit_b_16
    python bench/convert.py --models resnet56 --repeats 20

Each model runs in its own subprocess so that its peak resident memory (ru_maxrss) is its own.
Targets on a 2-core CPU, cached: ResNet-56 <= 30 ms each way, ResNet-50 <= 300 ms, ViT-B/16 <= 3 s.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def measure(name: str, repeats: int) -> dict:
    import torch

    from nn.models import create_model
    from utils.convert import graph_to_state_dict, model_to_graph

    torch.manual_seed(0)
    model = create_model(name, num_classes=1000 if name in ("resnet50", "vit_b_16") else 10).eval()
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    graph = model_to_graph(model)
    first = time.perf_counter() - t0

    def timed(fn):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
            del out
        return statistics.median(times)

    to_graph = timed(lambda: model_to_graph(model))
    # Materialise the state dict (contiguous tensors), as loading it into a network would.
    back = timed(lambda: {k: v.contiguous() for k, v in graph_to_state_dict(graph).items()})
    views = timed(lambda: graph_to_state_dict(graph))
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"model": name, "nodes": graph.num_nodes, "edges": graph.layout.num_edges,
            "params": sum(p.numel() for p in model.parameters()), "first_call_s": first,
            "model_to_graph_ms": 1000 * to_graph, "graph_to_state_dict_ms": 1000 * back,
            "graph_to_state_dict_views_ms": 1000 * views,
            "peak_rss_mib": rss_peak / 1024, "model_rss_mib": rss_model / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet56", "vgg19_bn", "resnet50", "vit_b_16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.repeats)))
        return
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} cached calls")
    print(f"{'model':>10} {'nodes':>7} {'edges':>10} {'1st call':>9} {'to graph':>10} {'to state':>10} "
          f"{'(views)':>9} {'peak RSS':>9} {'(model)':>8}")
    for name in args.models:
        out = subprocess.run([sys.executable, __file__, "--one", name, "--repeats", str(args.repeats)],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{r['model']:>10} {r['nodes']:>7} {r['edges']:>10} {r['first_call_s']:>8.2f}s "
              f"{r['model_to_graph_ms']:>8.1f}ms {r['graph_to_state_dict_ms']:>8.1f}ms {r['graph_to_state_dict_views_ms']:>7.2f}ms "
              f"{r['peak_rss_mib']:>6.0f}MiB {r['model_rss_mib']:>5.0f}MiB")


if __name__ == "__main__":
    main()
