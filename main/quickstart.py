"""``run=quickstart``: the whole pipeline in one command, ending with a results table and a plot.

On the embedded default (``task=resnet20_on_digits``) it runs, each stage with its own run mode and run
directory, so every stage is resumable and can be re-run or inspected on its own:

1. ``generate``: the task's data models (``task.data_models.num``, one shard);
2. ``meta_train``: the metanetwork, one checkpoint per epoch;
3. ``visualize epochs=<task.quickstart.epochs>``: accuracy-vs-speed-up curves on a *validation* data model;
   the metanetwork epoch is selected on them (:func:`select_epoch`, by ``task.visualize.select_by``: the
   highest knee, or the best validation accuracy once pruned to ``task.visualize.select_target`` and
   fine-tuned); epoch 0, no metanetwork, is measured for reference but never selected;
4. ``pretrain_final slot=<task.quickstart.target_index>``: a fresh target network, trained like a data model;
5. ``pruning_final`` at every ``task.pruning.target_speed_ups``, with the selected metanetwork and with
   ``metanetwork=none`` (the identical pipeline and budget without it).

It then prints a Markdown table (val and test accuracy, speed-up, MACs, latency per variant and target),
and writes ``quickstart_results.{json,csv,md}`` and the test-accuracy-vs-speed-up plot
(``quickstart_acc_vs_speed_up.png``/``.pdf``) into its run directory; ``figures/make_figures.py`` redraws the
README's copy from the JSON. Test accuracy is read once per final network; no selection uses it.
"""
from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

from configs import load_group_option
from main.meta_train import adaptive_bn_scores, floor_candidates, floor_epochs
from main.run_modes import RUN_MODES, ConfigError, dispatch, prepare_run
from main.visualize import knees
from utils.config_schema import settings
from utils.io import atomic_write_json, atomic_write_text, write_csv
from utils.plotting import plt, save_figure

log = logging.getLogger(__name__)


SWAPPABLE_GROUPS = ("method", "metanetwork")  # plain config groups without a defaults list


def stage_config(cfg: DictConfig, run: str, **values: Any) -> DictConfig:
    """A copy of ``cfg`` for another run mode (its own run directory through the ``run_dir`` interpolation).

    ``values`` are dotted keys to set; ``method=...`` and ``metanetwork=...`` swap the config group option
    as the command-line override would."""
    sub = copy.deepcopy(cfg)
    with open_dict(sub):
        sub.run = run
        for key, value in values.items():
            if key in SWAPPABLE_GROUPS:
                try:
                    sub[key] = load_group_option(key, str(value))
                except FileNotFoundError as err:
                    raise ConfigError(str(err)) from None
            else:
                OmegaConf.update(sub, key, value, force_add=True)
    return sub


def curve_score(points: List[Dict[str, float]], lo: float, hi: float) -> float:
    """Mean validation accuracy of a pruning curve over speed-ups ``[lo, hi]`` (linear interpolation)."""
    x = np.array([p["speed_up"] for p in points])
    y = np.array([p["val_acc"] for p in points])
    grid = np.linspace(lo, hi, 64)
    return float(np.interp(grid, x, y).mean())


