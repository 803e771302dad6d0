"""ImageNet stages around the metanetwork: ``meta_train``, ``visualize``, ``prune_after_metanetwork``.

``run=meta_train``: every step takes **one data model per rank** (step ``s`` of an epoch: rank ``r`` takes
the ``s * world + r``-th model of the epoch's shuffled order) and that rank's own image batches; the
metanetwork is wrapped in DistributedDataParallel (rank 0's initial weights are broadcast) and its
gradients are averaged over the ranks before every AdamW step, so every rank holds the same metanetwork.
The step's VJP runs under ``no_sync()`` and the average is taken explicitly once all ranks agree the
step is finite: DDP's in-backward all-reduce would deadlock when one rank skips a non-finite step.
The per-step work is ``main.meta_train.MetaTrainer``'s, unchanged; checkpoints have its format, so
``visualize`` and ``prune_after_metanetwork`` (and the single-process modes) read them.

``run=visualize epochs=[0,10,20]``: accuracy-vs-speed-up curves of a validation data model per epoch.
``run=prune_after_metanetwork slot=K meta_epoch=E [target_speed_up=1.7]``: network ``K`` (after
``finetune``) -> metanetwork -> fine-tune -> prune to the target -> fine-tune -> ``metrics.json``.
"""
from __future__ import annotations

import contextlib
import logging
import random
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, DistributedSampler

from data_loaders.data_models import DataModel
from main.meta_train import (
    MetaState,
    MetaTrainer,
    apply_metanetwork,
    epoch_checkpoint,
    load_data_models,
    load_metanetwork,
    meta_settings,
    meta_step,
    plot_meta,
    validate,
)
from main.run_modes import ConfigError, run_argument
from main.stages import evaluate_splits, example_input, train_stage
from main.visualize import plot_curves
from main_imagenet.context import (
    DistContext,
    data,
    load_stage,
    network_dir,
    prepare,
    resolved,
    slot_of,
    synced_calibration,
)
from main_imagenet.stages import STAGES
from nn.metanetwork import build_metanetwork
from utils import distributed as du
from utils.checkpoint import save_model
from utils.convert import graph_to_model
from utils.io import atomic_save, atomic_write_json, read_json, write_csv
from utils.latency import measure_latency
from utils.pruning.macs import MacCounter
from utils.pruning.methods import build_method
from utils.pruning.progressive import progressive_prune
from utils.train import evaluate

log = logging.getLogger(__name__)


def _batches(loader: DataLoader):
    while True:
        yield from loader


def _grads_finite(module: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p.grad).all()) for p in module.parameters() if p.grad is not None)


