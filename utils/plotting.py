"""Figures saved next to the numbers they show (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: servers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402

from utils import distributed as du  # noqa: E402


def plot_history(history: Sequence[Dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Loss and accuracy per epoch (train and validation) from ``fit``'s history rows, saved as ``path``."""
    if not history or not du.is_main():  # one rank draws (utils.io)
        return
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for split in ("train", "val"):
        ax_loss.plot(epochs, [row[f"{split}_loss"] for row in history], marker=".", label=split)
        ax_acc.plot(epochs, [row[f"{split}_acc"] for row in history], marker=".", label=split)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss", yscale="log")
    ax_acc.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_figure(fig, stem: str | Path) -> None:
    """Save ``fig`` as ``stem``.png and ``stem``.pdf (folders created) and close it."""
    stem = Path(stem)
    if not du.is_main():  # one rank draws (utils.io)
        plt.close(fig)
        return
    fig.tight_layout()
    stem.parent.mkdir(parents=True, exist_ok=True)
    for suffix in (".png", ".pdf"):
        fig.savefig(stem.with_suffix(suffix), dpi=130)
    plt.close(fig)
