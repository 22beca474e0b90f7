"""Baselines and statistics: shuffled explanations, random images, bootstrap intervals.

Every draw is seeded from (seed, feature) so a resumed or partial run makes the same choices as a
complete one.
"""

from __future__ import annotations

import numpy as np


def derangement(items: list, seed: int) -> dict:
    """A seeded permutation of ``items`` with no fixed point, as ``{item: other item}``.

    Used for the shuffled-explanations baseline: each feature is scored with another feature's
    explanation. Sattolo's algorithm gives a single random cycle, which never maps an item to
    itself. Needs at least two distinct items.
    """
    items = list(items)
    if len(items) < 2:
        raise ValueError("a derangement needs at least two items")
    rng = np.random.default_rng(seed)
    perm = list(range(len(items)))
    for i in range(len(perm) - 1, 0, -1):
        j = int(rng.integers(0, i))  # j < i: Sattolo, so the result is one cycle
        perm[i], perm[j] = perm[j], perm[i]
    return {items[i]: items[perm[i]] for i in range(len(items))}


def random_images(pool: list[int], exclude: set[int], n: int, seed: int, feature: int) -> list[int]:
    """``n`` sample ids drawn without replacement from ``pool`` minus ``exclude`` (seeded per feature)."""
    candidates = sorted(set(pool) - set(exclude))
    if not candidates:
        return []
    rng = np.random.default_rng([seed, feature])
    take = min(n, len(candidates))
    return [candidates[i] for i in rng.choice(len(candidates), size=take, replace=False)]


def bootstrap_ci(values, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap confidence interval of the mean: ``(mean, low, high)``.

    Resamples the values (one per feature) with replacement ``n_boot`` times. With fewer than two
    values the interval collapses onto the mean; with none everything is NaN.
    """
    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(x.mean())
    if x.size < 2:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    alpha = (1.0 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return mean, float(low), float(high)