@STAGES.register("meta_train")
def meta_train(cfg: DictConfig) -> dict[str, Any]:
    ctx = prepare(cfg)
    if cfg.metanetwork.name == "none":
        raise ConfigError("run=meta_train needs a metanetwork: pass metanetwork=resnet50 (or vit, ...)")
    mt, seed, rank, world = cfg.task.meta_train, int(cfg.seed), ctx.dist.rank, ctx.dist.world_size
    meta_dir = Path(cfg.meta_train_dir)
    train_set, val_set = load_data_models(cfg, "train"), load_data_models(cfg, "val")
    steps = len(train_set) // world  # every rank takes one data model per step; the remainder waits a turn
    if steps == 0:
        raise ConfigError(f"{len(train_set)} training data model(s) for {world} ranks: each step needs one per rank; "
                          "make more data models (run=train/prune/finetune slot=...) or use fewer ranks")
    splits, loaders = data(cfg, ctx)
    sampler = DistributedSampler(splits.train, world, rank, shuffle=True, seed=seed, drop_last=True)
    loader = DataLoader(splits.train, batch_size=int(mt.batch_size), sampler=sampler, drop_last=True,
                        num_workers=int(cfg.num_workers), pin_memory=ctx.device.type == "cuda")
    example = example_input(splits, ctx.device)
    torch.manual_seed(seed)
    metanet = build_metanetwork(cfg.metanetwork, train_set[0].graph).to(ctx.device)
    wrapped = du.wrap_ddp(metanet, ctx.device, find_unused_parameters=bool(cfg.dist.find_unused_parameters))
    fingerprint = {"metanetwork": resolved(cfg, "metanetwork")["metanetwork"], "slots": train_set.slots,
                   "meta_train": meta_settings(mt),
                   "seed": seed, "ranks": world}
    state = MetaState.load_or_new(cfg, ctx, metanet, meta_dir / "meta_last.pt", fingerprint)
    optimizer, scheduler, epochs, start, rows, val_rows = (state.optimizer, state.scheduler, state.epochs,
                                                           state.start, state.rows, state.val_rows)
    trainer = MetaTrainer(cfg, ctx, wrapped, example, state.budget)
    last = state.path
    if start == 0:
        val_rows.append(validate(ctx, None, val_set, loaders, example, epoch=0))
    bad = 0
    for epoch in range(start, epochs):
        order = list(range(len(train_set)))
        random.Random(seed * 7919 + epoch).shuffle(order)  # the same order on every rank
        torch.manual_seed(seed * 7919 + epoch + 7919 * rank)
        sampler.set_epoch(epoch)
        batches = _batches(loader)
        metanet.train()
        for s in range(steps):
            item = train_set[order[s * world + rank]]
            optimizer.zero_grad(set_to_none=True)
            with wrapped.no_sync() if wrapped is not metanet else contextlib.nullcontext():
                r = trainer.step(item, batches)
            ok = du.all_true(r["finite"] and _grads_finite(metanet))
            if ok:
                du.average_gradients(metanet)
                meta_step(optimizer, metanet, str(cfg.task.meta_train.get("optimizer", "adamw")))
                bad = 0
            else:
                bad += 1
                log.warning("epoch %d, step %d: non-finite loss or gradient on some rank; update skipped (%d in a row)",
                            epoch + 1, s + 1, bad)
                if bad >= int(mt.max_bad_steps):
                    raise FloatingPointError(f"{bad} meta-training steps in a row were not finite; lower "
                                             f"task.meta_train.lr or pruner_reg. Last good epoch: {meta_dir}")
            task_loss, sparsity = du.all_reduce_sum([r["task_loss"], r["sparsity"]])
            if state.budget is not None:  # the same mean loss on every rank: the multipliers stay equal
                state.budget.update(task_loss / world / int(mt.batches_per_step))
            rows.append({"epoch": epoch + 1, "step": s + 1, "slot": item.slot, "lr": optimizer.param_groups[0]["lr"],
                         "task_loss": task_loss / world, "sparsity": sparsity / world, "skipped": not ok,
                         **{k: v for k, v in r.items() if k.endswith("_s")}})  # losses: mean over ranks
        scheduler.step()
        val_rows.append(validate(ctx, metanet, val_set, loaders, example, epoch=epoch + 1))
        if du.is_main():
            atomic_save({"metanetwork": metanet.state_dict(), "epoch": epoch + 1,
                         "metanetwork_cfg": resolved(cfg, "metanetwork")["metanetwork"]}, epoch_checkpoint(meta_dir, epoch + 1))
            atomic_save({"metanetwork": metanet.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "rows": rows, "val_rows": val_rows,
                         "fingerprint": fingerprint,
                         "log_mu": state.budget.log_mu if state.budget else 0.0}, last)
            write_csv(rows, meta_dir / "meta_losses.csv")
            write_csv(val_rows, meta_dir / "meta_val.csv")
            plot_meta(rows, val_rows, meta_dir / "meta_train.png")
        du.barrier()
        log.info("meta epoch %d/%d: task loss %.4f; val acc (no fine-tuning) %.2f", epoch + 1, epochs,
                 sum(r["task_loss"] for r in rows[-steps:]) / steps, val_rows[-1]["val_acc"])
    summary = {"epochs": epochs, "meta_train_dir": str(meta_dir), "val": val_rows, "ranks": world,
               "replica_checksums": du.replica_checksums(metanet)}  # one per rank, equal when in step
    if du.is_main():
        atomic_write_json(summary, meta_dir / "meta_summary.json")
        if len(set(summary["replica_checksums"])) != 1:
            raise RuntimeError(f"the metanetwork replicas differ across ranks: {summary['replica_checksums']}")
    du.barrier()
    return summary


def _edited(cfg: DictConfig, item: DataModel, epoch: int, device: torch.device) -> torch.nn.Module:
    """The data model as the metanetwork of ``epoch`` rewrites it (epoch 0: unchanged)."""
    metanet = load_metanetwork(cfg, item.graph, epoch, device)
    with torch.no_grad():
        return graph_to_model(apply_metanetwork(metanet, item.graph.to(device))).to(device)


@STAGES.register("visualize")
def visualize(cfg: DictConfig) -> dict[str, Any]:
    ctx = prepare(cfg)
    index = run_argument(cfg, "epochs")
    epochs = [0] if index is None else [int(index)] if isinstance(index, (int, str)) else [int(e) for e in index]
    vis, seed = cfg.task.visualize, int(cfg.seed)
    item = load_data_models(cfg, "val")[int(vis.get("data_model", 0))]
    for epoch in epochs:  # fail before any work when a checkpoint is missing
        load_metanetwork(cfg, item.graph, epoch, ctx.device)
    splits, loaders = data(cfg, ctx)
    example, method = example_input(splits, ctx.device), build_method(cfg.method)
    curves: dict[int, dict[str, Any]] = {}
    for epoch in epochs:
        cache = ctx.run_dir / f"curve_epoch_{epoch:03d}.json"
        fingerprint = {"slot": item.slot, **resolved(cfg, "method"), "visualize": resolved(cfg.task, "visualize"),
                       "schedule": resolved(cfg.task.schedules, "finetune_after_metanetwork"),
                       "limits": vars(ctx.limits), "checkpoint_epoch": epoch}
        if cache.exists() and read_json(cache).get("fingerprint") == fingerprint:
            curves[epoch] = read_json(cache)
            continue
        model = _edited(cfg, item, epoch, ctx.device)
        fit = train_stage(cfg, ctx, model, loaders, "finetune_after_metanetwork", ctx.run_dir / f"epoch_{epoch:03d}", seed)
        points: list[dict[str, float]] = []

        def record(step: int, speed_up: float, model=model, points=points) -> None:  # all ranks, in lockstep
            if step % int(vis.eval_every) == 0 or speed_up >= float(vis.max_speed_up):
                acc = evaluate(model, loaders["val"], ctx.device, ctx.limits.eval_batches)["acc"]
                points.append({"step": step, "speed_up": speed_up, "val_acc": acc})

        record(0, float(item.info["speed_up"]))
        result = progressive_prune(model.eval(), float(vis.max_speed_up), method, example,
                                   base_macs=int(item.info["base_macs"]),
                                   calibrate=synced_calibration(method, loaders, ctx.device), on_step=record)
        curves[epoch] = {"epoch": epoch, "slot": item.slot, "finetune_val_acc": fit.selected_val.get("acc"),
                         "points": points, "pruning_steps": result.steps, "fingerprint": fingerprint}
        if du.is_main():
            atomic_write_json(curves[epoch], cache)
    if du.is_main():
        plot_curves(curves, ctx.run_dir / "acc_vs_speed_up",
                    title=f"{cfg.task.name}, {cfg.method.name}, validation data model {item.slot}")
    du.barrier()
    return {"curves": {e: c["points"] for e, c in curves.items()}}


