"""The model zoo: build a target network by name, read its widths, describe it, rebuild it.

A *family* (:class:`ModelFamily`) knows one architecture: its default widths, how to build it at any
widths, how to read the current widths back off the modules, and which layer is the classifier. The
registry maps model names to zero-argument factories returning a family::

    @register_model("resnet20")
    def resnet20() -> ModelFamily:
        return CifarResNetFamily(depth=20)

Widths are plain JSON (dicts, lists, ints). Because :func:`get_widths` reads them off the module shapes,
it also works after Torch-Pruning has resized modules in place, and :func:`describe_model` of a pruned
network is enough to rebuild an empty network that accepts its state dict with ``strict=True``::

    desc = describe_model(pruned)                  # JSON-serialisable
    fresh = create_model(desc["name"], num_classes=desc["num_classes"],
                         widths=desc["widths"], **desc["kwargs"])
    fresh.load_state_dict(pruned.state_dict())      # strict
"""
from __future__ import annotations

import abc
import copy
import numbers
from typing import Any, Callable, Dict, List, Mapping, Sequence

import torch
import torch.nn as tnn

from utils.architecture import ARCH_ATTR, register_zoo
from utils.registry import Registry

Widths = Dict[str, Any]


class ModelFamily(abc.ABC):
    """One architecture family: build at given widths, read widths back, find the classifier.

    Subclasses implement :meth:`default_widths`, :meth:`build`, :meth:`read_widths` and
    :meth:`classifier`; they may add coupling rules in :meth:`check_coupling` (e.g. "an identity
    shortcut forces two widths to agree") and pruning hints in :meth:`pruning_kwargs`.
    """

    #: Keyword arguments (besides ``num_classes`` and ``widths``) that :meth:`build` accepts.
    allowed_kwargs: frozenset = frozenset()

    @abc.abstractmethod
    def default_widths(self, **kwargs: Any) -> Widths:
        """Widths of the unpruned architecture, computed without building it."""

    @abc.abstractmethod
    def build(self, num_classes: int, widths: Widths, **kwargs: Any) -> tnn.Module:
        """Build a freshly initialised model; ``widths`` has been validated already."""

    @abc.abstractmethod
    def read_widths(self, model: tnn.Module) -> Widths:
        """Current widths, read off the module shapes (works after in-place pruning)."""

    @abc.abstractmethod
    def classifier(self, model: tnn.Module) -> tnn.Linear:
        """The final ``Linear`` layer; its ``out_features`` is the number of classes."""

    def check_coupling(self, widths: Widths, **kwargs: Any) -> None:
        """Raise ``ValueError`` if widths that the architecture ties together disagree."""

    def pruning_kwargs(self, model: tnn.Module) -> Dict[str, Any]:
        """Extra arguments for a Torch-Pruning pruner so that the result stays describable.

        The classifier keeps its outputs (one per class), hence it is always ignored.
        """
        return {"ignored_layers": [self.classifier(model)]}

    def after_pruning(self, model: tnn.Module) -> None:
        """Fix plain attributes that Torch-Pruning does not know about (e.g. ``hidden_dim``)."""

    def check_kwargs(self, name: str, kwargs: Mapping[str, Any]) -> None:
        """Raise ``TypeError`` naming the allowed options if ``kwargs`` has any other key."""
        unknown = sorted(set(kwargs) - set(self.allowed_kwargs))
        if unknown:
            allowed = ", ".join(sorted(self.allowed_kwargs)) or "none"
            raise TypeError(f"model {name!r} got unexpected keyword arguments {unknown}; allowed: {allowed}")


MODELS: Registry[Callable[[], ModelFamily]] = Registry("model")


def register_model(name: str) -> Callable[[Callable[[], ModelFamily]], Callable[[], ModelFamily]]:
    """Decorator registering a zero-argument factory (or class) that returns a :class:`ModelFamily`."""
    return MODELS.register(name)


def list_models() -> List[str]:
    """Sorted names of all registered models."""
    return MODELS.names()


def get_family(name: str) -> ModelFamily:
    """The family of a registered model; unknown names raise ``UnknownNameError`` listing valid ones."""
    return MODELS.get(name)()


def check_widths(widths: Any, expected: Any, path: str = "widths") -> Any:
    """Check that ``widths`` has the structure of ``expected`` and return a normalised copy.

    Dicts must have the same keys, sequences the same length, leaves must be positive ints. Tuples
    become lists so the result is plain JSON. Errors name the offending entry, e.g.
    ``widths['blocks'][1]``, and say what was expected.
    """
    if isinstance(expected, Mapping):
        if not isinstance(widths, Mapping):
            raise ValueError(f"{path} must be a dict with keys {sorted(expected)}, got {widths!r}")
        missing, extra = sorted(set(expected) - set(widths)), sorted(set(widths) - set(expected))
        if missing or extra:
            raise ValueError(
                f"{path} has wrong keys: missing {missing}, unexpected {extra}; expected keys "
                f"{sorted(expected)} (default {expected!r})"
            )
        return {k: check_widths(widths[k], expected[k], f"{path}[{k!r}]") for k in expected}
    if isinstance(expected, (list, tuple)):
        if not isinstance(widths, Sequence) or isinstance(widths, str):
            raise ValueError(f"{path} must be a list of {len(expected)} entries, got {widths!r}")
        if len(widths) != len(expected):
            raise ValueError(
                f"{path} has {len(widths)} entries but the architecture needs {len(expected)} "
                f"(default {list(expected)!r})"
            )
        return [check_widths(w, e, f"{path}[{i}]") for i, (w, e) in enumerate(zip(widths, expected))]
    # A leaf: a channel count. bool is an int subclass but never a width.
    if isinstance(widths, bool) or not isinstance(widths, numbers.Integral) or widths <= 0:
        raise ValueError(f"{path} must be a positive int (default {expected}), got {widths!r}")
    return int(widths)


