"""``run=pretrain``: train a zoo model from scratch on a data set and save it (widths + state dict).

Writes to the run directory: ``model.pt`` (architecture description + weights of the epoch selected on
the validation split), ``metrics.json`` (validation and, once, test accuracy; MACs; parameters; timings;
the resolved config), ``pretrain_history.csv`` / ``.png`` and the resumable ``pretrain_last.pt``.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Dict

from omegaconf import DictConfig, OmegaConf

from main.run_modes import RUN_MODES, prepare_run
from main.stages import data_for, evaluate_splits, example_input, new_model, train_stage
from utils import distributed as du
from utils.checkpoint import save_model
from utils.io import atomic_write_json
from utils.plotting import plot_history
from utils.pruning.macs import MacCounter

log = logging.getLogger(__name__)


@RUN_MODES.register("pretrain")
def pretrain(cfg: DictConfig) -> Dict[str, Any]:
    ctx = prepare_run(cfg)
    t0 = time.time()
    splits, loaders = data_for(cfg, ctx)
    model = new_model(cfg, splits.num_classes, int(cfg.seed), ctx.device)
    result = train_stage(cfg, ctx, model, loaders, "pretrain", ctx.run_dir, int(cfg.seed))
    # The test split is looked at exactly once, after selection on the validation split.
    test = evaluate_splits(model, loaders, ctx, names=("test",))
    counter = MacCounter(model, example_input(splits, ctx.device))
    metrics = {
        "run": "pretrain", "task": cfg.task.name, "model": cfg.model.name, "dataset": cfg.dataset.name,
        "seed": int(cfg.seed), "device": str(ctx.device), "epochs_run": len(result.history),
        "selected_epoch": result.selected_epoch, "val_acc": result.selected_val.get("acc"),
        "val_loss": result.selected_val.get("loss"), **test, "macs": counter(), "params": counter.params(),
        "train_seconds": result.seconds, "total_seconds": time.time() - t0, "ranks": ctx.dist.world_size,
        "replica_checksums": du.replica_checksums(model),  # one per rank: equal when DDP kept them in step
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    save_model(ctx.run_dir / "model.pt", model, metrics={k: v for k, v in metrics.items() if k != "config"})
    atomic_write_json(metrics, ctx.run_dir / "metrics.json")
    plot_history(result.history, ctx.run_dir / "pretrain_history.png", title=f"{cfg.model.name} on {cfg.dataset.name}")
    log.info("pretrain done: val acc %.2f (epoch %d), test acc %.2f, %.2f M MACs -> %s",
             metrics["val_acc"], result.selected_epoch, metrics["test_acc"], metrics["macs"] / 1e6,
             ctx.run_dir / "model.pt")
    return metrics