def select_epoch(curves: Dict[int, List[Dict[str, float]]], reference: float | None = None,
                 target_acc: Dict[int, float] | None = None, by: str = "knee") -> tuple[int, Dict[int, float]]:
    """The selected metanetwork epoch (> 0) and every epoch's score.

    ``by="knee"``: the epoch whose curve keeps its accuracy to the highest speed-up: the largest knee
    (:func:`main.visualize.knee`, against ``reference``, the original network's validation accuracy; without
    it, against the start of the epoch-0 curve), ties broken by the :func:`curve_score` over the range all
    curves cover (the score returned). ``by="target"``: the epoch whose validation data model, pruned to
    ``task.visualize.select_target`` and fine-tuned, is most accurate on validation (``target_acc``, the
    score returned), ties broken by the knee. ``by="adaptive_bn"``: likewise with ``target_acc`` the mean
    validation accuracy of the output network pruned one-shot to the task's targets with its BatchNorm
    statistics re-estimated (:func:`main.meta_train.adaptive_bn_scores`, measured during meta-training).

    (Mean accuracy alone can prefer a flat curve that starts low: a metanetwork whose output network did not
    recover in the after-metanetwork fine-tune, at 47% from the first pruning step, beat a curve that held 95%
    to 1.7x.)
    """
    lo = max(min(p["speed_up"] for p in pts) for pts in curves.values())
    hi = min(max(p["speed_up"] for p in pts) for pts in curves.values())
    scores = {int(e): curve_score(pts, lo, hi) for e, pts in curves.items()}
    knee_of = knees({int(e): {"points": pts} for e, pts in curves.items()}, reference)
    candidates = [e for e in scores if e > 0]
    if not candidates:
        raise ValueError("task.quickstart.epochs needs at least one metanetwork epoch > 0")
    if by == "knee":
        return max(candidates, key=lambda e: (round(knee_of[e], 6), scores[e])), scores
    if by not in ("target", "adaptive_bn"):
        raise ConfigError(f"task.visualize.select_by={by!r}: choose knee, target or adaptive_bn")
    target_acc = {int(e): float(a) for e, a in (target_acc or {}).items()}
    if by == "adaptive_bn" and any(e not in target_acc for e in candidates):
        raise ConfigError("task.visualize.select_by=adaptive_bn needs meta-training's adaptive-BN figures "
                          "(meta_val.csv's val_acc_at_<t>x_adaptive_bn) for every candidate epoch")
    if any(e not in target_acc for e in candidates):
        raise ConfigError("task.visualize.select_by=target needs task.visualize.select_target (a speed-up), so "
                          "that run=visualize prunes and fine-tunes each epoch's network to it")
    return max(candidates, key=lambda e: (round(target_acc[e], 6), round(knee_of[e], 6))), target_acc


def selected_epoch(cfg: DictConfig, vis: Dict[str, Any], val_rows=()) -> tuple[int, Dict[int, float]]:
    """:func:`select_epoch` on the result of ``run=visualize``, by ``task.visualize.select_by`` (``adaptive_bn``
    reads meta-training's validation rows ``val_rows``)."""
    by = settings(cfg, "task.visualize").select_by
    scores = adaptive_bn_scores(val_rows) if by == "adaptive_bn" else vis.get("target_val_acc")
    return select_epoch(vis["curves"], vis.get("reference_val_acc"), scores, by)


def selection_candidates(cfg: DictConfig, requested, val_rows) -> List[int]:
    """The epochs ``run=visualize`` draws curves for: the requested ones under the accuracy floor
    (:func:`main.meta_train.floor_candidates`); with ``select_by=adaptive_bn`` also the epoch above the floor
    that scores best there, so that every trained epoch competes while curves are drawn for a few."""
    floor = settings(cfg, "task.meta_train").accuracy_floor
    epochs = floor_candidates(requested, val_rows, floor)
    if settings(cfg, "task.visualize").select_by == "adaptive_bn":
        scores = adaptive_bn_scores(val_rows)
        keep = [e for e in floor_epochs(val_rows, floor) if e > 0 and e in scores] or [e for e in scores if e > 0]
        if keep:
            epochs = sorted({*epochs, max(keep, key=lambda e: scores[e])})
    return epochs


def _row(variant: str, m: Dict[str, Any]) -> Dict[str, Any]:
    return {
        "variant": variant, "target_speed_up": m["target_speed_up"], "speed_up": round(m["speed_up"], 3),
        "val_acc": round(m["val_acc"], 2), "test_acc": round(m["test_acc"], 2),
        "base_test_acc": round(m["base_test_acc"], 2), "macs_M": round(m["macs"] / 1e6, 3),
        "params_k": round(m["params"] / 1e3, 1),
        "latency_ms": round(m["latency"]["pruned"]["latency_ms"], 3),
        "base_latency_ms": round(m["latency"]["base"]["latency_ms"], 3),
    }


