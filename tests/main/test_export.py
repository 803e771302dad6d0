"""ONNX export: onnxruntime reproduces PyTorch's logits for pruned CNNs, an N:M network and a ViT."""
import pytest
import torch
import torch_pruning as tp

from main.export import ExportMismatchError, export_checked, require_export_extra
from nn.models import create_model, get_family
from utils.config_schema import ConfigError
from utils.pruning.unstructured import nm_prune

ort = pytest.importorskip("onnxruntime", reason="the export extra is not installed")


def _pruned(name, size=32):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    family = get_family(name)
    tp.pruner.BasePruner(model, torch.randn(1, 3, size, size), importance=tp.importance.MagnitudeImportance(p=2),
                         pruning_ratio=0.4, global_pruning=not name.startswith("vit"),
                         **family.pruning_kwargs(model)).step()
    family.after_pruning(model)
    return model


def _nm_2_4():
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10).eval()
    with torch.no_grad():
        nm_prune(model, 2, 4)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("build", [lambda: _pruned("resnet20"), lambda: _pruned("vgg19_bn"), _nm_2_4,
                                   lambda: _pruned("vit_tiny")], ids=["pruned_resnet", "pruned_vgg", "nm_2_4", "vit"])
def test_onnxruntime_matches_pytorch(build, tmp_path):
    model = build()
    torch.manual_seed(1)
    inputs = torch.randn(16, 3, 32, 32)
    result = export_checked(model, inputs, tmp_path / "model.onnx", repeats=2)
    assert result["max_abs_diff"] <= 1e-4 and result["onnxruntime_ms"] > 0 and result["pytorch_ms"] > 0
    # The batch dimension is dynamic: another batch size runs and agrees too.
    session = ort.InferenceSession(result["path"], providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 32, 32)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        assert torch.allclose(got, model(x), atol=1e-4, rtol=0)


class _Shifted(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) + 1e-3


@pytest.mark.slow
def test_a_wrong_export_is_caught(tmp_path, monkeypatch):
    """The exported file computes logits + 1e-3: the check against PyTorch must refuse it."""
    import main.export

    real_export = main.export.export_onnx
    monkeypatch.setattr(main.export, "export_onnx", lambda m, x, p: real_export(_Shifted(m), x, p))
    with pytest.raises(ExportMismatchError, match="differ from PyTorch's by 0.001"):
        export_checked(_nm_2_4(), torch.randn(4, 3, 32, 32), tmp_path / "model.onnx", repeats=1)


def test_missing_extra_says_what_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("no onnxruntime", name="onnxruntime")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    with pytest.raises(ConfigError, match=r"onnxruntime is missing.*\.\[export\]"):
        require_export_extra()
