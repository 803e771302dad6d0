"""The published method's data-model layout, and its mapping onto the zoo networks.

The published code saves data models as a Hugging Face ``datasets`` folder (``save_to_disk``), one row per
data model: one column per state-dict key of its own ResNet/VGG classes, holding nested lists, plus
:data:`METRIC_COLUMNS`. Several such folders are merged with ``concatenate_datasets``.

Its CIFAR ResNets use the zoo's state-dict keys (``conv1``, ``layer1.0.bn1``, ``layer2.0.downsample.0``,
``fc``) and compute the same function on 32x32 inputs. Its VGG-19 stores each block as a ``Sequential``
(``block<b>.<3k>`` is the k-th conv of block b, ``block<b>.<3k+1>`` its BN) where the zoo has one
``features`` list; it pools after the first three blocks on 32x32 inputs, which is the zoo's
``vgg19_bn`` with ``max_pools=3``. :class:`PublishedLayout` renames keys both ways; the widths of a pruned
row are read off its tensor shapes (:func:`nn.models.widths_from_state`), so a row of any pruned widths
rebuilds the zoo network that holds exactly its tensors.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Tuple

import numpy as np
import torch
import torch.nn as tnn

from data_loaders.data_models import DataModelStoreError
from nn.models import create_model, get_family, widths_from_state
from nn.models.cifar_resnet import CifarResNetFamily
from nn.models.vgg import VGGFamily

#: The non-tensor columns of a published row, in the published code's order.
METRIC_COLUMNS = ("train_acc", "train_loss", "val_acc", "val_loss", "current_speed_up")


class PublishedRowError(DataModelStoreError):
    """A published row does not fit the task's architecture; the message names the key and shapes."""


class PublishedLayout:
    """Key renaming between one zoo architecture and the published code's class for it.

    Args:
        prefixes: zoo module prefix -> published module prefix, for the modules that are named
            differently (empty when the keys are the same).
        required_kwargs: model kwargs the zoo network needs to compute the published function.
    """

    def __init__(self, prefixes: Mapping[str, str], required_kwargs: Mapping[str, Any]) -> None:
        self.to_published_prefix = dict(prefixes)
        self.to_zoo_prefix = {v: k for k, v in prefixes.items()}
        self.required_kwargs = dict(required_kwargs)

    @staticmethod
    def _rename(key: str, table: Mapping[str, str]) -> str:
        prefix, _, leaf = key.rpartition(".")
        return f"{table.get(prefix, prefix)}.{leaf}" if prefix else key

    def to_zoo(self, key: str) -> str:
        return self._rename(key, self.to_zoo_prefix)

    def to_published(self, key: str) -> str:
        return self._rename(key, self.to_published_prefix)


def _resnet_layout(family: CifarResNetFamily, image_size: int) -> PublishedLayout:
    return PublishedLayout({}, {})  # same keys; the published 8x8 average pool is the zoo's global one at 32x32


def _vgg_layout(family: VGGFamily, image_size: int) -> PublishedLayout:
    # The published forward pools after blocks 0-2, after block 3 only on 64x64 inputs.
    required = {"max_pools": 4 if image_size == 64 else 3}
    with torch.device("meta"):
        template = create_model("vgg19_bn", num_classes=10, **required)
    zoo = [name for name, m in template.named_modules() if isinstance(m, (tnn.Conv2d, tnn.BatchNorm2d))]
    published: List[str] = []
    blocks, current = [], 0
    for item in family.config:  # block b holds the convs between the (b-1)-th and b-th pool of the plan
        if item == "M":
            blocks.append(current)
            current = 0
        else:
            current += 1
    for b, convs in enumerate(blocks):
        for k in range(convs):  # Sequential(conv, BN, ReLU, conv, BN, ...): the last ReLU is dropped
            published += [f"block{b}.{3 * k}", f"block{b}.{3 * k + 1}"]
    if len(published) != len(zoo):
        raise AssertionError(f"VGG plan gives {len(published)} published layers for {len(zoo)} zoo layers")
    return PublishedLayout(dict(zip(zoo, published)), required)


_LAYOUTS: Dict[type, Callable[[Any, int], PublishedLayout]] = {
    CifarResNetFamily: _resnet_layout,
    VGGFamily: _vgg_layout,
}


