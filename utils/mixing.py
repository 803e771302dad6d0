"""Mixup and CutMix batch augmentation for training (the ViT-B/16 ImageNet recipe uses both).

Mixup (Zhang et al., 2018) blends two images, ``x = lam * x_i + (1 - lam) * x_j``; CutMix (Yun et al.,
2019) pastes a random box of ``x_j`` into ``x_i`` and sets ``lam`` to the area that stayed ``x_i``. The
partner ``j`` is a random permutation of the batch and ``lam ~ Beta(alpha, alpha)``. The loss is mixed
the same way, ``lam * CE(logits, y_i) + (1 - lam) * CE(logits, y_j)``, which equals cross-entropy against
the mixed (and, with label smoothing, smoothed) one-hot targets, without needing the number of classes.

Randomness comes from torch's global generator, which ``fit`` seeds per epoch, so a resumed run mixes
exactly like an uninterrupted one.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class BatchMix:
    """Mixup / CutMix settings of a schedule (``mixup_alpha``, ``cutmix_alpha``, ``mix_prob``, ``switch_prob``).

    An alpha of 0 turns that augmentation off. With both on, each batch uses CutMix with probability
    ``switch_prob`` and Mixup otherwise; a batch is mixed at all with probability ``mix_prob``.
    """

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5

    @classmethod
    def from_schedule(cls, schedule: Mapping[str, Any]) -> BatchMix | None:
        """The schedule's mixing, or None when neither augmentation is on."""
        mix = cls(float(schedule.get("mixup_alpha", 0.0) or 0.0), float(schedule.get("cutmix_alpha", 0.0) or 0.0),
                  float(schedule.get("mix_prob", 1.0)), float(schedule.get("switch_prob", 0.5)))
        if mix.mixup_alpha < 0 or mix.cutmix_alpha < 0:
            raise ValueError(f"mixup_alpha={mix.mixup_alpha}, cutmix_alpha={mix.cutmix_alpha}: alphas are >= 0")
        return mix if mix.mixup_alpha > 0 or mix.cutmix_alpha > 0 else None

    def _beta(self, alpha: float) -> float:
        a = torch.tensor(float(alpha))
        return float(torch.distributions.Beta(a, a).sample())

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Mix a batch ``x`` (B, C, H, W) with labels ``y`` (B,); returns ``(x_mixed, y_partner, lam)``."""
        perm = torch.randperm(x.shape[0]).to(x.device)
        if float(torch.rand(())) >= self.mix_prob:
            return x, y, 1.0
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or float(torch.rand(())) < self.switch_prob)
        if not use_cutmix:
            lam = self._beta(self.mixup_alpha)
            return lam * x + (1.0 - lam) * x[perm], y[perm], lam
        lam = self._beta(self.cutmix_alpha)
        h, w = x.shape[-2:]
        # A box covering a (1 - lam) share of the image, centred uniformly and clipped to the image.
        ch, cw = int(h * (1.0 - lam) ** 0.5), int(w * (1.0 - lam) ** 0.5)
        cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        x = x.clone()
        x[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)  # the area actually pasted, after clipping
        return x, y[perm], lam


def mixed_cross_entropy(logits: torch.Tensor, y: torch.Tensor, y_partner: torch.Tensor, lam: float,
                        label_smoothing: float = 0.0) -> torch.Tensor:
    """``lam * CE(logits, y) + (1 - lam) * CE(logits, y_partner)`` (mean over the batch)."""
    loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    if lam < 1.0:
        loss = lam * loss + (1.0 - lam) * F.cross_entropy(logits, y_partner, label_smoothing=label_smoothing)
    return loss
