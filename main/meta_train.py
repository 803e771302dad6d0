"""``run=meta_train``: train the metanetwork on the training data models (docs/design.md section 5).

One step per training data model (shuffled every epoch):

1. ``W = graph_to_state_dict(metanetwork(graph))`` (differentiable in the metanetwork's parameters);
2. ``W`` is copied into a *work copy* of the data model (eval mode: BatchNorm uses its stored statistics)
   and ``dL/dW`` is accumulated over ``batches_per_step`` training batches by ordinary backward passes
   through the network only;
3. Torch-Pruning's ``GroupNormPruner.regularize`` adds the group-sparsity gradient to ``dL/dW`` (for
   unstructured methods, its per-weight counterpart; see :mod:`utils.pruning.schemes`), weighted by
   ``pruner_reg`` (published);
4. **one** vector-Jacobian product pushes the total ``dL/dW`` through the conversion and the metanetwork,
   then AdamW steps. (The published code backpropagated through the metanetwork once per batch.)

After every epoch the validation data models pass through the metanetwork and are evaluated without any
fine-tune (:func:`validate`); with targets (the prune-aware term's, or the task's when the epoch is
selected by ``adaptive_bn``) also pruned one-shot to each target, as they are and with their BatchNorm
statistics re-estimated. ``accuracy_floor`` stops meta-training after the first epoch whose output falls
below that fraction of the original's accuracy (also after a resume), and selection keeps to the epochs
above it (:func:`floor_candidates`).

Work copies and pruners (dependency graphs) are built once per data model and reused. A step whose loss or
gradient is not finite is skipped and logged; ``max_bad_steps`` in a row stop the run with an error.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from configs.schema import MetaTrainSettings
from data_loaders.data_models import DataModel, DataModelSet, store_files
from main.generate import store_header, store_settings
from main.run_modes import RUN_MODES, ConfigError, RunContext, prepare_run
from main.stages import data_for, example_input
from nn.metanetwork import build_metanetwork
from utils import distributed as du
from utils.checkpoint import CheckpointError, load_checkpoint
from utils.config_schema import settings
from utils.convert import NetworkGraph, graph_to_model, graph_to_state_dict
from utils.io import atomic_save, atomic_write_json, write_csv
from utils.pruning.prune_mask import PruneMask
from utils.pruning.schemes import scheme_for
from utils.pruning.selectivity import selectivity, weight_norm_sq
from utils.train import batch_statistics, evaluate, recalibrate_batchnorm

log = logging.getLogger(__name__)


def load_data_models(cfg: DictConfig, split: str) -> DataModelSet:
    """The train or val data models of this task and criterion (see ``generate_dataset``)."""
    files = store_files(cfg.data_models_dir)
    maker = str(cfg.get("data_models_method") or cfg.method.name)  # data_models_method: another method's store
    if not files:
        raise FileNotFoundError(
            f"no data models in {Path(cfg.data_models_dir).resolve()}: generate them first with "
            f"`python -m generate_dataset data_generator={cfg.task.name} method={maker}`")
    expect = {k: v for k, v in store_header(cfg).items() if k in ("task", "model")}
    expect.update(method=maker, settings=store_settings(cfg, for_reading=True))
    return DataModelSet(files, split=split, val_fraction=float(cfg.task.data_models.val_fraction), expect=expect)


def apply_metanetwork(metanet: Optional[torch.nn.Module], graph: NetworkGraph) -> NetworkGraph:
    """The metanetwork's output graph; BN running statistics (buffers, no gradient) are passed through."""
    if metanet is None:
        return graph
    out = metanet(graph)
    buffers = graph.layout.buffer_columns.to(graph.node_features.device)
    if buffers.any():
        out = out.replace(torch.where(buffers, graph.node_features, out.node_features), out.edge_features)
    return out


def epoch_checkpoint(meta_dir: Path, epoch: int) -> Path:
    return Path(meta_dir) / "metanetwork" / f"epoch_{epoch:03d}.pt"


