"""``run=benchmark``: every method on one task, at every speed-up, with several seeds and equal budgets.

Settings live in ``configs/benchmark/`` (``benchmark.methods``: label -> method config option, and whether
the graph metanetwork is applied). For each seed one *target network* is trained (``run=pretrain_final``
with the reference criterion, the data models' one) and **every** structured method prunes that same
network with ``run=pruning_final``: the after-metanetwork and after-pruning fine-tuning schedules of the
task are the same for all (the "no metanetwork" baselines fine-tune for the after-metanetwork budget too).
Methods with their own pipeline (MetaPruning, Rewarded meta-pruning) search widths and train the found
network with their configured schedule instead; their metrics name their budget. The graph metanetwork
is meta-trained once (seed ``benchmark.meta_seed``), its epoch chosen on validation curves
(:func:`main.quickstart.select_epoch`) unless ``meta_epoch=`` is given.

Each finished cell (method, speed-up, seed) is saved as ``cells/<method>_x<speed-up>_seed<seed>.json``; a
re-run skips finished cells. Outputs in the run directory: ``benchmark_cells.csv`` (one row per cell),
``benchmark_table.md`` (test accuracy mean ± std per method and speed-up, with the reached speed-up) and
``benchmark_acc_vs_speed_up.png/.pdf`` (also copied to ``paths.figures_dir``).
"""
from __future__ import annotations

import logging
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from main.quickstart import select_epoch, stage_config
from main.run_modes import RUN_MODES, ConfigError, dispatch, prepare_run
from utils.io import atomic_write_json, atomic_write_text, read_json, write_csv
from utils.plotting import plt, save_figure

log = logging.getLogger(__name__)


def _candidate_epochs(cfg: DictConfig) -> List[int]:
    bench = cfg.benchmark
    if bench.get("meta_epochs"):
        return sorted({0, *map(int, bench.meta_epochs)})
    total = int(cfg.task.meta_train.epochs)
    return sorted({0, *(max(1, round(total * q / 4)) for q in (1, 2, 3, 4))})


def _metanetwork(cfg: DictConfig, timings: Dict[str, float]) -> Dict[str, Any]:
    """Data models, meta-training and the selected epoch, shared by every seed."""
    ref = dict(method=str(cfg.benchmark.reference_method), seed=int(cfg.benchmark.meta_seed))
    t = time.time()
    dispatch(stage_config(cfg, "generate", shard=0, num=int(cfg.task.data_models.num), **ref))
    dispatch(stage_config(cfg, "meta_train", **ref))
    meta_dir = str(stage_config(cfg, "meta_train", **ref).meta_train_dir)
    if cfg.get("meta_epoch") is not None:
        epoch, scores = int(cfg.meta_epoch), {}
    else:
        vis = dispatch(stage_config(cfg, "visualize", epochs=_candidate_epochs(cfg), **ref))
        epoch, scores = select_epoch(vis["curves"], vis.get("reference_val_acc"))
    timings["metanetwork_s"] = round(time.time() - t, 1)
    log.info("benchmark: metanetwork epoch %d from %s", epoch, meta_dir)
    return {"epoch": epoch, "scores": scores, "meta_train_dir": meta_dir}


def _summary_row(label: str, target: float, cells: List[Dict[str, Any]]) -> Dict[str, Any]:
    def stats(key: str) -> tuple[float, float]:
        values = [float(c[key]) for c in cells]
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    (acc, acc_sd), (su, su_sd), (val, _) = stats("test_acc"), stats("speed_up"), stats("val_acc")
    return {"method": label, "target_speed_up": target, "seeds": len(cells), "test_acc_mean": acc,
            "test_acc_std": acc_sd, "speed_up_mean": su, "speed_up_std": su_sd, "val_acc_mean": val,
            "base_test_acc_mean": statistics.mean(float(c["base_test_acc"]) for c in cells)}


