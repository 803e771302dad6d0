"""Conversion is exact, complete and differentiable for every zoo model, at full and at pruned widths."""
import pytest
import torch
import torch_pruning as tp
import torchvision

from nn.models import create_model, get_family, list_models
from utils.convert import (NODE_ATTENTION, NODE_INPUT, NODE_OUTPUT, UnsupportedLayerError, get_layout,
                           graph_to_model, graph_to_state_dict, model_to_graph, register_module_adapter)

SMALL = [n for n in list_models() if n != "vit_b_16"]


def _model(name, pruned=False):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7).eval()
    with torch.no_grad():  # non-trivial BN statistics and a non-zero ViT head
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
        for p in model.parameters():
            if (p == 0).all():
                p.normal_(0, 0.02)
    if pruned:
        x = torch.randn(1, 3, getattr(model, "image_size", 32), getattr(model, "image_size", 32))
        family = get_family(name)
        tp.pruner.BasePruner(model, x, importance=tp.importance.RandomImportance(), pruning_ratio=0.4,
                             global_pruning=not name.startswith("vit"), **family.pruning_kwargs(model)).step()
        family.after_pruning(model)
    return model


def _channel_count(model):
    """Input channels + every conv/linear output (attention: one node per q/k/v triple), minus the
    channels of downsample branches, which are summed into the main branch's channels."""
    count = 3
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and not name.endswith("downsample.0"):
            count += m.weight.shape[0]
        elif isinstance(m, torch.nn.MultiheadAttention):
            count += m.embed_dim
    return count


def _check_exact(model):
    graph = model_to_graph(model)
    state, back = model.state_dict(), graph_to_state_dict(graph)
    assert list(back) == list(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    size = getattr(model, "image_size", 32)
    x = torch.randn(2, 3, size, size)
    assert torch.equal(graph_to_model(graph).eval()(x), model(x))
    return graph


@pytest.mark.slow
@pytest.mark.parametrize("pruned", [False, True], ids=["full", "pruned"])
@pytest.mark.parametrize("name", SMALL)
def test_round_trip_is_bit_exact_and_complete(name, pruned):
    model = _model(name, pruned)
    graph = _check_exact(model)
    layout = graph.layout
    assert graph.num_nodes == _channel_count(model)
    # Every weight element appears exactly once: edge blocks tile their feature rows without overlap,
    # per-channel values occupy distinct (node, column) slots, and the counts add up.
    mapped = 0
    for t, ei in layout.edge_index.items():
        blocks = sorted((p.start, p.count) for p in layout.params if p.kind == "edges" and p.source == t)
        if t in layout.constant_edges:
            assert not blocks
            continue
        assert blocks[0][0] == 0 and sum(c for _, c in blocks) == ei.shape[1]
        assert all(s1 + c1 == s2 for (s1, c1), (s2, _) in zip(blocks, blocks[1:]))
        mapped += ei.shape[1] * layout.edge_dims[t]
    slots = torch.cat([p.nodes * len(layout.node_slots) + p.columns for p in layout.params if p.kind == "nodes"])
    assert slots.unique().numel() == slots.numel()
    mapped += slots.numel()
    state = model.state_dict()
    assert mapped == sum(state[k].numel() for k in state if k not in layout.extras)
    assert all("num_batches_tracked" in k or k in ("class_token", "encoder.pos_embedding") for k in layout.extras)
    # Node order: input channels first, classifier outputs last.
    assert (layout.node_type[:3] == NODE_INPUT).all() and (layout.node_type[-7:] == NODE_OUTPUT).all()
    assert ((layout.node_type == NODE_ATTENTION).any()) == name.startswith("vit")
    # Edges run producer -> consumer and stay inside the graph.
    for ei in layout.edge_index.values():
        assert ei.min() >= 0 and ei.max() < graph.num_nodes


@pytest.mark.slow
def test_vit_b_16_round_trip():
    torch.manual_seed(0)
    _check_exact(create_model("vit_b_16", num_classes=10).eval())


def test_layout_is_cached_per_architecture_and_widths():
    a, b = _model("resnet8"), _model("resnet8")
    assert get_layout(a) is get_layout(b)
    assert get_layout(_model("resnet8", pruned=True)) is not get_layout(a)


def test_state_dict_is_differentiable_in_the_features():
    model = _model("resnet8")
    graph = model_to_graph(model)
    graph.node_features.requires_grad_(True)
    for f in graph.edge_features.values():
        f.requires_grad_(True)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 7, (4,))
    state = graph_to_state_dict(graph)
    loss = torch.nn.functional.cross_entropy(torch.func.functional_call(model, state, (x,)), y)
    loss.backward()
    # The same loss through the network's own parameters gives the same gradients, slot by slot.
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    rows = graph.edge_features["conv3x3"].grad
    p = next(p for p in graph.layout.params if p.name == "layer1.0.conv1.weight")
    assert torch.allclose(rows[p.start: p.start + p.count].reshape(p.shape), model.layer1[0].conv1.weight.grad)
    p = next(p for p in graph.layout.params if p.name == "layer1.0.bn1.weight")
    assert torch.allclose(graph.node_features.grad[p.nodes, p.columns], model.layer1[0].bn1.weight.grad)
    assert graph.edge_features["identity"].grad is None  # shortcuts are structure, not parameters


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenet_v2", "vgg11_bn", "resnext50_32x4d", "densenet121"])
def test_other_torchvision_cnns_convert_without_new_code(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=5).eval()
    x = torch.randn(1, 3, 64, 64)
    graph = model_to_graph(model, x)
    back = graph_to_state_dict(graph)
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    assert torch.equal(graph_to_model(graph, template=model).eval()(x), model(x))


