"""``run=benchmark``: every method on one task, at every speed-up, with several seeds and equal budgets.

Settings live in ``configs/benchmark/`` (``benchmark.methods``: label -> method config option, and whether
the graph metanetwork is applied). For each seed one *target network* is trained (``run=pretrain_final``
with the reference criterion, the data models' one) and **every** structured method prunes that same
network with ``run=pruning_final``: the after-metanetwork and after-pruning fine-tuning schedules of the
task are the same for all (the "no metanetwork" baselines fine-tune for the after-metanetwork budget too).
Methods with their own pipeline (MetaPruning, Rewarded meta-pruning) search widths and train the found
network with their configured schedule instead; their metrics name their budget. The graph metanetwork
is meta-trained once (seed ``benchmark.meta_seed``), its epoch chosen on validation curves
(:func:`main.quickstart.selected_epoch`) unless ``meta_epoch=`` is given. A method entry whose ``metanetwork``
is a mapping of metanetwork keys (``{layer: multiplicative, edit: additive}``: the published configuration),
or that carries ``meta_train:`` or ``visualize:`` keys (how it is meta-trained, how its epoch is selected),
is a variant with its own meta-training on the same data models; ``method`` may then be another criterion
than the one it was meta-trained with (its output pruned by Intra-Fusion, say). Without a metanetwork, the
after-metanetwork fine-tune of a seed's target network is the same for every criterion: it is made once
and shared (``main.final.baseline_finetune_dir``), except sparse learning's, which is regularised.

Each cell has two accuracies of the same pruned network: right after pruning, before any fine-tuning
(``pruned_test_acc``, where criteria differ most), and after the equal fine-tuning budget (``test_acc``).
For both, the table gives mean ± std over seeds and the paired difference against ``benchmark.compare_to``
(same seed, same target network) with its 95% Student-t interval over seeds, marked where the interval
excludes 0.

A method entry may carry a ``grid`` (dotted config key -> values, e.g. ``{method.reg: [5e-4, 0.02, 0.05]}``):
at every target, each grid point is run on the target network of ``benchmark.tune_seed`` and the one with
the highest *validation* accuracy after the fine-tuning is used for every seed (the tuning seed's cell is
reused). The choices and every point's validation accuracy are in ``benchmark.json`` (``tuning``) and under
the table, and the tuning time is part of the total (``timings.tuning_s``). The metanetwork's one
hyperparameter, its epoch, is chosen on validation curves as in the quickstart.

With ``benchmark.workers: N`` (N > 1) the cells run in N worker processes at once, each with
``threads`` torch threads (default: the CPU count over N) and its log in ``cells/worker_<pid>.log``; the
target networks are trained first, one seed per worker, and the tuning cells before the others. A cell's
numbers do not depend on how many run beside it (each has its run directory and seeds its generators),
as long as the thread count per cell is the same (``tests/main/test_benchmark.py`` checks that two
workers give the cells of one, bit for bit). Small networks use two threads poorly, so on a 2-core CPU two
single-threaded workers finish the cells sooner (measured in the README, "Comparing methods").

Each finished cell (method, speed-up, seed[, grid point]) is saved as ``cells/<method>_x<speed-up>_seed<seed>.json``; a
re-run skips finished cells, after checking that each was made from the same inputs (``inputs`` in its file:
task, method, metanetwork, model, data and optimiser settings); one made under other settings is refused with
one line, never silently reused. Outputs in the run directory: ``benchmark_cells.csv`` (one row per cell),
``benchmark_summary.csv`` and ``benchmark_table.md`` (per target: both columns, with the reached speed-up),
and ``benchmark_acc_vs_speed_up.png/.pdf`` (a panel per column, a band per method for the interval of its
mean; ``figures/make_figures.py --benchmark-run`` redraws it from ``benchmark.json``).
"""
from __future__ import annotations

import itertools
import logging
import math
import multiprocessing
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf
from scipy.stats import spearmanr
from scipy.stats import t as student_t
from tqdm import tqdm

from data_loaders import build_datasets
from main.meta_train import adaptive_bn_scores
from main.quickstart import selected_epoch, selection_candidates, stage_config
from main.run_modes import RUN_MODES, ConfigError, dispatch, prepare_run
from utils.config_schema import check_config, settings
from utils.io import atomic_write_json, atomic_write_text, read_json, write_csv
from utils.plotting import plt, save_figure

log = logging.getLogger(__name__)


