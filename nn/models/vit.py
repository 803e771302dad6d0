"""Vision Transformers from torchvision (Dosovitskiy et al., 2021): vit_b_16 and a tiny test variant.

Both are torchvision's ``VisionTransformer``, so state-dict keys are torchvision's.

- ``vit_b_16``: patch 16, 12 layers, 12 heads, hidden 768, MLP 3072; kwargs ``image_size`` (default
  224, a multiple of 16), ``dropout``, ``attention_dropout``.
- ``vit_tiny``: image 32, patch 8, 2 layers, 4 heads, hidden 32, MLP 64; every one of these (and the
  dropouts) can be overridden by kwargs.

Widths::

    {"hidden_dim": int,          # token width: conv_proj, class token, positional embedding, every
                                 # LayerNorm, attention (q/k/v/out) and the head input
     "mlp_dims": [int, ...]}     # hidden width of each encoder layer's MLP

The number of heads is fixed by the architecture, so ``hidden_dim`` must be divisible by it (each head
keeps ``hidden_dim // num_heads`` dims). ``hidden_dim`` is a constructor argument of torchvision's class,
so the model is built at that width directly (torchvision sizes and initialises all the tied tensors
itself, including ``model.hidden_dim`` which its forward reshapes with); only MLPs whose width differs
from the first layer's are swapped for resized copies.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable

import torch.nn as tnn
from torchvision.models.vision_transformer import VisionTransformer

from nn.models._resize import linear_like, replace
from nn.models.registry import ModelFamily, Widths, register_model

# Arguments of VisionTransformer that a family may fix or expose; others (representation_size,
# norm_layer, conv_stem_configs) would add layers the widths format does not describe.
_CONFIG_KEYS = (
    "image_size", "patch_size", "num_layers", "num_heads", "hidden_dim", "mlp_dim", "dropout", "attention_dropout",
)


def attention_layers(model: tnn.Module) -> Iterable[tnn.MultiheadAttention]:
    """Every ``nn.MultiheadAttention`` of the model, in encoder order."""
    return (m for m in model.modules() if isinstance(m, tnn.MultiheadAttention))


class ViTFamily(ModelFamily):
    """Family spec of torchvision's ``VisionTransformer``.

    Args:
        defaults: values for the keys of ``_CONFIG_KEYS`` (dropouts may be omitted).
        allowed_kwargs: which of those ``create_model`` may override.
    """

    def __init__(self, defaults: Dict[str, Any], allowed_kwargs: Iterable[str]) -> None:
        self.defaults = dict(defaults)
        self.allowed_kwargs = frozenset(allowed_kwargs)
        assert self.allowed_kwargs <= set(_CONFIG_KEYS), self.allowed_kwargs

    def config(self, **kwargs: Any) -> Dict[str, Any]:
        """``VisionTransformer`` arguments: the family defaults updated with ``kwargs``."""
        return {**self.defaults, **kwargs}

    def default_widths(self, **kwargs: Any) -> Widths:
        cfg = self.config(**kwargs)
        return {"hidden_dim": cfg["hidden_dim"], "mlp_dims": [cfg["mlp_dim"]] * cfg["num_layers"]}

    def check_coupling(self, widths: Widths, **kwargs: Any) -> None:
        heads = self.config(**kwargs)["num_heads"]
        if widths["hidden_dim"] % heads:
            raise ValueError(
                f"widths['hidden_dim'] ({widths['hidden_dim']}) must be divisible by num_heads ({heads}) "
                "so that every attention head keeps the same head dim"
            )

    def build(self, num_classes: int, widths: Widths, **kwargs: Any) -> tnn.Module:
        cfg = self.config(**kwargs)
        mlp_dims = widths["mlp_dims"]
        cfg.update(hidden_dim=widths["hidden_dim"], mlp_dim=mlp_dims[0])
        model = VisionTransformer(num_classes=num_classes, **cfg)
        hidden = widths["hidden_dim"]
        # torchvision names the blocks encoder.layers.encoder_layer_{i}.
        for i, (block_name, layer) in enumerate(model.encoder.layers.named_children()):
            prefix = f"encoder.layers.{block_name}.mlp"
            fc1 = linear_like(layer.mlp[0], hidden, mlp_dims[i])
            fc2 = linear_like(layer.mlp[3], mlp_dims[i], hidden)
            for name, new in ((f"{prefix}.0", fc1), (f"{prefix}.3", fc2)):
                if replace(model, name, new):
                    # torchvision's MLPBlock init.
                    tnn.init.xavier_uniform_(new.weight)
                    tnn.init.normal_(new.bias, std=1e-6)
        return model

    def read_widths(self, model: tnn.Module) -> Widths:
        return {
            "hidden_dim": model.conv_proj.out_channels,
            "mlp_dims": [layer.mlp[0].out_features for layer in model.encoder.layers],
        }

    def classifier(self, model: tnn.Module) -> tnn.Linear:
        return model.heads.head

    def pruning_kwargs(self, model: tnn.Module) -> Dict[str, Any]:
        """Torch-Pruning arguments that keep the heads intact and prune the token parameters.

        Torch-Pruning 1.6's ``num_heads=`` argument expects timm-style qkv ``Linear`` layers: given
        torchvision's fused ``nn.MultiheadAttention`` the pruner silently skips the hidden-dim group.
        ``out_channel_groups={mha: num_heads}`` instead makes it remove the *same* head-dim index from
        every head, so heads stay aligned and ``embed_dim`` stays divisible by ``num_heads``. Do not add
        ``round_to=num_heads`` on top: it rounds the full width while indices are picked per head, and
        over-prunes (32 -> 16 instead of 20 at ratio 0.3 on vit_tiny).
        """
        return {
            "ignored_layers": [model.heads],
            "out_channel_groups": {mha: mha.num_heads for mha in attention_layers(model)},
            # (1, 1, D) and (1, S, D): the token width is the last dimension.
            "unwrapped_parameters": [(model.class_token, 2), (model.encoder.pos_embedding, 2)],
        }

    def after_pruning(self, model: tnn.Module) -> None:
        """Torch-Pruning resizes tensors and MHA's embed/head/k/v dims, but not ``model.hidden_dim``."""
        hidden = model.conv_proj.out_channels
        model.hidden_dim = hidden  # forward reshapes patches to (B, hidden_dim, n_patches) with it
        for mha in attention_layers(model):
            if mha.embed_dim != hidden or mha.head_dim * mha.num_heads != hidden:
                raise ValueError(
                    f"attention width {mha.embed_dim} ({mha.num_heads} heads of {mha.head_dim}) does not match "
                    f"hidden_dim {hidden}; prune with out_channel_groups from pruning_kwargs()"
                )


VIT_B_16 = dict(image_size=224, patch_size=16, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072)
VIT_TINY = dict(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64)


@register_model("vit_b_16")
def vit_b_16() -> ModelFamily:
    return ViTFamily(VIT_B_16, allowed_kwargs=("image_size", "dropout", "attention_dropout"))


@register_model("vit_tiny")
def vit_tiny() -> ModelFamily:
    return ViTFamily(VIT_TINY, allowed_kwargs=_CONFIG_KEYS)