def test_unsupported_layer_names_the_module_and_the_fix():
    class Odd(torch.nn.Module):
        def forward(self, x):
            return x

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Upsample(scale_factor=2), torch.nn.Conv2d(4, 2, 1))
    with pytest.raises(UnsupportedLayerError, match=r"module '1' \(torch.nn.modules.upsampling.Upsample\).*register_module_adapter"):
        model_to_graph(model)
    shuffle = torchvision.models.shufflenet_v2_x0_5(weights=None)
    with pytest.raises(UnsupportedLayerError, match="splits the .* channels across axes"):
        model_to_graph(shuffle, torch.randn(1, 3, 64, 64))
    # Registering an adapter makes the layer convertible.
    from utils.convert import passthrough

    passthrough(torch.nn.Upsample)
    try:
        back = graph_to_state_dict(model_to_graph(model))
        assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    finally:
        from utils.convert.adapters import MODULE_ADAPTERS

        MODULE_ADAPTERS.pop(torch.nn.Upsample)
    assert register_module_adapter  # public


def test_edge_ids_of_grouped_depthwise_and_dense_layers():
    """Each edge joins the channels its weight element connects, built from per-channel blocks."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, groups=3), torch.nn.ReLU(), torch.nn.Conv2d(6, 6, 1, groups=6),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(6, 4)).eval()
    graph = model_to_graph(model)
    layout = graph.layout
    assert not layout.edge_index._built  # converting never builds the edge ids; only reading them does
    inputs = torch.nonzero(layout.node_type == NODE_INPUT).flatten()
    c0, c2, fc = (layout.module_nodes[k] for k in ("0", "2", "5"))
    # Conv "0": weight (6, 1, 3, 3), output o reads input o // 2. Conv "2": output o reads channel o.
    # Linear "5": weight (4, 6), element (o, i) is edge 6 * o + i.
    expected = {
        "conv3x3": torch.stack([inputs[torch.arange(6) // 2], c0]),
        "conv1x1": torch.stack([c0, c2]),
        "linear": torch.stack([c2.repeat(4), fc.repeat_interleave(6)]),
    }
    assert sorted(layout.edge_index) == sorted(expected)
    for t, ei in expected.items():
        assert torch.equal(layout.edge_index[t], ei), t
        assert layout.edge_count(t) == ei.shape[1]
    assert layout.num_edges == 6 + 6 + 24
    assert layout.edge_index["linear"] is layout.edge_index["linear"]  # built once, then kept
