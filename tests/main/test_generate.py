"""Data-model generation, the HDF5 store, resume after interruption, merging, and the cached loader."""
from pathlib import Path

import h5py
import pytest
import torch
from hydra import compose, initialize_config_dir

import main.generate as gen
from data_loaders.data_models import (
    DataModelSet,
    DataModelStoreError,
    ShardWriter,
    merge_shards,
    read_header,
    read_records,
    store_files,
)
from generate_dataset.merge import main as merge_main
from main.meta_train import load_data_models
from main.run_modes import dispatch
from utils.convert import graph_to_state_dict

ROOT = Path(__file__).resolve().parents[2]
TINY = ["dataset=synthetic", "dataset.num_train=64", "dataset.num_test=16", "dataset.image_size=16",
        "model=resnet8", "debug=smoke", "resume=true", "progress=false"]


def _cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("generate_dataset", overrides=[*TINY, f"paths.root_dir={tmp_path}", *overrides])


def _store(cfg):
    return Path(cfg.data_models_dir)


def test_generation_writes_the_expected_data_models(tmp_path):
    cfg = _cfg(tmp_path, "num=2")
    dispatch(cfg)
    shard = _store(cfg) / "shard_000.h5"
    records = read_records(shard)
    assert [r.slot for r in records] == [0, 1]
    for r in records:
        info = r.info
        assert info["speed_up"] >= cfg.task.pruning.initial_speed_up
        assert info["macs"] < info["base_macs"] and info["params"] < info["base_params"]
        assert 0 <= info["train_acc"] <= 100 and 0 <= info["val_acc"] <= 100
        assert info["seed"] == gen.slot_seed(0, r.slot)
        assert set(info["timings"]) == {"pretrain_s", "prune_s", "finetune_s"}
        assert info["config"]["task"]["name"] == "resnet20_on_digits" and info["method"] == "group_l2_max"
        assert r.arch["name"] == "resnet8" and r.arch["widths"] != {"stem": 16, "stages": [16, 32, 64],
                                                                    "blocks": [[16], [32], [64]]}
    with h5py.File(shard) as f:  # tensors are stored natively
        assert f["slot00000/state/conv1.weight"].dtype == "float32"
        assert f["slot00000/state/bn1.num_batches_tracked"].dtype == "int64"
    assert not (_store(cfg) / "work").exists()  # work folders are cleaned up
    # Different seeds per slot: different weights.
    assert not torch.equal(records[0].state["fc.weight"][:, :4], records[1].state["fc.weight"][:, :4])


class Killed(Exception):
    """Stands for the process dying (pytest reserves KeyboardInterrupt for itself)."""


def test_interrupted_generation_resumes_without_losing_or_duplicating(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, "num=3")
    real = gen.train_stage
    calls, killed = [], []

    def flaky(cfg_, ctx, model, loaders, stage, run_dir, seed, **kwargs):
        calls.append((run_dir.name, stage))
        if run_dir.name == "slot00001" and stage == "finetune_initial" and not killed:
            killed.append(True)
            raise Killed  # the process dies after slot 1 was pretrained and pruned
        return real(cfg_, ctx, model, loaders, stage, run_dir, seed, **kwargs)

    monkeypatch.setattr(gen, "train_stage", flaky)
    with pytest.raises(Killed):
        dispatch(cfg)
    shard = _store(cfg) / "shard_000.h5"
    first = read_records(shard)
    assert [r.slot for r in first] == [0]
    assert (_store(cfg) / "work" / "slot00001" / "pruned.pt").exists()
    calls.clear()
    dispatch(cfg)
    # Slot 1 continued after pruning (no second pretraining); slot 0 was not redone.
    assert calls == [("slot00001", "finetune_initial"), ("slot00002", "pretrain"), ("slot00002", "finetune_initial")]
    records = read_records(shard)
    assert [r.slot for r in records] == [0, 1, 2]
    assert all(torch.equal(records[0].state[k], v) for k, v in first[0].state.items())


def test_shards_merge_and_the_loader_round_trips(tmp_path):
    for index in (0, 1):
        dispatch(_cfg(tmp_path, "num=1", f"index={index}"))
    store = _store(_cfg(tmp_path))
    assert merge_main([str(store)]) == 0
    assert store_files(store) == [store / "data_models.h5"]
    merged = read_records(store / "data_models.h5")
    assert [r.slot for r in merged] == [0, 1]
    with pytest.raises(DataModelStoreError, match="more than one shard"):
        merge_shards([store / "shard_000.h5", store / "shard_000.h5"], tmp_path / "dup.h5")

    data = DataModelSet(store_files(store), split="all", expect={"model": "resnet8"})
    assert len(data) == 2 and data.slots == [0, 1]
    item = data[1]
    stored = merged[1].state
    own = item.model.state_dict()
    assert list(own) == list(stored) and all(torch.equal(own[k], v) for k, v in stored.items())
    back = graph_to_state_dict(item.graph)
    assert all(torch.equal(back[k], v) for k, v in stored.items())
    assert data[1] is item and data[1].graph is item.graph  # decoded and converted once
    train, val = DataModelSet([store / "data_models.h5"], "train", 0.5), DataModelSet([store / "data_models.h5"], "val", 0.5)
    assert (train.slots, val.slots) == ([0], [1])