def markdown(summary: List[Dict[str, Any]], targets: List[float]) -> str:
    head = ["method", *(f"{t:g}x: test acc (speed-up)" for t in targets)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in dict.fromkeys(r["method"] for r in summary):
        cells = []
        for t in targets:
            r = next((r for r in summary if r["method"] == label and r["target_speed_up"] == t), None)
            cells.append("-" if r is None else f"{r['test_acc_mean']:.2f} ± {r['test_acc_std']:.2f} "
                         f"({r['speed_up_mean']:.2f}x)")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: List[Dict[str, Any]], stem: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(r["method"] for r in summary):
        rows = sorted((r for r in summary if r["method"] == label), key=lambda r: r["speed_up_mean"])
        ax.errorbar([r["speed_up_mean"] for r in rows], [r["test_acc_mean"] for r in rows],
                    yerr=[r["test_acc_std"] for r in rows], marker="o", capsize=3, label=label)
    ax.set(xlabel="speed-up (MACs of the unpruned network / MACs)", ylabel="test accuracy (%), mean ± std over seeds",
           title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, stem)


@RUN_MODES.register("benchmark")
def benchmark(cfg: DictConfig) -> Dict[str, Any]:
    ctx = prepare_run(cfg)
    bench = cfg.benchmark
    methods = OmegaConf.to_container(bench.methods, resolve=True)
    targets = [float(t) for t in bench.speed_ups]
    seeds = [int(s) for s in bench.seeds]
    if not methods or not targets or not seeds:
        raise ConfigError("benchmark.methods, benchmark.speed_ups and benchmark.seeds must not be empty")
    for label, spec in methods.items():  # fail on a typo before hours of work
        stage_config(cfg, "pruning_final", method=spec["method"])
    t0, timings = time.time(), {}
    meta = _metanetwork(cfg, timings) if any(s.get("metanetwork") for s in methods.values()) else None
    slot, reference = int(bench.target_index), str(bench.reference_method)
    cells_dir = ctx.run_dir / "cells"
    rows: List[Dict[str, Any]] = []
    todo = [(label, t, s) for s in seeds for t in targets for label in methods]
    for label, target, seed in tqdm(todo, desc="benchmark cells", disable=not cfg.progress):
        path = cells_dir / f"{label}_x{target:g}_seed{seed}.json"
        if path.exists():
            rows.append(read_json(path))
            continue
        spec = methods[label]
        target_cfg = stage_config(cfg, "pretrain_final", slot=slot, seed=seed, method=reference)
        dispatch(target_cfg)  # trained once per seed, then found finished
        values: Dict[str, Any] = dict(target=target, seed=seed, slot=slot, method=spec["method"],
                                      final_targets_dir=str(target_cfg.final_targets_dir))
        if spec.get("metanetwork"):
            values.update(meta_epoch=meta["epoch"], meta_train_dir=meta["meta_train_dir"])
        else:
            values["metanetwork"] = "none"
        t = time.time()
        m = dispatch(stage_config(cfg, "pruning_final", **values))
        row = {"method": label, "target_speed_up": target, "seed": seed, "speed_up": m["speed_up"],
               "val_acc": m["val_acc"], "test_acc": m["test_acc"], "base_test_acc": m.get("base_test_acc"),
               "macs": m["macs"], "params": m["params"], "latency_ms": m["latency"]["pruned"]["latency_ms"],
               "base_latency_ms": m["latency"]["base"]["latency_ms"], "seconds": round(time.time() - t, 1)}
        atomic_write_json(row, path)
        rows.append(row)
    summary = [_summary_row(label, t, [r for r in rows if r["method"] == label and r["target_speed_up"] == t])
               for label in methods for t in targets]
    table = markdown(summary, targets)
    timings["total_s"] = round(time.time() - t0, 1)
    write_csv(rows, ctx.run_dir / "benchmark_cells.csv")
    write_csv(summary, ctx.run_dir / "benchmark_summary.csv")
    atomic_write_text(table, ctx.run_dir / "benchmark_table.md")
    result = {"table": table, "summary": summary, "cells": rows, "timings": timings, "task": cfg.task.name,
              "metanetwork_epoch": meta and meta["epoch"], "seeds": seeds}
    atomic_write_json(result, ctx.run_dir / "benchmark.json")
    stem = ctx.run_dir / "benchmark_acc_vs_speed_up"
    plot(summary, stem, f"{cfg.task.name}: {len(seeds)} seeds, equal fine-tuning budgets")
    figures = Path(cfg.paths.figures_dir)
    figures.mkdir(parents=True, exist_ok=True)
    for suffix in (".png", ".pdf"):
        shutil.copyfile(stem.with_suffix(suffix), figures / f"benchmark_{cfg.task.name}{suffix}")
    print(f"\n{table}\nresults in {ctx.run_dir}; {timings['total_s']:.0f} s")
    return result
