"""Fashion-MNIST on tiny IDX files written here in the exact official format; never the real files."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from data_loaders import DatasetCorruptError, DatasetNotFoundError, build_datasets
from data_loaders.fashion_mnist import FILES, IMAGES_MAGIC, LABELS_MAGIC, read_idx

N_TRAIN, N_TEST = 60, 20


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """The IDX encoding: big-endian magic, one big-endian count per dimension, then the uint8 payload."""
    head = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return head + array.astype(np.uint8).tobytes()


def write_fashion(folder: Path, gz: bool = True, n_train: int = N_TRAIN, n_test: int = N_TEST) -> dict:
    """Four official-format files with random pixels and labels 0..9 in turn; returns the arrays."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train_images": rng.integers(0, 256, (n_train, 28, 28)), "train_labels": np.arange(n_train) % 10,
              "test_images": rng.integers(0, 256, (n_test, 28, 28)), "test_labels": (np.arange(n_test) * 3) % 10}
    for role, stem in FILES.items():
        data = idx_bytes(arrays[role], IMAGES_MAGIC if role.endswith("images") else LABELS_MAGIC)
        if gz:
            with gzip.open(folder / f"{stem}.gz", "wb") as f:
                f.write(data)
        else:
            (folder / stem).write_bytes(data)
    return arrays


def cfg(data_dir: Path, system_dir: Path | None = None, **extra) -> dict:
    # system_dir always points into tmp: the tests must not find (or need) the Debian package's files
    return {"name": "fashion_mnist", "root": str(data_dir), "system_dir": str(system_dir or data_dir / "none"),
            "num_classes": 10, "val_size": 10, "augment": True, **extra}


@pytest.mark.parametrize("layout,gz", [("fashion_mnist", True), ("fashion_mnist", False),
                                       ("FashionMNIST/raw", True), ("system", False)])
def test_reads_every_layout_exactly(tmp_path, layout, gz):
    folder = tmp_path / "system" if layout == "system" else tmp_path / "data" / layout
    arrays = write_fashion(folder, gz=gz)
    splits = build_datasets(cfg(tmp_path / "data", system_dir=tmp_path / "system"))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (N_TRAIN - 10, 10, N_TEST)
    assert (splits.image_size, splits.in_channels, splits.num_classes) == (28, 3, 10)
    raw = splits.test.base.images  # (N, 3, 28, 28) uint8, the grey channel replicated
    assert raw.dtype == torch.uint8 and raw.shape == (N_TEST, 3, 28, 28)
    assert torch.equal(raw[:, 2], torch.from_numpy(arrays["test_images"].astype(np.uint8)))
    assert splits.test.base.labels.tolist() == arrays["test_labels"].tolist()
    x, y = splits.test[4]
    assert x.dtype == torch.float32 and x.shape == (3, 28, 28) and y == arrays["test_labels"][4]


def test_first_complete_folder_wins(tmp_path):
    write_fashion(tmp_path / "data" / "fashion_mnist", n_test=20)
    write_fashion(tmp_path / "system", n_test=30)
    assert len(build_datasets(cfg(tmp_path / "data", system_dir=tmp_path / "system")).test) == 20


def test_train_size_is_a_fixed_stratified_subset_and_test_stays_whole(tmp_path):
    write_fashion(tmp_path / "data" / "fashion_mnist")
    full = build_datasets(cfg(tmp_path / "data"))
    a, b = (build_datasets(cfg(tmp_path / "data", train_size=20)) for _ in range(2))
    assert len(a.train) == 20 and len(a.test) == N_TEST and np.array_equal(a.train.indices, b.train.indices)
    assert set(a.train.indices) < set(full.train.indices) and np.array_equal(a.val.indices, full.val.indices)
    labels = full.train.base.labels.numpy()[a.train.indices]
    assert np.bincount(labels, minlength=10).tolist() == [2] * 10  # stratified
    moved = build_datasets(cfg(tmp_path / "data", train_size=20, split_seed=3))  # the subset of another split
    assert len(moved.train) == 20 and not set(moved.train.indices) & set(moved.val.indices)