def test_store_errors_name_the_file_and_the_problem(tmp_path):
    dispatch(_cfg(tmp_path, "num=1"))
    shard = _store(_cfg(tmp_path)) / "shard_000.h5"
    with pytest.raises(DataModelStoreError, match="made for something else: model='resnet8' \\(expected 'resnet20'\\)"):
        read_records(shard, expect={"model": "resnet20"})
    with pytest.raises(DataModelStoreError, match="made for something else"):
        ShardWriter(shard, {"task": "resnet20_on_digits", "model": "vgg19_bn"})
    bad = tmp_path / "cut.h5"
    bad.write_bytes(shard.read_bytes()[:2000])
    with pytest.raises(DataModelStoreError, match="cut.h5 cannot be read as HDF5.*truncated or corrupt"):
        read_records(bad)
    with pytest.raises(DataModelStoreError, match="does not exist"):
        read_records(tmp_path / "missing.h5")
    with pytest.raises(DataModelStoreError, match="no data-model files"):
        DataModelSet([])


# ---------------------------------------------------------------------------------------------------
# store isolation: no run silently reuses data models made under other settings
# ---------------------------------------------------------------------------------------------------

REAL = [o for o in TINY if not o.startswith("debug=")] + [
    "task.schedules.pretrain.epochs=2", "task.schedules.finetune_initial.epochs=1", "resume=true"]


def _real_cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("generate_dataset", overrides=[*REAL, f"paths.root_dir={tmp_path}", *overrides])


def test_a_debug_run_then_a_real_run_gives_the_real_runs_data_models(tmp_path):
    debug, real = _cfg(tmp_path, "num=1"), _real_cfg(tmp_path, "num=1")
    assert _store(debug) != _store(real) and _store(debug).name == "debug-smoke_seed0"
    dispatch(debug)
    dispatch(real)
    made = read_records(_store(real) / "shard_000.h5")
    assert len(made) == 1 and made[0].info["timings"]["pretrain_s"] > 0  # trained here, not taken from debug
    settings = read_header(_store(real) / "shard_000.h5")["settings"]
    assert settings["debug"] is None and settings["dataset"]["name"] == "synthetic"
    assert not {"root", "download", "system_dir"} & set(settings["dataset"])  # where the files are is no setting
    assert read_header(_store(debug) / "shard_000.h5")["settings"]["debug"]["max_epochs"] == 1
    # Pointed at the debug store on purpose, the real run is refused, naming what differs.
    with pytest.raises(DataModelStoreError, match=r"debug: stored None, asked|debug\.max_epochs: stored 1, asked None"):
        dispatch(_real_cfg(tmp_path, "num=1", f"data_models_dir={_store(debug)}"))


def test_a_store_refuses_other_settings_naming_the_keys_and_the_flag(tmp_path):
    dispatch(_cfg(tmp_path, "num=1", "method=sparse_learning"))
    store = _store(_cfg(tmp_path, "method=sparse_learning"))
    with pytest.raises(DataModelStoreError, match=r"method\.reg: stored 0\.0005, asked 0\.05.*data_models_tag="):
        dispatch(_cfg(tmp_path, "num=2", "method=sparse_learning", "method.reg=0.05"))
    with pytest.raises(DataModelStoreError, match=r"schedules\.pretrain\.lr: stored 0\.1, asked 0\.05"):
        dispatch(_cfg(tmp_path, "num=2", "method=sparse_learning", "task.schedules.pretrain.lr=0.05"))
    assert [r.slot for r in read_records(store / "shard_000.h5")] == [0]  # nothing was added by the refused runs
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        reader = compose("main", overrides=[*TINY, f"paths.root_dir={tmp_path}", "method=sparse_learning",
                                            "method.reg=0.05", "run=meta_train"])
    with pytest.raises(DataModelStoreError, match=r"method\.reg: stored 0\.0005, asked 0\.05"):
        load_data_models(reader, "all")
    # The flag named in the message makes a separate store, and the first is left as it was.
    other = _cfg(tmp_path, "num=1", "method=sparse_learning", "method.reg=0.05", "data_models_tag=reg005")
    dispatch(other)
    assert _store(other) == store.parent / "reg005" and len(read_records(_store(other) / "shard_000.h5")) == 1


def test_each_seed_has_its_store_and_readers_ignore_the_seed_only(tmp_path):
    assert _store(_cfg(tmp_path, "seed=3")).name == "debug-smoke_seed3"
    dispatch(_cfg(tmp_path, "num=1"))
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        reader = compose("main", overrides=[*TINY, f"paths.root_dir={tmp_path}", "seed=5",
                                            "data_models_tag=debug-smoke_seed0"])
    assert len(load_data_models(reader, "all")) == 1  # another seed's metanetwork may train on seed 0's models
    with pytest.raises(DataModelStoreError, match=r"seed: stored 0, asked 5"):  # but never generate into them
        dispatch(_cfg(tmp_path, "num=2", "seed=5", "data_models_tag=debug-smoke_seed0"))


def test_a_store_that_does_not_record_its_settings_is_refused(tmp_path):
    cfg = _cfg(tmp_path, "num=1")
    old = {k: v for k, v in gen.store_header(cfg).items() if k != "settings"}
    ShardWriter(_store(cfg) / "shard_000.h5", old)
    with pytest.raises(DataModelStoreError, match="does not record the settings.*data_models_tag="):
        dispatch(cfg)
