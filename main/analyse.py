"""``run=analyse [meta_epoch=E]``: weight statistics of a validation data model before and after the metanetwork.

For the network as it is and as the metanetwork of epoch ``meta_epoch`` outputs it (no fine-tuning), per
Torch-Pruning group: the channels' group L1 and L2 norms and their Taylor sensitivity (|w * dL/dw| from a few
training batches); per BatchNorm layer: |gamma|; per convolution: the mean absolute correlation between its
output filters. Saved as ``analyse.json`` (every value plus summaries) and plotted in ``analyse.png``. What to
look for: a metanetwork that makes a network easy to prune concentrates each group's norm in fewer channels
(more channels near zero), without raising filter correlation.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List

import torch
import torch.nn.functional as F
import torch_pruning as tp
from omegaconf import DictConfig

from main.meta_train import apply_metanetwork, load_data_models, load_metanetwork
from main.run_modes import RUN_MODES, ConfigError, prepare_run
from main.stages import data_for, example_input
from utils.config_schema import settings
from utils.convert import graph_to_model
from utils.io import atomic_write_json
from utils.pruning.progressive import pruning_kwargs

log = logging.getLogger(__name__)


def _summary(values: List[float]) -> Dict[str, float]:
    t = torch.tensor(values, dtype=torch.float64)
    if t.numel() == 0:
        return {"count": 0}
    return {"count": t.numel(), "mean": float(t.mean()), "std": float(t.std()) if t.numel() > 1 else 0.0,
            "min": float(t.min()), "max": float(t.max())}


def weight_statistics(model: torch.nn.Module, example: torch.Tensor, batches: List) -> Dict[str, Any]:
    """Group norms, Taylor sensitivity, BN scales and filter correlation of ``model`` (see the module docstring)."""
    model.eval()
    model.zero_grad(set_to_none=True)
    for x, y in batches:  # gradients for the Taylor criterion (eval mode: BN statistics are not touched)
        F.cross_entropy(model(x), y).backward()
    kw = pruning_kwargs(model)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example,
                                               unwrapped_parameters=kw.get("unwrapped_parameters"))
    norms = {p: tp.importance.GroupMagnitudeImportance(p=p, normalizer=None) for p in (1, 2)}
    taylor = tp.importance.GroupTaylorImportance(normalizer=None)
    names = {m: n for n, m in model.named_modules()}
    groups, relative = [], []
    for group in dg.get_all_groups(ignored_layers=kw.get("ignored_layers", []),
                                   root_module_types=[torch.nn.Conv2d, torch.nn.Linear]):
        with torch.no_grad():
            l1, l2, sens = norms[1](group), norms[2](group), taylor(group)
        if l2 is None or l2.numel() < 2:
            continue
        rel = (l2 / l2.max()).tolist()
        relative += rel
        groups.append({"root": names.get(group[0].dep.target.module, "?"), "channels": l2.numel(),
                       "l1": l1.tolist(), "l2": l2.tolist(), "taylor": sens.tolist() if sens is not None else None,
                       "share_below_10pct": sum(r < 0.1 for r in rel) / len(rel)})
    bn = {names[m]: m.weight.detach().abs().tolist() for m in model.modules()
          if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.affine}
    corr = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d) and m.out_channels > 1:
            w = m.weight.detach().flatten(1)
            c = torch.corrcoef(w)
            off = c[~torch.eye(len(c), dtype=torch.bool)]
            corr[name] = float(off.abs().nan_to_num().mean())
    model.zero_grad(set_to_none=True)
    return {
        "groups": groups, "bn_abs_scale": bn, "filter_correlation": corr,
        "summary": {
            "relative_group_l2": _summary(relative),
            "share_of_channels_below_10pct_of_group_max": sum(r < 0.1 for r in relative) / max(len(relative), 1),
            "bn_abs_scale": _summary([v for vals in bn.values() for v in vals]),
            "filter_correlation": _summary(list(corr.values())),
            "taylor": _summary([v for g in groups if g["taylor"] for v in g["taylor"]]),
        },
    }


@RUN_MODES.register("analyse")
def analyse(cfg: DictConfig) -> Dict[str, Any]:
    ctx = prepare_run(cfg)
    use_meta = cfg.metanetwork.name != "none"
    if use_meta and cfg.get("meta_epoch") is None:
        raise ConfigError("run=analyse compares a network before and after the metanetwork: pass meta_epoch=..., "
                          "e.g. `python -m main run=analyse meta_epoch=8`")
    item = load_data_models(cfg, "val")[settings(cfg, "task.visualize").data_model]
    metanet = load_metanetwork(cfg, item.graph, int(cfg.meta_epoch), ctx.device) if use_meta else None
    splits, loaders = data_for(cfg, ctx)
    example = example_input(splits, ctx.device)
    batches = [(x.to(ctx.device), y.to(ctx.device)) for _, (x, y) in zip(range(2), loaders["train"])]
    graph = item.graph.to(ctx.device)
    with torch.no_grad():
        after = graph_to_model(apply_metanetwork(metanet, graph)).to(ctx.device)
    result = {"slot": item.slot, "meta_epoch": int(cfg.meta_epoch) if use_meta else 0,
              "before": weight_statistics(graph_to_model(graph).to(ctx.device), example, batches),
              "after": weight_statistics(after, example, batches)}
    atomic_write_json(result, ctx.run_dir / "analyse.json")
    plot_analysis(result, ctx.run_dir / "analyse.png")
    log.info("channels below 10%% of their group's largest L2 norm: %.3f before, %.3f after the metanetwork",
             result["before"]["summary"]["share_of_channels_below_10pct_of_group_max"],
             result["after"]["summary"]["share_of_channels_below_10pct_of_group_max"])
    return {k: result[k]["summary"] for k in ("before", "after")}


def plot_analysis(result: Dict[str, Any], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for key in ("before", "after"):
        stats = result[key]
        rel = [v / max(g["l2"]) for g in stats["groups"] for v in g["l2"]]
        axes[0].hist(rel, bins=40, alpha=0.5, label=key)
        axes[1].hist([v for vals in stats["bn_abs_scale"].values() for v in vals], bins=40, alpha=0.5, label=key)
        corr = stats["filter_correlation"]
        axes[2].plot(range(len(corr)), list(corr.values()), marker=".", label=key)
    axes[0].set(title="group L2 norm / group max", xlabel="relative norm", ylabel="channels")
    axes[1].set(title="BatchNorm |gamma|", xlabel="|gamma|")
    axes[2].set(title="mean |correlation| between filters", xlabel="convolution (in order)")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"validation data model {result['slot']}: before / after the metanetwork (epoch {result['meta_epoch']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
