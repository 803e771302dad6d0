"""Training and evaluation loop shared by every stage (pretraining, fine-tuning after pruning, ...).

``fit`` trains a model for one *schedule* (epochs, lr, milestones, ...) with one *optimiser* config,
evaluates on the validation split after every epoch, writes a resumable checkpoint per epoch
(atomically) and a CSV of the history, and finally keeps the weights of the epoch selected on the
validation split (``select: best``) or the last epoch (``select: last``). The test split is never
looked at here: callers evaluate it once, at the very end.

Under ``torchrun`` (a process group with several ranks, see ``utils/distributed.py``) the same call trains
with DistributedDataParallel: loaders built by ``data_loaders.sharded_loaders`` give each rank its share of the data,
``fit`` calls the sampler's ``set_epoch``, losses and accuracies are summed over the ranks, every rank reads
the same checkpoint on resume, and only rank 0 writes files. In a single process nothing changes.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm  # not tqdm.auto: its asyncio variant calls iter(loader) eagerly, a 2nd DataLoader iterator

from utils import distributed as du
from utils.checkpoint import CheckpointError, check_fingerprint, load_checkpoint, plain
from utils.io import atomic_save, write_csv
from utils.mixing import BatchMix, mixed_cross_entropy
from utils.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)


@dataclass
class Limits:
    """Caps that shrink a run (the ``debug`` config group); ``None`` means no cap."""

    max_epochs: Optional[int] = None
    train_batches: Optional[int] = None
    eval_batches: Optional[int] = None

    @classmethod
    def from_cfg(cls, debug: Optional[Mapping[str, Any]]) -> "Limits":
        debug = debug or {}
        return cls(debug.get("max_epochs"), debug.get("limit_train_batches"), debug.get("limit_eval_batches"))


@dataclass
class FitResult:
    """What ``fit`` returns: per-epoch history and the selected epoch (1-based; 0 = no training)."""

    history: List[Dict[str, Any]] = field(default_factory=list)
    selected_epoch: int = 0
    selected_val: Dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def _autocast(device: torch.device, amp: bool):
    # Mixed precision only where it pays off and is safe: CUDA. On the CPU this is a no-op context.
    return torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp and device.type == "cuda")


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: DataLoader,
    device: torch.device,
    limit_batches: Optional[int] = None,
    amp: bool = False,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> Dict[str, float]:
    """Mean cross-entropy and top-1 accuracy (in %) of ``model`` over ``loader`` in eval mode.

    ``memory_format``: the layout the images are given in (``torch.channels_last`` for a model converted to it).

    When ``loader`` reads only this rank's share (``utils.distributed.is_sharded``) the sums are reduced
    over the ranks, so every rank gets the figures of the whole split; every rank must then call it."""
    was_training = model.training
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    for i, (x, y) in enumerate(loader):
        if limit_batches is not None and i >= limit_batches:
            break
        x, y = x.to(device, non_blocking=True, memory_format=memory_format), y.to(device, non_blocking=True)
        with _autocast(device, amp):
            logits = model(x)  # (B, num_classes)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        seen += y.numel()
    model.train(was_training)
    if du.is_sharded(loader):
        loss_sum, correct, seen = du.all_reduce_sum([loss_sum, correct, seen])
        seen = int(seen)
    if seen == 0:
        raise ValueError("evaluation loader yielded no batches (empty split, or limit_eval_batches=0)")
    return {"loss": loss_sum / seen, "acc": 100.0 * correct / seen, "n": seen}


_BATCH_NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)


@contextlib.contextmanager
def batchnorms_in_train_mode(norms: List[torch.nn.Module], momentum: Optional[float],
                             reset: bool = False) -> Iterator[None]:
    """``norms`` (BatchNorm modules) in train mode with ``momentum`` inside the block (0: their running
    statistics stay as they are; None: they become the exact average over the batches seen, from a reset
    when ``reset``); their modes and momenta are restored afterwards."""
    state = [(m.training, m.momentum) for m in norms]
    for m in norms:
        if reset:
            m.reset_running_stats()
        m.train()
        m.momentum = momentum
    try:
        yield
    finally:
        for m, (training, m_momentum) in zip(norms, state):
            m.train(training)
            m.momentum = m_momentum


def batch_norms(model: torch.nn.Module) -> List[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, _BATCH_NORMS)]


def batch_statistics(model: torch.nn.Module):
    """``model``'s BatchNorms normalise with each batch's own statistics inside the block (train mode, momentum
    0: their stored running statistics are left as they are); the rest of the model stays in its mode."""
    return batchnorms_in_train_mode(batch_norms(model), 0.0)


@torch.no_grad()
def recalibrate_batchnorm(model: torch.nn.Module, images: List[torch.Tensor]) -> None:
    """Re-estimate every BatchNorm's running statistics as the exact average over ``images`` (batches), with
    the weights as they are: "adaptive BN", the cheap proxy of a fine-tune's outcome for a pruned network (its
    stored statistics belong to the channels it had before)."""
    with batchnorms_in_train_mode(batch_norms(model), None, reset=True):
        for x in images:
            model(x)


def train_one_epoch(
    model: torch.nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    label_smoothing: float = 0.0,
    grad_clip: Optional[float] = None,
    scaler: Optional[torch.amp.GradScaler] = None,
    limit_batches: Optional[int] = None,
    desc: str = "train",
    progress: bool = True,
    after_backward: Optional[Callable[[torch.nn.Module], None]] = None,
    mix: Optional[BatchMix] = None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> Dict[str, float]:
    """One pass over ``loader``; returns mean training loss and accuracy (%) of the seen batches.

    ``after_backward(model)`` runs between the backward pass and the optimiser step on unscaled gradients
    (sparse learning: Torch-Pruning's ``pruner.regularize``). ``mix`` applies Mixup/CutMix to each batch
    (the accuracy then counts each label by its share). ``model`` may be a DDP wrapper."""
    model.train()
    amp = scaler is not None and scaler.is_enabled()
    loss_sum, correct, seen = 0.0, 0, 0
    total = len(loader) if limit_batches is None else min(len(loader), limit_batches)
    bar = tqdm(loader, total=total, desc=desc, leave=False, disable=not progress, mininterval=1.0)
    for i, (x, y) in enumerate(bar):
        if i >= total:
            break
        x, y = x.to(device, non_blocking=True, memory_format=memory_format), y.to(device, non_blocking=True)
        x, y_partner, lam = mix(x, y) if mix is not None else (x, y, 1.0)
        with _autocast(device, amp):
            logits = model(x)
            loss = mixed_cross_entropy(logits.float(), y, y_partner, lam, label_smoothing)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{desc}: the training loss became {loss.item()} at batch {i}; lower the learning rate or disable "
                "mixed precision. The last finished epoch is still in the run directory's checkpoint."
            )
        optimizer.zero_grad(set_to_none=True)
        if amp:
            scaler.scale(loss).backward()
            if grad_clip or after_backward:
                scaler.unscale_(optimizer)
            if after_backward:
                after_backward(model)
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if after_backward:
                after_backward(model)
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
        loss_sum += loss.item() * y.numel()
        pred = logits.argmax(1)
        correct += lam * (pred == y).sum().item() + (1.0 - lam) * (pred == y_partner).sum().item()
        seen += y.numel()
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100.0 * correct / seen:.1f}")
    if du.is_sharded(loader):
        loss_sum, correct, seen = du.all_reduce_sum([loss_sum, correct, seen])
    return {"loss": loss_sum / max(seen, 1), "acc": 100.0 * correct / max(seen, 1)}


def _check_compatible(model: torch.nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in state.items()}
    if own != theirs:
        diff = sorted(set(own.items()) ^ set(theirs.items()))[:4]
        raise CheckpointError(
            f"{path} was written for a different architecture than this run builds (first differences: {diff}). "
            "Use another run directory (e.g. run_name=...), or pass resume=false to start over."
        )


def fit(
    model: torch.nn.Module,
    loaders: Mapping[str, DataLoader],
    schedule: Mapping[str, Any],
    optim_cfg: Mapping[str, Any],
    device: torch.device,
    run_dir: Optional[str | Path] = None,
    name: str = "train",
    resume: bool = True,
    limits: Limits = Limits(),
    seed: int = 0,
    progress: bool = True,
    fingerprint: Optional[Mapping[str, Any]] = None,
    after_backward: Optional[Callable[[torch.nn.Module], None]] = None,
    channels_last: bool = False,
) -> FitResult:
    """Train ``model`` (already on ``device``) for ``schedule``; see the module docstring.

    Args:
        loaders: needs ``"train"`` and ``"val"``.
        schedule: ``epochs``, ``lr``, ``milestones``, ``gamma``, ``label_smoothing``, ``scheduler``
            (``multistep`` | ``cosine``), ``warmup_epochs``, ``grad_clip``, ``select`` (``best`` | ``last``),
            ``mixup_alpha`` / ``cutmix_alpha`` / ``mix_prob`` / ``switch_prob`` (see ``utils/mixing.py``).
        optim_cfg: the ``optim`` config group (``name``, ``momentum``, ``weight_decay``, ``amp``, ...).
        run_dir: where ``{name}_last.pt`` (resumable state), ``{name}_best.pt`` and ``{name}_history.csv``
            go; ``None`` disables checkpointing.
        name: prefix of the files, so several stages can share one run directory.
        fingerprint: JSON-like settings that define the run (data set, schedule, seed, ...). A resumed run
            must have the same fingerprint, so changed settings never silently continue an old run.
        channels_last: train and evaluate in the channels-last memory format (faster convolutions on the CPU,
            ``bench/train_throughput.py``); ``model`` is handed back in the standard layout, with the same values.
    """
    fingerprint = plain(fingerprint or {})
    layout = torch.channels_last if channels_last else torch.contiguous_format
    with in_memory_format(model, layout):
        return _fit(model, loaders, schedule, optim_cfg, device, run_dir, name, resume, limits, seed, progress,
                    fingerprint, after_backward, layout)


@contextlib.contextmanager
def in_memory_format(model: torch.nn.Module, layout: torch.memory_format) -> Iterator[torch.nn.Module]:
    """``model`` with its 4-d parameters and buffers in ``layout`` inside the block, contiguous again after it
    (values are unchanged: only the strides move)."""
    if layout == torch.contiguous_format:
        yield model
        return
    model.to(memory_format=layout)
    try:
        yield model
    finally:
        model.to(memory_format=torch.contiguous_format)


def _fit(model, loaders, schedule, optim_cfg, device, run_dir, name, resume, limits, seed, progress, fingerprint,
         after_backward, layout) -> FitResult:
    epochs = int(schedule["epochs"])
    if limits.max_epochs is not None:
        epochs = min(epochs, int(limits.max_epochs))
    optimizer = build_optimizer(model.parameters(), optim_cfg, lr=float(schedule["lr"]))
    scheduler = build_scheduler(optimizer, schedule, epochs)
    amp = bool(optim_cfg.get("amp", True)) and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    select = schedule.get("select", "best")
    if select not in ("best", "last"):
        raise ValueError(f"schedule.select={select!r}; use 'best' (validation accuracy) or 'last'")
    mix = BatchMix.from_schedule(schedule)
    rank, main = du.get_rank(), du.is_main()

    result = FitResult()
    best_state: Optional[Dict[str, torch.Tensor]] = None
    start = 0
    run_dir = Path(run_dir) if run_dir is not None else None
    last_path = run_dir / f"{name}_last.pt" if run_dir else None
    best_path = run_dir / f"{name}_best.pt" if run_dir else None
    du.barrier()  # rank 0 finished writing whatever an earlier stage left; all ranks see the same files
    if resume and last_path is not None and last_path.exists():
        ckpt = load_checkpoint(last_path, map_location=device)
        _check_compatible(model, ckpt["model"], last_path)
        check_fingerprint(fingerprint, ckpt.get("fingerprint", {}), last_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start, result.history = int(ckpt["epoch"]), list(ckpt["history"])
        result.selected_epoch, result.selected_val = int(ckpt["selected_epoch"]), dict(ckpt["selected_val"])
        if select == "best" and best_path.exists():
            best_state = load_checkpoint(best_path, map_location=device)["model"]
        log.info("%s: resumed from %s after epoch %d/%d", name, last_path, start, epochs)

    t0 = time.time()
    # Several ranks: DDP averages the gradients in backward (the wrapper shares the model's parameters, so
    # the optimiser and the checkpoints keep working on ``model`` itself).
    trained = du.wrap_ddp(model, device)
    for epoch in range(start, epochs):
        # Seeding per epoch makes shuffling and augmentation identical whether or not the run was resumed;
        # the rank offset (0 on rank 0) gives each rank its own augmentation draws.
        torch.manual_seed(seed * 100003 + epoch + 7919 * rank)
        generator = getattr(loaders["train"], "generator", None)
        if generator is not None:
            generator.manual_seed(seed * 100003 + epoch)
        if hasattr(getattr(loaders["train"], "sampler", None), "set_epoch"):
            loaders["train"].sampler.set_epoch(epoch)  # DistributedSampler: a new, seeded order per epoch
        te = time.time()
        train = train_one_epoch(
            trained, loaders["train"], optimizer, device,
            label_smoothing=float(schedule.get("label_smoothing", 0.0)),
            grad_clip=schedule.get("grad_clip"), scaler=scaler, limit_batches=limits.train_batches,
            desc=f"{name} {epoch + 1}/{epochs}", progress=progress and main, after_backward=after_backward, mix=mix,
            memory_format=layout,
        )
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        # BatchNorm statistics drift apart across ranks (each saw its own batches): keep rank 0's, which
        # are the ones saved, so that every rank evaluates and selects with exactly the saved model.
        du.broadcast_state(model, buffers_only=True)
        val = evaluate(model, loaders["val"], device, limits.eval_batches, amp=amp, memory_format=layout)
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": train["loss"], "train_acc": train["acc"],
               "val_loss": val["loss"], "val_acc": val["acc"], "seconds": time.time() - te}
        result.history.append(row)
        log.info("%s epoch %d/%d  lr %.4g  train loss %.4f acc %.2f  val loss %.4f acc %.2f  (%.1fs)",
                 name, epoch + 1, epochs, lr, train["loss"], train["acc"], val["loss"], val["acc"], row["seconds"])
        improved = select == "last" or result.selected_epoch == 0 or val["acc"] > result.selected_val["acc"]
        if improved:
            result.selected_epoch, result.selected_val = epoch + 1, {"loss": val["loss"], "acc": val["acc"]}
            if select == "best":
                best_state = copy.deepcopy(model.state_dict())
                if best_path is not None and main:
                    atomic_save({"model": best_state, "epoch": epoch + 1}, best_path)
        if run_dir is not None and main:
            atomic_save({
                "epoch": epoch + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "history": result.history,
                "selected_epoch": result.selected_epoch, "selected_val": result.selected_val,
                "fingerprint": fingerprint,
            }, last_path)
            write_csv(result.history, run_dir / f"{name}_history.csv")

    if select == "best" and best_state is not None:
        model.load_state_dict(best_state)
    result.seconds = time.time() - t0
    if result.history and not math.isfinite(result.history[-1]["train_loss"]):
        raise FloatingPointError(f"{name}: training diverged (loss {result.history[-1]['train_loss']})")
    return result
