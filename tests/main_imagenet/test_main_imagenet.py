"""The ImageNet pipeline under torchrun: 2 CPU ranks (gloo) on a tiny ImageFolder with width-reduced models.

The data models are made in this process (world of 1: the same stages without a process group); the
distributed paths run as real jobs, ``python -m torch.distributed.run --nproc_per_node=2 -m main_imagenet``:
a DDP train step of a tiny ResNet-50, pruning a tiny ViT by heads on both ranks in lockstep, and a
meta-training step with one data model per rank. Each job records a checksum of every rank's replica.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from main_imagenet.main import run_stage
from utils.checkpoint import load_checkpoint, load_model
from utils.distributed import state_checksum
from utils.io import read_json

ROOT = Path(__file__).resolve().parents[2]
CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 3, 12, 4
COMMON = ["dataset.image_size=32", f"dataset.num_classes={CLASSES}", "dataset.val_size=6", "num_workers=0",
          "debug=smoke", "debug.max_epochs=2", "debug.limit_train_batches=2", "debug.limit_eval_batches=2",
          "progress=false", "threads=1", "task.batch_size=8", "task.eval_batch_size=8"]
VIT = ["task=vit_b_16_on_ImageNet", "model=vit_tiny", "metanetwork.num_layers=2", "metanetwork.hidden_dim=4",
       "task.meta_train.batch_size=4", "task.meta_train.batches_per_step=2", "task.visualize.max_speed_up=1.3",
       "task.visualize.eval_every=20"]
# ResNet-50's layout (3, 4, 6, 3 bottlenecks) at a few channels per layer.
TINY_RESNET50 = ("+model.kwargs.widths={stem:8,stages:[16,16,32,32],blocks:[[[4,4],[4,4],[4,4]],"
                 "[[4,4],[4,4],[4,4],[4,4]],[[8,8],[8,8],[8,8],[8,8],[8,8],[8,8]],[[8,8],[8,8],[8,8]]]}")


def write_image_folder(root: Path) -> None:
    """ImageNet's layout, ``{train,val}/<wnid>/*.png``: 3 classes of 32x32 images told apart by colour."""
    rng = np.random.default_rng(0)
    for split, n in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for c in range(CLASSES):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            tint = np.array([80 * c, 60, 200 - 80 * c])
            for i in range(n):
                image = (rng.random((32, 32, 3)) * 60 + tint).clip(0, 255).astype(np.uint8)
                Image.fromarray(image).save(folder / f"img{i}.png")


