"""``run=pretrain_final`` and ``run=pruning_final``: turn a chosen metanetwork into a pruned network.

``run=pretrain_final slot=K`` trains a fresh target network exactly like data-model slot ``K`` (train from
scratch, initial pruning, fine-tuning; pick a ``K`` outside the data-model slots) and saves it to
``<final_targets_dir>/target_K/model.pt``.

``run=pruning_final target=<speed-up> slot=K [meta_epoch=E]`` (the published forms ``index=`` and
``reproduce_index=`` are accepted for ``target=`` and ``slot=``) then:

1. applies the metanetwork of epoch ``meta_epoch`` (``metanetwork=none``: the identical pipeline without
   it, the baseline), and fine-tunes with the "after metanetwork" schedule (selection on validation);
   with ``method=sparse_learning`` that fine-tuning is Torch-Pruning's sparse learning (``regularize``).
   Without a metanetwork this fine-tune is the same for every criterion, so it is made once per target
   network and seed and shared (:func:`baseline_finetune_dir`);
2. prunes progressively with the method's criterion until the speed-up (against the *unpruned*
   network) reaches the target: never below it, at most one step above (unstructured methods,
   ``structure: unstructured``: ``target`` is the sparsity, the fraction of zeroed conv/linear weights,
   and fine-tuning keeps the zeros; see :mod:`utils.pruning.schemes`);
3. evaluates the pruned network on val and test before any fine-tuning (``pruned_val_acc``,
   ``pruned_test_acc``; reported, never selected on), fine-tunes again ("after pruning" schedule),
   evaluates on test, saves the network as widths + state dict and writes ``metrics.json`` (accuracy of the
   base and pruned networks on val and test, MACs, parameters, speed-up, measured latency of both on this
   device, seed, config, timings);
   with ``export_onnx=true`` also ``model.onnx``, checked with onnxruntime (:mod:`main.export`).

Every stage leaves a checkpoint in the run's folder, so an interrupted run continues where it stopped.

Methods that do not prune a trained network step by step (MetaPruning's width search, ...) set
``pipeline: <name>`` in their method config and register a function ``(cfg, ctx, target) -> metrics``
in :data:`FINAL_PIPELINES`; ``run=pruning_final`` hands the run to it, so every method is run, resumed and
compared through the same command and writes the same ``metrics.json`` keys.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict

import torch
from omegaconf import DictConfig, OmegaConf

from data_loaders.data_models import DataModel
from main.export import export_checked, real_batch, require_export_extra
from main.generate import make_data_model
from main.meta_train import apply_metanetwork, epoch_checkpoint, load_metanetwork
from main.run_modes import RUN_MODES, ConfigError, RunContext, prepare_run, run_argument
from main.stages import data_for, evaluate_splits, example_input, train_stage
from nn.models import create_model
from utils import distributed as du
from utils.checkpoint import CheckpointError, check_fingerprint, load_model, plain, save_model
from utils.convert import graph_to_model
from utils.io import atomic_write_json, file_digest, file_lock, read_json
from utils.latency import measure_latency
from utils.pruning.macs import MacCounter
from utils.pruning.schemes import scheme_for
from utils.registry import Registry

log = logging.getLogger(__name__)

# pipeline name -> fn(cfg, ctx, target_speed_up) -> metrics; "progressive" is pruning_final's own below
FINAL_PIPELINES: Registry[Callable[[DictConfig, RunContext, float], Dict[str, Any]]] = Registry("final pruning pipeline")


def _required_int(cfg: DictConfig, key: str, example: str, alias: str | None = None) -> int:
    value = run_argument(cfg, key, alias) if alias else cfg.get(key)
    if value is None:
        raise ConfigError(f"run={cfg.run} needs {key}=..., e.g. `python -m main run={cfg.run} {example}`")
    return int(value)


def target_path(cfg: DictConfig, slot: int) -> Path:
    return Path(cfg.final_targets_dir) / f"target_{slot}" / "model.pt"


@RUN_MODES.register("pretrain_final")
def pretrain_final(cfg: DictConfig) -> Dict[str, Any]:
    ctx = prepare_run(cfg)
    slot = _required_int(cfg, "slot", "slot=100", alias="index")
    path = target_path(cfg, slot)
    if path.exists():
        log.info("target %d already trained: %s", slot, path)
        return read_json(path.parent / "info.json")
    splits, loaders = data_for(cfg, ctx)
    record = make_data_model(cfg, ctx, slot, splits, loaders, path.parent / "work")
    model = create_model(record.arch["name"], num_classes=record.arch["num_classes"], widths=record.arch["widths"],
                         **record.arch["kwargs"])
    model.load_state_dict(record.state)
    save_model(path, model, info=record.info)
    atomic_write_json(record.info, path.parent / "info.json")
    if ctx.dist.is_main:  # the stage checkpoints served resuming; the finished network is model.pt
        shutil.rmtree(path.parent / "work", ignore_errors=True)
    return record.info


def baseline_finetune_dir(cfg: DictConfig, slot: int, scheme) -> Path:
    """Where the after-metanetwork fine-tune of target ``slot`` *without* a metanetwork lives. It depends on the
    target network, the schedule and the seed only, so every baseline that prunes this target shares it (the
    benchmark computes it once per seed), except a method that fine-tunes with its own hook (sparse learning's
    regulariser), which gets a folder of its own per setting. The stage's fingerprint guards the rest."""
    root = Path(cfg.final_targets_dir) / f"target_{slot}" / "finetuned"
    if not scheme.has_finetune_hook("finetune_after_metanetwork"):
        return root / "plain"
    settings = json.dumps(OmegaConf.to_container(cfg.method, resolve=True), sort_keys=True)
    return root / f"{cfg.method.name}_{hashlib.sha1(settings.encode()).hexdigest()[:10]}"


