"""Building blocks shared by the run modes: data, a fresh model, one training stage, evaluation."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from data_loaders import DatasetSplits, build_datasets, build_loaders, sharded_loaders
from main.run_modes import ConfigError, RunContext
from nn.models import create_model, describe_model
from utils.checkpoint import CheckpointError, load_checkpoint
from utils.device import seed_everything
from utils.train import FitResult, evaluate, fit


def data_for(cfg: DictConfig, ctx: RunContext, seed: int | None = None) -> Tuple[DatasetSplits, Dict[str, DataLoader]]:
    """The task's data set and its loaders (training order seeded by ``seed``, default ``cfg.seed``); in a
    distributed job each rank's loaders read its own share (``task.batch_size`` is the global batch)."""
    splits = build_datasets(cfg.dataset)
    build = sharded_loaders if ctx.dist.world_size > 1 else build_loaders
    try:
        loaders = build(splits, batch_size=int(cfg.task.batch_size), eval_batch_size=int(cfg.task.eval_batch_size),
                        num_workers=int(cfg.num_workers), seed=int(cfg.seed if seed is None else seed),
                        pin_memory=ctx.device.type == "cuda")
    except ValueError as err:  # a global batch the ranks cannot share
        raise ConfigError(str(err)) from None
    return splits, loaders


def example_input(splits: DatasetSplits, device: torch.device) -> torch.Tensor:
    """A zero batch of one image at the data set's input size (for tracing and MAC counting)."""
    return torch.zeros(1, splits.in_channels, splits.image_size, splits.image_size, device=device)


def new_model(cfg: DictConfig, num_classes: int, seed: int, device: torch.device) -> torch.nn.Module:
    """A freshly initialised model of ``cfg.model`` (initialisation seeded by ``seed``), or, with
    ``init_weights=<file>``, one holding those weights (a torchvision state dict: training fine-tunes it)."""
    seed_everything(seed)
    kwargs = OmegaConf.to_container(cfg.model.kwargs, resolve=True)
    model = create_model(cfg.model.name, num_classes=num_classes, **kwargs)
    if cfg.get("init_weights"):
        state = load_checkpoint(cfg.init_weights)
        try:
            model.load_state_dict(state.get("model", state))
        except RuntimeError as err:
            raise CheckpointError(f"init_weights={cfg.init_weights} does not fit model={cfg.model.name} with "
                                  f"{num_classes} classes: {str(err).splitlines()[0]}") from None
    return model.to(device)


def train_stage(cfg: DictConfig, ctx: RunContext, model: torch.nn.Module, loaders: Dict[str, DataLoader],
                stage: str, run_dir: Path, seed: int, after_backward=None) -> FitResult:
    """Train ``model`` with schedule ``cfg.task.schedules[stage]``, resumable in ``run_dir``."""
    schedule = cfg.task.schedules[stage]
    fingerprint = {
        "arch": describe_model(model), "dataset": OmegaConf.to_container(cfg.dataset, resolve=True),
        "schedule": OmegaConf.to_container(schedule, resolve=True), "batch_size": cfg.task.batch_size,
        "optim": OmegaConf.to_container(cfg.optim, resolve=True), "seed": seed, "limits": vars(ctx.limits),
        "channels_last": bool(cfg.channels_last),  # another layout rounds differently: not the same run
    }
    if after_backward is not None:  # e.g. sparse learning's regulariser: its settings define the run too
        fingerprint["after_backward"] = OmegaConf.to_container(cfg.method, resolve=True)
    return fit(model, loaders, schedule, cfg.optim, ctx.device, run_dir=run_dir, name=stage, resume=bool(cfg.resume),
               limits=ctx.limits, seed=seed, progress=bool(cfg.progress), fingerprint=fingerprint,
               after_backward=after_backward, channels_last=bool(cfg.channels_last))


def evaluate_splits(model: torch.nn.Module, loaders: Dict[str, DataLoader], ctx: RunContext,
                    names: Iterable[str] = ("train_eval", "val")) -> Dict[str, Any]:
    """``{"<split>_acc": ..., "<split>_loss": ...}`` for each named loader (``train_eval`` -> ``train``)."""
    out: Dict[str, Any] = {}
    for name in names:
        r = evaluate(model, loaders[name], ctx.device, ctx.limits.eval_batches)
        key = name.replace("_eval", "")
        out[f"{key}_acc"], out[f"{key}_loss"] = r["acc"], r["loss"]
    return out
