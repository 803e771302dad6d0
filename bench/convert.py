"""Network <-> graph conversion: speed, and memory over the model's own size.

    python bench/convert.py                        # resnet56 vgg19_bn resnet50 vit_b_16 vit_l_16
    python bench/convert.py --models vit_h_14 --repeats 1
    python bench/convert.py --models resnet56 --repeats 20

A name is a zoo model (``nn.models.list_models()``) or any torchvision classification model (built with
random weights; nothing is downloaded). Each model runs in its own subprocess, and each phase's peak
resident memory is read from the kernel's high-water mark (``VmHWM``, reset before the phase through
``/proc/self/clear_refs``), so a phase is not charged for what model construction or another phase used.

Columns: ``model MiB`` is the parameter and buffer bytes; ``convert`` the peak memory the first
``model_to_graph`` (trace + features) adds over the memory held before it, and ``graph`` what the graph
keeps, both as multiples of ``model MiB``; ``to state`` the peak of mapping the graph back to a
materialised state dict; ``edge ids`` what building ``edge_index`` (only the metanetwork reads it; 16
bytes per edge) adds. Times are the median over ``--repeats`` cached calls.
Targets: conversion <= 3x the model's bytes; cached ResNet-56 <= 30 ms each way, ResNet-50 <= 300 ms,
ViT-B/16 <= 3 s; ``torchvision.models.vit_h_14`` (2.4 GiB of weights) converts on a 24 GiB machine.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

_MIB = 2 ** 20


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    """Reset this process's peak-RSS mark (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_kib(exact: bool) -> int:
    """The process's peak RSS: since the last reset where it could be reset, else since it started."""
    return _status_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class Phase:
    """Peak resident memory a block of code adds over what was resident when it started, in bytes."""

    def __enter__(self) -> "Phase":
        self.exact = _reset_peak()
        self.start = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc) -> None:
        self.added = max(0, _peak_kib(self.exact) * 1024 - self.start)


def build(name: str):
    import torch
    import torchvision

    from nn.models import create_model
    from nn.models.registry import list_models

    torch.manual_seed(0)
    classes = 1000 if name in ("resnet50", "vit_b_16") else 10
    if name in list_models():
        return create_model(name, num_classes=classes).eval()
    try:
        return torchvision.models.get_model(name, weights=None).eval()
    except ValueError as e:
        raise SystemExit(f"unknown model {name!r}: not in the zoo ({', '.join(list_models())}) nor in "
                         f"torchvision.models.list_models() ({e})") from None


def measure(name: str, repeats: int) -> dict:
    import torch

    from utils.convert import graph_to_state_dict, model_to_graph

    model = build(name)
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    with Phase() as convert:
        t0 = time.perf_counter()
        graph = model_to_graph(model)
        first = time.perf_counter() - t0
    graph_bytes = graph.node_features.nbytes + sum(f.nbytes for f in graph.edge_features.values())

    def timed(fn):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
            del out
        return statistics.median(times) if times else float("nan")

    def materialised():  # contiguous tensors, as loading the state dict into a network would need
        return {k: v.contiguous() for k, v in graph_to_state_dict(graph).items()}

    with torch.no_grad():
        to_graph = timed(lambda: model_to_graph(model))
        with Phase() as back_mem:
            materialised()
        back = timed(materialised)
        views = timed(lambda: graph_to_state_dict(graph))
    with Phase() as ids:
        t0 = time.perf_counter()
        num_edges = sum(int(ei.shape[1]) for ei in graph.edge_index.values())
        ids_s = time.perf_counter() - t0
    assert num_edges == graph.layout.num_edges
    return {"model": name, "nodes": graph.num_nodes, "edges": num_edges,
            "params": sum(p.numel() for p in model.parameters()), "model_mib": model_bytes / _MIB,
            "first_call_s": first, "model_to_graph_ms": 1000 * to_graph,
            "graph_to_state_dict_ms": 1000 * back,
            "graph_to_state_dict_views_ms": 1000 * views, "edge_index_s": ids_s,
            "convert_peak_x": convert.added / model_bytes, "graph_x": graph_bytes / model_bytes,
            "to_state_peak_x": back_mem.added / model_bytes, "edge_index_x": ids.added / model_bytes,
            "peak_exact": convert.exact, "process_peak_mib": _peak_kib(convert.exact) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet56", "vgg19_bn", "resnet50", "vit_b_16", "vit_l_16"])
    parser.add_argument("--repeats", type=int, default=5, help="cached calls timed per model (0: memory only)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.repeats)))
        return
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} cached calls; "
          "memory as multiples of the model's parameter+buffer bytes")
    print(f"{'model':>10} {'model MiB':>9} {'edges':>10} {'1st call':>9} {'to graph':>10} {'to state':>10} "
          f"{'convert':>8} {'graph':>6} {'to state':>8} {'edge ids':>8}")
    rows = []
    for name in args.models:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", name, "--repeats", str(args.repeats)],
                             capture_output=True, text=True)
        if out.returncode:
            print(f"{name:>10} failed (exit {out.returncode}): {out.stderr.strip().splitlines()[-1:] or 'killed'}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(r)
        approx = "" if r["peak_exact"] else " (process peak: upper bound)"
        print(f"{r['model']:>10} {r['model_mib']:>9.0f} {r['edges']:>10} {r['first_call_s']:>8.2f}s "
              f"{r['model_to_graph_ms']:>8.1f}ms {r['graph_to_state_dict_ms']:>8.1f}ms "
              f"{r['convert_peak_x']:>7.2f}x {r['graph_x']:>5.2f}x {r['to_state_peak_x']:>7.2f}x "
              f"{r['edge_index_x']:>7.2f}x{approx}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
