"""``run=generate`` (``python -m generate_dataset``): produce the data models of one task, one shard at a time.

Shard ``index`` makes the data models of slots ``index * num ... index * num + num - 1``. For each slot:
train from scratch (``task.schedules.pretrain``), prune to the method's initial target
(``task.pruning.initial_speed_up``; unstructured methods: ``initial_sparsity`` or their N:M pattern),
fine-tune (``task.schedules.finetune_initial``), measure train and validation accuracy and loss, and append
the result to ``<data_models_dir>/shard_<index>.h5``.

Resuming: finished slots are in the shard file and are skipped; an unfinished slot continues from its own
work folder (``work/slot<k>/``: the stage checkpoints of ``fit`` and the pruned network), which is deleted
once the slot is stored (``resume=false`` restarts unfinished slots but never discards finished ones). Shards with different ``index`` can run side by side (one process per GPU, or
several on a CPU): they share nothing but the read-only data set.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any, Dict

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from data_loaders.data_models import DataModelRecord, ShardWriter
from main.run_modes import RUN_MODES, ConfigError, RunContext, prepare_run, run_argument
from main.stages import data_for, evaluate_splits, example_input, new_model, train_stage
from nn.models import describe_model
from utils import distributed as du
from utils.checkpoint import load_model, plain, save_model
from utils.io import atomic_write_json
from utils.pruning.macs import MacCounter
from utils.pruning.schemes import scheme_for

log = logging.getLogger(__name__)


def slot_seed(seed: int, slot: int) -> int:
    """Seed of data-model slot ``slot`` (distinct per slot, reproducible, shared by every shard layout)."""
    return 1000 * int(seed) + int(slot)


# Dataset keys that say where the files are or how to fetch them, not what the data is.
_LOCATION_KEYS = ("root", "download", "system_dir")


def store_settings(cfg: DictConfig, for_reading: bool = False) -> Dict[str, Any]:
    """The settings that make a store's data models what they are (recorded in its header, compared by every
    run that writes or reads it): model, data set, criterion, optimiser, the pretraining and initial
    fine-tuning schedules, the initial pruning target, the seed and the debug limits.

    ``for_reading``: what a reader must agree on. The seed is left out (the store's folder names it, and a
    metanetwork of another seed may train on these models), and so is the criterion's settings when the
    run reads another method's store (``data_models_method``), whose settings it does not know."""
    settings = {
        "model": plain(cfg.model),
        "dataset": {k: v for k, v in plain(cfg.dataset).items() if k not in _LOCATION_KEYS},
        "method": plain(cfg.method), "optim": plain(cfg.optim), "batch_size": int(cfg.task.batch_size),
        "schedules": {k: plain(cfg.task.schedules[k]) for k in ("pretrain", "finetune_initial")},
        "initial": {k: cfg.task.pruning.get(k) for k in ("initial_speed_up", "initial_sparsity")},
        "init_weights": cfg.get("init_weights"), "debug": plain(cfg.get("debug")), "seed": int(cfg.seed),
    }
    if for_reading:
        del settings["seed"]
        if cfg.get("data_models_method") and str(cfg.data_models_method) != cfg.method.name:
            del settings["method"]
    return settings


def store_header(cfg: DictConfig) -> Dict[str, Any]:
    """What every file of a data-model store must agree on."""
    return {"task": cfg.task.name, "model": cfg.model.name, "dataset": cfg.dataset.name, "method": cfg.method.name,
            "num_classes": int(cfg.dataset.num_classes), "settings": store_settings(cfg)}


def writable_store(cfg: DictConfig) -> Path:
    """The store that data models of ``cfg.method`` are written to; ``data_models_method`` (another method's
    store, for reading only) is refused, since the store's header names the method that made its models."""
    other = cfg.get("data_models_method")
    if other and str(other) != cfg.method.name:
        raise ConfigError(f"data_models_method={other} only reads another method's data models "
                          f"(run=meta_train/visualize); to make data models, drop it and set method={other}")
    return Path(cfg.data_models_dir)


