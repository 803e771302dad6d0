"""Permuting the channels of a Torch-Pruning group (a function-preserving change of the network) permutes
the corresponding graph nodes and nothing else."""
import pytest
import torch
import torch_pruning as tp

from nn.models import create_model
from utils.convert import model_to_graph

PARAMS_BY_DIRECTION = {True: ("weight", "bias", "running_mean", "running_var"), False: ("weight",)}


def permute_group(model, dg, group, perm):
    """Apply root-channel permutation ``perm`` (new channel j = old channel perm[j]) to every layer of the
    group, in each layer's own channel coordinates. Returns {module name: that module's channel order}."""
    done, out_positions = set(), {}
    names = {m: n for n, m in model.named_modules()}
    for dep, idxs in group.items:
        module = dep.target.module
        is_out = dg.is_out_channel_pruning_fn(dep.handler)
        if not isinstance(module, torch.nn.Module) or (id(module), is_out) in done or module not in names:
            continue
        done.add((id(module), is_out))
        pos = torch.tensor([int(i) for i in idxs])
        for pname in PARAMS_BY_DIRECTION[is_out]:
            t = getattr(module, pname, None)
            if t is None:
                continue
            dim = 0 if is_out else 1
            with torch.no_grad():
                src = t.index_select(dim, pos[perm])
                t.index_copy_(dim, pos, src)
        if is_out:
            out_positions[names[module]] = pos
    return out_positions


def _node_permutation(graph, out_positions, perm):
    """sigma[v] = where old node v sits after the permutation."""
    sigma = torch.arange(graph.num_nodes)
    for name, pos in out_positions.items():
        if name in graph.layout.module_nodes:
            nodes = graph.layout.module_nodes[name][pos]
            sigma[nodes[perm]] = nodes
    return sigma


def _check(model, root, x):
    unwrapped = [(getattr(model, "class_token"), 2), (model.encoder.pos_embedding, 2)] if hasattr(model, "class_token") else None
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x, unwrapped_parameters=unwrapped)
    channels = root.weight.shape[0]
    group = dg.get_pruning_group(root, tp.prune_conv_out_channels if isinstance(root, torch.nn.Conv2d)
                                 else tp.prune_linear_out_channels, idxs=list(range(channels)))
    before = model_to_graph(model)
    logits = model(x)
    perm = torch.randperm(channels, generator=torch.Generator().manual_seed(1))
    out_positions = permute_group(model, dg, group, perm)
    assert torch.allclose(model(x), logits, atol=1e-5)  # the change is function-preserving
    after = model_to_graph(model)
    assert after.layout is before.layout
    sigma = _node_permutation(before, out_positions, perm)
    moved = (sigma != torch.arange(before.num_nodes)).sum().item()
    group_nodes = torch.cat([before.layout.module_nodes[n] for n in out_positions if n in before.layout.module_nodes])
    assert moved > 0.8 * group_nodes.unique().numel()  # summed branches share nodes: count them once
    # Node features move with their nodes, and nothing else changes.
    assert torch.equal(after.node_features[sigma], before.node_features)
    # Every edge keeps its features, with both end points relabelled by sigma.
    n = before.num_nodes
    for t, ei in before.edge_index.items():
        key_after = ei[0] * n + ei[1]
        order = torch.argsort(key_after)
        moved_keys = sigma[ei[0]] * n + sigma[ei[1]]
        where = order[torch.searchsorted(key_after[order], moved_keys)]
        assert torch.equal(key_after[where], moved_keys), t
        assert torch.equal(after.edge_features[t][where], before.edge_features[t]), t
    assert all(torch.equal(after.extras[k], v) for k, v in before.extras.items())
    return moved


@pytest.mark.parametrize("name,root", [
    ("resnet20", "layer2.1.conv1"),         # a block's hidden channels
    ("resnet20", "conv1"),                  # the whole stage-1 residual stream: stem, sums, identity edges
    ("resnet20", "layer3.0.conv2"),         # a stage with a merged downsample branch
    ("vgg19_bn", "features.40"),            # the last conv, feeding the classifier
    ("resnet18", "layer2.0.downsample.0"),  # torchvision ResNet residual stream
    ("vit_tiny", "encoder.layers.encoder_layer_0.mlp.0"),  # a ViT MLP's hidden channels
])
@pytest.mark.slow
def test_group_permutation_permutes_nodes_and_nothing_else(name, root):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.weight.normal_(1, 0.1)
    x = torch.randn(2, 3, 32, 32)
    _check(model, model.get_submodule(root), x)
