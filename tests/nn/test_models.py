"""Tests of the model zoo (nn.models), parametrised over the whole registry.

Every model builds, runs forward/backward and respects num_classes; its description is JSON and rebuilds
the same architecture; after Torch-Pruning changes its widths in place, the description rebuilds an
empty model that loads the pruned state dict strictly and gives the same logits.
"""
from __future__ import annotations

import io
import json
from typing import Any, Dict

import pytest
import torch
import torch.nn as tnn
import torch_pruning as tp

from nn.models import create_model, describe_model, family_of, get_family, get_widths, list_models, widths_from_state
from utils.pruning.macs import MacCounter
from utils.registry import UnknownNameError

BIG = {"vit_b_16"}  # built once, in its own test
SMALL = [n for n in list_models() if n not in BIG]
CNNS = [n for n in SMALL if not n.startswith("vit")]


def example_input(name: str, batch: int = 2) -> torch.Tensor:
    """(B, 3, 32, 32) for every small model; torchvision ResNets need B >= 2 (1x1 maps in train-mode BN)."""
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def rebuild(desc: Dict[str, Any]) -> tnn.Module:
    return create_model(desc["name"], num_classes=desc["num_classes"], widths=desc["widths"], **desc["kwargs"])


def shapes(model: tnn.Module) -> Dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def leaves(widths: Any) -> list:
    if isinstance(widths, dict):
        return [x for v in widths.values() for x in leaves(v)]
    if isinstance(widths, list):
        return [x for v in widths for x in leaves(v)]
    return [widths]


