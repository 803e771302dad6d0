import pytest
import torch
import torch_pruning as tp

from nn.models import create_model, get_family
from utils.checkpoint import CheckpointError, load_model, save_model
from utils.io import atomic_save


def test_pruned_model_round_trips_through_save_model(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    pruner = tp.pruner.BasePruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=0.4, global_pruning=True,
                                  **get_family("resnet8").pruning_kwargs(model))
    pruner.step()
    save_model(tmp_path / "pruned.pt", model, metrics={"acc": 1.0})
    loaded, payload = load_model(tmp_path / "pruned.pt")
    assert payload["metrics"] == {"acc": 1.0}
    assert payload["arch"]["widths"]["stages"] != [16, 32, 64]  # it really was pruned
    assert torch.equal(loaded.eval()(x), model(x))


def test_load_model_errors_name_the_file_and_the_problem(tmp_path):
    (tmp_path / "cut.pt").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="cut.pt cannot be read"):
        load_model(tmp_path / "cut.pt")
    atomic_save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a model file of this project"):
        load_model(tmp_path / "other.pt")
    model = create_model("resnet8")
    save_model(tmp_path / "m.pt", model)
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    payload["arch"]["widths"]["stages"] = [16, 32, 48]
    payload["arch"]["widths"]["blocks"][2] = [48]
    atomic_save(payload, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="do not fit the stored architecture"):
        load_model(tmp_path / "m.pt")
