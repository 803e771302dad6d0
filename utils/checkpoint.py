"""Checkpoints: state dicts written atomically, read back with ``weights_only=True``.

Nothing here pickles a module. A model is stored as its architecture description (zoo name, number of
classes, per-layer widths; see ``nn.models.describe_model``) plus its state dict, so a pruned network
reloads without executing code from the file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Mapping, Sequence, Tuple

import torch

from utils.architecture import zoo
from utils.io import atomic_save

MODEL_FORMAT = "gmp-model-v1"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or was written for something else."""


def plain(obj: Any) -> Any:
    """OmegaConf containers and tuples -> plain dicts/lists, so fingerprints compare and serialise."""
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        return [plain(v) for v in obj]
    return obj


def check_fingerprint(own: Mapping[str, Any], theirs: Mapping[str, Any], path: Path) -> None:
    """Refuse to continue from ``path`` when the settings that made it (``theirs``) differ from ``own``."""
    changed = sorted(k for k in set(own) | set(theirs) if own.get(k) != theirs.get(k))
    if changed:
        detail = "; ".join(f"{k}: checkpoint {theirs.get(k)!r} vs now {own.get(k)!r}" for k in changed[:4])
        raise CheckpointError(
            f"{path} belongs to a run with other settings ({detail}). Re-run with the original settings to "
            "resume it, or choose another run directory (run_name=...) or pass resume=false to start over."
        )


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> Dict[str, Any]:
    """Load a checkpoint written by :func:`atomic_save` (tensors, dicts, lists, numbers, strings only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path (or the run directory it was derived from)")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, wrong format, pickled module, ...
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:200]}). It is truncated, "
            "corrupt or not a state-dict checkpoint of this project; delete it (a resumable run then restarts "
            "from its previous checkpoint) or point to another file."
        ) from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict of state")
    return obj


def save_model(path: str | os.PathLike, model: torch.nn.Module, **extra: Any) -> None:
    """Save ``model`` as (architecture description, state dict) plus JSON-like ``extra`` entries."""
    payload = {"format": MODEL_FORMAT, "arch": zoo().describe(model), "state_dict": model.state_dict(), **extra}
    atomic_save(payload, path)


def load_model(path: str | os.PathLike, map_location: Any = "cpu") -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """Rebuild a zoo model saved by :func:`save_model`; returns ``(model, payload)``."""
    payload = load_checkpoint(path, map_location=map_location)
    if payload.get("format") != MODEL_FORMAT or "arch" not in payload or "state_dict" not in payload:
        raise CheckpointError(
            f"{path} is not a model file of this project (expected format {MODEL_FORMAT!r} with 'arch' and "
            f"'state_dict'; found keys {sorted(payload)[:8]})"
        )
    arch = payload["arch"]
    model = zoo().build(arch)
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: the stored weights do not fit the stored architecture {arch['name']}: {err}") from err
    return model, payload  # on the CPU; the caller moves it to its device
