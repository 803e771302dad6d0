"""Measured inference latency: fewer MACs do not always make a network faster, so we report both."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict

import torch


def time_calls(fn: Callable[[], object], warmup: int = 3, repeats: int = 10,
               sync: Callable[[], None] = lambda: None) -> Dict[str, float]:
    """Median and interquartile range (ms) of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(1000 * (time.perf_counter() - t))
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"latency_ms": statistics.median(times), "latency_iqr_ms": q[2] - q[0]}


@torch.no_grad()
def measure_latency(model: torch.nn.Module, example: torch.Tensor, warmup: int = 3, repeats: int = 10) -> Dict[str, float]:
    """Median and interquartile range (ms) of ``model(example)`` in eval mode on ``example``'s device."""
    was_training = model.training
    model.eval()
    sync = torch.cuda.synchronize if example.device.type == "cuda" else (lambda: None)
    result = time_calls(lambda: model(example), warmup, repeats, sync)
    model.train(was_training)
    return {**result, "batch": example.shape[0], "device": str(example.device)}