def markdown_table(rows: List[Dict[str, Any]]) -> str:
    head = ["variant", "target", "speed-up", "val acc", "test acc", "target net test acc", "MMACs", "params (k)",
            "latency ms (pruned / target net)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['target_speed_up']:g}x | {r['speed_up']:.2f}x | {r['val_acc']:.2f} | "
                     f"{r['test_acc']:.2f} | {r['base_test_acc']:.2f} | {r['macs_M']:.2f} | {r['params_k']:.1f} | "
                     f"{r['latency_ms']:.2f} / {r['base_latency_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def quickstart_title(summary: Dict[str, Any]) -> str:
    return f"{summary['task']}, {summary['method']}, seed {summary['seed']}"


def plot_results(rows: List[Dict[str, Any]], stem: Path, title: str) -> None:
    """Test accuracy vs reached speed-up, one line per variant, as ``stem``.png and ``stem``.pdf."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        pts = sorted((r["speed_up"], r["test_acc"]) for r in rows if r["variant"] == variant)
        ax.plot(*zip(*pts), marker="o", label=variant)
    base = rows[0]["base_test_acc"]
    ax.axhline(base, color="gray", ls="--", lw=1, label=f"target network before pruning ({base:.2f})")
    ax.set(xlabel="speed-up (MACs of the unpruned network / MACs)", ylabel="test accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, stem)


@RUN_MODES.register("quickstart")
def quickstart(cfg: DictConfig) -> Dict[str, Any]:
    ctx = prepare_run(cfg)
    qs, select = cfg.task.get("quickstart"), settings(cfg, "task.visualize")
    if qs is None:
        raise ConfigError(f"task {cfg.task.name} has no quickstart settings (task.quickstart.epochs, target_index); "
                          "run the stages one by one, or use the default task: `python -m main run=quickstart`")
    t0, timings = time.time(), {}

    def timed(name: str, sub: DictConfig) -> Dict[str, Any]:
        t = time.time()
        log.info("quickstart: %s", name)
        out = dispatch(sub)
        timings[name] = round(time.time() - t, 1)
        return out

    timed("generate", stage_config(cfg, "generate", shard=0, num=int(cfg.task.data_models.num)))
    trained = timed("meta_train", stage_config(cfg, "meta_train"))
    epochs = selection_candidates(cfg, sorted({0, *map(int, qs.epochs)}), trained["val"])
    vis = timed("visualize", stage_config(cfg, "visualize", epochs=epochs))
    epoch, scores = selected_epoch(cfg, vis, trained["val"])
    knee_of, at_target = vis["knees"], vis.get("target_val_acc") or {}
    log.info("quickstart: selected metanetwork epoch %d by %s (score %.2f, knee %.2fx; no metanetwork %.2f, "
             "knee %.2fx)", epoch, select.select_by, scores[epoch], knee_of[epoch],
             scores.get(0, float("nan")), knee_of.get(0, float("nan")))
    slot = int(qs.target_index)
    timed("pretrain_final", stage_config(cfg, "pretrain_final", slot=slot))
    rows = []
    for target in map(float, cfg.task.pruning.target_speed_ups):
        for variant, values in ((f"metanetwork (epoch {epoch})", {"meta_epoch": epoch}),
                                ("no metanetwork", {"metanetwork": "none"})):
            metrics = timed(f"pruning_final_{variant.split()[0]}_x{target:g}",
                            stage_config(cfg, "pruning_final", target=target, slot=slot, **values))
            rows.append(_row(variant, metrics))
    table = markdown_table(rows)
    timings["total_s"] = round(time.time() - t0, 1)
    knee_line = "knee (val acc < 80% of the original's, no fine-tuning): " + ", ".join(
        f"{'no metanetwork' if e == 0 else f'epoch {e}'} {k:.2f}x" for e, k in sorted(knee_of.items()))
    table += "\n" + knee_line + "\n"
    if at_target:
        table += (f"val acc of the validation data model pruned to {select.select_target:g}x "
                  "and fine-tuned: " + ", ".join(f"{'no metanetwork' if e == 0 else f'epoch {e}'} {a:.2f}"
                                                 for e, a in sorted(at_target.items())) + "\n")
    summary = {"selected_epoch": epoch, "selected_by": select.select_by,
               "epoch_scores": scores, "knees": knee_of, "target_val_acc": at_target, "rows": rows, "timings": timings,
               "method": cfg.method.name, "task": cfg.task.name, "seed": int(cfg.seed)}
    atomic_write_json(summary, ctx.run_dir / "quickstart_results.json")
    write_csv(rows, ctx.run_dir / "quickstart_results.csv")
    atomic_write_text(table, ctx.run_dir / "quickstart_results.md")
    figure = ctx.run_dir / "quickstart_acc_vs_speed_up"  # the run directory only: a run never touches the checkout
    plot_results(rows, figure, quickstart_title(summary))
    print(f"\n{table}\nselected metanetwork epoch {epoch}; results in {ctx.run_dir}; plot {figure}.png; "
          f"{timings['total_s']:.0f} s in total")
    return {**summary, "table": table, "figure": str(figure.with_suffix(".png"))}
