"""GPU smoke check: the CUDA code paths of training, meta-training, the metanetwork and DDP, in a few minutes.

    python bench/cuda_check.py                            # on a machine with an NVIDIA GPU
    python bench/cuda_check.py --only amp_train ddp_nccl --reps 5
    python bench/cuda_check.py --device cpu --reps 1      # the same code paths on the CPU

Checks, one output line each (name, PASS / FAIL / SKIP, a figure or the reason):

- ``amp_train``: ResNet-20 trained for a few steps on random 32x32 images by ``utils.train.train_one_epoch``
  with float16 autocast and a GradScaler; the loss must stay finite (the line says whether it fell).
  On the CPU mixed precision is off: ``utils.train`` autocasts on CUDA only.
- ``meta_train_step``: one ``main.meta_train.MetaTrainer.step`` of the ``task=resnet20_on_digits`` config on a
  fresh ResNet-20 and random images, then the meta-optimiser's step; the metanetwork's gradients must be
  finite and not all zero, and the step must change its parameters.
- ``metanetwork_fwd_bwd``: the ``metanetwork=resnet56`` metanetwork on the graph of ResNet-56, torch path (the C
  kernels off), forward and forward+backward timed as the median of ``--reps`` after one warm-up.
- ``ddp_nccl``: a one-process NCCL group (gloo on the CPU), one DistributedDataParallel step of ResNet-8 and
  an all_reduce.

Without CUDA the checks print SKIP and the script exits 0; it exits 1 when any check fails. A check that
raises prints FAIL with the error's first line and the next check runs.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List

import torch
import torch.distributed as dist
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from configs import load_group_option
from data_loaders.data_models import DataModel
from main.meta_train import MetaTrainer, build_meta_optimizer, meta_step
from main.run_modes import RunContext
from nn.metanetwork import build_metanetwork
from nn.models import create_model
from utils.convert import model_to_graph
from utils.train import Limits, train_one_epoch

ROOT = Path(__file__).resolve().parents[1]


class Skip(Exception):
    """A check that cannot run here; its message is the reason."""


class CheckFailed(Exception):
    """A check that ran and found something wrong; its message says what."""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images(n: int, batch_size: int, device: torch.device) -> List[tuple]:
    """``n`` batches of random 32x32 images with labels of 10 classes, on ``device``."""
    return [(torch.randn(batch_size, 3, 32, 32, device=device), torch.randint(0, 10, (batch_size,), device=device))
            for _ in range(n)]


def check_amp_train(device: torch.device, reps: int) -> str:
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batch_size = 128 if device.type == "cuda" else 32
    loader = DataLoader(TensorDataset(*(torch.cat(t) for t in zip(*images(4, batch_size, device)))),
                        batch_size=batch_size)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    losses, seconds = [], 0.0
    for epoch in range(1 + max(reps, 2)):  # the first pass (allocations, cuDNN autotuning) is not timed
        t = time.perf_counter()
        losses.append(train_one_epoch(model, loader, optimizer, device, scaler=scaler, progress=False)["loss"])
        sync(device)
        seconds += (time.perf_counter() - t) if epoch else 0.0
    if not all(math.isfinite(v) for v in losses):
        raise CheckFailed(f"loss not finite: {losses}")
    steps = (len(losses) - 1) * len(loader)
    amp = f"fp16 autocast, scale {scaler.get_scale():g}" if scaler else "AMP off on CPU"
    trend = "fell" if losses[-1] < losses[0] else "did not fall"
    return (f"loss {losses[0]:.3f} -> {losses[-1]:.3f} ({trend}), {steps / seconds:.1f} steps/s at batch {batch_size} "
            f"({amp})")


def check_meta_train_step(device: torch.device, reps: int) -> str:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("main", overrides=["task=resnet20_on_digits", "task.meta_train.batches_per_step=2"])
    torch.manual_seed(0)
    item = DataModel(0, create_model("resnet20", num_classes=10).eval(), {})
    metanet = build_metanetwork(cfg.metanetwork, item.graph).to(device)
    mt = cfg.task.meta_train
    trainer = MetaTrainer(cfg, RunContext(device, Path("."), Limits()), metanet,
                          torch.zeros(1, 3, 32, 32, device=device))
    optimizer = build_meta_optimizer(metanet, str(mt.optimizer), float(mt.lr), float(mt.weight_decay))
    optimizer.zero_grad(set_to_none=True)
    before = [p.detach().clone() for p in metanet.parameters()]
    t = time.perf_counter()
    r = trainer.step(item, iter(images(int(mt.batches_per_step), 32, device)))
    sync(device)
    seconds = time.perf_counter() - t
    grads = [p.grad for p in metanet.parameters() if p.grad is not None]
    if not r["finite"] or not grads or not all(torch.isfinite(g).all() for g in grads):
        raise CheckFailed(f"non-finite step: task loss {r['task_loss']}, {len(grads)} parameters with gradients")
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
    if norm == 0.0:
        raise CheckFailed("the metanetwork's gradient is zero")
    meta_step(optimizer, metanet, str(mt.optimizer))
    moved = sum(not torch.equal(b, p) for b, p in zip(before, metanet.parameters()))
    if moved == 0:
        raise CheckFailed(f"the {mt.optimizer} step changed no parameter")
    return (f"task loss {r['task_loss']:.3f}, sparsity {r['sparsity']:.3g}, metanetwork grad norm {norm:.3g}, "
            f"{moved}/{len(before)} tensors updated, step {seconds:.2f}s")


def check_metanetwork_fwd_bwd(device: torch.device, reps: int) -> str:
    cfg = OmegaConf.merge(load_group_option("metanetwork", "resnet56"), {"kernels": False})
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    graph = model_to_graph(create_model("resnet56", num_classes=10))
    metanet = build_metanetwork(cfg, graph).to(device)
    on_device = graph.to(device)  # the layout's index tensors move with it

    def forward() -> tuple:
        return metanet.forward_features(on_device.node_features, on_device.edge_index, on_device.edge_features,
                                        on_device.node_type)

    def fwd() -> tuple:
        with torch.no_grad():
            return forward()

    def fwd_bwd() -> None:
        x, edges = forward()
        (x.square().sum() + sum(e.square().sum() for e in edges.values())).backward()
        metanet.zero_grad(set_to_none=True)

    ms = {"fwd": median_ms(fwd, device, reps), "fwd+bwd": median_ms(fwd_bwd, device, reps)}
    x, edges = fwd()
    if not torch.isfinite(x).all() or not all(torch.isfinite(e).all() for e in edges.values()):
        raise CheckFailed("the metanetwork's output is not finite")
    peak = f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else ""
    return (f"fwd {ms['fwd']:.1f} ms, fwd+bwd {ms['fwd+bwd']:.1f} ms (median of {max(reps, 1)}; "
            f"{graph.num_nodes:,} nodes, {graph.layout.num_edges:,} edges, {cfg.num_layers}x{cfg.hidden_dim}{peak})")


def median_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median wall time of ``fn`` in ms over ``reps`` calls (at least one) after one warm-up call."""
    times = []
    for _ in range(1 + max(reps, 1)):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times[1:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def single_rank_env() -> Iterator[None]:
    """The launcher's variables of rank 0 in a world of 1, restored afterwards."""
    values = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
              "LOCAL_RANK": "0"}
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def check_ddp_nccl(device: torch.device, reps: int) -> str:
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_available() or not dist.is_backend_available(backend):
        raise Skip(f"torch.distributed has no {backend} backend in this build")
    with single_rank_env():
        # utils.distributed.init_distributed makes no group for a world of 1, so join one directly.
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=120),
                                **({"device_id": device} if backend == "nccl" else {}))
        try:
            torch.manual_seed(0)
            model = torch.nn.parallel.DistributedDataParallel(
                create_model("resnet8", num_classes=10).to(device),
                device_ids=[device.index] if device.type == "cuda" else None)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
            (x, y), = images(1, 16, device)
            t = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            total = torch.full((4,), 3.0, device=device)
            dist.all_reduce(total)
            sync(device)
            seconds = time.perf_counter() - t
        finally:
            dist.destroy_process_group()
    if not math.isfinite(loss.item()) or not torch.equal(total.cpu(), torch.full((4,), 3.0)):
        raise CheckFailed(f"loss {loss.item()}, all_reduce gave {total.tolist()} instead of 3s")
    return f"{backend}: DDP step of resnet8 + all_reduce in {1000 * seconds:.0f} ms, loss {loss.item():.3f}"


