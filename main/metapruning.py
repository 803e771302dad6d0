"""``run=pruning_final method=metapruning|rewarded_metapruning index=<speed-up>``: MetaPruning end to end.

1. Train the PruningNet of ``model`` on the training split, a fresh random width vector per step
   (``<run_dir>/pruningnet/``; shared by every target speed-up of the run, resumable per epoch).
2. Evolutionary search in the MAC window of the target (``<run_dir>/x<target>/search.json``, resumable
   per generation): each candidate's BNs are recalibrated on training batches, then it is scored on the
   validation split; fitness = validation accuracy (``fitness: accuracy``) or the reward of Rewarded
   meta-pruning (``fitness: reward``, ``A_base`` = the PruningNet's full-width validation accuracy).
3. The found widths become a plain zoo network, trained from scratch with a task schedule
   (``retrain.init: generated`` starts from the PruningNet's weights instead), evaluated once on test,
   saved as widths + state dict, and ``metrics.json`` is written with the keys of ``main.final``.

The base network (``base_*`` accuracies, latency) is the PruningNet at full width exported to the zoo
network; ``metrics["base_reference"]`` says so. The search's fitness never looks at the test split.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from main.final import FINAL_PIPELINES
from main.run_modes import ConfigError, RunContext
from main.stages import data_for, evaluate_splits, example_input, train_stage
from nn.metapruning.families import adapter_for
from nn.metapruning.pruningnet import Choice, FixedWidthNet, MacTable, PruningNet, RandomWidthNet, recalibrate_bn
from nn.metapruning.search import FITNESS, EvolutionarySearch, SearchSettings, Window
from nn.models import create_model
from utils.checkpoint import CheckpointError, load_checkpoint, save_model
from utils.device import seed_everything
from utils.io import atomic_save, atomic_write_json
from utils.latency import measure_latency
from utils.pruning.macs import MacCounter
from utils.registry import Registry
from utils.train import evaluate, fit

log = logging.getLogger(__name__)

# retrain.init -> fn(cfg, ctx, net, choice, batches, num_classes) -> zoo network to train
RETRAIN_INITS: Registry[Callable[..., torch.nn.Module]] = Registry("MetaPruning retrain init")


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def build_pruningnet(cfg: DictConfig, num_classes: int) -> PruningNet:
    """The PruningNet of ``cfg.model`` with the width ratios and MLP size of ``cfg.method``."""
    r = cfg.method.ratios
    if not 0 < float(r.min) <= 1 or int(r.num) < 1:
        raise ConfigError(f"method.ratios needs 0 < min <= 1 and num >= 1, got {_plain(r)}; e.g. method.ratios.min=0.25")
    n = int(r.num)
    ratios = [1.0] if n == 1 else [float(r.min) + (1 - float(r.min)) * i / (n - 1) for i in range(n)]
    try:
        adapter = adapter_for(cfg.model.name)
    except ValueError as err:
        raise ConfigError(f"{err}; pick one with model=...") from None
    return PruningNet(adapter, num_classes, ratios, hidden=int(cfg.method.hidden))


def scaled_schedule(schedule: dict[str, Any], factor: int) -> dict[str, Any]:
    """``schedule`` with epochs and milestones times ``factor``; the last epoch's PruningNet is kept."""
    if factor < 1:
        raise ConfigError(f"method.schedule_factor must be a positive integer, got {factor}")
    out = {**schedule, "epochs": int(schedule["epochs"]) * factor, "select": "last"}
    for key in ("milestones", "warmup_epochs"):
        if schedule.get(key) is not None:
            out[key] = [m * factor for m in schedule[key]] if key == "milestones" else schedule[key] * factor
    return out


