"""Can the metanetwork shrink channels selectively? The sparsity penalty alone, on one data model.

Runs ``main.meta_train.penalty_descent`` until ||W||^2 has fallen ``--fall``-fold: once as plain gradient
descent on the weights (the reference), then once per metanetwork variant (AdamW on the metanetwork, one
VJP per step, as in meta-training). Prints, per run, the steps taken and the selectivity figures of
``utils.pruning.selectivity`` of the result: the share of channels below 10% of their group's largest norm,
and the within-group min/max norm ratio (about 0.8 before).

    python bench/selectivity.py --store data_models/resnet20_on_digits/group_l2_max/seed0
    python bench/selectivity.py --store ... --variants additive:0:1e-3 relative_scale:1:1e-3

A variant is ``edit:magnitude_features:lr[:optimizer[:layer]]`` (optimizer ``adamw`` or ``nsgd``; layer
``fast``, the default, or ``multiplicative``, the published layer's rule). ``--json`` writes the rows for the README table.
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from omegaconf import OmegaConf

from data_loaders.data_models import DataModelSet, store_files
from main.meta_train import penalty_descent
from nn.metanetwork import GraphMetanetwork
from utils.pruning.schemes import scheme_for
from utils.pruning.selectivity import selectivity

DEFAULT_VARIANTS = ["additive:0:1e-3", "relative_scale:0:1e-3", "relative_scale:1:1e-3"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, help="folder of data-model shards (python -m generate_dataset)")
    parser.add_argument("--slot", type=int, default=0, help="index into the validation data models")
    parser.add_argument("--val-fraction", type=float, default=0.25)
    parser.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS)
    parser.add_argument("--reg", type=float, default=1.0, help="GroupNormPruner reg")
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--direct-lr", type=float, default=0.003, help="step size of direct descent")
    parser.add_argument("--fall", type=float, default=10.0)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()

    item = DataModelSet(store_files(args.store), split="val", val_fraction=args.val_fraction)[args.slot]
    example = torch.randn(1, 3, args.image_size, args.image_size)
    mt = OmegaConf.create({"pruner_reg": args.reg, "alpha": args.alpha})
    scheme = scheme_for(OmegaConf.create({"name": "group_l2_max", "importance": "group_magnitude", "p": 2,
                                          "group_reduction": "mean", "normalizer": "max"}))
    rows = [{"run": "data model as is", "steps": 0, "fall": 1.0, **selectivity(item.model.eval(), example)}]
    runs = [("direct descent", None)] + [(v, v) for v in args.variants]
    for label, variant in runs:
        model = copy.deepcopy(item.model).eval()
        regularize = scheme.meta_regularizer(model, example, mt)
        metanet, lr = None, args.direct_lr
        if variant is not None:
            parts = variant.split(":")
            edit, mag, lr = parts[:3]
            opt, layer = (parts[3] if len(parts) > 3 else "adamw"), (parts[4] if len(parts) > 4 else "fast")
            torch.manual_seed(0)
            metanet = GraphMetanetwork.from_graph(item.graph, hidden_dim=args.hidden, num_layers=args.layers,
                                                  node_ratio=0.01, edge_ratio=0.01, edit=edit,
                                                  magnitude_features=mag == "1", layer=layer)
        t = time.perf_counter()
        r = penalty_descent(model, regularize, item.graph, metanet, lr=float(lr), max_steps=args.max_steps,
                            fall=args.fall, optimizer=opt if variant is not None else "adamw")
        rows.append({"run": label, "steps": r["steps"], "fall": r["norm_sq_start"] / r["norm_sq_end"],
                     **selectivity(model, example), "seconds": round(time.perf_counter() - t, 1)})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n| run | steps | ||W||^2 fall | channels < 10% of group max | within-group min/max |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['steps']} | {r['fall']:.1f}x | {100 * r['small_group_fraction']:.1f}% | "
              f"{r['min_max_ratio']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
