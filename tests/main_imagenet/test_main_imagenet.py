"""One pipeline under torchrun: the run modes of ``main`` as 2-rank CPU jobs (gloo) on tiny data.

The ImageNet side runs on a tiny ImageFolder with width-reduced models through the launcher
(``python -m torch.distributed.run --nproc_per_node=2 -m main_imagenet``): a DDP pretraining step of a tiny
ResNet-50, a data model of a tiny ViT pruned by heads on both ranks in lockstep, meta-training with one data
model per rank, the curves and final pruning with the metanetwork. Every pruning scheme and sparse learning
then runs as ``run=pruning_final`` under torchrun on the CIFAR-style synthetic task. Each job records a
checksum of every rank's replica: equal checksums mean the ranks stayed in step.
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

from data_loaders.data_models import DataModelSet, store_files
from main.run_modes import dispatch, run_entry
from tests.main.test_meta_train import _cfg as cifar_cfg
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


def torchrun(root: Path, *overrides: str, module: str = "main_imagenet", common=COMMON,
             timeout: float = 240) -> subprocess.CompletedProcess:
    """``python -m <module>`` as a 2-rank job on the CPU; fails the test with the job's output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", module,
           f"paths.root_dir={root}", *common, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False, timeout=timeout)
    errors = "\n".join(line for line in proc.stderr.splitlines() if "warn" not in line.lower())
    # a rank that aborts prints its cause first, then a long list of modules: keep the cause in the report
    causes = [line for line in proc.stderr.splitlines() if any(k in line for k in ("Fatal Python", "terminate", "what():"))]
    assert proc.returncode == 0, proc.stdout[-2000:] + "\n".join(causes) + "\n" + errors[-8000:]
    return proc


def _one(pattern: str, root: Path) -> Path:
    found = sorted(root.glob(pattern))
    assert len(found) == 1, (pattern, found)
    return found[0]


def _in_step(metrics: dict) -> None:
    sums = metrics["replica_checksums"]
    assert metrics["ranks"] == 2 and len(sums) == 2 and sums[0] == sums[1]


@pytest.fixture(scope="module")
def vit_store(tmp_path_factory):
    """Three ViT data models (two for training, one for validation) and target network 100, in one process."""
    root = tmp_path_factory.mktemp("imagenet")
    write_image_folder(root / "datasets" / "imagenet")
    dispatch(_cfg(root, *VIT, "run=generate", "num=3"))
    dispatch(_cfg(root, *VIT, "run=pretrain_final", "slot=100"))
    return root


@pytest.mark.slow
def test_missing_imagenet_root_fails_clearly(tmp_path, caplog):
    with pytest.raises(SystemExit) as err:
        run_entry(_cfg(tmp_path, *VIT, "run=pretrain"))
    assert err.value.code == 2
    assert f"missing folder(s) {tmp_path / 'datasets' / 'imagenet' / 'train'}" in caplog.text


@pytest.mark.slow
def test_data_models_in_one_process(vit_store):
    store = _one("data_models/*/*/*", vit_store)
    items = DataModelSet(store_files(store))
    assert [r.slot for r in items.records] == [0, 1, 2]
    assert all(r.info["ranks"] == 1 and r.info["speed_up"] >= 1.037 for r in items.records)


@pytest.mark.slow
def test_ddp_pretrain_step_resnet50(tmp_path):
    write_image_folder(tmp_path / "datasets" / "imagenet")
    torchrun(tmp_path, "run=pretrain", "model=resnet50", TINY_RESNET50)
    run_dir = _one("outputs/*/pretrain/*", tmp_path)
    metrics = read_json(run_dir / "metrics.json")
    _in_step(metrics)  # DDP kept both replicas identical, BN statistics included
    assert metrics["selected_epoch"] >= 1
    model, _ = load_model(run_dir / "model.pt")
    assert state_checksum(model) == metrics["replica_checksums"][0]  # rank 0 saved exactly what both ranks hold
    history = (run_dir / "pretrain_history.csv").read_text().splitlines()
    assert len(history) == 3  # header + 2 epochs, written once (by rank 0)
    assert len(list((tmp_path / "outputs").rglob("*.log"))) == 1  # one run directory and one log per job
    assert not (ROOT / ".hydra").exists()


