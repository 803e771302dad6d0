"""Import of the published code's data models (Hugging Face ``datasets`` rows) and export back to that layout.

The published rows are built here the way the published code builds them: a state dict of torch tensors
plus the metric columns, through ``Dataset.from_generator`` and ``save_to_disk``. The VGG rows come from an
independent copy of the published network's structure (blocks as ``Sequential``, pooling after the first
three blocks on 32x32 inputs), so that the key mapping and the pooling are checked against logits.
"""
from pathlib import Path

import pytest
import torch
import torch.nn as tnn
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from data_loaders.data_models import DataModelSet, read_records, write_shard
from data_loaders.published_layout import METRIC_COLUMNS, PublishedRowError
from generate_dataset.export_published import main as export_main
from main.run_modes import ConfigError, dispatch
from nn.models import create_model, get_widths
from utils.pruning.macs import MacCounter

datasets = pytest.importorskip("datasets")

ROOT = Path(__file__).resolve().parents[2]
TINY = ["dataset=synthetic", "dataset.num_train=48", "dataset.num_test=16", "dataset.image_size=32", "debug=smoke",
        "progress=false", "run=import_published"]


def _cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("generate_dataset", overrides=[*TINY, f"paths.root_dir={tmp_path}", *overrides])


def _pruned_resnet20(seed: int) -> tnn.Module:
    """A ResNet-20 at pruned widths (stage and hidden widths differ), with non-trivial BN statistics."""
    torch.manual_seed(seed)
    widths = {"stem": 13, "stages": [13, 27 - seed, 50], "blocks": [[9, 16 - seed, 11], [20, 31, 8], [64, 40, 33]]}
    model = create_model("resnet20", num_classes=10, widths=widths)
    for m in model.modules():
        if isinstance(m, tnn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked += 3
    return model.eval()


class PublishedStyleVGG(tnn.Module):
    """The published VGG's structure at given conv widths: five blocks of conv-BN(-ReLU), pools after blocks
    0-2 (and 3 on 64x64 inputs), global average pool, one linear layer."""

    def __init__(self, widths, num_classes=10):
        super().__init__()
        per_block, c_in, it = [2, 2, 4, 4, 4], 3, iter(widths)
        for b, n in enumerate(per_block):
            layers = []
            for _ in range(n):
                c_out = next(it)
                layers += [tnn.Conv2d(c_in, c_out, 3, padding=1), tnn.BatchNorm2d(c_out), tnn.ReLU(inplace=True)]
                c_in = c_out
            setattr(self, f"block{b}", tnn.Sequential(*layers[:-1]))
        self.classifier = tnn.Linear(c_in, num_classes)

    def forward(self, x):
        h = x.shape[2]
        for b in range(5):
            x = F.relu(getattr(self, f"block{b}")(x))
            if b < 3 or (b == 3 and h == 64):
                x = F.max_pool2d(x, 2)
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _vgg_widths(seed):
    return [5 + seed, 7, 9, 6, 11, 8, 7, 10, 12, 6, 9, 8, 7, 5, 6, 9 + seed]


def _published_vgg(seed):
    torch.manual_seed(seed)
    model = PublishedStyleVGG(_vgg_widths(seed))
    for m in model.modules():
        if isinstance(m, tnn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _metrics(i):
    return {"train_acc": 91.0 + i, "train_loss": 0.25, "val_acc": 89.5 - i, "val_loss": 0.41, "current_speed_up": 1.3 + i}


def _save_published(path: Path, models) -> Path:
    """``models`` as the published code saves them: state dict + metrics per row, then save_to_disk."""
    def rows(models):
        for i, model in enumerate(models):
            yield {**model.state_dict(), **_metrics(i)}

    # A tuple: datasets would split a list argument into shards, each enumerated from 0.
    dataset = datasets.Dataset.from_generator(rows, gen_kwargs={"models": tuple(models)}, cache_dir=str(path) + "_cache")
    dataset.save_to_disk(str(path))
    return path


@pytest.mark.slow
def test_published_resnet_rows_import_with_their_widths_and_logits(tmp_path):
    originals = [_pruned_resnet20(0), _pruned_resnet20(1)]
    folder = _save_published(tmp_path / "published_r20", originals)
    cfg = _cfg(tmp_path, "model=resnet20", f"path={folder}")
    summary = dispatch(cfg)
    assert summary["rows"] == 2 and summary["slots"] == [0, 1]
    records = read_records(Path(cfg.data_models_dir) / "shard_000.h5")
    x = torch.randn(4, 3, 32, 32)
    base_macs = MacCounter(create_model("resnet20", num_classes=10), x[:1])()
    for i, (record, original) in enumerate(zip(records, originals)):
        assert record.arch["widths"] == get_widths(original)
        for key, tensor in original.state_dict().items():
            assert torch.equal(record.state[key], tensor), key
        assert record.info["published"] == {"source": str(folder.resolve()), "row": i, **_metrics(i)}
        assert record.info["metrics_from"] == "measured" and 0 <= record.info["val_acc"] <= 100
        assert record.info["speed_up"] == pytest.approx(base_macs / MacCounter(original, x[:1])())
    loaded = DataModelSet(store_files_of(cfg))
    for item, original in zip([loaded[0], loaded[1]], originals):
        assert torch.equal(item.model(x), original(x))  # same function: same modules, same weights


def store_files_of(cfg):
    return sorted(Path(cfg.data_models_dir).glob("shard_*.h5"))


@pytest.mark.slow
def test_published_vgg_rows_map_onto_the_zoo_vgg_with_three_pools(tmp_path):
    originals = [_published_vgg(0), _published_vgg(1)]
    folder = _save_published(tmp_path / "published_vgg", originals)
    with pytest.raises(ConfigError, match=r"model\.kwargs\.max_pools=3"):  # the zoo default pools five times
        dispatch(_cfg(tmp_path, "model=vgg19_bn", f"path={folder}"))
    cfg = _cfg(tmp_path, "model=vgg19_bn", "+model.kwargs.max_pools=3", f"path={folder}", "evaluate=false")
    dispatch(cfg)
    loaded = DataModelSet(store_files_of(cfg))
    x = torch.randn(3, 3, 32, 32)
    for i, original in enumerate(originals):
        item = loaded[i]
        assert get_widths(item.model) == {"convs": _vgg_widths(i)}
        torch.testing.assert_close(item.model(x), original(x), rtol=1e-5, atol=1e-6)
        assert item.info["metrics_from"] == "published" and item.info["val_acc"] == _metrics(i)["val_acc"]
    # The task config of VGG-19 on CIFAR-100 uses the published network.
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        assert compose("main", overrides=["task=VGG19_on_CIFAR100"]).model.kwargs.max_pools == 3


@pytest.mark.slow
def test_a_row_of_another_architecture_is_rejected_and_nothing_is_written(tmp_path):
    good = _pruned_resnet20(0)
    bad = _pruned_resnet20(0)
    bad.layer2[1].conv1 = tnn.Conv2d(26, 31, 3, padding=1, bias=False)  # in-channels do not match the stage (27)
    folder = _save_published(tmp_path / "mixed", [good, good, bad])
    cfg = _cfg(tmp_path, "model=resnet20", f"path={folder}")
    with pytest.raises(PublishedRowError, match=r"row 2 .*'layer2\.1\.conv1\.weight' has shape \[31, 26, 3, 3\] in the "
                                                 r"row; resnet20 at the widths read from the row needs \[31, 27, 3, 3\]"):
        dispatch(cfg)
    store = Path(cfg.data_models_dir)
    assert not store.exists() or not any(store.iterdir())  # no shard, not even a partial one
    deeper = _save_published(tmp_path / "resnet32_row", [create_model("resnet32", num_classes=10).eval()])
    with pytest.raises(PublishedRowError, match=r"'layer1\.3\.conv1\.weight' \(shape \[16, 16, 3, 3\]\), which "
                                                r"resnet20 does not have"):
        dispatch(_cfg(tmp_path, "model=resnet20", f"path={deeper}"))
    with pytest.raises(ConfigError, match="not a folder"):
        dispatch(_cfg(tmp_path, "model=resnet20", f"path={tmp_path / 'nowhere'}"))


@pytest.mark.slow
def test_import_appends_a_shard_refuses_a_second_import_and_exports_back(tmp_path):
    originals = [_pruned_resnet20(0), _pruned_resnet20(1)]
    first = _save_published(tmp_path / "first", originals[:1])
    second = _save_published(tmp_path / "second", originals)
    dispatch(_cfg(tmp_path, "model=resnet20", f"path={first}", "evaluate=false"))
    cfg = _cfg(tmp_path, "model=resnet20", f"path={second}", "evaluate=false")
    assert dispatch(cfg)["slots"] == [1, 2]  # the next shard and the next free slots
    assert [p.name for p in store_files_of(cfg)] == ["shard_000.h5", "shard_001.h5"]
    with pytest.raises(ConfigError, match="already imported"):
        dispatch(cfg)
    out = tmp_path / "exported"
    assert export_main([cfg.data_models_dir, "--out", str(out)]) == 0
    rows = datasets.load_from_disk(str(out))
    assert len(rows) == 3 and set(rows.column_names) == set(originals[0].state_dict()) | set(METRIC_COLUMNS)
    row = rows.with_format("numpy")[2]
    for key, tensor in originals[1].state_dict().items():
        assert torch.equal(torch.as_tensor(row[key]), tensor), key
    assert row["val_acc"] == _metrics(1)["val_acc"]
    assert export_main([cfg.data_models_dir, "--out", str(out)]) == 2  # never overwrites
    # The export imports again, into another task folder, to the same tensors.
    again = _cfg(tmp_path, "model=resnet20", f"path={out}", "evaluate=false", "method=l1")
    dispatch(again)
    reimported = read_records(store_files_of(again)[0])
    assert all(torch.equal(reimported[2].state[k], v) for k, v in originals[1].state_dict().items())


def test_export_refuses_a_vgg_that_the_published_network_does_not_compute(tmp_path, capsys):
    cfg = _cfg(tmp_path, "model=vgg19_bn", "+model.kwargs.max_pools=3", "evaluate=false",
               f"path={_save_published(tmp_path / 'v', [_published_vgg(0)])}")
    dispatch(cfg)
    assert export_main([cfg.data_models_dir, "--out", str(tmp_path / "ok")]) == 0
    record = read_records(store_files_of(cfg)[0])[0]
    record.arch = {**record.arch, "kwargs": {}}  # the same weights in the zoo default, which pools five times
    write_shard(tmp_path / "five" / "shard_000.h5", {"task": "x"}, [record])
    assert export_main([str(tmp_path / "five"), "--out", str(tmp_path / "no")]) == 2
    assert "max_pools=None (the published network has max_pools=3)" in capsys.readouterr().err
    assert not (tmp_path / "no").exists() and not (tmp_path / "no.partial").exists()
