"""``run=import_published``: the published code's data models into this project's store.

    python -m generate_dataset.import_published <folder> data_generator=<task> method=<method> [evaluate=false]

``<folder>`` is a Hugging Face ``datasets`` folder written by the published code (``save_to_disk``, one
row per data model; merged folders from ``concatenate_datasets`` are the same). Every row is rebuilt as
the task's zoo network at the widths read from its tensor shapes (:mod:`data_loaders.published_layout`), measured
like a generated data model (MACs, speed-up against the unpruned network; with ``evaluate=true``, the
default, train and validation accuracy and loss on this project's splits of the task's data), and written
to a new shard ``<data_models_dir>/shard_<k>.h5`` with the next free shard index and slot numbers.

The published figures are kept in each record's ``info["published"]`` (its ``val_*`` were measured on the
test split). With ``evaluate=false`` they also stand in for the measured ones (``info["metrics_from"]``
says which). A row that does not fit the task's architecture stops the import with the key and the shapes
that differ, and nothing is written: the shard file appears only when every row has been converted. A
folder that is already in the store (same absolute path) is refused rather than imported twice.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Dict, Iterator

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from data_loaders.data_models import DataModelRecord, check_header, read_descriptions, read_header, write_shard
from data_loaders.published_layout import PublishedRowError, layout_for, rebuild, row_arrays, split_row
from main.generate import store_header, writable_store
from main.run_modes import RUN_MODES, ConfigError, prepare_run
from main.stages import data_for, evaluate_splits, example_input, new_model
from nn.models import describe_model
from utils.io import atomic_write_json
from utils.pruning.macs import MacCounter
from utils.pruning.schemes import scheme_for

log = logging.getLogger(__name__)

USAGE = "python -m generate_dataset.import_published <folder> data_generator=<task> method=<method>"


def require_published_extra():
    """The ``datasets`` module; a :class:`ConfigError` saying what to install when the extra is missing."""
    try:
        import datasets
    except ImportError:
        raise ConfigError("reading the published data models needs the optional `published` extra: "
                          "pip install -c constraints.txt -e \".[published]\"") from None
    return datasets


def load_published(path: str | Path):
    """The published rows of ``path`` as a ``datasets.Dataset`` whose items are one-row Arrow tables."""
    datasets = require_published_extra()
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path} is not a folder; give the folder the published code wrote with save_to_disk")
    try:
        rows = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise ConfigError(f"{path} is not a dataset folder written by datasets' save_to_disk ({err})") from None
    if isinstance(rows, datasets.DatasetDict):
        raise ConfigError(f"{path} holds several splits ({', '.join(rows)}); give the folder of one of them")
    return rows.with_format("arrow")


def _next_free(store: Path, header: Dict[str, Any], source: Path) -> tuple[int, int]:
    """(next shard index, next slot) of the store, after checking it is for this task and lacks ``source``."""
    shard, slot = 0, 0
    for path in sorted(store.glob("shard_*.h5")) + sorted(store.glob("data_models.h5")):
        check_header(path, read_header(path), header)
        for s, description in read_descriptions(path).items():
            if description["info"].get("published", {}).get("source") == str(source):
                raise ConfigError(f"{source} is already imported into {path} (slot {s}); delete that file to "
                                  "import it again")
            slot = max(slot, s + 1)
        if path.name.startswith("shard_"):
            shard = max(shard, int(path.stem.split("_")[1]) + 1)
    return shard, slot


@RUN_MODES.register("import_published")
def import_published(cfg: DictConfig) -> Dict[str, Any]:
    ctx = prepare_run(cfg)
    if not cfg.get("path"):
        raise ConfigError(f"run=import_published needs the published data-model folder: {USAGE}")
    source = Path(str(cfg.path)).expanduser().resolve()
    rows = load_published(source)
    scheme = scheme_for(cfg.method)
    if scheme.axis != "speed_up":
        raise ConfigError(f"method={cfg.method.name} prunes by {scheme.axis}; the published data models are "
                          "channel-pruned: import them under the channel criterion they were made with, "
                          "e.g. method=group_l2_max")
    image_size = int(cfg.dataset.image_size)
    layout = layout_for(cfg.model.name, image_size)
    kwargs = OmegaConf.to_container(cfg.model.kwargs, resolve=True)
    wrong = {k: v for k, v in layout.required_kwargs.items() if kwargs.get(k) != v}
    if wrong:
        fix = " ".join(f"model.kwargs.{k}={v}" for k, v in wrong.items())
        raise ConfigError(f"the published {cfg.model.name} on {image_size}x{image_size} inputs is the zoo network "
                          f"with {fix} (the task has {kwargs}); add {fix} to the command")
    if cfg.model.name.startswith("resnet") and image_size != 32:
        log.warning("the published ResNets average-pool an 8x8 map: their function is the zoo's only on 32x32 "
                    "inputs, and this task's are %dx%d", image_size, image_size)
    header = store_header(cfg)
    store = writable_store(cfg)
    shard, first_slot = _next_free(store, header, source)
    evaluate = bool(cfg.get("evaluate", True))
    if evaluate:
        splits, loaders = data_for(cfg, ctx)
        example = example_input(splits, ctx.device)
    else:
        example = torch.zeros(1, 3, image_size, image_size, device=ctx.device)
    num_classes = int(cfg.dataset.num_classes)
    base = MacCounter(new_model(cfg, num_classes, int(cfg.seed), ctx.device), example)
    base_macs, base_params = base(), base.params()
    config = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("task", "dataset", "optim", "method")}

    def records() -> Iterator[DataModelRecord]:
        for i in tqdm(range(len(rows)), desc="import", disable=not cfg.progress):
            t = time.time()
            state, published = split_row(row_arrays(rows[i]))
            try:
                model = rebuild(cfg.model.name, num_classes, kwargs, layout, state).to(ctx.device)
            except PublishedRowError as err:
                raise PublishedRowError(f"row {i} of {source}: {err}. Nothing was written; import it under the "
                                        "task of that architecture, or drop the row") from None
            metrics = evaluate_splits(model, loaders, ctx) if evaluate else {
                k: published[k] for k in ("train_acc", "train_loss", "val_acc", "val_loss")}
            slot = first_slot + i
            info = {
                "slot": slot, "seed": None, **metrics, **scheme.measure(model, example, base_macs),
                "base_macs": base_macs, "base_params": base_params, "prune_steps": None,
                "timings": {"import_s": time.time() - t}, "task": cfg.task.name, "method": cfg.method.name,
                "config": config, "metrics_from": "measured" if evaluate else "published",
                "published": {"source": str(source), "row": i, **published},
            }
            log.info("row %d -> slot %d: %.3fx (published %.3fx), val acc %.2f (%s)", i, slot, info["speed_up"],
                     published["current_speed_up"], info["val_acc"], info["metrics_from"])
            model.cpu()
            yield DataModelRecord(slot, describe_model(model), info, model.state_dict())

    path = store / f"shard_{shard:03d}.h5"
    t0 = time.time()
    n = write_shard(path, header, records())
    summary = {"source": str(source), "shard": str(path), "rows": n, "slots": [first_slot, first_slot + n - 1],
               "seconds": time.time() - t0, "evaluated": evaluate}
    log.info("imported %d data models from %s into %s in %.1f s", n, source, path, summary["seconds"])
    if (store / "data_models.h5").exists():  # loaders read the merged file and ignore the shards
        log.warning("%s has a merged data_models.h5, which is read instead of the shards: merge again to include "
                    "the imported ones (python -m generate_dataset.merge %s)", store, store)
    atomic_write_json(summary, ctx.run_dir / "import_summary.json")
    return summary