@pytest.mark.slow
def test_ddp_data_model_of_a_vit_pruned_by_heads(tmp_path):
    # 1.8x rather than the published 1.037x, which the MLPs alone reach: the token width must shrink too.
    write_image_folder(tmp_path / "datasets" / "imagenet")
    torchrun(tmp_path, *VIT, "run=generate", "shard=0", "num=1", "task.pruning.initial_speed_up=1.8")
    items = DataModelSet(store_files(_one("data_models/*/*/*", tmp_path)))
    info = items.records[0].info
    assert info["speed_up"] >= 1.8
    _in_step(info)
    model = items[0].model
    hidden = model.conv_proj.out_channels
    assert hidden < 32 and hidden % 4 == 0  # whole head dims removed: 4 heads of equal width remain
    for mha in (m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)):
        assert (mha.num_heads, mha.embed_dim, mha.head_dim) == (4, hidden, hidden // 4)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, CLASSES)
    assert not list(tmp_path.glob("data_models/*/*/*/work"))  # the slot's work folder is gone once it is stored


@pytest.mark.slow
def test_ddp_meta_training_keeps_replicas_identical(vit_store):
    start = time.time()
    torchrun(vit_store, *VIT, "run=meta_train")
    meta_dir = _one("outputs/*/meta_train/*", vit_store)
    summary = read_json(meta_dir / "meta_summary.json")
    assert summary["epochs"] == 2
    _in_step(summary)
    rows = (meta_dir / "meta_losses.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2  # 2 epochs x (2 training data models / 2 ranks) steps, one row per step
    saved = load_checkpoint(meta_dir / "metanetwork" / "epoch_002.pt")["metanetwork"]
    first = load_checkpoint(meta_dir / "metanetwork" / "epoch_001.pt")["metanetwork"]
    assert any(not torch.equal(saved[k], first[k]) for k in saved)  # the metanetwork did learn
    assert time.time() - start < 120


@pytest.mark.slow
def test_ddp_curves_and_final_pruning_with_the_metanetwork(vit_store):
    if not list(vit_store.glob("outputs/*/meta_train/*/metanetwork/epoch_001.pt")):
        dispatch(_cfg(vit_store, *VIT, "run=meta_train"))
    torchrun(vit_store, *VIT, "run=visualize", "epochs=[0,1]")
    vis_dir = _one("outputs/*/visualize/*", vit_store)
    curve = read_json(vis_dir / "curve_epoch_001.json")
    assert curve["points"][-1]["speed_up"] >= 1.3 and (vis_dir / "acc_vs_speed_up.png").is_file()
    assert set(read_json(vis_dir / "knees.json")["knees"]) == {"0", "1"}
    torchrun(vit_store, *VIT, "run=pruning_final", "target=1.3", "slot=100", "meta_epoch=1")
    metrics = read_json(_one("outputs/*/pruning_final/*/target100_graph_metanetwork1_x1.3/metrics.json", vit_store))
    assert metrics["speed_up"] >= 1.3 and metrics["meta_epoch"] == 1 and 0 <= metrics["test_acc"] <= 100
    _in_step(metrics)


CIFAR = ["dataset=synthetic", "dataset.num_train=96", "dataset.num_test=16", "dataset.image_size=16", "model=resnet8",
         "debug=smoke", "debug.max_epochs=2", "progress=false", "threads=1", "task.batch_size=16"]


@pytest.mark.slow
@pytest.mark.parametrize("method,target", [("group_l2_max", 1.6), ("unstructured_l1", 0.6), ("nm_2_4", 0.5),
                                           ("sparse_learning", 1.6)])
def test_every_scheme_prunes_under_torchrun(tmp_path, method, target):
    """Channels, unstructured, N:M and sparse learning: ``run=pruning_final`` as a 2-rank ``python -m main`` job."""
    dispatch(cifar_cfg(tmp_path, f"method={method}", "run=pretrain_final", "slot=100", "task.batch_size=16"))
    torchrun(tmp_path, f"method={method}", "metanetwork=none", "run=pruning_final", f"target={target}", "slot=100",
             module="main", common=CIFAR)
    out = _one(f"outputs/*/pruning_final/*/target100_none_x{target:g}", tmp_path)
    metrics = read_json(out / "metrics.json")
    _in_step(metrics)
    axis = metrics["axis"]
    reached = 0.45 if method == "nm_2_4" else target - 1e-6  # 2:4 everywhere but the dense RGB stem
    assert metrics[axis] >= reached and 0 <= metrics["test_acc"] <= 100
    if axis == "sparsity":  # the zeros survived the distributed fine-tuning
        model, _ = load_model(out / "model.pt")
        assert sum(int((m.weight == 0).sum()) for m in model.modules() if isinstance(m, torch.nn.Conv2d)) > 0
    # without a metanetwork the after-metanetwork fine-tune is the target network's, shared by the baselines
    shared = _one("outputs/*/pretrain_final/*/target_100/finetuned/*", tmp_path)
    assert (shared.name == "plain") == (method != "sparse_learning")
    finetune = load_checkpoint(shared / "finetune_after_metanetwork_last.pt")["fingerprint"]
    assert ("after_backward" in finetune) == (method == "sparse_learning")  # SL's regulariser ran in the job