CHECKS: Dict[str, Callable[[torch.device, int], str]] = {
    "amp_train": check_amp_train,
    "meta_train_step": check_meta_train_step,
    "metanetwork_fwd_bwd": check_metanetwork_fwd_bwd,
    "ddp_nccl": check_ddp_nccl,
}


def run_check(name: str, device: torch.device, reps: int) -> str:
    """Run one check and print its line; returns PASS, FAIL or SKIP."""
    t = time.perf_counter()
    try:
        status, detail = "PASS", CHECKS[name](device, reps)
    except Skip as err:
        status, detail = "SKIP", str(err)
    except CheckFailed as err:
        status, detail = "FAIL", str(err)
    except Exception as err:  # noqa: BLE001  (any error is this check's failure; the next one still runs)
        lines = str(err).strip().splitlines()
        status, detail = "FAIL", f"{type(err).__name__}: {lines[0] if lines else ''}"
    print(f"{name:<20} {status}  {detail}  [{time.perf_counter() - t:.1f}s]", flush=True)
    return status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions (and extra training passes)")
    parser.add_argument("--only", nargs="+", default=list(CHECKS), choices=list(CHECKS))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads with --device cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        for name in args.only:
            print(f"{name:<20} SKIP  no CUDA here (torch {torch.__version__}); --device cpu runs it on the CPU")
        return
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
        where = torch.cuda.get_device_name(device)
    else:
        torch.set_num_threads(args.threads)
        where = f"{torch.get_num_threads()} threads"
    print(f"device={device} ({where}) torch={torch.__version__} reps={args.reps}", flush=True)
    statuses = [run_check(name, device, args.reps) for name in args.only]
    sys.exit(1 if "FAIL" in statuses else 0)


if __name__ == "__main__":
    main()
