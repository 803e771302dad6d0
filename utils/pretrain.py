"""``run=pretrain``: train a zoo model from scratch on a data set and save it (widths + state dict).

Writes to the run directory: ``model.pt`` (architecture description + weights of the epoch selected on
the validation split), ``metrics.json`` (validation and, once, test accuracy; MACs; parameters; timings;
the resolved config), ``pretrain_history.csv`` / ``.png`` and the resumable ``pretrain_last.pt``.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Dict

import torch
import torch_pruning as tp
from omegaconf import DictConfig, OmegaConf

from data_loaders import build_datasets, build_loaders
from nn.models import create_model, describe_model
from utils.checkpoint import save_model
from utils.io import atomic_write_json
from utils.plotting import plot_history
from utils.run_modes import RUN_MODES, prepare_run
from utils.train import evaluate, fit

log = logging.getLogger(__name__)


def count_macs_params(model: torch.nn.Module, in_channels: int, image_size: int, device: torch.device) -> Dict[str, int]:
    """MACs and parameter count at the data set's input size (Torch-Pruning's counter, as for speed-ups)."""
    was_training = model.training
    example = torch.zeros(1, in_channels, image_size, image_size, device=device)
    macs, params = tp.utils.count_ops_and_params(model.eval(), example)
    model.train(was_training)
    return {"macs": int(macs), "params": int(params)}


@RUN_MODES.register("pretrain")
def pretrain(cfg: DictConfig) -> Dict[str, Any]:
    ctx = prepare_run(cfg)
    t0 = time.time()
    splits = build_datasets(cfg.dataset)
    loaders = build_loaders(
        splits, batch_size=int(cfg.task.batch_size), eval_batch_size=int(cfg.task.eval_batch_size),
        num_workers=int(cfg.num_workers), seed=int(cfg.seed), pin_memory=ctx.device.type == "cuda",
    )
    model_kwargs = OmegaConf.to_container(cfg.model.kwargs, resolve=True)
    model = create_model(cfg.model.name, num_classes=splits.num_classes, **model_kwargs).to(ctx.device)
    schedule = cfg.task.schedules.pretrain
    fingerprint = {
        "arch": describe_model(model), "dataset": OmegaConf.to_container(cfg.dataset, resolve=True),
        "schedule": OmegaConf.to_container(schedule, resolve=True), "batch_size": cfg.task.batch_size,
        "optim": OmegaConf.to_container(cfg.optim, resolve=True), "seed": cfg.seed, "limits": vars(ctx.limits),
    }
    result = fit(
        model, loaders, schedule, cfg.optim, ctx.device, run_dir=ctx.run_dir, name="pretrain", resume=cfg.resume,
        limits=ctx.limits, seed=int(cfg.seed), progress=bool(cfg.progress), fingerprint=fingerprint,
    )
    # The test split is looked at exactly once, after selection on the validation split.
    test = evaluate(model, loaders["test"], ctx.device, ctx.limits.eval_batches)
    metrics = {
        "run": "pretrain", "task": cfg.task.name, "model": cfg.model.name, "dataset": cfg.dataset.name,
        "seed": int(cfg.seed), "device": str(ctx.device), "epochs_run": len(result.history),
        "selected_epoch": result.selected_epoch, "val_acc": result.selected_val.get("acc"),
        "val_loss": result.selected_val.get("loss"), "test_acc": test["acc"], "test_loss": test["loss"],
        **count_macs_params(model, splits.in_channels, splits.image_size, ctx.device),
        "train_seconds": result.seconds, "total_seconds": time.time() - t0,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    save_model(ctx.run_dir / "model.pt", model, metrics={k: v for k, v in metrics.items() if k != "config"})
    atomic_write_json(metrics, ctx.run_dir / "metrics.json")
    plot_history(result.history, ctx.run_dir / "pretrain_history.png", title=f"{cfg.model.name} on {cfg.dataset.name}")
    log.info("pretrain done: val acc %.2f (epoch %d), test acc %.2f, %.2f M MACs -> %s",
             metrics["val_acc"], result.selected_epoch, test["acc"], metrics["macs"] / 1e6, ctx.run_dir / "model.pt")
    return metrics