def layout_for(model_name: str, image_size: int) -> PublishedLayout:
    """The published layout of zoo model ``model_name`` on ``image_size`` inputs."""
    family = get_family(model_name)
    make = _LAYOUTS.get(type(family))
    if make is None:
        raise DataModelStoreError(f"the published code stores no data models of {model_name!r} in a layout this "
                                  "project reads; published data models exist for the CIFAR ResNets (resnet20, "
                                  "resnet56, resnet110, ...) and vgg19_bn")
    return make(family, image_size)


def row_arrays(row) -> Dict[str, np.ndarray]:
    """The columns of a one-row ``pyarrow.Table`` as numpy arrays of their stored dtype and shape.

    Nested list columns are flattened level by level in Arrow (no Python objects per value, which makes a
    ResNet-56 row ~1000x faster to read than ``datasets``' numpy formatter); each level must be regular.
    """
    import pyarrow as pa

    out: Dict[str, np.ndarray] = {}
    for name in row.column_names:
        values = row.column(name).combine_chunks()
        shape: List[int] = []
        while pa.types.is_list(values.type) or pa.types.is_large_list(values.type) or \
                pa.types.is_fixed_size_list(values.type):
            lengths = values.value_lengths().to_numpy(zero_copy_only=False)
            if lengths.size and (lengths != lengths[0]).any():
                raise PublishedRowError(f"column {name!r} holds lists of different lengths ({sorted(set(lengths))}) "
                                        "at one level: not a tensor")
            shape.append(int(lengths[0]) if lengths.size else 0)
            values = values.flatten()
        out[name] = values.to_numpy(zero_copy_only=False).reshape(shape)
    return out


def split_row(row: Mapping[str, np.ndarray]) -> Tuple[Dict[str, torch.Tensor], Dict[str, float]]:
    """A published row (:func:`row_arrays`) as (state dict in published keys, metrics)."""
    missing = [c for c in METRIC_COLUMNS if c not in row]
    if missing:
        raise PublishedRowError(f"the row has no column {missing[0]!r}: not a data model of the published code "
                                f"(its rows hold {', '.join(METRIC_COLUMNS)} next to the state-dict keys)")
    metrics = {c: float(row[c]) for c in METRIC_COLUMNS}
    state = {k: torch.from_numpy(np.array(v)) for k, v in row.items() if k not in METRIC_COLUMNS}
    return state, metrics


def rebuild(model_name: str, num_classes: int, model_kwargs: Mapping[str, Any], layout: PublishedLayout,
            published_state: Mapping[str, torch.Tensor]) -> tnn.Module:
    """The zoo network holding exactly the tensors of one published row.

    Raises :class:`PublishedRowError` naming the first key that is missing, unexpected, or of another shape
    than the network at the widths read from the row needs.
    """
    state = {layout.to_zoo(k): v for k, v in published_state.items()}
    kwargs = dict(model_kwargs)
    try:
        widths = widths_from_state(model_name, state, num_classes, **kwargs)
    except KeyError as err:
        raise PublishedRowError(f"the row does not fit {model_name}: it has no {layout.to_published(err.args[0])!r}, "
                                f"which {model_name} needs") from None
    try:
        model = create_model(model_name, num_classes=num_classes, widths=widths, **kwargs)
    except ValueError as err:  # a weight of the wrong rank, or widths that the architecture ties together disagree
        raise PublishedRowError(f"the row does not fit {model_name}: {err}") from None
    expected = model.state_dict()
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise PublishedRowError(f"the row has {layout.to_published(unexpected[0])!r} (shape "
                                f"{list(state[unexpected[0]].shape)}), which {model_name} does not have")
    for key, tensor in expected.items():
        if key not in state:
            raise PublishedRowError(f"the row has no {layout.to_published(key)!r}, which {model_name} needs "
                                    f"(shape {list(tensor.shape)} at the widths read from the row)")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise PublishedRowError(f"{layout.to_published(key)!r} has shape {list(state[key].shape)} in the row; "
                                    f"{model_name} at the widths read from the row needs {list(tensor.shape)}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    return model.eval()


def to_published_row(layout: PublishedLayout, state: Mapping[str, torch.Tensor],
                     metrics: Mapping[str, float]) -> Dict[str, Any]:
    """One row of the published layout: numpy arrays under published keys, then the metric columns."""
    row: Dict[str, Any] = {layout.to_published(k): v.item() if v.dim() == 0 else v.detach().cpu().numpy()
                           for k, v in state.items()}  # 0-d (num_batches_tracked) as a scalar column, as published
    row.update({c: float(metrics[c]) for c in METRIC_COLUMNS})
    return row
