"""Device and seeding: chosen once per run, never by calling ``.cuda()`` in library code."""
from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch

log = logging.getLogger(__name__)


def get_device(spec: str | None = "auto") -> torch.device:
    """Resolve ``device=auto|cpu|cuda|cuda:N`` to a ``torch.device``.

    ``auto`` picks CUDA when present and the CPU otherwise; asking for CUDA on a machine without it is an
    error rather than a silent fall-back, so a GPU job never runs for a day on the CPU by accident.
    """
    spec = "auto" if spec in (None, "", "auto") else str(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as err:
        raise ValueError(f"device={spec!r} is not a valid torch device ({err}); use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={spec!r} was requested but CUDA is not available here; use device=auto or device=cpu")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_threads(threads: int | None) -> None:
    """Limit torch's intra-op CPU threads (``threads=null`` keeps torch's default)."""
    if threads:
        torch.set_num_threads(int(threads))
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