def load_metanetwork(cfg: DictConfig, graph: NetworkGraph, epoch: int, device: torch.device) -> Optional[torch.nn.Module]:
    """The metanetwork of ``epoch`` (0: none) from the meta-training directory of this config."""
    if epoch == 0 or cfg.metanetwork.name == "none":
        return None
    path = epoch_checkpoint(Path(cfg.meta_train_dir), epoch)
    if not path.exists():
        have = sorted(p.stem for p in path.parent.glob("epoch_*.pt")) if path.parent.exists() else []
        raise CheckpointError(f"metanetwork checkpoint {path} does not exist (available: {have or 'none'}); "
                              "run run=meta_train first or pick another epoch")
    metanet = build_metanetwork(cfg.metanetwork, graph).to(device)
    metanet.load_state_dict(load_checkpoint(path, map_location=device)["metanetwork"])
    return metanet.eval()


def prune_aware_settings(cfg: DictConfig) -> Optional[Dict[str, Any]]:
    """``task.meta_train.prune_aware`` as a dict when its weight is above 0 (the term is on), else None."""
    pa = settings(cfg, "task.meta_train").prune_aware
    if pa.weight <= 0.0:
        return None
    targets = list(pa.targets)
    if not targets or any(t <= 1.0 for t in targets):
        raise ConfigError(f"task.meta_train.prune_aware.targets={targets}: the speed-ups (> 1) to prune to in the "
                          "prune-aware term, e.g. task.meta_train.prune_aware.targets=[3.0]")
    if scheme_for(cfg.method).axis != "speed_up":
        raise ConfigError(f"task.meta_train.prune_aware is for channel pruning; method={cfg.method.name} is unstructured")
    return {"weight": pa.weight, "targets": targets, "batch_norm": pa.batch_norm}