def test_missing_files_name_each_file_and_both_ways_to_get_them(tmp_path):
    write_fashion(tmp_path / "data" / "fashion_mnist")
    (tmp_path / "data" / "fashion_mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError) as err:
        build_datasets(cfg(tmp_path / "data"))
    message = str(err.value)
    for stem in FILES.values():
        assert stem in message
    assert "apt-get install dataset-fashion-mnist" in message and "dataset.download=true" in message
    assert "only train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte" in message


def test_download_offline_fails_with_a_clear_message(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    def offline(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tvd, "FashionMNIST", offline)
    with pytest.raises(DatasetNotFoundError, match="download=true failed .*dataset-fashion-mnist"):
        build_datasets(cfg(tmp_path / "data", download=True))


def test_download_writes_torchvisions_layout_which_is_then_read(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    def fake(root, download):  # what torchvision's downloader leaves behind
        write_fashion(Path(root) / "FashionMNIST" / "raw", gz=False)

    monkeypatch.setattr(tvd, "FashionMNIST", fake)
    assert len(build_datasets(cfg(tmp_path / "data", download=True)).test) == N_TEST


@pytest.mark.parametrize("damage,match", [
    (lambda b: b[:-5], "announces 20 items"),
    (lambda b: (0x00000801).to_bytes(4, "big") + b[4:], "magic number 0x00000801"),
    (lambda b: b[:4] + b[4:8] + (32).to_bytes(4, "big") + b[12:], "32x28 images"),
    (lambda b: b[:6], "shorter than its header"),
])
def test_corrupt_image_file_is_named(tmp_path, damage, match):
    write_fashion(tmp_path / "data" / "fashion_mnist", gz=False)
    path = tmp_path / "data" / "fashion_mnist" / FILES["test_images"]
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DatasetCorruptError, match=match) as err:
        build_datasets(cfg(tmp_path / "data"))
    assert str(path) in str(err.value)


def test_truncated_gzip_and_mismatched_counts_are_named(tmp_path):
    folder = tmp_path / "data" / "fashion_mnist"
    write_fashion(folder)
    gz = folder / (FILES["train_images"] + ".gz")
    gz.write_bytes(gz.read_bytes()[:100])
    with pytest.raises(DatasetCorruptError, match=str(gz)):
        build_datasets(cfg(tmp_path / "data"))
    write_fashion(folder)
    with gzip.open(folder / (FILES["test_labels"] + ".gz"), "wb") as f:
        f.write(idx_bytes(np.zeros(7), LABELS_MAGIC))
    with pytest.raises(DatasetCorruptError, match="20 images but .* 7 labels"):
        build_datasets(cfg(tmp_path / "data"))


def test_read_idx_labels(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(idx_bytes(np.array([3, 1, 4]), LABELS_MAGIC))
    assert read_idx(path, LABELS_MAGIC).tolist() == [3, 1, 4]


def test_other_image_size_is_refused(tmp_path):
    write_fashion(tmp_path / "data" / "fashion_mnist")
    with pytest.raises(ValueError, match="28x28"):
        build_datasets(cfg(tmp_path / "data", image_size=32))


@pytest.mark.slow
def test_the_fashion_mnist_task_trains_on_tiny_files(tmp_path):
    from hydra import compose, initialize_config_dir

    from main.run_modes import dispatch

    write_fashion(tmp_path / "datasets" / "fashion_mnist", n_train=120, n_test=20)
    root = Path(__file__).resolve().parents[2] / "configs"
    with initialize_config_dir(config_dir=str(root), version_base="1.3"):
        cfg = compose("main", overrides=["task=resnet20_on_fashion_mnist", "model=resnet8", "debug=smoke",
                                         f"paths.root_dir={tmp_path}", f"dataset.system_dir={tmp_path}/none",
                                         "dataset.val_size=20", "dataset.train_size=50", "progress=false"])
    assert cfg.dataset.name == "fashion_mnist" and cfg.task.pruning.benchmark_speed_ups == [3.0, 4.0]
    metrics = dispatch(cfg)
    assert metrics["dataset"] == "fashion_mnist" and metrics["epochs_run"] == 1 and 0 <= metrics["test_acc"] <= 100
    assert metrics["macs"] > 0
