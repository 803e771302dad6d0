"""Target-network zoo: every network the metanetwork prunes, built by name.

Usage::

    from nn.models import create_model, describe_model, get_widths, list_models
    model = create_model("resnet56", num_classes=100)
    desc = describe_model(model)   # JSON: rebuild with create_model(desc["name"], ...)

Importing this package registers every family (one module per family).
"""
from nn.models.registry import (
    MODELS,
    ModelFamily,
    create_model,
    describe_model,
    family_of,
    get_family,
    get_widths,
    list_models,
    register_model,
    widths_from_state,
)

# Imported for their @register_model side effects.
from nn.models import cifar_resnet, torchvision_resnet, vgg, vit  # noqa: E402,F401  isort: skip

__all__ = [
    "MODELS",
    "ModelFamily",
    "create_model",
    "describe_model",
    "family_of",
    "get_family",
    "get_widths",
    "list_models",
    "register_model",
    "widths_from_state",
]
