"""One meta-training step on ResNet-56, split into its parts (docs/design.md section 5).

    python bench/meta_step.py                     # 4 batches of 500 images per step, then the published 100
    python bench/meta_step.py --batches 4 --repeats 3

Parts: data passes (forward+backward of the network with the metanetwork's weights, accumulated over the
step's batches), metanetwork forward (incl. graph -> state dict), regularisation (GroupNormPruner), and the
single vector-Jacobian product through conversion and metanetwork. Random images stand in for CIFAR-10
(the cost does not depend on the pixels). Target: metanetwork + conversion + regularisation <= 25% of the
step at 4 batches. With 100 batches of 500 the step takes minutes on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from data_loaders.data_models import DataModel
from main.meta_train import MetaTrainer
from main.run_modes import RunContext
from nn.metanetwork import build_metanetwork
from nn.models import create_model
from utils.device import get_device
from utils.pruning.methods import build_method
from utils.pruning.progressive import progressive_prune
from utils.train import Limits

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 100])
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = get_device(args.device)
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("main", overrides=["task=resnet56_on_CIFAR10"])
    torch.manual_seed(0)
    model = create_model("resnet56").eval()
    progressive_prune(model, 1.32, build_method(cfg.method), torch.zeros(1, 3, 32, 32))  # a data model's widths
    item = DataModel(0, model, {})
    metanet = build_metanetwork(cfg.metanetwork, item.graph).to(device)
    ctx = RunContext(device, Path("."), Limits())
    print(f"device={device} threads={torch.get_num_threads()} metanetwork={cfg.metanetwork.num_layers}x"
          f"{cfg.metanetwork.hidden_dim}, graph {item.graph}")
    for batches in args.batches:
        OmegaConf.update(cfg, "task.meta_train.batches_per_step", batches)
        trainer = MetaTrainer(cfg, ctx, metanet, torch.zeros(1, 3, 32, 32, device=device))
        data = [(torch.randn(args.batch_size, 3, 32, 32), torch.randint(0, 10, (args.batch_size,)))]
        runs = []
        for r in range(args.repeats + 1):  # the first step builds the work copy and pruner: not timed
            metanet.zero_grad()
            out = trainer.step(item, iter(data * batches))
            if r:
                runs.append(out)
        parts = {k: statistics.median(o[k] for o in runs) for k in ("data_s", "metanet_fwd_s", "regularize_s", "metanet_bwd_s")}
        total = sum(parts.values())
        overhead = parts["metanet_fwd_s"] + parts["regularize_s"] + parts["metanet_bwd_s"]
        print(f"{batches:>3} x {args.batch_size} images: step {total:7.2f}s = data {parts['data_s']:.2f}s + metanetwork "
              f"fwd {parts['metanet_fwd_s']:.2f}s + regularize {parts['regularize_s']:.3f}s + VJP {parts['metanet_bwd_s']:.2f}s"
              f"  -> metanetwork+conversion+regularisation {100 * overhead / total:.1f}% of the step")


if __name__ == "__main__":
    main()
