"""Training throughput of zoo models, standard layout against channels-last, beside the machine's limit.

    python bench/train_throughput.py                                # ResNet-20/56, VGG-19 at 32x32, batch 128
    python bench/train_throughput.py --models resnet20 --image-size 28   # the Fashion-MNIST task's network
    python bench/train_throughput.py --models resnet50 --image-size 224 --batch-size 32

One line per model and layout: images/s of a forward + backward + SGD step, the model's training FLOPs per
image (3 x 2 x its MACs: forward, and a backward of about twice the forward) and the fraction of the
nominal fp32 peak this reaches, then the channels-last / standard ratio. The two layouts of a model are
timed alternately, ``--rounds`` times each, and the best round of each is kept, so a load that comes and
goes on the machine touches both alike. The training loops use channels-last (``channels_last: true``) on
the measured grounds printed here.

Nominal peak = threads x clock x fp32 FLOPs per cycle per core: 2 FMA units x vector lanes x 2 (16 lanes
with AVX-512 on Intel, 8 with AVX2; AMD cores before Zen 5 run AVX-512 at 256 bits, so 8 there). The clock
is the highest ``cpu MHz`` in /proc/cpuinfo; turbo clocks make the true peak higher.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torch_pruning as tp

from nn.models import create_model
from utils.device import get_device

LAYOUTS = {"standard": torch.contiguous_format, "channels_last": torch.channels_last}


def nominal_peak_gflops(threads: int) -> tuple[float, str]:
    """fp32 GFLOP/s of ``threads`` cores by the formula of the module docstring, and how it was reached."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    mhz = max((float(line.split(":")[1]) for line in text.splitlines() if line.startswith("cpu MHz")), default=0.0)
    capability = torch.backends.cpu.get_cpu_capability()
    amd = "AuthenticAMD" in text
    lanes = 16 if capability == "AVX512" and not amd else 8 if capability in ("AVX2", "AVX512") else 4
    flops = 2 * lanes * 2
    return threads * mhz / 1000 * flops, f"{threads} threads x {mhz / 1000:.2f} GHz x {flops} FLOP/cycle ({capability})"


def setup(name: str, batch_size: int, image_size: int, device: torch.device, layout: torch.memory_format):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, **({"image_size": image_size} if name.startswith("vit") else {}))
    model.to(device).train()
    model.to(memory_format=layout)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch_size, 3, image_size, image_size, device=device).contiguous(memory_format=layout)
    y = torch.randint(0, 10, (batch_size,), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    step()  # warm-up (allocations, cuDNN autotune)
    return model, step


def timed(step, steps: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet56", "vgg19_bn"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per layout; the best is kept")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = get_device(args.device)
    threads = torch.get_num_threads()
    peak, how = nominal_peak_gflops(threads)
    print(f"device={device} threads={threads} batch={args.batch_size} size={args.image_size}")
    if device.type == "cpu":
        print(f"nominal fp32 peak {peak:.0f} GFLOP/s = {how}")
    for name in args.models:
        runs = {label: setup(name, args.batch_size, args.image_size, device, fmt) for label, fmt in LAYOUTS.items()}
        macs, _ = tp.utils.count_ops_and_params(runs["standard"][0], torch.zeros(1, 3, args.image_size, args.image_size,
                                                                                    device=device))
        flops = 6 * macs  # per image: forward 2 x MACs, backward about twice that
        best = {label: float("inf") for label in LAYOUTS}
        for _ in range(args.rounds):
            for label, (_, step) in runs.items():
                best[label] = min(best[label], timed(step, args.steps, device))
        for label, seconds in best.items():
            rate = args.batch_size / seconds
            share = f"  {100 * rate * flops / 1e9 / peak:5.1f}% of peak" if device.type == "cpu" else ""
            print(f"{name:>10} {label:>13}: {rate:8.1f} img/s  {1000 * seconds:8.1f} ms/step  "
                  f"{flops / 1e6:7.1f} MFLOP/img  {rate * flops / 1e9:6.1f} GFLOP/s{share}")
        print(f"{name:>10} channels_last / standard: {best['standard'] / best['channels_last']:.2f}x")


if __name__ == "__main__":
    main()