def _stage_model(ctx: DistContext, path: Path, make) -> torch.nn.Module:
    """The network saved at ``path`` by an earlier (interrupted) run, or ``make()``'s, saved by rank 0."""
    if path.exists():
        return load_stage(path, path.stem, ctx.device, "")[0]
    model = make()
    if du.is_main():
        save_model(path, model)
    du.barrier()
    return model


@STAGES.register("prune_after_metanetwork")
def prune_after_metanetwork(cfg: DictConfig) -> dict[str, Any]:
    ctx = prepare(cfg)
    slot, seed = slot_of(cfg)
    target = float(cfg.target_speed_up if cfg.get("target_speed_up") is not None
                   else cfg.task.pruning.target_speed_ups[0])
    base_model, payload = load_stage(network_dir(cfg, slot) / "finetuned.pt", "finetune", ctx.device,
                                     f"run=train, run=prune, run=finetune with slot={slot}")
    info = payload["metrics"]
    use_meta = cfg.metanetwork.name != "none"
    if use_meta and cfg.get("meta_epoch") is None:
        raise ConfigError("run=prune_after_metanetwork needs meta_epoch=E (chosen with run=visualize), or "
                          "metanetwork=none for the same pipeline without the metanetwork")
    epoch = int(cfg.meta_epoch) if use_meta else 0
    out = ctx.run_dir / f"slot{slot}_{cfg.metanetwork.name}{epoch if use_meta else ''}_x{target:g}"
    t0 = time.time()
    splits, loaders = data(cfg, ctx, seed)
    example, method = example_input(splits, ctx.device), build_method(cfg.method)
    base = {f"base_{k}": v for k, v in evaluate_splits(base_model, loaders, ctx, ("val", "test")).items()}

    def after_metanetwork() -> torch.nn.Module:
        model = _edited(cfg, DataModel(slot, base_model, info), epoch, ctx.device)
        train_stage(cfg, ctx, model, loaders, "finetune_after_metanetwork", out, seed)
        return model

    def pruned() -> torch.nn.Module:
        model = _stage_model(ctx, out / "after_metanetwork.pt", after_metanetwork).eval()
        progressive_prune(model, target, method, example, base_macs=int(info["base_macs"]),
                          calibrate=synced_calibration(method, loaders, ctx.device))
        return model

    model = _stage_model(ctx, out / "pruned.pt", pruned)
    train_stage(cfg, ctx, model, loaders, "finetune_after_pruning", out, seed)
    final = evaluate_splits(model, loaders, ctx, ("val", "test"))
    counter = MacCounter(model, example)
    batch = torch.zeros(max(1, int(cfg.task.eval_batch_size) // ctx.dist.world_size), *example.shape[1:],
                        device=ctx.device)
    metrics = {"task": cfg.task.name, "method": cfg.method.name, "metanetwork": cfg.metanetwork.name,
               "meta_epoch": epoch, "slot": slot, "target_speed_up": target, "seed": seed, **base, **final,
               "speed_up": int(info["base_macs"]) / counter(), "macs": counter(), "params": counter.params(),
               "base_macs": int(info["base_macs"]), "ranks": ctx.dist.world_size,
               "latency": {"base": measure_latency(base_model, batch), "pruned": measure_latency(model, batch)},
               "seconds": time.time() - t0, "config": OmegaConf.to_container(cfg, resolve=True)}
    if du.is_main():
        save_model(out / "model.pt", model, metrics={k: v for k, v in metrics.items() if k != "config"})
        atomic_write_json(metrics, out / "metrics.json")
    du.barrier()
    log.info("%s%s: %.3fx, test acc %.2f (network before: %.2f)", cfg.method.name,
             f" + metanetwork epoch {epoch}" if use_meta else "", metrics["speed_up"], final["test_acc"],
             base["base_test_acc"])
    return metrics