def check_stage_inputs(cfg: DictConfig, ctx: RunContext, out: Path, source_digest: str, epoch: int | None,
                       target: float) -> None:
    """Record what the stages in ``out`` are made from (the target network's file, the metanetwork's settings and
    checkpoint, the method, the target) and refuse to continue them from other inputs: two metanetworks with
    the same epoch number, or another criterion under the same run name, would otherwise find each other's
    finished stages and reuse them."""
    if epoch is not None and not epoch_checkpoint(Path(cfg.meta_train_dir), epoch).exists():
        load_metanetwork(cfg, None, epoch, ctx.device)  # raises the error that names the missing checkpoint
    inputs = plain({
        "target_network": source_digest, "target": target, "method": OmegaConf.to_container(cfg.method, resolve=True),
        "metanetwork": OmegaConf.to_container(cfg.metanetwork, resolve=True) if epoch is not None else "none",
        "meta_checkpoint": file_digest(epoch_checkpoint(Path(cfg.meta_train_dir), epoch)) if epoch is not None else "",
    })
    path = out / "inputs.json"
    if path.exists():
        check_fingerprint(inputs, read_json(path), path)
    elif ctx.dist.is_main:
        atomic_write_json(inputs, path)
    du.barrier()


def target_accuracy(cfg: DictConfig, ctx: RunContext, model: torch.nn.Module, loaders, source: Path,
                    source_digest: str) -> Dict[str, Any]:
    """``base_{val,test}_{acc,loss}`` of the target network ``source``, measured once per data setting and kept
    beside it (every method of a benchmark prunes the same network: no need to evaluate it in every cell)."""
    def measure() -> Dict[str, Any]:
        return {f"base_{k}": v for k, v in evaluate_splits(model, loaders, ctx, ("val", "test")).items()}

    if ctx.dist.world_size > 1:  # every rank takes part in the sharded evaluation
        return measure()
    fingerprint = {"dataset": OmegaConf.to_container(cfg.dataset, resolve=True), "limits": vars(ctx.limits),
                   "model": source_digest}
    cache = source.parent / "base_metrics.json"
    with file_lock(source.parent / ".lock"):
        if cache.exists() and read_json(cache).get("fingerprint") == fingerprint:
            return read_json(cache)["metrics"]
        metrics = measure()
        atomic_write_json({"fingerprint": fingerprint, "metrics": metrics}, cache)
    return metrics


def _stage(path: Path, device: torch.device):
    """The network saved after a finished stage, or None."""
    if not path.exists():
        return None, None
    model, payload = load_model(path)
    return model.to(device), payload


