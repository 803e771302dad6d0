"""Measured inference latency: fewer MACs do not always make a network faster, so we report both."""
from __future__ import annotations

import statistics
import time
from typing import Dict

import torch


@torch.no_grad()
def measure_latency(model: torch.nn.Module, example: torch.Tensor, warmup: int = 3, repeats: int = 10) -> Dict[str, float]:
    """Median and interquartile range (ms) of ``model(example)`` in eval mode on ``example``'s device."""
    was_training = model.training
    model.eval()
    sync = torch.cuda.synchronize if example.device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        model(example)
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model(example)
        sync()
        times.append(1000 * (time.perf_counter() - t))
    model.train(was_training)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"latency_ms": statistics.median(times), "latency_iqr_ms": q[2] - q[0], "batch": example.shape[0],
            "device": str(example.device)}
