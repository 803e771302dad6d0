import json

import pytest
import torch

from utils.checkpoint import CheckpointError, load_checkpoint
from utils.io import atomic_save, atomic_write_json, write_csv
from utils.registry import Registry, UnknownNameError


def test_registry_lists_valid_names_and_suggests():
    reg = Registry("model")
    reg.register("resnet56")(object)
    reg.register("resnet20")(object)
    with pytest.raises(UnknownNameError) as err:
        reg.get("resnet65")
    assert "Did you mean 'resnet56'" in str(err.value) and "Valid names: resnet20, resnet56" in str(err.value)
    with pytest.raises(ValueError, match="twice"):
        reg.register("resnet20")(object)


def test_atomic_save_leaves_no_partial_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_save({"w": torch.ones(3)}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_save({"w": Boom()}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(3))  # the old content survived


def test_load_checkpoint_rejects_pickled_objects_and_missing_files(tmp_path):
    torch.save({"module": torch.nn.Linear(2, 2)}, tmp_path / "module.pt")  # a pickled module executes code
    with pytest.raises(CheckpointError, match="module.pt cannot be read"):
        load_checkpoint(tmp_path / "module.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    atomic_save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint(tmp_path / "list.pt")


def test_json_and_csv(tmp_path):
    atomic_write_json({"acc": torch.tensor(0.5), "path": tmp_path}, tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text()) == {"acc": 0.5, "path": str(tmp_path)}
    write_csv([{"a": 1, "b": "x,y"}, {"a": 2, "c": 3.5}], tmp_path / "t.csv")
    assert (tmp_path / "t.csv").read_text() == 'a,b,c\n1,"x,y",\n2,,3.5\n'