def make_data_model(cfg: DictConfig, ctx: RunContext, slot: int, splits, loaders, work: Path) -> DataModelRecord:
    """Train, prune and fine-tune the data model of ``slot``, resumable through ``work``."""
    seed = slot_seed(cfg.seed, slot)
    example = example_input(splits, ctx.device)
    scheme = scheme_for(cfg.method)
    pruned_path = work / "pruned.pt"
    timings: Dict[str, float] = {}
    reference = new_model(cfg, splits.num_classes, seed, ctx.device)  # the unpruned architecture
    base = MacCounter(reference, example)
    base_macs, base_params = base(), base.params()
    if pruned_path.exists():  # pretraining and pruning already done before an interruption
        model, payload = load_model(pruned_path)
        model.to(ctx.device)
        prune_info, timings = dict(payload["prune"]), dict(payload["timings"])
    else:
        model = reference
        t = time.time()
        train_stage(cfg, ctx, model, loaders, "pretrain", work, seed)
        timings["pretrain_s"] = time.time() - t
        t = time.time()
        prune_info = scheme.prune(model, scheme.initial_target(cfg.task), example, base_macs,
                                  lambda: iter(loaders["train"]), ctx.device)
        timings["prune_s"] = time.time() - t
        save_model(pruned_path, model, prune=prune_info, timings=timings)
    t = time.time()
    train_stage(cfg, ctx, model, loaders, "finetune_initial", work, seed,
                after_backward=scheme.finetune_hook(model, example, "finetune_initial"))
    timings["finetune_s"] = time.time() - t
    metrics = evaluate_splits(model, loaders, ctx)
    info = {
        "slot": slot, "seed": seed, **metrics, **scheme.measure(model, example, base_macs),
        "base_macs": base_macs, "base_params": base_params,
        "prune_steps": prune_info["steps"], "timings": timings, "task": cfg.task.name, "method": cfg.method.name,
        "ranks": ctx.dist.world_size, "replica_checksums": du.replica_checksums(model),  # equal: the ranks agree
        "config": {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("task", "dataset", "optim", "method")},
    }
    log.info("slot %d: train acc %.2f, val acc %.2f, %s %.3f", slot, info["train_acc"], info["val_acc"], scheme.axis,
             info[scheme.axis])
    model.cpu()
    return DataModelRecord(slot, describe_model(model), info, model.state_dict())


@RUN_MODES.register("generate")
def generate(cfg: DictConfig) -> Dict[str, Any]:
    ctx = prepare_run(cfg)
    shard = run_argument(cfg, "shard")
    index = int(shard if shard is not None else 0)
    num = int(cfg.num if cfg.get("num") is not None else cfg.task.data_models.num)
    if index < 0 or num < 1:
        raise ConfigError(f"shard={index}, num={num}: a shard needs shard >= 0 and num >= 1, e.g. shard=0 num=4")
    store = writable_store(cfg)
    writer = ShardWriter(store / f"shard_{index:03d}.h5", store_header(cfg))  # rank 0 creates the file
    du.barrier()
    done = set(writer.finished_slots())
    slots = range(index * num, index * num + num)
    log.info("shard %d: slots %d-%d, %d already stored in %s", index, slots[0], slots[-1],
             len(done & set(slots)), writer.path)
    splits, loaders = data_for(cfg, ctx)
    t0 = time.time()
    for slot in tqdm(slots, desc=f"shard {index}", disable=not cfg.progress or not ctx.dist.is_main):
        if slot in done:
            continue
        work = store / "work" / f"slot{slot:05d}"
        if not cfg.resume and ctx.dist.is_main:  # start the unfinished slot over; finished slots are kept
            shutil.rmtree(work, ignore_errors=True)
        du.barrier()
        record = make_data_model(cfg, ctx, slot, splits, loaders, work)
        writer.append(record)
        if ctx.dist.is_main:
            shutil.rmtree(work, ignore_errors=True)
    if ctx.dist.is_main and (store / "work").is_dir() and not any((store / "work").iterdir()):
        (store / "work").rmdir()
    du.barrier()  # the shard file holds every slot on every rank's reading
    summary = {"shard": str(writer.path), "slots": writer.finished_slots(), "seconds": time.time() - t0}
    atomic_write_json(summary, ctx.run_dir / "generate_summary.json")
    return summary
