"""``run=visualize epochs=[0,30,40]`` (or the published ``index=[0,30,40]``): pick a metanetwork epoch by its accuracy-vs-speed-up curve.

For each listed epoch (0 = no metanetwork: the original data model), a *validation* data model is passed
through that epoch's metanetwork, fine-tuned with the "after metanetwork" schedule (selection on the
validation split), then pruned step by step **without** fine-tuning while the validation accuracy is
recorded against the speed-up (relative to the unpruned network) up to ``task.visualize.max_speed_up``
(unstructured methods: against the sparsity, up to ``task.visualize.max_sparsity`` or the sparsest N:M).
A flatter curve that keeps its accuracy to a higher speed-up is a better metanetwork. Each curve is cached
as JSON next to its fingerprint (settings and checkpoint digest), so a re-run only re-plots; all curves are
drawn in one figure (PNG and PDF). The test split is never used here.

With ``task.visualize.select_target`` set (a speed-up, e.g. the hardest target of the task), each epoch's
fine-tuned network is also pruned, in a copy, straight to that target and fine-tuned with the "after
pruning" schedule, exactly as ``run=pruning_final`` would; its validation accuracy is recorded as
``target_val_acc``. ``task.visualize.select_by: target`` then selects the epoch on it instead of the knee
(:func:`main.quickstart.select_epoch`): the knee measures pruning without fine-tuning, which on digits
does not predict the accuracy once pruned and fine-tuned.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path
from typing import Any, Dict, List

import torch
from omegaconf import DictConfig, OmegaConf

from main.meta_train import apply_metanetwork, epoch_checkpoint, load_data_models, load_metanetwork
from main.run_modes import RUN_MODES, ConfigError, prepare_run, run_argument
from main.stages import data_for, example_input, train_stage
from utils.config_schema import settings
from utils.convert import graph_to_model
from utils.io import atomic_write_json, file_digest, read_json
from utils.plotting import plt, save_figure
from utils.pruning.schemes import SCHEMES, scheme_for
from utils.train import evaluate

log = logging.getLogger(__name__)


def _epochs(cfg: DictConfig) -> List[int]:
    index = run_argument(cfg, "epochs")
    if index is None:
        return [0]
    epochs = [int(index)] if isinstance(index, (int, float, str)) else [int(e) for e in index]
    if any(e < 0 for e in epochs):
        raise ConfigError(f"epochs={list(epochs)}: epochs are >= 0 (0 = no metanetwork), e.g. epochs=[0,30,40]")
    return epochs


def curve(cfg: DictConfig, ctx, item, epoch: int, splits, loaders, out_dir: Path) -> Dict[str, Any]:
    """Fine-tune the (metanetwork-edited) data model, then record accuracy vs speed-up while pruning."""
    vis, seed = settings(cfg, "task.visualize"), int(cfg.seed)
    metanet = load_metanetwork(cfg, item.graph, epoch, ctx.device)
    with torch.no_grad():
        graph = apply_metanetwork(metanet, item.graph.to(ctx.device))
    model = graph_to_model(graph).to(ctx.device)
    scheme = scheme_for(cfg.method)
    example = example_input(splits, ctx.device)
    # the same fine-tuning as run=pruning_final's, sparse learning's regulariser included
    fit = train_stage(cfg, ctx, model, loaders, "finetune_after_metanetwork", out_dir / f"epoch_{epoch:03d}", seed,
                      after_backward=scheme.finetune_hook(model, example, "finetune_after_metanetwork"))
    model.eval()
    base_macs = int(item.info["base_macs"])
    # a copy for select_target, pruned after the curve (which prunes the network itself) so that the curve
    # sees the same random state with and without it
    probe = copy.deepcopy(model) if vis.select_target is not None else None
    limit = scheme.curve_limit(vis)
    every = vis.eval_every if scheme.axis == "speed_up" else 1  # unstructured curves have few, coarse steps
    points: List[Dict[str, float]] = []

    def record(step: int, position: float) -> None:
        if step % every == 0 or position >= limit - 1e-9:
            acc = evaluate(model, loaders["val"], ctx.device, ctx.limits.eval_batches)["acc"]
            points.append({"step": step, scheme.axis: position, "val_acc": acc})

    record(0, scheme.position(model, example, base_macs))
    result = scheme.prune(model, limit, example, base_macs, lambda: iter(loaders["train"]), ctx.device, on_step=record)
    out = {"epoch": epoch, "slot": item.slot, "finetune_val_acc": fit.selected_val.get("acc"),
           "axis": scheme.axis, "points": points, "pruning_steps": result["steps"]}
    if probe is not None:
        out["target"] = pruned_and_finetuned(cfg, ctx, probe, vis.select_target, example, base_macs, loaders,
                                             out_dir / f"epoch_{epoch:03d}_at_target", seed)
    return out


def pruned_and_finetuned(cfg: DictConfig, ctx, model: torch.nn.Module, target: float, example: torch.Tensor,
                         base_macs: int, loaders, run_dir: Path, seed: int) -> Dict[str, Any]:
    """Prune ``model`` to ``target`` with the method's criterion and fine-tune it ("after pruning"
    schedule) as ``run=pruning_final`` does; validation accuracy before and after that fine-tuning."""
    scheme = scheme_for(cfg.method)
    result = scheme.prune(model, target, example, base_macs, lambda: iter(loaders["train"]), ctx.device)
    before = evaluate(model, loaders["val"], ctx.device, ctx.limits.eval_batches)["acc"]
    train_stage(cfg, ctx, model, loaders, "finetune_after_pruning", run_dir, seed,
                after_backward=scheme.finetune_hook(model, example, "finetune_after_pruning"))
    after = evaluate(model, loaders["val"], ctx.device, ctx.limits.eval_batches)["acc"]
    return {"target": target, scheme.axis: scheme.position(model, example, base_macs),
            "pruned_val_acc": before, "val_acc": after, "pruning_steps": result["steps"]}


KNEE_FRACTION = 0.8  # the knee: where accuracy first falls below this fraction of the original network's


def knee(points: List[Dict[str, float]], reference_acc: float, axis: str = "speed_up",
         fraction: float = KNEE_FRACTION) -> float:
    """The first position (speed-up or sparsity) of a pruning curve whose validation accuracy is below
    ``fraction * reference_acc``, interpolated linearly between the two points around the crossing; the
    curve's last position if it never falls that low (then the knee is at least that)."""
    level = fraction * reference_acc
    for prev, cur in zip(points, points[1:]):
        if cur["val_acc"] < level:
            if prev["val_acc"] <= level:
                return float(prev[axis])
            t = (prev["val_acc"] - level) / (prev["val_acc"] - cur["val_acc"])
            return float(prev[axis] + t * (cur[axis] - prev[axis]))
    return float(points[-1][axis]) if points[0]["val_acc"] >= level else float(points[0][axis])