def train_pruningnet(cfg: DictConfig, ctx: RunContext, net: PruningNet, loaders: dict[str, DataLoader],
                     run_dir: Path, seed: int) -> float:
    """Train ``net`` with random widths (resumable); returns the seconds spent (0 if it was already trained)."""
    done = run_dir / "pruningnet.pt"
    schedule = scaled_schedule(_plain(cfg.method.schedule), int(cfg.method.schedule_factor))
    fingerprint = {
        "model": cfg.model.name, "ratios": net.space.ratios, "hidden": int(cfg.method.hidden),
        "dataset": _plain(cfg.dataset), "schedule": schedule, "batch_size": int(cfg.task.batch_size),
        "optim": _plain(cfg.optim), "seed": seed, "limits": vars(ctx.limits),
    }
    if bool(cfg.resume) and done.exists():
        saved = load_checkpoint(done, map_location=ctx.device)
        if saved.get("fingerprint") == fingerprint:
            net.load_state_dict(saved["state_dict"])
            log.info("PruningNet already trained: %s", done)
            return 0.0
        raise CheckpointError(f"{done} was trained with other settings; re-run with them, or pass resume=false "
                              "(or another run_name=...) to train a new PruningNet")
    wrapper = RandomWidthNet(net)
    result = fit(wrapper, loaders, schedule, cfg.optim, ctx.device, run_dir=run_dir, name="pruningnet",
                 resume=bool(cfg.resume), limits=ctx.limits, seed=seed, progress=bool(cfg.progress),
                 fingerprint=fingerprint)
    atomic_save({"state_dict": net.state_dict(), "fingerprint": fingerprint, "seconds": result.seconds}, done)
    return result.seconds


def calibration_batches(loader: DataLoader, n: int, seed: int, device: torch.device) -> list[torch.Tensor]:
    """The same ``n`` training batches (images only) for every candidate's BN recalibration."""
    torch.manual_seed(seed)  # augmentation draws from the global RNG
    generator = getattr(loader, "generator", None)
    if generator is not None:
        generator.manual_seed(seed)
    out = []
    for x, _ in loader:
        if len(out) >= n:
            break
        out.append(x.to(device))
    return out


class Scorer:
    """choice -> ``{"acc", "loss"}`` of the PruningNet at that choice on the validation split, BNs recalibrated."""

    def __init__(self, net: PruningNet, batches: list[torch.Tensor], val: DataLoader, ctx: RunContext) -> None:
        self.net, self.batches, self.val, self.ctx = net, batches, val, ctx

    @torch.no_grad()
    def __call__(self, choice: Choice) -> dict[str, float]:
        recalibrate_bn(self.net, choice, self.batches)
        r = evaluate(FixedWidthNet(self.net, choice).eval(), self.val, self.ctx.device, self.ctx.limits.eval_batches)
        return {"acc": r["acc"], "loss": r["loss"]}


@RETRAIN_INITS.register("scratch")
def _from_scratch(cfg, ctx, net, choice, batches, num_classes):
    seed_everything(int(cfg.seed))
    return create_model(cfg.model.name, num_classes=num_classes, widths=net.widths(choice),
                        **_plain(cfg.model.kwargs)).to(ctx.device)


@RETRAIN_INITS.register("generated")
def _from_generated(cfg, ctx, net, choice, batches, num_classes):
    with torch.no_grad():
        recalibrate_bn(net, choice, batches)
        return net.export(cfg.model.name, choice, **_plain(cfg.model.kwargs)).to(ctx.device)