def load_weights(model: torch.nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (e.g. a metanetwork's output weights) into ``model``'s parameters and buffers, in place."""
    with torch.no_grad():
        for name, value in model.state_dict(keep_vars=True).items():
            value.copy_(state[name])


@dataclass
class _Work:
    """Per data model, built once: a work copy of the network, its pruner, the graph on the device."""

    model: torch.nn.Module
    regularize: Callable[[torch.nn.Module], None]  # adds the sparsity gradient (GroupNormPruner.regularize)
    graph: NetworkGraph
    params: List[str]
    mask: Optional[PruneMask] = None  # prune-aware term: the criterion's one-shot selection on this network


def meta_settings(mt: MetaTrainSettings) -> Dict[str, Any]:
    """The ``task.meta_train`` settings a resumed run must share (``epochs`` may grow)."""
    return {k: v for k, v in dataclasses.asdict(mt).items() if k != "epochs"}


class MetaTrainer:
    def __init__(self, cfg: DictConfig, ctx: RunContext, metanet: torch.nn.Module, example: torch.Tensor) -> None:
        self.cfg, self.ctx, self.metanet, self.example = cfg, ctx, metanet, example
        self.mt = settings(cfg, "task.meta_train")
        self._work: Dict[int, _Work] = {}
        self.scheme = scheme_for(cfg.method)
        self.prune_aware = prune_aware_settings(cfg)
        cap = ctx.limits.train_batches  # a debug run caps the batches of a step as it caps a training epoch's
        self.batches_per_step = self.mt.batches_per_step if cap is None else min(self.mt.batches_per_step, int(cap))
        # the network passes in channels-last, as the training loops (``channels_last``): faster on the CPU
        self.layout = torch.channels_last if bool(cfg.channels_last) else torch.contiguous_format

    def work(self, item: DataModel) -> _Work:
        if item.slot not in self._work:
            model = copy.deepcopy(item.model).to(self.ctx.device).eval()
            regularize = self.scheme.meta_regularizer(model, self.example, self.mt)
            mask = PruneMask(model, self.scheme.method, self.example) if self.prune_aware else None
            model.to(memory_format=self.layout)  # load_weights copies W into these strides
            params = [n for n, _ in model.named_parameters()]
            self._work[item.slot] = _Work(model, regularize, item.graph.to(self.ctx.device), params, mask)
        return self._work[item.slot]

    def step(self, item: DataModel, batches: Iterator, target: Optional[float] = None) -> Dict[str, Any]:
        """One meta-training step on ``item``; returns losses, timings and whether it was finite. With the
        prune-aware term on, ``target`` is the speed-up its network is pruned to (see :meth:`pruned_loss`)."""
        w = self.work(item)
        times: Dict[str, float] = {}
        t = time.perf_counter()
        out = apply_metanetwork(self.metanet, w.graph)
        state = graph_to_state_dict(out)
        times["metanet_fwd_s"] = time.perf_counter() - t
        t = time.perf_counter()
        load_weights(w.model, state)  # the work copy holds W; gradients are taken with respect to it
        w.model.zero_grad(set_to_none=False)
        task_loss, step_batches = 0.0, []
        for _ in range(self.batches_per_step):
            x, y = next(batches)
            x = x.to(self.ctx.device, non_blocking=True, memory_format=self.layout)
            y = y.to(self.ctx.device, non_blocking=True)
            step_batches.append((x, y))
            loss = F.cross_entropy(w.model(x), y)  # summed over the step's batches (docs/design.md section 5)
            loss.backward()
            task_loss += loss.item()
        pruned_loss = self.pruned_loss(w, item, state, step_batches, target) if self.prune_aware else None
        times["data_s"] = time.perf_counter() - t
        t = time.perf_counter()
        params = dict(w.model.named_parameters())
        before = {n: p.grad.clone() for n, p in params.items()}
        w.regularize(w.model)
        with torch.no_grad():  # the penalty whose gradient regularize added: reg/2 * sum gamma * w^2
            sparsity = 0.5 * sum(float(((p.grad - before[n]) * p).sum()) for n, p in params.items())
        times["regularize_s"] = time.perf_counter() - t
        grads = [params[n].grad for n in w.params]
        finite = math.isfinite(task_loss) and math.isfinite(sparsity) and all(torch.isfinite(g).all() for g in grads)
        t = time.perf_counter()
        # Tensors the metanetwork passes through unchanged (a ViT's class token and position embedding)
        # have no graph to push their gradient into.
        edited = [i for i, n in enumerate(w.params) if state[n].requires_grad]
        if finite:  # one vector-Jacobian product through the conversion and the metanetwork
            torch.autograd.backward([state[w.params[i]] for i in edited], [grads[i] for i in edited])
        times["metanet_bwd_s"] = time.perf_counter() - t
        extra = {} if pruned_loss is None else {"pruned_task_loss": pruned_loss, "prune_target": target}
        finite = finite and (pruned_loss is None or math.isfinite(pruned_loss))
        return {"task_loss": task_loss, "sparsity": sparsity, "finite": finite, **extra,
                **times}

    def pruned_loss(self, w: _Work, item: DataModel, state: Dict[str, torch.Tensor], step_batches, target: float) -> float:
        """The prune-aware term: the task loss of the output network pruned to ``target`` by the criterion.

        The channels the criterion removes (:class:`utils.pruning.prune_mask.PruneMask`, chosen from W with no
        gradient) are zeroed in the work copy, the same batches pass through it, and ``weight`` times the
        gradient is added to the gradients already accumulated, on the kept weights only. (Passing the masked
        loss's gradient to the removed weights as well changes nothing in a ReLU network: a zeroed channel sits
        at ReLU's kink, whose gradient is 0, so those gradients are 0 either way; measured bit-identical.) The
        work copy holds W again afterwards."""
        pa = self.prune_aware
        kept = w.mask.select(float(target), float(item.info["base_macs"]))
        masks = w.mask.weight_masks(kept)
        full = {n: p.grad.clone() for n, p in w.model.named_parameters()}
        with torch.no_grad():
            for p, m in masks.items():
                p.mul_(m)
        w.model.zero_grad(set_to_none=False)
        loss_sum = 0.0
        with batch_statistics(w.model) if pa["batch_norm"] == "batch" else contextlib.nullcontext():
            for x, y in step_batches:
                loss = F.cross_entropy(w.model(x), y)
                loss.backward()
                loss_sum += loss.item()
        with torch.no_grad():
            for n, p in w.model.named_parameters():
                g = p.grad
                if p in masks:
                    g.mul_(masks[p])
                g.mul_(pa["weight"]).add_(full[n])
        load_weights(w.model, state)  # W again (the regulariser reads it); copying data leaves .grad as it is
        return loss_sum



META_OPTIMIZERS = ("adamw", "nsgd")


def build_meta_optimizer(metanet: torch.nn.Module, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """``adamw`` (published), or ``nsgd``: SGD with momentum 0.9 on the gradient clipped to norm 1 (see
    :func:`meta_step`). AdamW's per-parameter normalisation moves every parameter at about the same speed, so
    the one that shrinks all channels together moves as fast as those that shrink the weak ones; clipped SGD
    keeps the relative sizes of the gradient, which the sparsity term's per-channel weights live in."""
    if name == "adamw":
        return torch.optim.AdamW(metanet.parameters(), lr=lr, weight_decay=weight_decay)
    if name == "nsgd":
        return torch.optim.SGD(metanet.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ConfigError(f"task.meta_train.optimizer={name!r} is unknown; valid: {', '.join(META_OPTIMIZERS)}")


def meta_step(optimizer: torch.optim.Optimizer, metanet: torch.nn.Module, name: str) -> None:
    if name == "nsgd":
        torch.nn.utils.clip_grad_norm_(metanet.parameters(), 1.0)
    optimizer.step()


@dataclass
class MetaState:
    """The meta-optimiser and its schedule, and where meta-training (re)starts."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    epochs: int
    start: int
    rows: List[Dict[str, Any]]
    val_rows: List[Dict[str, Any]]
    path: Path

    @classmethod
    def load_or_new(cls, cfg: DictConfig, ctx: RunContext, metanet: torch.nn.Module, path: Path,
              fingerprint: Dict[str, Any]) -> "MetaState":
        """Fresh optimiser state, or the one of ``path`` (``meta_last.pt``) when resuming with equal settings."""
        mt = settings(cfg, "task.meta_train")
        optimizer = build_meta_optimizer(metanet, mt.optimizer, mt.lr, mt.weight_decay)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(mt.milestones), gamma=mt.gamma)
        epochs = mt.epochs if ctx.limits.max_epochs is None else min(mt.epochs, ctx.limits.max_epochs)
        state = cls(optimizer, scheduler, epochs, 0, [], [], path)
        if cfg.resume and path.exists():  # every rank of a job reads the same file
            ckpt = load_checkpoint(path, map_location=ctx.device)
            if ckpt["fingerprint"] != fingerprint:
                raise CheckpointError(f"{path} belongs to a meta-training with other settings (or another number "
                                      "of ranks); re-run with them, or pass resume=false (or another run_name)")
            metanet.load_state_dict(ckpt["metanetwork"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            state.start, state.rows, state.val_rows = int(ckpt["epoch"]), list(ckpt["rows"]), list(ckpt["val_rows"])
            log.info("meta_train: resumed after epoch %d/%d from %s", state.start, epochs, path)
        return state


def penalty_descent(model: torch.nn.Module, regularize: Callable[[torch.nn.Module], None], graph: NetworkGraph,
                    metanet: Optional[torch.nn.Module] = None, lr: float = 1e-3, max_steps: int = 500,
                    fall: float = 10.0, optimizer: str = "adamw") -> Dict[str, Any]:
    """Minimise the sparsity penalty alone, until ``||W||^2`` has fallen ``fall``-fold (or ``max_steps``).

    Without ``metanet``: plain gradient descent on the weights of ``model`` (``lr`` is the step size). With it:
    ``optimizer`` (:func:`build_meta_optimizer`) on the metanetwork's parameters, ``W = graph_to_state_dict(metanet(graph))`` as in meta-training,
    one vector-Jacobian product per step. This is the expressivity check of the metanetwork: with the task
    loss out of the way, can it shrink channels *selectively*, as direct descent does, or only all together?
    Returns the steps taken and ``||W||^2`` before and after; ``model`` holds the final weights.
    """
    start = weight_norm_sq(model)
    params = dict(model.named_parameters())
    opt = None
    if metanet is not None:
        opt = build_meta_optimizer(metanet, optimizer, lr, 0.0)
    steps = 0
    while steps < max_steps and weight_norm_sq(model) > start / fall:
        steps += 1
        if metanet is not None:
            state = graph_to_state_dict(apply_metanetwork(metanet, graph))
            load_weights(model, state)
        for p in params.values():
            p.grad = torch.zeros_like(p)
        regularize(model)
        if metanet is None:
            with torch.no_grad():
                for p in params.values():
                    p.sub_(lr * p.grad)
            continue
        opt.zero_grad(set_to_none=True)
        names = [n for n in params if state[n].requires_grad]
        torch.autograd.backward([state[n] for n in names], [params[n].grad for n in names])
        meta_step(opt, metanet, optimizer)
    if metanet is not None:  # the weights of the last metanetwork
        with torch.no_grad():
            load_weights(model, graph_to_state_dict(apply_metanetwork(metanet, graph)))
    return {"steps": steps, "norm_sq_start": start, "norm_sq_end": weight_norm_sq(model)}


RECALIBRATION_BATCHES = 8  # training batches that re-estimate a pruned network's BatchNorm statistics


def recalibration_images(cfg: DictConfig, splits, device: torch.device) -> List[torch.Tensor]:
    """A fixed draw of training batches (the same every epoch and run) for :func:`validate`'s adaptive BN."""
    loader = torch.utils.data.DataLoader(splits.train, batch_size=settings(cfg, "task.meta_train").batch_size,
                                         shuffle=True, generator=torch.Generator().manual_seed(int(cfg.seed)))
    layout = torch.channels_last if bool(cfg.channels_last) else torch.contiguous_format
    images = []
    for x, _ in loader:
        images.append(x.to(device, memory_format=layout))
        if len(images) == RECALIBRATION_BATCHES:
            break
    return images


def _batches(loader) -> Iterator:
    while True:
        yield from loader


def _train_loader(cfg: DictConfig, ctx: RunContext, splits) -> torch.utils.data.DataLoader:
    """The image batches of the task loss: seeded shuffling in one process, this rank's share in a job."""
    mt, common = settings(cfg, "task.meta_train"), {"num_workers": int(cfg.num_workers), "drop_last": True,
                                       "pin_memory": ctx.device.type == "cuda"}
    if ctx.dist.world_size == 1:
        return torch.utils.data.DataLoader(splits.train, batch_size=mt.batch_size, shuffle=True,
                                           generator=torch.Generator().manual_seed(int(cfg.seed)), **common)
    sampler = DistributedSampler(splits.train, ctx.dist.world_size, ctx.dist.rank, shuffle=True, seed=int(cfg.seed),
                                 drop_last=True)
    return torch.utils.data.DataLoader(splits.train, batch_size=mt.batch_size, sampler=sampler, **common)


@RUN_MODES.register("meta_train")
def meta_train(cfg: DictConfig) -> Dict[str, Any]:
    """Meta-train the metanetwork on the training data models, one checkpoint per epoch (module docstring).

    In a distributed job every step takes **one data model per rank** (step ``s`` of an epoch: rank ``r``
    takes the ``s * world + r``-th of the epoch's shuffled order) and that rank's own image batches. The
    metanetwork is wrapped in DistributedDataParallel (rank 0's initial weights are broadcast); the step's
    vector-Jacobian product runs under ``no_sync()`` and the gradients are averaged explicitly once every rank
    agrees the step is finite (DDP's in-backward all-reduce would deadlock when one rank skips a step), so
    every rank holds the same metanetwork. With one process this is exactly the single-process loop."""
    ctx = prepare_run(cfg)
    if cfg.metanetwork.name == "none":
        raise ConfigError("run=meta_train needs a metanetwork: pass metanetwork=resnet56 (or another size)")
    mt, seed, rank, world = settings(cfg, "task.meta_train"), int(cfg.seed), ctx.dist.rank, ctx.dist.world_size
    meta_dir = Path(cfg.meta_train_dir)
    train_set, val_set = load_data_models(cfg, "train"), load_data_models(cfg, "val")
    steps = len(train_set) // world  # one data model per rank and step; the remainder waits for another epoch
    if steps == 0:
        raise ConfigError(f"{len(train_set)} training data model(s) for {world} ranks: each step needs one per rank; "
                          "make more data models (run=generate) or use fewer ranks")
    splits, loaders = data_for(cfg, ctx)
    loader = _train_loader(cfg, ctx, splits)
    example = example_input(splits, ctx.device)
    torch.manual_seed(seed)
    metanet = build_metanetwork(cfg.metanetwork, train_set[0].graph).to(ctx.device)
    wrapped = du.wrap_ddp(metanet, ctx.device, find_unused_parameters=bool(cfg.get("dist", {}).get(
        "find_unused_parameters", False)))
    fingerprint = {"metanetwork": dataclasses.asdict(settings(cfg, "metanetwork")),  # epochs may grow
                   "meta_train": meta_settings(mt), "slots": train_set.slots, "seed": seed,
                   **({"ranks": world} if world > 1 else {})}
    state = MetaState.load_or_new(cfg, ctx, metanet, meta_dir / "meta_last.pt", fingerprint)
    trainer = MetaTrainer(cfg, ctx, wrapped, example)
    optimizer, scheduler, epochs, start, rows, val_rows = (state.optimizer, state.scheduler, state.epochs,
                                                           state.start, state.rows, state.val_rows)
    pa = trainer.prune_aware
    # the output network pruned one-shot to the prune-aware term's targets (or, to select by it, the task's)
    targets = pa["targets"] if pa else []
    if not targets and settings(cfg, "task.visualize").select_by == "adaptive_bn":
        if trainer.scheme.axis != "speed_up":
            raise ConfigError("task.visualize.select_by=adaptive_bn is for channel pruning; "
                              f"method={cfg.method.name} is unstructured")
        targets = [float(t) for t in cfg.task.pruning.target_speed_ups]
    at_targets = {"method": trainer.scheme.method, "targets": sorted(targets),
                  "recalibration": recalibration_images(cfg, splits, ctx.device)} if targets else {}
    if start == 0:
        val_rows.append(validate(ctx, None, val_set, loaders, example, epoch=0, **at_targets))
    max_bad, bad, name = mt.max_bad_steps, 0, mt.optimizer
    for epoch in range(start, epochs):
        if val_rows[-1]["epoch"] not in floor_epochs(val_rows, mt.accuracy_floor):  # also after a resume
            log.info("meta_train: stopped after epoch %d: its output network's val acc %.2f is below "
                     "task.meta_train.accuracy_floor=%g of the original's %.2f", epoch, val_rows[-1]["val_acc"],
                     mt.accuracy_floor, val_rows[0]["val_acc"])
            break
        order = list(range(len(train_set)))
        random.Random(seed * 7919 + epoch).shuffle(order)  # the same order on every rank
        torch.manual_seed(seed * 7919 + epoch + 7919 * rank)
        if loader.generator is not None:
            loader.generator.manual_seed(seed * 7919 + epoch)
        else:
            loader.sampler.set_epoch(epoch)
        batches = _batches(loader)
        metanet.train()
        for s in tqdm(range(steps), desc=f"meta epoch {epoch + 1}/{epochs}", disable=not cfg.progress or rank > 0,
                      leave=False):
            item = train_set[order[s * world + rank]]
            optimizer.zero_grad(set_to_none=True)
            target = None
            if trainer.prune_aware:  # a target per step, the same on every rank and after a resume
                target = random.Random(seed * 7919 + epoch * 100003 + s).choice(trainer.prune_aware["targets"])
            with wrapped.no_sync() if wrapped is not metanet else contextlib.nullcontext():
                r = trainer.step(item, batches, target)
            task_loss, sparsity = (v / world for v in du.all_reduce_sum([r["task_loss"], r["sparsity"]]))
            ok = du.all_true(r["finite"] and all(torch.isfinite(p.grad).all() for p in metanet.parameters()
                                                 if p.grad is not None))
            if ok:
                du.average_gradients(metanet)
                meta_step(optimizer, metanet, name)
                bad = 0
            else:
                bad += 1
                log.warning("epoch %d, step %d (data model %d): non-finite loss or gradient%s; update skipped (%d in a "
                            "row)", epoch + 1, s + 1, item.slot, " on some rank" if world > 1 else "", bad)
                if bad >= max_bad:
                    raise FloatingPointError(f"{bad} meta-training steps in a row were not finite; lower "
                                             f"task.meta_train.lr or pruner_reg. Last good epoch: {meta_dir}")
            rows.append({"epoch": epoch + 1, "step": s + 1, "slot": item.slot, "lr": optimizer.param_groups[0]["lr"],
                         **{k: v for k, v in r.items() if k != "finite"}, "task_loss": task_loss,
                         "sparsity": sparsity, "skipped": not ok})  # losses: the mean over the ranks
        scheduler.step()
        val_rows.append(validate(ctx, metanet, val_set, loaders, example, epoch=epoch + 1, **at_targets))
        atomic_save({"metanetwork": metanet.state_dict(), "epoch": epoch + 1,
                     "metanetwork_cfg": dataclasses.asdict(settings(cfg, "metanetwork"))},
                    epoch_checkpoint(meta_dir, epoch + 1))
        atomic_save({"metanetwork": metanet.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "rows": rows, "val_rows": val_rows,
                     "fingerprint": fingerprint}, state.path)
        write_csv(rows, meta_dir / "meta_losses.csv")
        write_csv(val_rows, meta_dir / "meta_val.csv")
        plot_meta(rows, val_rows, meta_dir / "meta_train.png")
        this = [row for row in rows if row["epoch"] == epoch + 1]
        log.info("meta epoch %d/%d: task loss %.4f, sparsity %.4f; val acc (no fine-tuning) %.2f", epoch + 1, epochs,
                 sum(row["task_loss"] for row in this) / len(this), sum(row["sparsity"] for row in this) / len(this),
                 val_rows[-1]["val_acc"])
    summary = {"epochs": epochs, "trained_epochs": val_rows[-1]["epoch"], "meta_train_dir": str(meta_dir), "val": val_rows, "ranks": world,
               "replica_checksums": du.replica_checksums(metanet)}  # one per rank, equal when in step
    if len(set(summary["replica_checksums"])) != 1:
        raise RuntimeError(f"the metanetwork replicas differ across ranks: {summary['replica_checksums']}")
    atomic_write_json(summary, meta_dir / "meta_summary.json")
    du.barrier()
    return summary


def floor_epochs(val_rows: Sequence[Dict[str, Any]], floor: float) -> List[int]:
    """The epochs (0: no metanetwork) whose output network keeps at least ``floor`` times the original's
    no-fine-tune validation accuracy (``val_rows``: ``meta_val.csv``'s rows, epoch 0 first)."""
    original = next(r["val_acc"] for r in val_rows if r["epoch"] == 0)
    return [int(r["epoch"]) for r in val_rows if r["val_acc"] >= floor * original]


def floor_candidates(candidates: Sequence[int], val_rows: Sequence[Dict[str, Any]], floor: float) -> List[int]:
    """The candidate epochs to select from under ``task.meta_train.accuracy_floor``: the requested ones that
    were trained and keep the floor, plus the last epoch that keeps it (meta-training may have stopped early).
    When no epoch > 0 keeps it, the most accurate trained epoch stands in, so a selection still happens."""
    if floor <= 0:  # off: the candidates as requested
        return sorted({0, *candidates})
    trained = {int(r["epoch"]) for r in val_rows}
    keep = [e for e in floor_epochs(val_rows, floor) if e > 0]
    if not keep:
        best = max((r for r in val_rows if r["epoch"] > 0), key=lambda r: r["val_acc"])
        log.warning("no meta-epoch keeps task.meta_train.accuracy_floor=%g of the original's val acc %.2f; the most "
                    "accurate one (epoch %d, %.2f) stands in", floor, val_rows[0]["val_acc"], best["epoch"],
                    best["val_acc"])
        keep = [int(best["epoch"])]
    chosen = {e for e in candidates if e in trained and (e == 0 or e in keep)} | {max(keep)}
    return sorted({0} | chosen)


def adaptive_bn_scores(val_rows: Sequence[Dict[str, Any]]) -> Dict[int, float]:
    """Per epoch, the mean over the validation targets of ``val_acc_at_<t>x_adaptive_bn`` (:func:`validate`):
    the output network pruned one-shot to each target, BatchNorm statistics re-estimated, no fine-tune."""
    out = {}
    for r in val_rows:
        accs = [v for k, v in r.items() if k.startswith("val_acc_at_") and k.endswith("x_adaptive_bn")
                and v is not None and v == v]  # a CSV round trip leaves NaN where a column is missing
        if accs:
            out[int(r["epoch"])] = sum(accs) / len(accs)
    return out


def validate(ctx: RunContext, metanet, val_set: DataModelSet, loaders, example: torch.Tensor,
             epoch: int, method=None, targets: Sequence[float] = (),
             recalibration: Sequence[torch.Tensor] = ()) -> Dict[str, Any]:
    """Cheap per-epoch figures on the validation data models: accuracy of the output network without any
    fine-tuning, how selectively its channels are sized (:mod:`utils.pruning.selectivity`: the share of
    channels below 10% of their group's largest norm, the within-group min/max norm ratio) and ||W||^2.
    With ``targets`` (the prune-aware term's) also ``val_acc_at_<t>x``: the output network with the channels
    that ``method`` removes at ``t`` zeroed (:class:`PruneMask`), without fine-tuning, and with
    ``recalibration`` (batches of training images) also ``val_acc_at_<t>x_adaptive_bn``: that network once its
    BatchNorm statistics are re-estimated on them, the cheap proxy of what a fine-tune recovers."""
    accs, sel = [], []
    for item in val_set:
        with torch.no_grad():
            graph = apply_metanetwork(metanet, item.graph.to(ctx.device))
        model = graph_to_model(graph).to(ctx.device).eval()
        accs.append(evaluate(model, loaders["val"], ctx.device, ctx.limits.eval_batches)["acc"])
        sel.append(selectivity(model, example))
        sel[-1]["norm_sq"] = weight_norm_sq(model)
        if targets:
            mask = PruneMask(model, method, example)
            for t in targets:
                with torch.no_grad():
                    for p, m in mask.weight_masks(mask.select(t, float(item.info["base_macs"]))).items():
                        p.mul_(m)  # the next, larger target starts from these removals, as progressive pruning would
                sel[-1][f"val_acc_at_{t:g}x"] = evaluate(model, loaders["val"], ctx.device, ctx.limits.eval_batches)["acc"]
                if recalibration:  # and once its BatchNorms are re-estimated on training images (adaptive BN)
                    adapted = copy.deepcopy(model)
                    recalibrate_batchnorm(adapted, recalibration)
                    sel[-1][f"val_acc_at_{t:g}x_adaptive_bn"] = evaluate(adapted, loaders["val"], ctx.device,
                                                                         ctx.limits.eval_batches)["acc"]
    mean = {k: sum(d[k] for d in sel) / len(sel) for k in sel[0]}
    return {"epoch": epoch, "val_acc": sum(accs) / len(accs), **mean}


def plot_meta(rows, val_rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    steps = range(1, len(rows) + 1)
    a.plot(steps, [r["task_loss"] for r in rows], label="task loss (sum over batches)")
    a.plot(steps, [r["sparsity"] for r in rows], label="sparsity penalty")
    a.set(xlabel="step", yscale="log", title="meta-training losses")
    a.legend()
    b.plot([r["epoch"] for r in val_rows], [r["val_acc"] for r in val_rows], marker="o", label="val acc, no fine-tuning")
    b2 = b.twinx()
    b2.plot([r["epoch"] for r in val_rows], [r["small_group_fraction"] for r in val_rows], marker="s", color="C1",
            label="channels < 10% of group max")
    if all("min_max_ratio" in r for r in val_rows):  # older runs recorded only the fraction
        b2.plot([r["epoch"] for r in val_rows], [r["min_max_ratio"] for r in val_rows], marker="^", color="C2",
                label="within-group min/max norm")
    b.set(xlabel="epoch (0: no metanetwork)", ylabel="accuracy (%)", title="validation data models")
    b2.set_ylabel("fraction / ratio")
    fig.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
