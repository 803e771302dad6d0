"""Training throughput of zoo models: images/s for forward+backward+SGD step, and peak memory on CUDA.

    python bench/train_throughput.py                      # CIFAR models at 32x32, batch 128
    python bench/train_throughput.py --models resnet50 --image-size 224 --batch-size 32

Prints one line per model. Figures from a shared machine are noisy: compare models within one run.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from nn.models import create_model
from utils.device import get_device


def measure(name: str, batch_size: int, image_size: int, steps: int, device: torch.device) -> dict:
    model = create_model(name, num_classes=10, **({"image_size": image_size} if name.startswith("vit") else {}))
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch_size, 3, image_size, image_size, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    step()  # warm-up (allocations, cuDNN autotune)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return {"images_per_s": steps * batch_size / seconds, "step_ms": 1000 * seconds / steps, "peak_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet8", "resnet20", "resnet56", "vgg19_bn"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = get_device(args.device)
    print(f"device={device} threads={torch.get_num_threads()} batch={args.batch_size} size={args.image_size}")
    for name in args.models:
        r = measure(name, args.batch_size, args.image_size, args.steps, device)
        print(f"{name:>10}: {r['images_per_s']:8.1f} img/s  {r['step_ms']:8.1f} ms/step  peak {r['peak_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