def _candidate_epochs(cfg: DictConfig) -> List[int]:
    bench = settings(cfg, "benchmark")
    if bench.meta_epochs:
        return sorted({0, *bench.meta_epochs})
    total = settings(cfg, "task.meta_train").epochs
    return sorted({0, *(max(1, round(total * q / 4)) for q in (1, 2, 3, 4))})


# The sections of a method entry that change its metanetwork (and so give it a meta-training of its own), and
# the config node each one sets.
VARIANT_SECTIONS = {"metanetwork": "metanetwork", "meta_train": "task.meta_train", "visualize": "task.visualize"}


def metanetwork_variant(spec: Dict[str, Any]) -> Dict[str, Any]:
    """The dotted keys a method entry changes in its metanetwork's making: ``metanetwork: true`` is the task's
    metanetwork ({}); a mapping (``{layer: multiplicative}``) changes those metanetwork keys, and the mappings
    ``meta_train`` and ``visualize`` change ``task.meta_train`` and ``task.visualize`` keys (how it is
    meta-trained and how its epoch is selected)."""
    def flat(node: str, value: Any) -> Dict[str, Any]:  # {prune_aware: {weight: 1}} -> prune_aware.weight: 1
        if not isinstance(value, dict):
            return {node: value}
        return {k: v for key, sub in value.items() for k, v in flat(f"{node}.{key}", sub).items()}

    out: Dict[str, Any] = {}
    for section, node in VARIANT_SECTIONS.items():
        if isinstance(spec.get(section), dict):
            out.update(flat(node, spec[section]))
    return out


# The keys of a benchmark.methods entry (configs/benchmark/default.yaml); meta_epoch: the metanetwork's epoch
# for this row instead of the selected one, so one row per epoch shows how the selection measures track the
# fine-tuned accuracy (configs/benchmark/selection.yaml).
ENTRY_KEYS = ("method", "metanetwork", "grid", "meta_epoch", *VARIANT_SECTIONS)


def check_entry(label: str, spec: Any) -> None:
    """Refuse a method entry that is no mapping, lacks ``method``, or has a key no entry has (a typo)."""
    if not isinstance(spec, dict) or "method" not in spec:
        raise ConfigError(f"benchmark.methods.{label} must be a mapping with a method key "
                          "({method: group_l2_max, ...}), or null to drop it")
    unknown = sorted(set(spec) - set(ENTRY_KEYS))
    if unknown:
        raise ConfigError(f"benchmark.methods.{label}: unknown key(s) {', '.join(unknown)}; "
                          f"valid: {', '.join(ENTRY_KEYS)}")
    epoch = spec.get("meta_epoch")
    if epoch is not None and (not spec.get("metanetwork") or not isinstance(epoch, int) or epoch < 0):
        raise ConfigError(f"benchmark.methods.{label}.meta_epoch={epoch!r}: a metanetwork epoch (an integer >= 0) "
                          "for an entry with metanetwork: true")


def _metanetwork(cfg: DictConfig, timings: Dict[str, float], variant: Dict[str, Any]) -> Dict[str, Any]:
    """Data models, meta-training and the selected epoch of one metanetwork variant, shared by every seed. The
    data models are the same for every variant (their store does not depend on the metanetwork)."""
    bench = settings(cfg, "benchmark")
    ref = dict(method=bench.reference_method, seed=bench.meta_seed)
    keys = dict(variant)
    if variant:  # a meta-training run of its own
        keys["run_name"] = f"{stage_config(cfg, 'meta_train', **ref).run_name}_{grid_tag(variant)}"
    t = time.time()
    dispatch(stage_config(cfg, "generate", shard=0, num=int(cfg.task.data_models.num), **ref))
    trained = dispatch(stage_config(cfg, "meta_train", **ref, **keys))
    meta_dir = str(stage_config(cfg, "meta_train", **ref, **keys).meta_train_dir)
    figures: Dict[str, Any] = {}  # per epoch, what a selection could read (benchmark.json: metanetworks)
    if cfg.get("meta_epoch") is not None:
        epoch, scores = int(cfg.meta_epoch), {}
    else:
        vis_cfg = stage_config(cfg, "visualize", **ref, **keys)
        epochs = selection_candidates(vis_cfg, _candidate_epochs(cfg), trained["val"])
        vis = dispatch(stage_config(vis_cfg, "visualize", epochs=epochs))
        epoch, scores = selected_epoch(vis_cfg, vis, trained["val"])
        figures = {"knee": vis["knees"], "target_val_acc": vis.get("target_val_acc") or {},
                   "adaptive_bn": adaptive_bn_scores(trained["val"])}
    timings["metanetwork_s"] = round(timings.get("metanetwork_s", 0.0) + time.time() - t, 1)
    log.info("benchmark: metanetwork %s epoch %d from %s", grid_tag(variant) or "(task's)", epoch, meta_dir)
    return {"epoch": epoch, "scores": scores, "meta_train_dir": meta_dir, "variant": variant,
            "figures": {**figures, "val_acc": {int(r["epoch"]): r["val_acc"] for r in trained["val"]}}}


