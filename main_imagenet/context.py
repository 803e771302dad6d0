"""What every ImageNet stage shares: joining the job, one run directory, sharded data, network files.

``prepare(cfg)`` is the distributed counterpart of ``main.run_modes.prepare_run``: it checks the
top-level settings, joins the process group (``utils.distributed.init_distributed``), seeds, and settles the
run directory: rank 0's path is broadcast and only rank 0 creates it, so a job has one run directory
however many ranks it has (even if the path holds a timestamp that ranks would resolve differently).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from data_loaders import DatasetSplits, build_datasets, sharded_loaders
from main.generate import slot_seed
from main.run_modes import ConfigError, RunContext, check_top_level
from utils import distributed as du
from utils.checkpoint import load_model
from utils.device import seed_everything, set_threads
from utils.pruning.methods import PruningMethod
from utils.pruning.progressive import loss_gradients
from utils.train import Limits

log = logging.getLogger(__name__)


@dataclass
class DistContext(RunContext):
    """A run context that also knows this rank's place in the job."""

    dist: du.DistInfo = field(default_factory=du.DistInfo)


def prepare(cfg: DictConfig) -> DistContext:
    """Join the job, seed, pick this rank's device and settle the one run directory (see module docstring)."""
    check_top_level(cfg)
    set_threads(cfg.get("threads"))
    if du.env_rank() != 0:
        logging.getLogger().setLevel(logging.WARNING)  # one rank narrates; the others speak only of trouble
    try:
        device, info = du.init_distributed(cfg.get("device", "auto"), float(cfg.dist.timeout_s))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    seed_everything(int(cfg.seed))
    run_dir = Path(du.broadcast_object(str(cfg.run_dir)))
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    du.barrier()
    log.info("run=%s task=%s model=%s ranks=%d device=%s run_dir=%s", cfg.run, cfg.task.name, cfg.model.name,
             info.world_size, device, run_dir)
    return DistContext(device=device, run_dir=run_dir, limits=Limits.from_cfg(cfg.get("debug")), dist=info)


def data(cfg: DictConfig, ctx: RunContext, seed: int | None = None) -> tuple[DatasetSplits, dict[str, Any]]:
    """The data set (ImageNet folders from ``dataset.root``) and loaders that give each rank its share."""
    splits = build_datasets(cfg.dataset)
    try:
        loaders = sharded_loaders(
            splits, batch_size=int(cfg.task.batch_size), eval_batch_size=int(cfg.task.eval_batch_size),
            num_workers=int(cfg.num_workers), seed=int(cfg.seed if seed is None else seed),
            pin_memory=ctx.device.type == "cuda")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return splits, loaders


def network_dir(cfg: DictConfig, slot: int) -> Path:
    """Where the stages ``train`` -> ``prune`` -> ``finetune`` of network ``slot`` hand over their networks."""
    return Path(cfg.networks_dir) / f"slot_{slot:03d}"


def slot_of(cfg: DictConfig) -> tuple[int, int]:
    """``(slot, seed)`` of this run's network (the seed is distinct per slot, as for data models)."""
    slot = int(cfg.slot)
    if slot < 0:
        raise ConfigError(f"slot={slot}: slots are >= 0, e.g. slot=0")
    return slot, slot_seed(int(cfg.seed), slot)


def load_stage(path: Path, stage: str, device: torch.device, hint: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The network an earlier stage saved at ``path``, on ``device``; a clear error when it is missing."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run the {stage} stage first ({hint})")
    model, payload = load_model(path)
    return model.to(device), payload


def synced_calibration(method: PruningMethod, loaders: dict[str, Any], device: torch.device):
    """Gradients for data-driven criteria, averaged over the ranks so every rank prunes the same channels.

    Pruning runs on every rank in lockstep (identical weights, identical decisions), which needs identical
    importance scores; Taylor's gradients are made identical by averaging. The Hessian criterion keeps
    per-sample statistics inside its importance object, which this cannot average.
    """
    if not method.needs_gradients:
        return None
    if method.per_sample_gradients and du.get_world_size() > 1:
        raise ConfigError(f"method={method.name} keeps per-sample statistics that cannot be synchronised across "
                          "ranks; prune with one process (python -m main_imagenet ...) or pick another method")
    calibrate = loss_gradients(method, lambda: iter(loaders["train"]), device)

    def synced(model: torch.nn.Module) -> None:
        calibrate(model)
        du.average_gradients(model)

    return synced


def resolved(cfg: DictConfig, *keys: str) -> dict[str, Any]:
    """Plain containers of some config groups, for metrics files and fingerprints."""
    return {k: OmegaConf.to_container(cfg[k], resolve=True) for k in keys}