def halve(widths: Any) -> Any:
    if isinstance(widths, dict):
        return {k: halve(v) for k, v in widths.items()}
    if isinstance(widths, list):
        return [halve(v) for v in widths]
    return max(1, widths // 2)


def irregular(name: str) -> Dict[str, Any]:
    """Default widths halved minus 0, 1 or 2 by position, so that a mixed-up index changes a shape;
    coupled entries are then made to agree again."""
    counter = iter(range(10_000))

    def shrink(w: Any) -> Any:
        if isinstance(w, dict):
            return {k: shrink(v) for k, v in w.items()}
        if isinstance(w, list):
            return [shrink(v) for v in w]
        return max(1, w // 2 - next(counter) % 3)

    widths = shrink(get_family(name).default_widths())
    if name.startswith("vit"):
        widths["hidden_dim"] = 12  # a multiple of the 4 heads
    elif "stem" in widths and name != "resnet50":  # identity shortcut from the stem
        widths["stem"] = widths["stages"][0]
    return widths


@torch.no_grad()
def randomise(model: tnn.Module, seed: int = 0) -> None:
    """Perturb every parameter and BN statistic, so that logits are non-trivial in eval mode
    (ViT's head starts at zero) and magnitude importance has no ties."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(0.1 * torch.randn(p.shape, generator=g))
    for m in model.modules():
        if isinstance(m, tnn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))


def prune(model: tnn.Module, example: torch.Tensor, ratio: float = 0.3, global_pruning: bool = False) -> None:
    family = family_of(model)
    pruner = tp.pruner.BasePruner(
        model,
        example,
        importance=tp.importance.MagnitudeImportance(),
        pruning_ratio=ratio,
        global_pruning=global_pruning,
        **family.pruning_kwargs(model),
    )
    pruner.step()
    family.after_pruning(model)


# --------------------------------------------------------------------------- build, forward, backward


def test_registry_lists_every_family() -> None:
    expected = {"resnet8", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
                "vgg19_bn", "resnet18", "resnet50", "vit_b_16", "vit_tiny"}
    assert set(list_models()) == expected
    assert list_models() == sorted(expected)


@pytest.mark.slow
@pytest.mark.parametrize("num_classes", [7, 13])
@pytest.mark.parametrize("name", SMALL)
def test_forward_backward(name: str, num_classes: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=num_classes)
    out = model(example_input(name))
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
    assert get_widths(model) == get_family(name).default_widths()
    assert describe_model(model)["num_classes"] == num_classes


@pytest.mark.slow
def test_vit_b_16_builds_and_runs_at_224() -> None:
    model = create_model("vit_b_16", num_classes=7).eval()
    widths = get_widths(model)
    assert widths == {"hidden_dim": 768, "mlp_dims": [3072] * 12}
    assert sum(p.numel() for p in model.parameters()) == 85_804_039  # ViT-B/16 with a 7-way head
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 7)
    desc = json.loads(json.dumps(describe_model(model)))
    assert desc == {"name": "vit_b_16", "num_classes": 7, "kwargs": {}, "widths": widths}


@pytest.mark.parametrize(
    "name, widths",
    [
        ("resnet20", {"stem": 16, "stages": [16, 32, 64], "blocks": [[16] * 3, [32] * 3, [64] * 3]}),
        ("vgg19_bn", {"convs": [64, 64, 128, 128] + [256] * 4 + [512] * 8}),
        ("resnet18", {"stem": 64, "stages": [64, 128, 256, 512],
                      "blocks": [[[64]] * 2, [[128]] * 2, [[256]] * 2, [[512]] * 2]}),
        ("resnet50", {"stem": 64, "stages": [256, 512, 1024, 2048],
                      "blocks": [[[64, 64]] * 3, [[128, 128]] * 4, [[256, 256]] * 6, [[512, 512]] * 3]}),
        ("vit_tiny", {"hidden_dim": 32, "mlp_dims": [64, 64]}),
    ],
)
def test_default_widths(name: str, widths: Dict[str, Any]) -> None:
    assert get_widths(create_model(name)) == widths


# --------------------------------------------------------------------------- describe and rebuild


@pytest.mark.slow
@pytest.mark.parametrize("name", SMALL)
def test_describe_roundtrip_at_default_widths(name: str) -> None:
    model = create_model(name, num_classes=13)
    desc = json.loads(json.dumps(describe_model(model)))
    assert desc["name"] == name and desc["num_classes"] == 13
    clone = rebuild(desc)
    assert shapes(clone) == shapes(model)
    assert list(clone.state_dict()) == list(model.state_dict())
    clone.load_state_dict(model.state_dict(), strict=True)


def test_describe_keeps_kwargs() -> None:
    model = create_model("vit_tiny", num_classes=5, image_size=48, num_layers=3, num_heads=2, mlp_dim=40)
    desc = json.loads(json.dumps(describe_model(model)))
    assert desc["kwargs"] == {"image_size": 48, "num_layers": 3, "num_heads": 2, "mlp_dim": 40}
    assert desc["widths"] == {"hidden_dim": 32, "mlp_dims": [40, 40, 40]}
    clone = rebuild(desc)
    assert shapes(clone) == shapes(model)
    assert clone(torch.randn(2, 3, 48, 48)).shape == (2, 5)


@pytest.mark.slow
@pytest.mark.parametrize("name", SMALL)
def test_reload_after_pruning(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=7)
    randomise(model)
    example = example_input(name)
    default = get_widths(model)
    n_params = sum(p.numel() for p in model.parameters())
    # Global ranking gives every CNN layer its own width, so a mixed-up index in widths would show.
    # (On vit_tiny it happens to keep the whole token width; local pruning makes it shrink 32 -> 20.)
    is_vit = name.startswith("vit")
    prune(model, example, global_pruning=not is_vit)

    widths = get_widths(model)
    assert widths != default
    assert all(w <= d for w, d in zip(leaves(widths), leaves(default)))
    if is_vit:
        assert widths["hidden_dim"] == 20 and model.hidden_dim == 20
    else:
        assert len(set(leaves(widths))) > len(set(leaves(default)))
    assert sum(p.numel() for p in model.parameters()) < 0.8 * n_params
    desc = json.loads(json.dumps(describe_model(model)))
    assert desc["num_classes"] == 7  # the classifier kept its outputs
    assert desc["widths"] == widths

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    clone = rebuild(desc)
    clone.load_state_dict(torch.load(buffer), strict=True)
    model.eval(), clone.eval()
    with torch.no_grad():
        expected, got = model(example), clone(example)
    assert expected.shape == (2, 7)
    assert expected.abs().max() > 1e-3  # not a trivially zero output
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_vit_pruning_keeps_heads_aligned() -> None:
    """Every head must lose the same head-dim indices, otherwise heads mix after reshaping."""
    model = create_model("vit_tiny")
    randomise(model)
    with torch.no_grad():  # tag each hidden channel with its original index
        model.conv_proj.bias.copy_(torch.arange(32, dtype=torch.float))
    prune(model, example_input("vit_tiny"))
    kept = model.conv_proj.bias.round().long()
    heads = 4
    assert model.hidden_dim == len(kept) == 20  # 32 -> 8 per head -> int(8 * 0.7) = 5 per head
    per_head = kept.view(heads, -1) - 8 * torch.arange(heads)[:, None]
    assert (per_head == per_head[0]).all()
    for mha in model.modules():
        if isinstance(mha, tnn.MultiheadAttention):
            assert (mha.embed_dim, mha.head_dim, mha.kdim, mha.vdim) == (20, 5, 20, 20)


@pytest.mark.slow
@pytest.mark.parametrize("shrink", ["halve", "irregular"])
@pytest.mark.parametrize("name", SMALL)
def test_hand_set_widths(name: str, shrink: str) -> None:
    default = get_family(name).default_widths()
    asked = halve(default) if shrink == "halve" else irregular(name)
    assert asked != default
    model = create_model(name, num_classes=13, widths=asked)
    assert get_widths(model) == asked
    out = model(example_input(name))
    assert out.shape == (2, 13)
    out.sum().backward()
    full = create_model(name, num_classes=13)
    assert sum(p.numel() for p in model.parameters()) < 0.5 * sum(p.numel() for p in full.parameters())


def test_resnet50_stem_is_free_and_tuples_are_accepted() -> None:
    widths = get_family("resnet50").default_widths()
    widths["stem"] = 24
    widths["stages"] = tuple(widths["stages"])
    model = create_model("resnet50", widths=widths)
    assert get_widths(model)["stem"] == 24
    assert model.conv1.weight.shape == (24, 3, 7, 7)
    assert model.layer1[0].downsample[0].weight.shape == (256, 24, 1, 1)
    assert json.loads(json.dumps(describe_model(model)))["widths"]["stages"] == [256, 512, 1024, 2048]


# --------------------------------------------------------------------------- errors


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(UnknownNameError) as info:
        create_model("resnet65")
    message = str(info.value)
    for valid in ("resnet20", "resnet56", "vgg19_bn", "vit_tiny", "resnet50"):
        assert valid in message
    assert isinstance(info.value, KeyError)


def _resnet20(**changes: Any) -> Dict[str, Any]:
    widths = get_family("resnet20").default_widths()
    widths.update(changes)
    return widths


BAD_WIDTHS = [
    ("resnet20", {"stem": 16, "stages": [16, 32, 64]}, r"missing \['blocks'\]"),
    ("resnet20", _resnet20(extra=3), r"unexpected \['extra'\]"),
    ("resnet20", _resnet20(blocks=[[16] * 3, [32] * 2, [64] * 3]),
     r"widths\['blocks'\]\[1\] has 2 entries but the architecture needs 3"),
    ("resnet20", _resnet20(stages=[16, 0, 64]), r"widths\['stages'\]\[1\] must be a positive int \(default 32\), got 0"),
    ("resnet20", _resnet20(stages=[16, 32.0, 64]), r"widths\['stages'\]\[1\] must be a positive int"),
    ("resnet20", _resnet20(stem=8), r"widths\['stem'\] \(8\) must equal widths\['stages'\]\[0\] \(16\)"),
    ("resnet18", {"stem": 32, "stages": [64, 128, 256, 512], "blocks": [[[64]] * 2, [[128]] * 2, [[256]] * 2, [[512]] * 2]},
     r"must equal widths\['stages'\]\[0\]"),
    ("resnet50", {"stem": 64, "stages": [256, 512, 1024, 2048],
                  "blocks": [[[64]] * 3, [[128, 128]] * 4, [[256, 256]] * 6, [[512, 512]] * 3]},
     r"widths\['blocks'\]\[0\]\[0\] has 1 entries but the architecture needs 2"),
    ("vgg19_bn", {"convs": [64] * 15}, r"widths\['convs'\] has 15 entries but the architecture needs 16"),
    ("vit_tiny", {"hidden_dim": 30, "mlp_dims": [64, 64]}, r"\(30\) must be divisible by num_heads \(4\)"),
    ("vit_tiny", [32, 64], r"widths must be a dict with keys \['hidden_dim', 'mlp_dims'\]"),
]


@pytest.mark.parametrize("name, widths, message", BAD_WIDTHS)
def test_bad_widths_raise_helpful_value_error(name: str, widths: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_model(name, widths=widths)


def test_bad_num_classes_and_kwargs() -> None:
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        create_model("resnet8", num_classes=0)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['patch_size'\].*image_size"):
        create_model("vit_b_16", patch_size=8)
    with pytest.raises(TypeError, match="allowed: none"):
        create_model("resnet8", image_size=32)


def test_describe_needs_a_zoo_model() -> None:
    with pytest.raises(ValueError, match="not built by nn.models.create_model"):
        describe_model(tnn.Linear(2, 3))


@pytest.mark.slow
@pytest.mark.parametrize("name", CNNS)
def test_widths_from_state_reads_pruned_widths_off_a_bare_state_dict(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=7)
    prune(model, example_input(name), global_pruning=True)
    assert widths_from_state(name, model.state_dict(), num_classes=7) == get_widths(model)
    state = model.state_dict()
    first_conv = next(k for k, v in state.items() if v.dim() == 4)
    del state[first_conv]
    with pytest.raises(KeyError, match=first_conv):
        widths_from_state(name, state, num_classes=7)


@pytest.mark.slow
def test_vgg_max_pools_keeps_late_blocks_at_a_larger_map() -> None:
    x = torch.randn(2, 3, 32, 32)
    five, three = create_model("vgg19_bn"), create_model("vgg19_bn", max_pools=3)
    three.load_state_dict(five.state_dict())  # the same parameters: pooling holds none
    assert sum(isinstance(m, tnn.MaxPool2d) for m in three.modules()) == 3
    assert three(x).shape == five(x).shape == (2, 10)
    # Blocks 4 and 5 run at 4x4 instead of 2x2 and 1x1: 513 M MACs against 399 M.
    assert MacCounter(three, x[:1])() > 1.25 * MacCounter(five, x[:1])()
    with pytest.raises(ValueError, match="max_pools must be an int from 0 to 5"):
        create_model("vgg19_bn", max_pools=6)