# The two accuracies of every cell, measured on the same pruned network (run=pruning_final).
COLUMNS = {"pruned_test_acc": "no fine-tuning", "test_acc": "fine-tuned"}


def paired_interval(diffs: Sequence[float], level: float = 0.95) -> Tuple[float, float, float]:
    """Mean of paired differences (one per seed) and its two-sided Student-t interval; NaN bounds for one seed."""
    n, mean = len(diffs), statistics.mean(diffs)
    if n < 2:
        return mean, math.nan, math.nan
    half = float(student_t.ppf(0.5 + level / 2, n - 1)) * statistics.stdev(diffs) / math.sqrt(n)
    return mean, mean - half, mean + half


def _paired(cells: List[Dict[str, Any]], reference: List[Dict[str, Any]], key: str) -> Tuple[float, float, float] | None:
    """Mean paired difference ``cells - reference`` of ``key`` over the seeds both have, with its 95% interval."""
    by_seed = {c["seed"]: c for c in reference}
    diffs = [float(c[key]) - float(by_seed[c["seed"]][key]) for c in cells
             if c.get(key) is not None and by_seed.get(c["seed"], {}).get(key) is not None]
    return paired_interval(diffs) if diffs else None


def _summary_row(label: str, target: float, cells: List[Dict[str, Any]],
                 reference: List[Dict[str, Any]] | None = None) -> Dict[str, Any]:
    """Mean ± std over seeds of both accuracy columns, the reached speed-up, and for each column the paired
    difference against the ``reference`` method's cells of the same seeds with its 95% interval."""
    def stats(key: str, rows: List[Dict[str, Any]]) -> tuple[float | None, float | None]:
        values = [float(c[key]) for c in rows if c.get(key) is not None]
        if not values:
            return None, None
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    (su, su_sd), (val, _) = stats("speed_up", cells), stats("val_acc", cells)
    row = {"method": label, "target_speed_up": target, "seeds": len(cells), "speed_up_mean": su,
           "speed_up_std": su_sd, "val_acc_mean": val,
           "base_test_acc_mean": statistics.mean(float(c["base_test_acc"]) for c in cells)}
    for key in COLUMNS:
        row[f"{key}_mean"], row[f"{key}_std"] = stats(key, cells)
        paired = _paired(cells, reference, key) if reference is not None else None
        if paired is not None:
            mean, lo, hi = paired
            row.update({f"{key}_diff": mean, f"{key}_diff_lo": lo, f"{key}_diff_hi": hi,
                        f"{key}_separated": bool(lo > 0 or hi < 0)})  # the interval excludes 0
    return row


def add_strongest(summary: List[Dict[str, Any]], cells_of: Dict[tuple, List[Dict[str, Any]]],
                  baselines: Sequence[str]) -> Dict[str, Dict[str, str]]:
    """For each target and column, the strongest baseline (highest mean of the methods in ``baselines``), and in
    every other row the paired difference against it (``<column>_best_diff``, ``_lo``, ``_hi``, ``_separated``).
    Returns ``{target: {column: strongest label}}``."""
    strongest: Dict[str, Dict[str, str]] = {}
    for row in summary:
        t = row["target_speed_up"]
        for key in COLUMNS:
            means = {r["method"]: r[f"{key}_mean"] for r in summary
                     if r["target_speed_up"] == t and r["method"] in baselines and r.get(f"{key}_mean") is not None}
            if not means:
                continue
            best = max(means, key=means.get)
            strongest.setdefault(f"{t:g}", {})[key] = best
            paired = _paired(cells_of[row["method"], t], cells_of[best, t], key) if row["method"] != best else None
            if paired is not None:
                mean, lo, hi = paired
                row.update({f"{key}_best_diff": mean, f"{key}_best_diff_lo": lo, f"{key}_best_diff_hi": hi,
                            f"{key}_best_separated": bool(lo > 0 or hi < 0)})
    return strongest