def create_model(name: str, num_classes: int = 10, widths: Widths | None = None, **kwargs: Any) -> tnn.Module:
    """Build a registered model, at default widths or at the given ``widths``.

    Args:
        name: a name from :func:`list_models`.
        num_classes: outputs of the classifier; the model maps (B, 3, H, W) images to (B, num_classes).
        widths: family-specific channel counts (see each family's docstring); None for the defaults.
        **kwargs: family-specific options (e.g. ``image_size`` for ViTs); recorded for rebuilding.
    """
    family = get_family(name)
    family.check_kwargs(name, kwargs)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    default = family.default_widths(**kwargs)
    widths = copy.deepcopy(default) if widths is None else check_widths(widths, default)
    family.check_coupling(widths, **kwargs)
    model = family.build(num_classes, widths, **kwargs)
    setattr(model, ARCH_ATTR, {"name": name, "num_classes": num_classes, "kwargs": dict(kwargs)})
    return model


def _arch(model: tnn.Module) -> Dict[str, Any]:
    arch = getattr(model, ARCH_ATTR, None)
    if arch is None:
        raise ValueError(
            f"{type(model).__name__} was not built by nn.models.create_model (no {ARCH_ATTR!r} attribute), "
            "so its family is unknown"
        )
    return arch


def family_of(model: tnn.Module) -> ModelFamily:
    """The family of a model built by :func:`create_model`."""
    return get_family(_arch(model)["name"])


def get_widths(model: tnn.Module) -> Widths:
    """Current widths of a model built by :func:`create_model`, read off its module shapes."""
    return family_of(model).read_widths(model)


def widths_from_state(name: str, state: Mapping[str, torch.Tensor], num_classes: int = 10,
                      **kwargs: Any) -> Widths:
    """Widths of the network whose state dict is ``state``, read off its tensor shapes.

    A network of ``name`` is built on the meta device (no memory), every conv, linear and norm layer is
    given the sizes of its weight in ``state``, and the family's :meth:`ModelFamily.read_widths` reads them
    back, so no family needs a second reader. Raises ``KeyError`` with the first layer weight that ``state``
    lacks and ``ValueError`` for a weight of the wrong rank; whether the rest of ``state`` fits is for
    ``load_state_dict`` to check.
    """
    with torch.device("meta"):
        template = create_model(name, num_classes=num_classes, **kwargs)
    for prefix, module in template.named_modules():
        key = f"{prefix}.weight"
        if not isinstance(module, (tnn.Conv2d, tnn.Linear, tnn.BatchNorm2d, tnn.LayerNorm)):
            continue
        if key not in state:
            raise KeyError(key)
        shape = tuple(state[key].shape)
        if isinstance(module, tnn.Conv2d) and len(shape) == 4:
            module.out_channels, module.in_channels = shape[0], shape[1] * module.groups
        elif isinstance(module, tnn.Linear) and len(shape) == 2:
            module.out_features, module.in_features = shape
        elif isinstance(module, tnn.BatchNorm2d) and len(shape) == 1:
            module.num_features = shape[0]
        elif isinstance(module, tnn.LayerNorm) and len(shape) == 1:
            module.normalized_shape = shape
        else:
            raise ValueError(f"{key} has shape {list(shape)}, not that of a {type(module).__name__} weight")
    return get_family(name).read_widths(template)


def describe_model(model: tnn.Module) -> Dict[str, Any]:
    """JSON-serialisable description from which :func:`create_model` rebuilds the architecture.

    Returns ``{"name", "num_classes", "kwargs", "widths"}``; ``num_classes`` is read from the
    classifier's current ``out_features`` and ``widths`` from the current module shapes.
    """
    arch = _arch(model)
    family = get_family(arch["name"])
    return {
        "name": arch["name"],
        "num_classes": int(family.classifier(model).out_features),
        "kwargs": copy.deepcopy(arch["kwargs"]),
        "widths": family.read_widths(model),
    }


class _ZooHooks:
    """This zoo as ``utils`` sees it (:class:`utils.architecture.Zoo`): registered below, on import."""

    describe = staticmethod(describe_model)

    @staticmethod
    def build(arch: Mapping[str, Any]) -> tnn.Module:
        return create_model(arch["name"], num_classes=arch["num_classes"], widths=arch["widths"],
                            **arch.get("kwargs", {}))

    @staticmethod
    def pruning_kwargs(model: tnn.Module) -> Dict[str, Any]:
        return family_of(model).pruning_kwargs(model)

    @staticmethod
    def after_pruning(model: tnn.Module) -> None:
        family_of(model).after_pruning(model)

    @staticmethod
    def classifier(model: tnn.Module) -> tnn.Module:
        return family_of(model).classifier(model)


register_zoo(_ZooHooks())