def knees(curves: Dict[int, Dict[str, Any]], reference: float | None = None) -> Dict[int, float]:
    """Every curve's :func:`knee` against ``reference``, the original network's validation accuracy (its
    stored ``val_acc``, before any fine-tuning). Without it: against the start of the epoch-0 curve when
    drawn, else each curve's own start. (A curve's own start is no reference for a method that changes the
    network before pruning: sparse learning with too strong a ``reg`` starts at chance and stays flat.)"""
    if reference is None and 0 in curves:
        reference = curves[0]["points"][0]["val_acc"]
    return {e: knee(c["points"], reference if reference is not None else c["points"][0]["val_acc"],
                    c.get("axis", "speed_up")) for e, c in curves.items()}


@RUN_MODES.register("visualize")
def visualize(cfg: DictConfig) -> Dict[str, Any]:
    ctx = prepare_run(cfg)
    epochs = _epochs(cfg)
    vis = settings(cfg, "task.visualize")
    if vis.select_by == "target" and vis.select_target is None:
        raise ConfigError("task.visualize.select_by=target needs task.visualize.select_target=<speed-up> "
                          "(e.g. the task's hardest target)")
    item = load_data_models(cfg, "val")[vis.data_model]
    for epoch in epochs:  # fail before any work when a checkpoint is missing
        load_metanetwork(cfg, item.graph, epoch, ctx.device)
    splits, loaders = data_for(cfg, ctx)
    if vis.select_target is not None:  # or an unreachable target
        scheme_for(cfg.method).check_target(graph_to_model(item.graph).to(ctx.device), vis.select_target,
                                            example_input(splits, ctx.device), int(item.info["base_macs"]))
    curves: Dict[int, Dict[str, Any]] = {}
    for epoch in epochs:
        cache = ctx.run_dir / f"curve_epoch_{epoch:03d}.json"
        fingerprint = {
            "slot": item.slot, "method": OmegaConf.to_container(cfg.method, resolve=True),
            "schedule": OmegaConf.to_container(cfg.task.schedules.finetune_after_metanetwork, resolve=True),
            "visualize": dataclasses.asdict(vis), "limits": vars(ctx.limits),
            "checkpoint": file_digest(epoch_checkpoint(Path(cfg.meta_train_dir), epoch))[:16] if epoch else "",
        }
        if vis.select_target is not None:
            fingerprint["after_pruning"] = OmegaConf.to_container(cfg.task.schedules.finetune_after_pruning,
                                                                  resolve=True)
        if scheme_for(cfg.method).has_finetune_hook("finetune_after_metanetwork"):  # curves cached before its fine-tuning was regularised are stale
            fingerprint["finetune"] = "regularized"
        if cache.exists() and read_json(cache).get("fingerprint") == fingerprint:
            curves[epoch] = read_json(cache)
            log.info("epoch %d: cached curve %s", epoch, cache)
            continue
        curves[epoch] = {**curve(cfg, ctx, item, epoch, splits, loaders, ctx.run_dir), "fingerprint": fingerprint}
        atomic_write_json(curves[epoch], cache)
    axis = scheme_for(cfg.method).axis
    reference = float(item.info["val_acc"])  # the original data model's, before any fine-tuning
    knee_of = knees(curves, reference)
    for e in epochs:
        log.info("epoch %d: knee at %.3f (%s where val acc falls below %.0f%% of the original's)", e, knee_of[e],
                 axis, 100 * KNEE_FRACTION)
    at_target = {e: c["target"]["val_acc"] for e, c in curves.items() if "target" in c}
    for e, acc in at_target.items():
        log.info("epoch %d: val acc %.2f once pruned to %gx and fine-tuned", e, acc, vis.select_target)
    atomic_write_json({"fraction": KNEE_FRACTION, "axis": axis, "reference_val_acc": reference,
                       "knees": {str(e): k for e, k in knee_of.items()},
                       "target_val_acc": {str(e): a for e, a in at_target.items()}}, ctx.run_dir / "knees.json")
    plot_curves(curves, ctx.run_dir / "acc_vs_speed_up", title=f"{cfg.task.name}, {cfg.method.name}, "
                f"validation data model {item.slot}", knee_of=knee_of)
    return {"axis": axis, "curves": {e: c["points"] for e, c in curves.items()}, "knees": knee_of,
            "reference_val_acc": reference, "target_val_acc": at_target,
            "figure": str(ctx.run_dir / "acc_vs_speed_up.png")}


def plot_curves(curves: Dict[int, Dict[str, Any]], stem: Path, title: str = "",
                knee_of: Dict[int, float] | None = None) -> None:
    """One figure with every epoch's accuracy-vs-speed-up curve (knees in the legend), as ``stem``.png/.pdf."""
    fig, ax = plt.subplots(figsize=(6, 4))
    axis = "speed_up"
    for epoch, c in sorted(curves.items()):
        pts, axis = c["points"], c.get("axis", "speed_up")
        label = "no metanetwork" if epoch == 0 else f"metanetwork epoch {epoch}"
        if knee_of is not None and epoch in knee_of:
            label += f" (knee {knee_of[epoch]:.2f})"
        ax.plot([p[axis] for p in pts], [p["val_acc"] for p in pts], marker=".", label=label)
    ax.set(xlabel=SCHEMES.get("channels" if axis == "speed_up" else "unstructured").axis_label,
           ylabel="validation accuracy (%)",
           title=title or "accuracy vs speed-up, pruning without fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, stem)