def _cell(row: Dict[str, Any], key: str, best: bool) -> str:
    if row.get(f"{key}_mean") is None:
        return "- | -" + (" | -" if best else "")

    def diff(prefix: str) -> str:
        if prefix + "diff" not in row:
            return "-"
        lo, hi = row[prefix + "diff_lo"], row[prefix + "diff_hi"]
        return f"{row[prefix + 'diff']:+.2f} [{lo:+.2f}, {hi:+.2f}]" + (" *" if row[prefix + "separated"] else "")

    parts = [f"{row[f'{key}_mean']:.2f} ± {row[f'{key}_std']:.2f}", diff(f"{key}_")]
    return " | ".join(parts + ([diff(f"{key}_best_")] if best else []))


def markdown(summary: List[Dict[str, Any]], targets: List[float], reference: str, test_images: int,
             strongest: Dict[str, Dict[str, str]] | None = None) -> str:
    """One table per target: both columns, mean ± std over seeds, and the paired difference against
    ``reference`` (and, given ``strongest``, against the strongest baseline of the column) with its 95%
    interval (``*``: the interval excludes 0)."""
    best = bool(strongest)
    parts = ("test acc", f"vs {reference} [95% CI]") + (("vs strongest baseline [95% CI]",) if best else ())
    head = ["method", "speed-up"] + [f"{name}: {part}" for name in COLUMNS.values() for part in parts]
    out = [f"Test split: {test_images} images, so one point is {test_images / 100:.2f} images. "
           f"*: the paired 95% interval (t over seeds) of the difference excludes 0.\n"]
    for t in targets:
        named = ""
        if best and f"{t:g}" in strongest:
            named = " (strongest baseline: " + ", ".join(f"{COLUMNS[k]} {v}" for k, v in strongest[f"{t:g}"].items()) + ")"
        out += [f"\n**{t:g}x**{named}\n", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in (r for r in summary if r["target_speed_up"] == t):
            out.append(f"| {r['method']} | {r['speed_up_mean']:.2f}x | " +
                       " | ".join(_cell(r, key, best) for key in COLUMNS) + " |")
    return "\n".join(out) + "\n"


# What a metanetwork's epoch can be selected by (benchmark.json: metanetworks.<tag>.figures), each a higher-is-
# better figure per epoch: its output's no-fine-tune validation accuracy, the adaptive-BN score, the knee of its
# no-fine-tune curve, and the validation data model's accuracy once pruned to select_target and fine-tuned.
SELECTION_FIGURES = ("val_acc", "adaptive_bn", "knee", "target_val_acc")


def rank_correlation(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's rho; NaN where either side is constant (no ranking to compare)."""
    if len(set(xs)) < 2 or len(set(ys)) < 2:
        return math.nan
    return float(spearmanr(xs, ys)[0])


def selection_study(methods: Dict[str, Dict[str, Any]], meta: Dict[str, Dict[str, Any]],
                    cells_of: Dict[tuple, List[Dict[str, Any]]], targets: Sequence[float],
                    reference: str) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """For a metanetwork with a row per epoch (``meta_epoch``; epoch 0 is the ``reference`` row when it prunes
    with the same criterion and no metanetwork): per target and epoch, the mean fine-tuned validation and test
    accuracy over seeds beside each selection figure; and per figure, its Spearman rank correlation with
    them over the epochs and the epoch it would select, against the best one. Returns (epochs, figures)."""
    epochs_out, figures_out = [], []
    for tag, m in meta.items():
        row_of = {int(s["meta_epoch"]): label for label, s in methods.items() if s.get("metanetwork")
                  and s.get("meta_epoch") is not None and grid_tag(metanetwork_variant(s)) == tag}
        criteria = {methods[label]["method"] for label in row_of.values()}
        ref = methods.get(reference)
        if ref is not None and not ref.get("metanetwork") and criteria == {ref["method"]}:
            row_of.setdefault(0, reference)
        if len(row_of) < 3:
            continue
        figures = {name: {int(e): float(v) for e, v in m["figures"].get(name, {}).items()} for name in SELECTION_FIGURES}
        for target in targets:
            acc = {}
            for epoch, label in sorted(row_of.items()):
                rows = cells_of.get((label, target), [])
                if not rows:
                    continue
                acc[epoch] = {k: statistics.mean(float(r[k]) for r in rows) for k in ("val_acc", "test_acc")}
                epochs_out.append({"metanetwork": tag or "task", "target_speed_up": target, "epoch": epoch,
                                   "row": label, "seeds": len(rows),
                                   **{f"finetuned_{k}_mean": v for k, v in acc[epoch].items()},
                                   **{name: figures[name].get(epoch) for name in SELECTION_FIGURES}})
            if len(acc) < 3:
                continue
            best = max(acc, key=lambda e: acc[e]["val_acc"])
            for name in SELECTION_FIGURES:
                have = sorted(e for e in acc if e in figures[name])
                if len(have) < 3:
                    continue
                chosen = max((e for e in have if e > 0), key=lambda e: figures[name][e], default=None)
                xs = [figures[name][e] for e in have]
                rho = {k: rank_correlation(xs, [acc[e][k] for e in have]) for k in ("val_acc", "test_acc")}
                figures_out.append({
                    "metanetwork": tag or "task", "target_speed_up": target, "figure": name, "epochs": have,
                    "spearman_val": rho["val_acc"], "spearman_test": rho["test_acc"],
                    "selects": chosen, "selected_val_acc": acc[chosen]["val_acc"] if chosen is not None else None,
                    "selected_test_acc": acc[chosen]["test_acc"] if chosen is not None else None,
                    "best_epoch": best, "best_val_acc": acc[best]["val_acc"], "best_test_acc": acc[best]["test_acc"]})
    return epochs_out, figures_out


def selection_markdown(epochs: List[Dict[str, Any]], figures: List[Dict[str, Any]]) -> str:
    """The selection study as markdown: the per-epoch figures beside the fine-tuned accuracy, then per figure
    its rank correlation with it and what selecting by it gives."""
    def num(v: Any, fmt: str = "{:.2f}") -> str:
        return "-" if v is None or v != v else fmt.format(v)

    out = ["\n## Selection figures against the fine-tuned accuracy (mean over seeds)\n",
           "| metanetwork | target | epoch | fine-tuned val acc | fine-tuned test acc | "
           + " | ".join(SELECTION_FIGURES) + " |", "|---" * (5 + len(SELECTION_FIGURES)) + "|"]
    for r in epochs:
        out.append(f"| {r['metanetwork']} | {r['target_speed_up']:g}x | {r['epoch']} | {num(r['finetuned_val_acc_mean'])} | "
                   f"{num(r['finetuned_test_acc_mean'])} | " + " | ".join(num(r[n], "{:.3f}" if n == "knee" else "{:.2f}")
                                                               for n in SELECTION_FIGURES) + " |")
    out += ["", "| metanetwork | target | figure | epochs | Spearman, val | Spearman, test | selects | its val / test acc "
            "| best epoch (val) | its val / test acc |", "|---" * 10 + "|"]
    for r in figures:
        out.append(f"| {r['metanetwork']} | {r['target_speed_up']:g}x | {r['figure']} | {','.join(map(str, r['epochs']))} | "
                   f"{num(r['spearman_val'])} | {num(r['spearman_test'])} | {r['selects']} | "
                   f"{num(r['selected_val_acc'])} / {num(r['selected_test_acc'])} | {r['best_epoch']} | "
                   f"{num(r['best_val_acc'])} / {num(r['best_test_acc'])} |")
    return "\n".join(out) + "\n"


def benchmark_title(result: Dict[str, Any]) -> str:
    return f"{result['task']}: {len(result['seeds'])} seeds, equal fine-tuning budgets"


def plot(summary: List[Dict[str, Any]], stem: Path, title: str) -> None:
    """Accuracy vs reached speed-up, one panel per column, a line per method, a band for the 95% interval
    of its mean over seeds."""
    fig, axes = plt.subplots(1, len(COLUMNS), figsize=(12, 4.5), sharex=True)
    for ax, (key, name) in zip(axes, COLUMNS.items()):
        for label in dict.fromkeys(r["method"] for r in summary):
            rows = sorted((r for r in summary if r["method"] == label and r.get(f"{key}_mean") is not None),
                          key=lambda r: r["speed_up_mean"])
            if not rows:
                continue
            x = [r["speed_up_mean"] for r in rows]
            y = [r[f"{key}_mean"] for r in rows]
            half = [float(student_t.ppf(0.975, r["seeds"] - 1)) * r[f"{key}_std"] / math.sqrt(r["seeds"])
                    if r["seeds"] > 1 else 0.0 for r in rows]
            (line,) = ax.plot(x, y, marker="o", label=label)
            ax.fill_between(x, [a - h for a, h in zip(y, half)], [a + h for a, h in zip(y, half)],
                            color=line.get_color(), alpha=0.15)
        ax.set(xlabel="speed-up (MACs of the unpruned network / MACs)", ylabel="test accuracy (%)",
               title=f"{name}: mean over seeds, 95% interval")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    save_figure(fig, stem)


_MISSING = object()


def grid_points(spec: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Every combination of a method entry's ``grid`` (dotted key -> values); ``[{}]`` without a grid."""
    grid = spec.get("grid") or {}
    return [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]


def grid_tag(point: Dict[str, Any]) -> str:
    """``{"method.reg": 0.05}`` -> ``reg0.05``: names the cell files and run directories of a grid point."""
    def text(value: Any) -> str:
        if isinstance(value, (list, tuple)):
            return "-".join(map(text, value))
        return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)

    return "_".join(f"{key.split('.')[-1]}{text(value)}" for key, value in point.items())


class _Cells:
    """Runs and caches the cells of one benchmark: one ``run=pruning_final`` per method, target, seed and grid
    point, on that seed's target network (trained once, with the reference criterion)."""

    def __init__(self, cfg: DictConfig, cells_dir: Path, meta: Dict[str, Dict[str, Any]]) -> None:
        self.cfg, self.dir, self.meta = cfg, cells_dir, meta
        bench = settings(cfg, "benchmark")
        self.slot, self.reference = bench.target_index, bench.reference_method

    def path(self, label: str, target: float, seed: int, point: Dict[str, Any] | None = None) -> Path:
        tag = grid_tag(point or {})
        return self.dir / (f"{label}_x{target:g}_seed{seed}.json" if not tag else
                           f"{label}_{tag}_x{target:g}_seed{seed}.json")

    def target_network(self, seed: int, train: bool = True) -> DictConfig:
        """The config of ``seed``'s target network, trained on the first call and then found finished (with
        ``train=False`` only its config)."""
        target_cfg = stage_config(self.cfg, "pretrain_final", slot=self.slot, seed=seed, method=self.reference)
        if train:
            dispatch(target_cfg)
        return target_cfg

    def get(self, label: str, spec: Dict[str, Any], target: float, seed: int,
            point: Dict[str, Any] | None = None) -> Dict[str, Any]:
        tag, path = grid_tag(point or {}), self.path(label, target, seed, point)
        target_cfg = self.target_network(seed, train=False)
        values: Dict[str, Any] = dict(target=target, seed=seed, slot=self.slot, method=spec["method"],
                                      final_targets_dir=str(target_cfg.final_targets_dir), **(point or {}))
        variant = grid_tag(metanetwork_variant(spec))
        fixed_epoch = spec.get("meta_epoch")
        fixed = f"epoch{fixed_epoch}" if fixed_epoch is not None else ""
        if tag or variant or fixed:  # its own run directory: the settings differ from the method's defaults
            plain = stage_config(self.cfg, "pruning_final", method=spec["method"], seed=seed)
            values["run_name"] = "_".join(filter(None, (plain.run_name, variant, fixed, tag)))
        if spec.get("metanetwork"):
            meta = self.meta[grid_tag(metanetwork_variant(spec))]
            epoch = meta["epoch"] if fixed_epoch is None else int(fixed_epoch)
            values.update(meta_epoch=epoch, meta_train_dir=meta["meta_train_dir"], **meta["variant"])
        else:
            values["metanetwork"] = "none"
        stage = stage_config(self.cfg, "pruning_final", **values)
        inputs = cell_inputs(stage)
        if path.exists():  # a finished cell counts only if it was made from the same inputs
            row = read_json(path)
            if row.get("inputs") != inputs:
                raise ConfigError(f"{path} was computed under other settings than this run's; use another output "
                                  "root (GMP_ROOT or paths.root_dir), or delete that cells folder to recompute it")
            return row
        self.target_network(seed)
        t = time.time()
        m = dispatch(stage)
        row = {"inputs": inputs, "method": label, "target_speed_up": target, "seed": seed, "grid": point or {}, "speed_up": m["speed_up"],
               "val_acc": m["val_acc"], "test_acc": m["test_acc"], "base_test_acc": m.get("base_test_acc"),
               "pruned_val_acc": m.get("pruned_val_acc"), "pruned_test_acc": m.get("pruned_test_acc"),
               "macs": m["macs"], "params": m["params"], "latency_ms": m["latency"]["pruned"]["latency_ms"],
               "base_latency_ms": m["latency"]["base"]["latency_ms"], "seconds": round(time.time() - t, 1)}
        atomic_write_json(row, path)
        return row


# The task sections that only the metanetwork's making reads (data models, meta-training, epoch selection).
METANETWORK_ONLY = ("data_models", "meta_train", "visualize", "quickstart")


def cell_inputs(stage: DictConfig) -> Dict[str, Any]:
    """What a cell's result depends on: the task (schedules, meta-training, pruning), method, metanetwork,
    model, data set (its location left out) and optimiser settings, and the cell's own run arguments."""
    plain = OmegaConf.to_container(stage, resolve=True)
    data = {k: v for k, v in plain["dataset"].items() if k not in ("root", "system_dir", "download")}
    # a cell without a metanetwork does not depend on how one is made, so a new meta-training setting (or
    # a metanetwork variant's) leaves the baselines' finished cells valid
    skip = ("benchmark_workers",) + (METANETWORK_ONLY if plain["metanetwork"].get("name") == "none" else ())
    task = {k: v for k, v in plain["task"].items() if k not in skip}
    return {"task": task, "method": plain["method"], "metanetwork": plain["metanetwork"],
            "model": plain["model"], "dataset": data, "optim": plain["optim"],
            **{k: plain.get(k) for k in ("target", "seed", "slot", "meta_epoch")}}


def _worker_job(cfg: DictConfig, cells_dir: str, meta: Dict[str, Dict[str, Any]], job: tuple) -> Any:
    """One job in a worker process: ``("target", seed)`` or ``("cell", label, spec, target, seed, point)``."""
    root = logging.getLogger()
    if not root.handlers:  # a fresh (spawned) process: its own log file next to the cells
        handler = logging.FileHandler(Path(cells_dir) / f"worker_{os.getpid()}.log")
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    cells = _Cells(cfg, Path(cells_dir), meta)
    if job[0] == "target":
        cells.target_network(job[1])
        return None
    return cells.get(*job[1:])


def run_jobs(cells: _Cells, jobs: List[tuple], workers: int, desc: str, progress: bool) -> List[Any]:
    """Run ``jobs`` (see :func:`_worker_job`) here, or in ``workers`` processes; results in the jobs' order.
    A job that fails stops the run with its error once the jobs already running have finished (their
    cells are saved, so a re-run does not repeat them)."""
    if workers <= 1 or len(jobs) <= 1:
        return [_worker_job(cells.cfg, str(cells.dir), cells.meta, job)
                for job in tqdm(jobs, desc=desc, disable=not progress)]
    results: List[Any] = [None] * len(jobs)
    context = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(_worker_job, cells.cfg, str(cells.dir), cells.meta, job): i for i, job in enumerate(jobs)}
        try:
            for future in tqdm(as_completed(futures), total=len(futures), desc=desc, disable=not progress):
                results[futures[future]] = future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return results


def worker_config(cfg: DictConfig, workers: int) -> DictConfig:
    """``cfg`` for the cells of ``workers`` processes: ``threads`` defaults to the CPU count over them."""
    if workers <= 1 or cfg.get("threads") is not None:
        return cfg
    return stage_config(cfg, str(cfg.run), threads=max(1, (os.cpu_count() or 1) // workers))


def tune(cells: _Cells, label: str, spec: Dict[str, Any], target: float, seed: int) -> Dict[str, Any]:
    """The grid point with the highest *validation* accuracy after the fine-tuning, on ``seed``'s target network
    (ties: the first point); the test split plays no part. Returns the choice and every point's figure."""
    tried = [(point, cells.get(label, spec, target, seed, point)) for point in grid_points(spec)]
    chosen, row = max(tried, key=lambda pr: pr[1]["val_acc"])
    return {"method": label, "target_speed_up": target, "seed": seed, "chosen": chosen,
            "val_acc": {grid_tag(p): r["val_acc"] for p, r in tried},
            "seconds": round(sum(r["seconds"] for _, r in tried), 1)}


@RUN_MODES.register("benchmark")
def benchmark(cfg: DictConfig) -> Dict[str, Any]:
    ctx = prepare_run(cfg)
    bench = settings(cfg, "benchmark")
    # a label set to null is left out: how a benchmark set drops a row it inherits (benchmark=evidence)
    methods = {k: v for k, v in bench.methods.items() if v is not None}
    targets, seeds = list(bench.speed_ups), list(bench.seeds)
    if not methods or not targets or not seeds:
        raise ConfigError("benchmark.methods, benchmark.speed_ups and benchmark.seeds must not be empty")
    for label, spec in methods.items():  # fail on a typo before hours of work
        check_entry(label, spec)
        plain = stage_config(cfg, "pruning_final", method=spec["method"])
        for key in spec.get("grid") or {}:
            if OmegaConf.select(plain, key, default=_MISSING) is _MISSING:
                raise ConfigError(f"benchmark.methods.{label}.grid: {key} is not a setting of method={spec['method']}; "
                                  f"valid method keys: {', '.join(sorted(plain.method))}")
        if metanetwork_variant(spec):  # its meta-training, metanetwork and selection keys, checked as a run would
            check_config(stage_config(cfg, "meta_train", **metanetwork_variant(spec)))
    workers = bench.workers
    t0, timings = time.time(), {}
    variants = {grid_tag(metanetwork_variant(s)): metanetwork_variant(s) for s in methods.values() if s.get("metanetwork")}
    meta = {tag: _metanetwork(cfg, timings, variant) for tag, variant in variants.items()}
    for label, spec in methods.items():  # an entry's fixed epoch must have been trained
        if spec.get("meta_epoch") is not None:
            trained = sorted(meta[grid_tag(metanetwork_variant(spec))]["figures"]["val_acc"])  # every trained epoch
            if int(spec["meta_epoch"]) not in trained:
                raise ConfigError(f"benchmark.methods.{label}.meta_epoch={spec['meta_epoch']}: its meta-training "
                                  f"has epochs {trained} (it may have stopped early at its accuracy floor); "
                                  "pick one of them")
    cells = _Cells(worker_config(cfg, workers), ctx.run_dir / "cells", meta)
    cells.dir.mkdir(parents=True, exist_ok=True)
    tune_seed = seeds[0] if bench.tune_seed is None else bench.tune_seed
    progress = bool(cfg.progress)
    t = time.time()
    if workers > 1:  # the target networks first (one per seed), then the grids, in parallel
        run_jobs(cells, [("target", s) for s in seeds], workers, "target networks", progress)
        run_jobs(cells, [("cell", label, spec, target, tune_seed, point) for label, spec in methods.items()
                         if spec.get("grid") for target in targets for point in grid_points(spec)
                         if not cells.path(label, target, tune_seed, point).exists()], workers, "tuning cells", progress)
    tuning = [tune(cells, label, spec, target, tune_seed) for label, spec in methods.items() if spec.get("grid")
              for target in targets]
    timings["tuning_s"] = round(time.time() - t, 1)
    chosen = {(r["method"], r["target_speed_up"]): r["chosen"] for r in tuning}
    for r in tuning:
        log.info("benchmark: %s at %gx: %s chosen on validation (seed %d; %s)", r["method"], r["target_speed_up"],
                 grid_tag(r["chosen"]), tune_seed, r["val_acc"])
    todo = [("cell", label, methods[label], t, s, chosen.get((label, t))) for s in seeds for t in targets
            for label in methods]
    rows = run_jobs(cells, todo, workers, "benchmark cells", progress)
    compare = bench.compare_to
    cells_of = {(label, t): [r for r in rows if r["method"] == label and r["target_speed_up"] == t]
                for label in methods for t in targets}
    summary = [_summary_row(label, t, cells_of[label, t], cells_of.get((compare, t)) if label != compare else None)
               for t in targets for label in methods]
    baselines = [label for label, spec in methods.items() if not spec.get("metanetwork")]
    strongest = add_strongest(summary, cells_of, baselines)
    table = markdown(summary, targets, compare, len(build_datasets(cfg.dataset).test), strongest)
    if tuning:
        table += "\nChosen on the validation accuracy of seed " + f"{tune_seed}'s cells: " + "; ".join(
            f"{r['method']} {grid_tag(r['chosen'])} at {r['target_speed_up']:g}x" for r in tuning) + ".\n"
    study_epochs, study = selection_study(methods, meta, cells_of, targets, compare)
    if study_epochs:
        table += selection_markdown(study_epochs, study)
        write_csv(study_epochs, ctx.run_dir / "selection_epochs.csv")
        write_csv(study, ctx.run_dir / "selection_figures.csv")
    timings["total_s"] = round(time.time() - t0, 1)
    write_csv([{k: v for k, v in r.items() if k != "inputs"} for r in rows], ctx.run_dir / "benchmark_cells.csv")
    write_csv(summary, ctx.run_dir / "benchmark_summary.csv")
    atomic_write_text(table, ctx.run_dir / "benchmark_table.md")
    result = {"table": table, "summary": summary, "cells": rows, "tuning": tuning, "timings": timings,
              "strongest_baseline": strongest, "selection_study": {"epochs": study_epochs, "figures": study},
              "task": cfg.task.name, "metanetwork_epochs": {tag or "task": m["epoch"] for tag, m in meta.items()},
              "metanetworks": {tag or "task": {k: m[k] for k in ("epoch", "scores", "figures", "meta_train_dir")}
                               for tag, m in meta.items()},
              "seeds": seeds, "workers": workers,
              "threads": cells.cfg.get("threads")}
    atomic_write_json(result, ctx.run_dir / "benchmark.json")
    stem = ctx.run_dir / "benchmark_acc_vs_speed_up"  # the run directory only: a run never touches the checkout
    plot(summary, stem, benchmark_title(result))
    print(f"\n{table}\nresults in {ctx.run_dir}; {timings['total_s']:.0f} s")
    return result
