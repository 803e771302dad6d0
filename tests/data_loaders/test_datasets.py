"""Dataset loaders on tiny files written in the official formats (CIFAR pickles, SVHN .mat, ImageNet
class folders), the embedded digits and the synthetic dataset. CPU only, a few seconds in all."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from omegaconf import OmegaConf
from PIL import Image

from data_loaders import (
    DATASETS,
    DatasetCorruptError,
    DatasetNotFoundError,
    build_datasets,
    build_loaders,
    list_datasets,
)
from data_loaders.splits import stratified_split
from utils.registry import UnknownNameError

# ---------------------------------------------------------------------------------------------------
# writers of tiny official-format files; each returns (number of train images, number of test images)
# ---------------------------------------------------------------------------------------------------


def _pickle(path: Path, data: np.ndarray, labels: np.ndarray, label_key: bytes) -> None:
    with open(path, "wb") as f:
        pickle.dump({b"data": data, label_key: labels.tolist(), b"batch_label": b"tiny"}, f)


def write_cifar10(root: Path, per_batch: int = 12, n_test: int = 20, seed: int = 0) -> tuple[int, int]:
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        _pickle(folder / name, rng.integers(0, 256, (n, 3072), dtype=np.uint8), np.arange(n) % 10, b"labels")
    return 5 * per_batch, n_test


def write_cifar100(root: Path, n_train: int = 60, n_test: int = 20) -> tuple[int, int]:
    rng = np.random.default_rng(1)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n in [("train", n_train), ("test", n_test)]:
        labels = rng.integers(0, 100, n)
        _pickle(folder / name, rng.integers(0, 256, (n, 3072), dtype=np.uint8), labels, b"fine_labels")
    return n_train, n_test


def svhn_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)  # official (H, W, C, N) layout
    y = (np.arange(n) % 10 + 1).reshape(n, 1).astype(np.uint8)  # 1..10, where 10 is the digit 0
    return x, y


def write_svhn(root: Path, n_train: int = 40, n_test: int = 20) -> tuple[int, int]:
    root.mkdir(parents=True, exist_ok=True)
    for name, n, seed in [("train_32x32.mat", n_train, 2), ("test_32x32.mat", n_test, 3)]:
        x, y = svhn_arrays(n, seed)
        scipy.io.savemat(root / name, {"X": x, "y": y})
    return n_train, n_test


def write_imagenet(root: Path, n_train: int = 6, n_val: int = 2) -> tuple[int, int]:
    rng = np.random.default_rng(4)
    wnids = ["n01440764", "n01443537", "n01484850"]
    for split, n in [("train", n_train), ("val", n_val)]:
        for c, wnid in enumerate(wnids):
            (root / split / wnid).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (30 + 4 * i, 40, 3), dtype=np.uint8)
                ext = "JPEG" if c == 0 else "png"  # both formats, and the official upper-case extension
                Image.fromarray(pixels).save(root / split / wnid / f"{wnid}_{i}.{ext}")
    return len(wnids) * n_train, len(wnids) * n_val


WRITERS = {"cifar10": write_cifar10, "cifar100": write_cifar100, "svhn": write_svhn,
           "imagenet": write_imagenet}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "svhn": 10, "imagenet": 3}


def file_cfg(name: str, root: Path, **kw) -> dict:
    cfg = {"name": name, "root": str(root), "val_size": 10, "split_seed": 0, "augment": True}
    if name == "imagenet":
        cfg["image_size"] = 32  # small crops keep the test fast; the pipeline is the same as at 224
    cfg.update(kw)
    return cfg


@pytest.fixture(params=sorted(WRITERS))
def file_dataset(request, tmp_path):
    """(name, cfg, n_train, n_test) for each file-backed dataset, written to a fresh folder."""
    name = request.param
    n_train, n_test = WRITERS[name](tmp_path)
    return name, file_cfg(name, tmp_path), n_train, n_test


# ---------------------------------------------------------------------------------------------------
# file-backed datasets
# ---------------------------------------------------------------------------------------------------


def test_shapes_dtypes_labels_and_split_sizes(file_dataset):
    name, cfg, n_train, n_test = file_dataset
    splits = build_datasets(OmegaConf.create(cfg))  # a DictConfig, as Hydra passes it
    size = cfg.get("image_size", 32)
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (NUM_CLASSES[name], 3, size)
    assert (len(splits.train) + len(splits.val), len(splits.val), len(splits.test)) == (n_train, 10, n_test)
    for split in (splits.train, splits.val, splits.test):
        image, label = split[len(split) - 1]
        assert image.shape == (3, size, size) and image.dtype == torch.float32
        assert isinstance(label, int) and 0 <= label < splits.num_classes
    batches = build_loaders(splits, batch_size=8)
    images, labels = next(iter(batches["test"]))
    assert images.shape == (min(8, n_test), 3, size, size) and labels.dtype == torch.int64
    assert sum(len(y) for _, y in batches["train"]) == len(splits.train)  # drop_last=False


def test_val_split_deterministic_disjoint_and_covering(file_dataset):
    _, cfg, n_train, _ = file_dataset
    a, b = build_datasets(cfg), build_datasets(cfg)
    other = build_datasets({**cfg, "split_seed": 1})
    np.testing.assert_array_equal(a.val.indices, b.val.indices)
    assert not np.array_equal(a.val.indices, other.val.indices)
    assert np.intersect1d(a.train.indices, a.val.indices).size == 0
    covered = np.sort(np.concatenate([a.train.indices, a.val.indices]))
    np.testing.assert_array_equal(covered, np.arange(n_train))


def test_only_train_is_augmented(file_dataset):
    _, cfg, _, _ = file_dataset
    splits = build_datasets(cfg)
    torch.manual_seed(0)
    for split in (splits.val, splits.test):
        assert torch.equal(split[0][0], split[0][0])
    draws = [splits.train[0][0] for _ in range(8)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    plain = build_datasets({**cfg, "augment": False})
    assert torch.equal(plain.train[0][0], plain.train[0][0])


def _raw_pixels(image: torch.Tensor, mean, std) -> np.ndarray:
    """Undo Normalize and the /255 scaling: (C, H, W) float -> uint8 pixels."""
    x = image * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    return (x * 255).round().to(torch.uint8).numpy()


def test_cifar_pixel_layout_and_val_uses_eval_transform(tmp_path):
    write_cifar10(tmp_path)
    splits = build_datasets(file_cfg("cifar10", tmp_path))
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb") as f:
        test = pickle.load(f, encoding="bytes")
    np.testing.assert_array_equal(_raw_pixels(splits.test[3][0], splits.mean, splits.std),
                                  test[b"data"][3].reshape(3, 32, 32))  # R plane, G plane, B plane
    assert splits.test[3][1] == test[b"labels"][3]
    # the validation item is the un-augmented training image it indexes
    index = int(splits.val.indices[0])
    batch, row = divmod(index, 12)
    with open(tmp_path / "cifar-10-batches-py" / f"data_batch_{batch + 1}", "rb") as f:
        train = pickle.load(f, encoding="bytes")
    np.testing.assert_array_equal(_raw_pixels(splits.val[0][0], splits.mean, splits.std),
                                  train[b"data"][row].reshape(3, 32, 32))


def test_cifar_root_may_be_the_batches_folder(tmp_path):
    write_cifar10(tmp_path)
    splits = build_datasets(file_cfg("cifar10", tmp_path / "cifar-10-batches-py"))
    assert (len(splits.train) + len(splits.val), len(splits.test)) == (60, 20)


def test_svhn_label_10_is_digit_0_and_layout(tmp_path):
    write_svhn(tmp_path)
    splits = build_datasets(file_cfg("svhn", tmp_path))
    x, y = svhn_arrays(20, seed=3)
    labels = [splits.test[i][1] for i in range(20)]
    assert labels == [int(v) % 10 for v in y[:, 0]] and labels[9] == 0  # y == 10 -> 0
    np.testing.assert_array_equal(_raw_pixels(splits.test[9][0], splits.mean, splits.std),
                                  x[:, :, :, 9].transpose(2, 0, 1))


def test_native_size_datasets_reject_other_image_size(tmp_path):
    write_cifar10(tmp_path)
    with pytest.raises(ValueError, match="image_size=64"):
        build_datasets(file_cfg("cifar10", tmp_path, image_size=64))


def test_configured_num_classes_must_match_the_data(tmp_path):
    write_imagenet(tmp_path)
    assert build_datasets(file_cfg("imagenet", tmp_path, num_classes=3)).num_classes == 3
    with pytest.raises(ValueError, match="num_classes=1000 but the data has 3 classes"):
        build_datasets(file_cfg("imagenet", tmp_path, num_classes=1000))


# ---------------------------------------------------------------------------------------------------
# missing and corrupt files, unknown names
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, expected, hints", [
    ("cifar10", ["cifar-10-batches-py/data_batch_1", "cifar-10-batches-py/test_batch"],
     ["https://www.cs.toronto.edu/~kriz/cifar.html", "tar xzf cifar-10-python.tar.gz -C"]),
    ("cifar100", ["cifar-100-python/train", "cifar-100-python/test"],
     ["https://www.cs.toronto.edu/~kriz/cifar.html", "tar xzf cifar-100-python.tar.gz -C"]),
    ("svhn", ["train_32x32.mat", "test_32x32.mat"], ["http://ufldl.stanford.edu/housenumbers/"]),
    ("imagenet", ["train", "val"], ["ILSVRC2012_img_train.tar", "class"]),
])
def test_missing_folder_names_expected_path_and_how_to_get_it(tmp_path, name, expected, hints):
    with pytest.raises(DatasetNotFoundError) as info:
        build_datasets(file_cfg(name, tmp_path / "nowhere"))
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert all(str((tmp_path / "nowhere" / path).resolve()) in message for path in expected)
    assert all(h in message for h in hints)


def test_incomplete_cifar_marks_only_the_missing_file(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError) as info:
        build_datasets(file_cfg("cifar10", tmp_path))
    missing = [line for line in str(info.value).splitlines() if "MISSING" in line]
    assert len(missing) == 1 and "data_batch_3" in missing[0] and str(tmp_path.resolve()) in missing[0]


def test_imagenet_unsorted_val_folder_is_explained(tmp_path):
    write_imagenet(tmp_path)
    flat = tmp_path / "val"
    for image in list(flat.rglob("*.*")):
        image.rename(flat / image.name)  # the official val archive is flat
    with pytest.raises(DatasetNotFoundError, match="sorted into class folders"):
        build_datasets(file_cfg("imagenet", tmp_path))


@pytest.mark.parametrize("name, path", [("cifar10", "cifar-10-batches-py/data_batch_2"),
                                        ("cifar100", "cifar-100-python/test"),
                                        ("svhn", "train_32x32.mat")])
def test_truncated_file_error_names_the_file(tmp_path, name, path):
    WRITERS[name](tmp_path)
    target = tmp_path / path
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    with pytest.raises(DatasetCorruptError) as info:
        build_datasets(file_cfg(name, tmp_path))
    assert str(target.resolve()) in str(info.value)


def test_unknown_name_lists_valid_names():
    with pytest.raises(UnknownNameError) as info:
        build_datasets({"name": "cifar11"})
    assert isinstance(info.value, KeyError)
    assert "'cifar10'" in str(info.value)  # the close match is suggested
    assert all(name in str(info.value) for name in list_datasets())
    assert list_datasets() == ["cifar10", "cifar100", "digits", "fashion_mnist", "imagenet", "svhn", "synthetic"]
    assert len(DATASETS) == 7


# ---------------------------------------------------------------------------------------------------
# embedded and synthetic datasets, splits, loaders
# ---------------------------------------------------------------------------------------------------


def test_digits_shapes_sizes_and_fixed_test_split():
    a = build_datasets({"name": "digits", "val_size": 0.1, "split_seed": 0})
    b = build_datasets({"name": "digits", "val_size": 0.1, "split_seed": 1})
    assert (a.num_classes, a.in_channels, a.image_size) == (10, 3, 32)
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert (len(a.test), len(a.val)) == (359, 144)  # round(0.2 * 1797), round(0.1 * 1438)
    image, label = a.train[0]
    assert image.shape == (3, 32, 32) and torch.equal(image[0], image[2])  # grey replicated to 3 channels
    assert torch.equal(torch.stack([a.test[i][0] for i in range(len(a.test))]),
                       torch.stack([b.test[i][0] for i in range(len(b.test))]))
    assert [a.test[i][1] for i in range(len(a.test))] == [b.test[i][1] for i in range(len(b.test))]
    assert not np.array_equal(a.val.indices, b.val.indices)
    assert sorted({a.test[i][1] for i in range(len(a.test))}) == list(range(10))


def test_digits_pixels_are_scaled_to_unit_interval():
    splits = build_datasets({"name": "digits", "augment": False, "image_size": 16, "channels": 1})
    pixels = torch.stack([splits.test[i][0] for i in range(len(splits.test))])
    raw = pixels * splits.std[0] + splits.mean[0]
    assert pixels.shape[1:] == (1, 16, 16)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5 and raw.max() > 0.9


def test_synthetic_is_deterministic_and_learnable():
    cfg = {"name": "synthetic", "val_size": 0.25, "augment": False}
    a, b = build_datasets(cfg), build_datasets(cfg)
    c = build_datasets({**cfg, "data_seed": 1})
    assert (len(a.train), len(a.val), len(a.test), a.num_classes) == (192, 64, 64, 10)

    def stack(split):
        items = [split[i] for i in range(len(split))]
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])

    (xa, ya), (xb, yb), (xc, _) = stack(a.train), stack(b.train), stack(c.train)
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and not torch.equal(xa, xc)
    # a nearest-class-mean classifier fitted on train must classify the test split
    means = torch.stack([xa[ya == k].mean(0) for k in range(10)]).flatten(1)
    xt, yt = stack(a.test)
    predictions = torch.cdist(xt.flatten(1), means).argmin(1)
    assert (predictions == yt).float().mean() > 0.9


def test_synthetic_options():
    splits = build_datasets({"name": "synthetic", "num_train": 40, "num_test": 8, "num_classes": 4,
                             "image_size": 16, "channels": 1, "val_size": 8})
    assert (len(splits.train), len(splits.val), len(splits.test)) == (32, 8, 8)
    assert splits.train[0][0].shape == (1, 16, 16) and splits.num_classes == 4


def test_stratified_split_exact_per_class_counts():
    labels = np.array([0] * 80 + [1] * 20)
    keep, held = stratified_split(labels, 10, seed=0)
    assert np.bincount(labels[held]).tolist() == [8, 2]
    assert len(keep) == 90 and np.intersect1d(keep, held).size == 0


@pytest.mark.parametrize("val_size", [0.0, 1.5, 256, True])
def test_bad_val_size_is_rejected(val_size):
    with pytest.raises(ValueError, match="val_size"):
        build_datasets({"name": "synthetic", "val_size": val_size})


def test_zero_val_size_gives_empty_validation():
    splits = build_datasets({"name": "synthetic", "val_size": 0})
    assert (len(splits.train), len(splits.val)) == (256, 0)


def test_loaders_shuffle_seeded_train_only():
    splits = build_datasets({"name": "synthetic", "val_size": 32, "augment": False})

    def order(loader):
        return torch.cat([y for _, y in loader]).tolist()

    a, b, c = (build_loaders(splits, 50, eval_batch_size=20, seed=s) for s in (0, 0, 1))
    assert order(a["train"]) == order(b["train"]) != order(c["train"])
    assert order(a["val"]) == [splits.val[i][1] for i in range(len(splits.val))]  # not shuffled
    assert len(a["val"]) == 2 and len(a["train"]) == 5  # 32 / 20 -> 2 batches; 224 / 50 -> 5 (kept tail)
    assert not a["train"].persistent_workers
    assert build_loaders(splits, 50, num_workers=1)["test"].persistent_workers
