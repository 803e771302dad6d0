"""Deterministic, stratified splits of a labelled index set.

Used twice:

* to carve the **validation split from the official training data** (seed ``split_seed``), so that
  hyper-parameters and early stopping never look at the test split;
* for datasets without an official test split (``digits``), to hold out a test split with a *fixed*
  seed, so the test split never changes when ``split_seed`` does.

The split is stratified: every class contributes to the held-out part in proportion to its size
(largest-remainder rounding, so the held-out size is exactly the requested one). It depends only on
the labels and the seed (NumPy's PCG64 generator), never on global RNG state, so the same seed gives
the same indices on every machine and run.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np


def resolve_holdout_count(size: float | int, total: int, what: str = "val_size") -> int:
    """Number of examples to hold out of ``total``.

    Args:
        size: a fraction in (0, 1) of ``total``, or an integer count in [0, total).
        total: number of examples available.

    Returns:
        the count; a fraction is rounded to the nearest integer and kept in [1, total - 1].
    """
    if isinstance(size, bool):
        raise ValueError(f"{what} must be a fraction in (0, 1) or an integer count, got {size!r}")
    if isinstance(size, (int, np.integer)):
        count = int(size)
        if not 0 <= count < total:
            raise ValueError(f"{what}={count} must be in [0, {total}) (the split has {total} examples)")
        return count
    frac = float(size)
    if not 0.0 < frac < 1.0:
        raise ValueError(f"{what}={size!r}: a float must be a fraction in (0, 1); "
                         f"use an integer for a count of examples")
    if total < 2:
        raise ValueError(f"cannot hold out a fraction of {total} example(s)")
    return min(max(int(round(frac * total)), 1), total - 1)


def _per_class_counts(class_sizes: np.ndarray, count: int) -> np.ndarray:
    """Split ``count`` over classes proportionally to ``class_sizes`` (largest remainder, exact total)."""
    total = int(class_sizes.sum())
    ideal = class_sizes * (count / total)
    take = np.floor(ideal).astype(np.int64)
    remainder = count - int(take.sum())
    # hand the leftover examples to the classes with the largest fractional parts; a stable sort breaks
    # ties by class order so the result is deterministic
    order = np.argsort(-(ideal - take), kind="stable")
    for c in order:
        if remainder == 0:
            break
        if take[c] < class_sizes[c]:
            take[c] += 1
            remainder -= 1
    return take


def stratified_split(labels: np.ndarray, holdout: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Split ``range(len(labels))`` into a kept part and a held-out part of exactly ``holdout`` items.

    Args:
        labels: (N,) integer class labels.
        holdout: number of indices to hold out, 0 <= holdout < N.
        seed: seed of the permutation; the result is a pure function of (labels, holdout, seed).

    Returns:
        (keep, held_out): sorted int64 index arrays, disjoint, together covering ``range(N)``.
    """
    labels = np.asarray(labels).reshape(-1)
    n = labels.shape[0]
    if not 0 <= holdout < max(n, 1):
        raise ValueError(f"holdout={holdout} must be in [0, {n})")
    rng = np.random.default_rng(seed)
    classes, inverse = np.unique(labels, return_inverse=True)
    sizes = np.bincount(inverse, minlength=len(classes))
    take = _per_class_counts(sizes, holdout)
    held = []
    for c in range(len(classes)):
        members = np.flatnonzero(inverse == c)
        held.append(rng.permutation(members)[: take[c]])
    held_out = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    mask = np.ones(n, dtype=bool)
    mask[held_out] = False
    return np.flatnonzero(mask).astype(np.int64), held_out.astype(np.int64)


def carve_validation(train_labels: np.ndarray, val_size: float | int,
                     split_seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Indices ``(train_idx, val_idx)`` into the official training set; see the module docstring."""
    count = resolve_holdout_count(val_size, len(train_labels), "val_size")
    return stratified_split(train_labels, count, split_seed)
