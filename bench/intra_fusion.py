"""Accuracy right after pruning (no fine-tuning): plain pruning vs Intra-Fusion on a trained network.

    python -m main run=pretrain_final index=100                   # the trained target (ResNet-20, digits)
    python bench/intra_fusion.py                                  # group_l2_max vs intra_fusion(_exact)
    python bench/intra_fusion.py --speed-ups 1.5 2 3 --methods group_l2_max intra_fusion \\
        --extra "intra_fusion:marginals=importance" --target outputs/.../target_100/model.pt

Every method starts from the same saved network and prunes progressively (the same schedule as
``run=pruning_final``) to the largest speed-up; the validation and test accuracy are recorded at the first
step that reaches each listed speed-up (the state a separate run to that target would end in). Prints a
Markdown table and the seconds each method's pruning took.
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from data_loaders import build_datasets, build_loaders
from utils.checkpoint import load_model
from utils.pruning.methods import build_method
from utils.pruning.progressive import progressive_prune
from utils.train import evaluate

ROOT = Path(__file__).resolve().parents[1]


def _method_cfg(cfg, spec: str):
    """``name`` or ``name:key=value,key=value`` -> (label, method config)."""
    name, _, extra = spec.partition(":")
    method = OmegaConf.load(ROOT / "configs" / "method" / f"{name}.yaml")
    for pair in filter(None, extra.split(",")):
        key, value = pair.split("=", 1)
        OmegaConf.update(method, key, OmegaConf.create({"v": value})["v"] if value else value)
    return spec, method


def run_method(model: torch.nn.Module, method_cfg, speed_ups: List[float], base_macs: int, loaders,
               steps: int) -> Tuple[Dict[float, Dict[str, float]], float]:
    """{speed-up: {val_acc, test_acc, reached}} recorded at the first step reaching each speed-up."""
    model = copy.deepcopy(model).eval()
    method = build_method(method_cfg)
    todo, rows = sorted(speed_ups), {}
    device = torch.device("cpu")

    def record(step: int, speed_up: float) -> None:
        while todo and speed_up >= todo[0]:
            rows[todo.pop(0)] = {"reached": speed_up, **{f"{k}_acc": evaluate(model, loaders[k], device)["acc"]
                                                          for k in ("val", "test")}}

    t = time.time()
    progressive_prune(model, max(speed_ups), method, torch.zeros(1, *next(iter(loaders["test"]))[0].shape[1:]),
                      base_macs=base_macs, steps=steps, on_step=record)
    return rows, time.time() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=Path, default=ROOT / "outputs/resnet20_on_digits/pretrain_final/"
                        "resnet20_group_l2_max_seed0/target_100/model.pt")
    parser.add_argument("--speed-ups", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    parser.add_argument("--methods", nargs="+", default=["group_l2_max", "intra_fusion", "intra_fusion_exact"])
    parser.add_argument("--extra", nargs="*", default=["intra_fusion:marginals=importance",
                                                       "intra_fusion_exact:marginals=importance",
                                                       "intra_fusion:transport=nearest",
                                                       "intra_fusion_exact:transport=nearest"],
                        help="more methods as name:key=value,... (method config overrides)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--overrides", nargs="*", default=[], help="Hydra overrides for the task (dataset)")
    args = parser.parse_args()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("main", overrides=args.overrides)
    splits = build_datasets(cfg.dataset)
    loaders = build_loaders(splits, batch_size=int(cfg.task.batch_size), eval_batch_size=int(cfg.task.eval_batch_size))
    model, payload = load_model(args.target)
    base_macs = int(payload.get("info", {}).get("base_macs", 0)) or None
    device = torch.device("cpu")
    base = {k: evaluate(model, loaders[k], device)["acc"] for k in ("val", "test")}
    print(f"target {args.target}: val {base['val']:.2f} %, test {base['test']:.2f} % (no pruning), "
          f"threads={torch.get_num_threads()}")
    header = "| method | " + " | ".join(f"{s:g}x val / test" for s in args.speed_ups) + " | prune s |"
    lines = [header, "|" + "---|" * (len(args.speed_ups) + 2)]
    for spec in args.methods + args.extra:
        label, method_cfg = _method_cfg(cfg, spec)
        rows, seconds = run_method(model, method_cfg, args.speed_ups, base_macs, loaders, args.steps)
        cells = [f"{rows[s]['val_acc']:.2f} / {rows[s]['test_acc']:.2f}" for s in args.speed_ups]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {seconds:.1f} |")
        print(lines[-1], flush=True)
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