@RUN_MODES.register("pruning_final")
def pruning_final(cfg: DictConfig) -> Dict[str, Any]:
    ctx = prepare_run(cfg)
    target = run_argument(cfg, "target")
    if target is None:
        raise ConfigError("run=pruning_final needs the target speed-up as target=..., e.g. target=2.3 slot=100")
    try:
        target = float(target)
    except (TypeError, ValueError):
        raise ConfigError(f"target={target!r} is not a number: give the speed-up (the sparsity for unstructured "
                          "methods), e.g. target=2.3") from None
    pipeline = str(cfg.method.get("pipeline", "progressive"))
    if pipeline != "progressive":
        return FINAL_PIPELINES.get(pipeline)(cfg, ctx, target)
    slot, seed = _required_int(cfg, "slot", "target=2.3 slot=100", alias="reproduce_index"), int(cfg.seed)
    source = target_path(cfg, slot)
    if not source.exists():
        raise CheckpointError(f"target network {source} does not exist: run `python -m main run=pretrain_final "
                              f"slot={slot}` first (same task, method and seed)")
    use_meta = cfg.metanetwork.name != "none"
    epoch = _required_int(cfg, "meta_epoch", f"target={target:g} slot={slot} meta_epoch=40") if use_meta else 0
    out = ctx.run_dir / f"target{slot}_{cfg.metanetwork.name}{epoch if use_meta else ''}_x{target:g}"
    source_digest = file_digest(source)  # what every stage of this cell starts from
    check_stage_inputs(cfg, ctx, out, source_digest, epoch if use_meta else None, target)
    t0, timings = time.time(), {}
    base_model, payload = load_model(source)
    base_model.to(ctx.device).eval()
    info = payload["info"]
    splits, loaders = data_for(cfg, ctx)
    example = example_input(splits, ctx.device)
    scheme = scheme_for(cfg.method)
    base_macs = int(info["base_macs"])
    scheme.check_target(base_model, target, example, base_macs)  # before any fine-tuning
    if cfg.get("export_onnx"):
        require_export_extra()  # before any work, not after the fine-tuning
    base = target_accuracy(cfg, ctx, base_model, loaders, source, source_digest)

    # 1. metanetwork (or not) and the after-metanetwork fine-tuning
    stage_dir = out if use_meta else baseline_finetune_dir(cfg, slot, scheme)
    with (file_lock(stage_dir / ".lock") if ctx.dist.world_size == 1 else contextlib.nullcontext()):
        model, _ = _stage(stage_dir / "after_metanetwork.pt", ctx.device)
        if model is None:
            t = time.time()
            item = DataModel(slot, base_model, info)
            metanet = load_metanetwork(cfg, item.graph, epoch, ctx.device) if use_meta else None
            with torch.no_grad():
                model = graph_to_model(apply_metanetwork(metanet, item.graph.to(ctx.device))).to(ctx.device)
            train_stage(cfg, ctx, model, loaders, "finetune_after_metanetwork", stage_dir, seed,
                        after_backward=scheme.finetune_hook(model, example, "finetune_after_metanetwork"))
            timings["after_metanetwork_s"] = time.time() - t
            save_model(stage_dir / "after_metanetwork.pt", model, timings=timings)
        elif stage_dir != out:
            log.info("the after-metanetwork fine-tune of target %d is shared: %s", slot, stage_dir)
    # 2. progressive pruning to the target
    pruned, stage = _stage(out / "pruned.pt", ctx.device)
    if pruned is None:
        t = time.time()
        model.eval()
        result = scheme.prune(model, target, example, base_macs, lambda: iter(loaders["train"]), ctx.device)
        timings["prune_s"] = time.time() - t
        save_model(out / "pruned.pt", model, prune=result, timings=timings)
        pruned = model
    else:
        timings.update(stage["timings"])
    # the pruned network before its fine-tuning: where criteria (and Intra-Fusion's merging) differ most
    no_finetune = {f"pruned_{k}": v for k, v in evaluate_splits(pruned, loaders, ctx, ("val", "test")).items()}
    # 3. after-pruning fine-tuning, one test evaluation, metrics
    t = time.time()
    train_stage(cfg, ctx, pruned, loaders, "finetune_after_pruning", out, seed,
                after_backward=scheme.finetune_hook(pruned, example, "finetune_after_pruning"))
    timings["after_pruning_s"] = time.time() - t
    final = evaluate_splits(pruned, loaders, ctx, ("val", "test"))
    measured, base_counter = scheme.measure(pruned, example, base_macs), MacCounter(base_model, example)
    batch = torch.zeros(int(cfg.task.eval_batch_size), *example.shape[1:], device=ctx.device)
    metrics = {
        "task": cfg.task.name, "method": cfg.method.name, "metanetwork": cfg.metanetwork.name, "meta_epoch": epoch,
        "reproduce_index": slot, f"target_{scheme.axis}": target, "axis": scheme.axis, "seed": seed, **base, **no_finetune, **final,
        **measured, "base_macs": base_macs, "target_macs": base_counter(), "target_params": base_counter.params(),
        "base_params": int(info["base_params"]), "ranks": ctx.dist.world_size,
        "replica_checksums": du.replica_checksums(pruned),  # one per rank: equal when the ranks pruned alike
        "latency": {"base": measure_latency(base_model, batch), "pruned": measure_latency(pruned, batch)},
        "timings": {**timings, "total_s": time.time() - t0},
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    save_model(out / "model.pt", pruned, metrics={k: v for k, v in metrics.items() if k != "config"})
    if cfg.get("export_onnx") and ctx.dist.is_main:
        metrics["onnx"] = export_checked(pruned, real_batch(loaders["val"], int(cfg.task.eval_batch_size)),
                                         out / "model.onnx")
    atomic_write_json(metrics, out / "metrics.json")
    log.info("%s%s: %s %.3f, test acc %.2f (target network %.2f), latency %.2f -> %.2f ms", cfg.method.name,
             f" + metanetwork epoch {epoch}" if use_meta else "", scheme.axis, metrics[scheme.axis], final["test_acc"],
             base["base_test_acc"], metrics["latency"]["base"]["latency_ms"], metrics["latency"]["pruned"]["latency_ms"])
    return metrics
