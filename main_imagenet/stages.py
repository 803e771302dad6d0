"""ImageNet stages of one network: ``train`` -> ``prune`` -> ``finetune`` (a data model, or a target network).

Each stage reads the network the previous one left in ``<networks_dir>/slot_<k>/`` and writes its own there,
beside its resumable training checkpoints and history (so slots never mix; the run directory holds the log):

- ``run=train slot=k``: a fresh zoo model (or torchvision weights from ``init_weights=<file.pth>``, then
  this is fine-tuning) trained with ``task.schedules.pretrain``; writes ``trained.pt``;
- ``run=prune slot=k``: progressive pruning with ``method`` to ``task.pruning.initial_speed_up``; ``pruned.pt``;
- ``run=finetune slot=k``: ``task.schedules.finetune_initial``; writes ``finetuned.pt`` and stores the
  network as data model ``k`` in ``<data_models_dir>/shard_<k>.h5`` for ``run=meta_train``.

Every rank runs every step in lockstep (DDP training through ``utils.train.fit``; pruning on identical
weights gives identical decisions); only rank 0 writes. A finished stage is skipped when re-run, an
interrupted training resumes from its per-epoch checkpoint in the run directory.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from data_loaders.data_models import DataModelRecord, ShardWriter
from main.generate import store_header
from main.stages import evaluate_splits, example_input, new_model, train_stage
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
from nn.models import describe_model
from utils import distributed as du
from utils.checkpoint import load_checkpoint, save_model
from utils.io import atomic_write_json, read_json
from utils.plotting import plot_history
from utils.pruning.macs import MacCounter
from utils.pruning.methods import build_method
from utils.pruning.progressive import progressive_prune
from utils.registry import Registry

log = logging.getLogger(__name__)

STAGES: Registry[Callable[[DictConfig], dict[str, Any]]] = Registry("ImageNet stage")


def _done(path: Path) -> dict[str, Any] | None:
    """The metrics of a stage that already finished (its output exists), else None."""
    info = path.with_suffix(".json")
    if path.exists() and info.exists():
        log.info("%s exists: stage already done (delete it to redo the stage)", path)
        return read_json(info)
    return None


def _save(ctx: DistContext, path: Path, model: torch.nn.Module, metrics: dict[str, Any], **extra: Any) -> None:
    """Rank 0 writes the network and its metrics (JSON beside it); the others wait until both are there."""
    if du.is_main():
        save_model(path, model, metrics=metrics, **extra)
        atomic_write_json(metrics, path.with_suffix(".json"))
    du.barrier()


@STAGES.register("train")
def train(cfg: DictConfig) -> dict[str, Any]:
    ctx = prepare(cfg)
    slot, seed = slot_of(cfg)
    out = network_dir(cfg, slot) / "trained.pt"
    if (done := _done(out)) is not None:
        return done
    splits, loaders = data(cfg, ctx, seed)
    model = new_model(cfg, splits.num_classes, seed, ctx.device)
    if cfg.get("init_weights"):  # fine-tune a torchvision checkpoint (same state-dict keys as the zoo models)
        state = load_checkpoint(cfg.init_weights, map_location=ctx.device)
        model.load_state_dict(state.get("model", state))
    result = train_stage(cfg, ctx, model, loaders, "pretrain", out.parent, seed)
    counter = MacCounter(model, example_input(splits, ctx.device))
    metrics = {"stage": "train", "slot": slot, "seed": seed, "ranks": ctx.dist.world_size,
               "replica_checksums": du.replica_checksums(model),  # one per rank: equal when DDP kept them in step
               "selected_epoch": result.selected_epoch, "val_acc": result.selected_val.get("acc"),
               "macs": counter(), "params": counter.params(), "train_seconds": result.seconds}
    _save(ctx, out, model, metrics)
    if du.is_main():
        plot_history(result.history, out.parent / "pretrain_history.png", title=f"{cfg.model.name} on {cfg.dataset.name}")
    log.info("train slot %d: val acc %.2f (epoch %d) -> %s", slot, metrics["val_acc"] or 0.0, result.selected_epoch, out)
    return metrics


@STAGES.register("prune")
def prune(cfg: DictConfig) -> dict[str, Any]:
    ctx = prepare(cfg)
    slot, seed = slot_of(cfg)
    source, out = network_dir(cfg, slot) / "trained.pt", network_dir(cfg, slot) / "pruned.pt"
    if (done := _done(out)) is not None:
        return done
    model, _ = load_stage(source, "train", ctx.device, f"run=train slot={slot}")
    splits, loaders = data(cfg, ctx, seed)
    example = example_input(splits, ctx.device)
    base = MacCounter(model, example)
    base_macs, base_params = base(), base.params()
    method = build_method(cfg.method)
    t = time.time()
    result = progressive_prune(model.eval(), float(cfg.task.pruning.initial_speed_up), method, example,
                               base_macs=base_macs, calibrate=synced_calibration(method, loaders, ctx.device))
    val = evaluate_splits(model, loaders, ctx, ("val",))
    metrics = {"stage": "prune", "slot": slot, "seed": seed, "method": cfg.method.name, **val,
               "replica_checksums": du.replica_checksums(model),  # lockstep pruning: the same network everywhere
               "speed_up": result.speed_up, "macs": result.macs, "base_macs": base_macs, "params": result.params,
               "base_params": base_params, "steps": result.steps, "prune_seconds": time.time() - t}
    _save(ctx, out, model, metrics, prune={"speed_up": result.speed_up, "steps": result.steps})
    log.info("prune slot %d: %.3fx in %d steps, val acc without fine-tuning %.2f", slot, result.speed_up,
             result.steps, val["val_acc"])
    return metrics


@STAGES.register("finetune")
def finetune(cfg: DictConfig) -> dict[str, Any]:
    ctx = prepare(cfg)
    slot, seed = slot_of(cfg)
    source, out = network_dir(cfg, slot) / "pruned.pt", network_dir(cfg, slot) / "finetuned.pt"
    if (done := _done(out)) is not None:
        return done
    model, payload = load_stage(source, "prune", ctx.device, f"run=prune slot={slot}")
    pruned = payload["metrics"]
    splits, loaders = data(cfg, ctx, seed)
    result = train_stage(cfg, ctx, model, loaders, "finetune_initial", out.parent, seed)
    counter = MacCounter(model, example_input(splits, ctx.device))
    info = {
        "slot": slot, "seed": seed, **evaluate_splits(model, loaders, ctx), "speed_up": pruned["base_macs"] / counter(),
        "macs": counter(), "base_macs": pruned["base_macs"], "params": counter.params(),
        "base_params": pruned["base_params"], "prune_steps": pruned["steps"], "selected_epoch": result.selected_epoch,
        "timings": {"finetune_s": result.seconds, "prune_s": pruned["prune_seconds"]}, "task": cfg.task.name,
        "method": cfg.method.name, "ranks": ctx.dist.world_size,
        "config": resolved(cfg, "task", "dataset", "optim", "method"),
    }
    if du.is_main():  # the network is also data model `slot` (one shard per slot: stages of slots run apart)
        writer = ShardWriter(Path(cfg.data_models_dir) / f"shard_{slot:03d}.h5", store_header(cfg))
        if slot not in writer.finished_slots():  # stored before finetuned.pt, so a stage marked done is stored
            state = {k: v.cpu() for k, v in model.state_dict().items()}
            writer.append(DataModelRecord(slot, describe_model(model), info, state))
    _save(ctx, out, model, info)
    log.info("finetune slot %d: train acc %.2f, val acc %.2f at %.3fx", slot, info["train_acc"], info["val_acc"],
             info["speed_up"])
    return info
