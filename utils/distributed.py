"""Distributed helpers on PyTorch's own engine (``torch.distributed`` + DistributedDataParallel).

A job is launched by ``torchrun`` (or SLURM's ``srun`` with the same environment variables), which sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. :func:`init_distributed`
reads them, picks the backend (NCCL on CUDA, gloo on the CPU) and this rank's device. Without them (plain
``python -m ...``) everything here degrades to the single-process case: rank 0 of a world of 1, no
process group, and every collective is a no-op. So library code can call these helpers unconditionally.

Failure handling: the process group has a finite timeout, so a rank blocked in a collective whose peer
died or hangs raises instead of waiting forever; :func:`run_guarded` logs a failing rank's error with its
rank and re-raises it, so the process exits non-zero and torchrun stops the other ranks.
"""
from __future__ import annotations

import datetime
import hashlib
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record
from torch.utils.data import Dataset, DistributedSampler, Sampler

from utils.device import get_device

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: a single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_rank() -> int:
    """This process's rank from the launcher's environment (0 when not launched by torchrun/srun)."""
    return int(os.environ.get("RANK", "0"))


def init_distributed(device_spec: str | None = "auto", timeout_s: float = 1800.0) -> tuple[torch.device, DistInfo]:
    """Join the process group described by the environment and choose this rank's device.

    ``device_spec`` is the run's ``device`` setting: ``auto`` picks ``cuda:LOCAL_RANK`` when CUDA is present
    and the CPU otherwise. ``timeout_s`` bounds every collective: a rank waiting on a dead or stuck peer
    fails after it instead of hanging the job.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = get_device(device_spec)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local)  # one GPU per rank on each node
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world <= 1:
        return device, DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    info = DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local,
                    backend=dist.get_backend())
    log.info("rank %d/%d (local %d) on %s, backend %s", info.rank, info.world_size, local, device, info.backend)
    return device, info


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the only rank that writes files."""
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _reduce_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (float64, so counts stay exact)."""
    if not is_distributed():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_reduce_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_true(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank; every rank gets the same answer (e.g. "skip this step")."""
    return all_reduce_sum([0.0 if flag else 1.0])[0] == 0.0


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` as rank ``src`` has it (any picklable object: a path, a decision, a small dict)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_reduce_device() if dist.get_backend() == "nccl" else None)
    return box[0]


def all_gather_object(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def sync_rng() -> None:
    """Give every rank rank 0's torch RNG state, so random decisions taken next (a random pruning criterion)
    are the same everywhere; training draws per-rank augmentation and leaves the ranks' states apart."""
    if is_distributed():
        torch.set_rng_state(broadcast_object(torch.get_rng_state()))


def state_checksum(module: torch.nn.Module) -> str:
    """SHA-256 of the module's parameters and buffers (names, shapes, bytes): equal iff the replicas agree."""
    digest = hashlib.sha256()
    for name, t in module.state_dict().items():
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def replica_checksums(module: torch.nn.Module) -> list[str]:
    """:func:`state_checksum` of every rank's copy of ``module`` (all ranks must call it)."""
    return all_gather_object(state_checksum(module))


@torch.no_grad()
def broadcast_state(module: torch.nn.Module, src: int = 0, buffers_only: bool = False) -> None:
    """Overwrite ``module``'s parameters and buffers (or only buffers) with rank ``src``'s.

    After DDP training the parameters agree but BatchNorm running statistics do not (each rank updated
    them on its own batches); this makes every rank hold exactly the model rank 0 saves and evaluates.
    """
    if not is_distributed():
        return
    tensors = list(module.buffers()) if buffers_only else [*module.parameters(), *module.buffers()]
    for t in tensors:
        dist.broadcast(t.data, src=src)


def average_gradients(module: torch.nn.Module) -> None:
    """Mean of every parameter's ``.grad`` over the ranks (for gradients taken outside DDP)."""
    if not is_distributed():
        return
    world = dist.get_world_size()
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world)


def wrap_ddp(module: torch.nn.Module, device: torch.device, **kwargs: Any) -> torch.nn.Module:
    """``module`` in DistributedDataParallel when the job has several ranks, else ``module`` itself.

    ``device_ids`` is left unset: inputs are already on the rank's device, and DDP then passes arbitrary
    input objects (the metanetwork's graphs) through untouched.
    """
    if not is_distributed():
        return module
    return torch.nn.parallel.DistributedDataParallel(module, **kwargs)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (state dicts are saved from it, so checkpoints have no prefix)."""
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` of a dataset, without the padding of ``DistributedSampler``.

    For evaluation: every example is seen exactly once over all ranks, so sums reduced with
    :func:`all_reduce_sum` give the exact metric of the whole split.
    """

    def __init__(self, dataset: Dataset, rank: int, world_size: int) -> None:
        self.n, self.rank, self.world = len(dataset), rank, world_size  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


def is_sharded(loader: Any) -> bool:
    """Whether ``loader`` reads only this rank's share of its data set (then its metrics need reducing)."""
    sampler = getattr(loader, "sampler", None)
    return is_distributed() and isinstance(sampler, (DistributedSampler, ShardSampler))


def run_guarded(fn: Callable[[], T]) -> T:
    """Run ``fn`` as this rank's whole job; a failure takes the process down at once, with its error.

    In a single process the error is simply re-raised. In a job the error (with its rank and traceback) is
    logged and written to torchrun's error file, and the process exits non-zero right away: torchrun then
    stops the other ranks, which may be blocked in a collective, and reports this rank as the root cause.
    (A normal interpreter exit with a live gloo/NCCL group would abort in its C++ destructor instead.)
    The process group is torn down on success so the job exits without waiting on it.
    """
    if not (dist.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1):
        return fn()
    try:
        result = record(fn)()  # record(): the traceback goes to torchrun's error file
    except SystemExit as err:  # a user error already reported by the entry point (exit status 2)
        code = err.code if isinstance(err.code, int) else 1
        _exit_now(code)
    except BaseException as err:  # noqa: BLE001  (any error, Ctrl-C included, must take the job down)
        log.error("rank %s of %s failed: %s: %s", env_rank(), os.environ.get("WORLD_SIZE"), type(err).__name__, err)
        traceback.print_exc()
        _exit_now(1)
    if dist.is_initialized():
        dist.destroy_process_group()
    return result


def _exit_now(code: int) -> None:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