def _cfg(root: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("main_imagenet", overrides=[f"paths.root_dir={root}", *COMMON, *overrides])


def torchrun(root: Path, *overrides: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """``python -m main_imagenet`` as a 2-rank job on the CPU; fails the test with the job's output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "main_imagenet", f"paths.root_dir={root}", *COMMON, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False, timeout=timeout)
    errors = "\n".join(line for line in proc.stderr.splitlines() if "warn" not in line.lower())
    assert proc.returncode == 0, proc.stdout[-2000:] + errors[-8000:]
    return proc


@pytest.fixture(scope="module")
def vit_store(tmp_path_factory):
    """Three ViT data models (two for training, one for validation) and a trained, unpruned slot 3."""
    root = tmp_path_factory.mktemp("imagenet")
    write_image_folder(root / "datasets" / "imagenet")
    for slot in range(3):
        for stage in ("train", "prune", "finetune"):
            run_stage(_cfg(root, *VIT, f"run={stage}", f"slot={slot}"))
    run_stage(_cfg(root, *VIT, "run=train", "slot=3"))
    return root


def _networks(root: Path) -> Path:
    return next((root / "outputs").glob("*/networks/*"))


def test_missing_imagenet_root_fails_clearly(tmp_path, caplog):
    with pytest.raises(SystemExit) as err:
        run_stage(_cfg(tmp_path, *VIT, "run=train"))
    assert err.value.code == 2
    assert f"missing folder(s) {tmp_path / 'datasets' / 'imagenet' / 'train'}" in caplog.text


def test_stages_in_one_process_make_data_models(vit_store):
    net = _networks(vit_store)
    info = read_json(net / "slot_001" / "finetuned.json")
    assert info["ranks"] == 1 and info["speed_up"] >= 1.037
    shards = sorted(p.name for p in (vit_store / "data_models").glob("*/*/shard_*.h5"))
    assert shards == ["shard_000.h5", "shard_001.h5", "shard_002.h5"]


def test_ddp_train_step_resnet50(tmp_path):
    write_image_folder(tmp_path / "datasets" / "imagenet")
    torchrun(tmp_path, "run=train", "slot=0", "model=resnet50", TINY_RESNET50)
    net = _networks(tmp_path) / "slot_000"
    metrics = read_json(net / "trained.json")
    assert metrics["ranks"] == 2 and metrics["selected_epoch"] >= 1
    sums = metrics["replica_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]  # DDP kept both replicas identical, BN statistics included
    model, _ = load_model(net / "trained.pt")
    assert state_checksum(model) == sums[0]  # rank 0 saved exactly what both ranks hold
    history = (net / "pretrain_history.csv").read_text().splitlines()
    assert len(history) == 3  # header + 2 epochs, written once (by rank 0)
    logs = list((tmp_path / "outputs").rglob("*.log"))
    assert len(logs) == 1  # one run directory and one log per job, not per rank
    assert not (ROOT / ".hydra").exists()


def test_ddp_prunes_vit_by_heads(vit_store):
    # 1.8x rather than the published 1.037x, which the MLPs alone reach: the token width must shrink too.
    torchrun(vit_store, *VIT, "run=prune", "slot=3", "task.pruning.initial_speed_up=1.8")
    pruned = _networks(vit_store) / "slot_003"
    metrics = read_json(pruned / "pruned.json")
    assert metrics["speed_up"] >= 1.8
    assert metrics["replica_checksums"][0] == metrics["replica_checksums"][1]
    model, _ = load_model(pruned / "pruned.pt")
    hidden = model.conv_proj.out_channels
    assert hidden < 32 and hidden % 4 == 0  # whole head dims removed: 4 heads of equal width remain
    for mha in (m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)):
        assert (mha.num_heads, mha.embed_dim, mha.head_dim) == (4, hidden, hidden // 4)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, CLASSES)


def test_ddp_meta_training_keeps_replicas_identical(vit_store):
    start = time.time()
    torchrun(vit_store, *VIT, "run=meta_train")
    meta_dir = next((vit_store / "outputs").glob("*/meta_train/*"))
    summary = read_json(meta_dir / "meta_summary.json")
    assert summary["ranks"] == 2 and summary["epochs"] == 2
    sums = summary["replica_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    rows = (meta_dir / "meta_losses.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2  # 2 epochs x (2 training data models / 2 ranks) steps, one row per step
    saved = load_checkpoint(meta_dir / "metanetwork" / "epoch_002.pt")["metanetwork"]
    first = load_checkpoint(meta_dir / "metanetwork" / "epoch_001.pt")["metanetwork"]
    assert any(not torch.equal(saved[k], first[k]) for k in saved)  # the metanetwork did learn
    assert time.time() - start < 120


def test_visualize_and_prune_after_metanetwork_in_one_process(vit_store):
    if not list((vit_store / "outputs").glob("*/meta_train/*/metanetwork/epoch_001.pt")):
        run_stage(_cfg(vit_store, *VIT, "run=meta_train"))
    run_stage(_cfg(vit_store, *VIT, "run=visualize", "index=[0,1]"))
    vis_dir = next((vit_store / "outputs").glob("*/visualize/*"))
    curve = read_json(vis_dir / "curve_epoch_001.json")
    assert curve["points"][-1]["speed_up"] >= 1.3 and (vis_dir / "acc_vs_speed_up.png").is_file()
    run_stage(_cfg(vit_store, *VIT, "run=prune_after_metanetwork", "slot=1", "meta_epoch=1", "target_speed_up=1.3"))
    metrics = read_json(next((vit_store / "outputs").glob("*/prune_after_metanetwork/*/slot1_graph_metanetwork1_x1.3/metrics.json")))
    assert metrics["speed_up"] >= 1.3 and metrics["meta_epoch"] == 1 and 0 <= metrics["test_acc"] <= 100