@FINAL_PIPELINES.register("metapruning")
def run_metapruning(cfg: DictConfig, ctx: RunContext, target: float) -> dict[str, Any]:
    t0, seed, m = time.time(), int(cfg.seed), cfg.method
    init, stage = str(m.retrain.init), str(m.retrain.schedule)
    RETRAIN_INITS.get(init)  # unknown names fail before any training
    FITNESS.get(str(m.fitness))
    if stage not in cfg.task.schedules:
        raise ConfigError(f"method.retrain.schedule={stage} is not a schedule of task {cfg.task.name}; "
                          f"choose one of {sorted(cfg.task.schedules)}")
    splits, loaders = data_for(cfg, ctx)
    example = example_input(splits, ctx.device)
    net = build_pruningnet(cfg, splits.num_classes)
    table = MacTable(net, cfg.model.name, example, **_plain(cfg.model.kwargs))
    base_macs = table(net.space.full())  # the unpruned default-width network
    settings = SearchSettings.from_cfg(m.search)
    window = Window(net.space, table, base_macs, target, settings.tolerance)  # unreachable: error before training
    net.to(ctx.device)
    timings = {"pruningnet_s": train_pruningnet(cfg, ctx, net, loaders, ctx.run_dir / "pruningnet", seed)}

    # 2. search: A_base is the PruningNet at full width, scored exactly like every candidate
    out = ctx.run_dir / f"x{target:g}"
    batches = calibration_batches(loaders["train"], int(m.recalibration_batches), seed, ctx.device)
    scorer = Scorer(net, batches, loaders["val"], ctx)
    base_score = scorer(net.space.full())
    fitness = FITNESS.get(str(m.fitness))(base_score["acc"], base_macs, float(m.reward_eps))
    fingerprint = {"pruningnet": str(ctx.run_dir / "pruningnet" / "pruningnet.pt"), "fitness": str(m.fitness),
                   "reward_eps": float(m.reward_eps), "search": vars(settings), "target": target, "seed": seed,
                   "recalibration_batches": int(m.recalibration_batches), "base_acc": base_score["acc"]}
    t = time.time()
    result = EvolutionarySearch(window, scorer, fitness, settings, seed, out / "search.json", fingerprint,
                                resume=bool(cfg.resume), progress=bool(cfg.progress)).run()
    timings["search_s"] = time.time() - t
    log.info("found widths %s: %.3fx, PruningNet val acc %.2f (full width %.2f)", net.widths(result.best),
             result.record["speed_up"], result.record["acc"], base_score["acc"])

    # 3. the found network as a plain zoo network, trained with the project's loop
    t = time.time()
    model = RETRAIN_INITS.get(init)(cfg, ctx, net, result.best, batches, splits.num_classes)
    train_stage(cfg, ctx, model, loaders, stage, out, seed)
    timings["retrain_s"] = time.time() - t
    final = evaluate_splits(model, loaders, ctx, ("val", "test"))
    with torch.no_grad():
        recalibrate_bn(net, net.space.full(), batches)
        base_model = net.export(cfg.model.name, net.space.full(), **_plain(cfg.model.kwargs)).eval()
    base = {f"base_{k}": v for k, v in evaluate_splits(base_model, loaders, ctx, ("val", "test")).items()}
    counter, base_counter = MacCounter(model, example), MacCounter(base_model, example)
    if counter() != result.record["macs"] or base_counter() != base_macs:
        raise RuntimeError(f"MAC count of the exported network ({counter()}) differs from the search's "
                           f"({result.record['macs']}): the family adapter does not match the zoo model")
    batch = torch.zeros(int(cfg.task.eval_batch_size), *example.shape[1:], device=ctx.device)
    metrics = {
        "task": cfg.task.name, "method": m.name, "metanetwork": "none", "meta_epoch": None, "reproduce_index": None,
        "target_speed_up": target, "seed": seed, **base, **final, "base_reference": "pruningnet_full_width",
        "speed_up": base_macs / counter(), "macs": counter(), "params": counter.params(),
        "base_macs": base_macs, "base_params": base_counter.params(),
        "target_macs": base_macs, "target_params": base_counter.params(),  # pruned from the unpruned network itself
        "latency": {"base": measure_latency(base_model, batch), "pruned": measure_latency(model, batch)},
        "search": {"widths": net.widths(result.best), "choice": list(result.best), "ratios": net.space.ratios,
                   "fitness": str(m.fitness), "best": result.record, "pruningnet_full_width": base_score,
                   "scored": result.evaluations, "history": result.history},
        "retrain": {"init": init, "schedule": stage},
        "timings": {**timings, "total_s": time.time() - t0},
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    save_model(out / "model.pt", model, metrics={k: v for k, v in metrics.items() if k != "config"})
    atomic_write_json(metrics, out / "metrics.json")
    log.info("%s: %.3fx, val acc %.2f, test acc %.2f (PruningNet full width %.2f), latency %.2f -> %.2f ms", m.name,
             metrics["speed_up"], final["val_acc"], final["test_acc"], base["base_test_acc"],
             metrics["latency"]["base"]["latency_ms"], metrics["latency"]["pruned"]["latency_ms"])
    return metrics
