"""Paired comparisons over subjects: the mean of a per-subject difference with a bootstrap interval.

The control verdict of a method is one such difference: Control Δ = Dice(own condition) −
Dice(another subject's condition), per subject, for the same samples' noise and scalars. A method
*follows its condition* when the 95% interval of the mean Δ lies above 0.

The interval is a percentile bootstrap over subjects. With several strata (training seeds) it is a
two-level (hierarchical) bootstrap: each resample draws the seeds with replacement, then each drawn
seed's subjects with replacement. A seed is one training run, so the interval then carries the spread
between runs as well as between subjects: two seeds of which one follows its condition and one does
not give an interval that reaches the one that does not, where resampling the subjects of each seed
alone would pool them into a narrow interval above 0. With one seed it is the plain bootstrap over
subjects.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95
CONTROL_DELTA = "Control Δ"  # the column name


def _resampled_means(values: np.ndarray, strata: np.ndarray, rng: np.random.Generator, resamples: int) -> np.ndarray:
    """Means of ``resamples`` bootstrap resamples of ``values``: over subjects within one stratum, over
    strata and then subjects within each drawn stratum with several (the module docstring)."""
    groups = [values[strata == stratum] for stratum in np.unique(strata)]
    if len(groups) == 1:
        return groups[0][rng.integers(0, len(groups[0]), (resamples, len(groups[0])))].sum(axis=1) / len(values)
    drawn = rng.integers(0, len(groups), (resamples, len(groups)))  # the strata each resample is made of
    total, count = np.zeros(resamples), np.zeros(resamples)
    for slot in range(len(groups)):
        for j, group in enumerate(groups):
            here = drawn[:, slot] == j
            sums = group[rng.integers(0, len(group), (resamples, len(group)))].sum(axis=1)  # a fresh draw per slot
            total += np.where(here, sums, 0.0)
            count += here * len(group)
    return total / count


def resample_indices(strata: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The indices of one bootstrap resample of values labelled by ``strata``, drawn as
    :func:`_resampled_means` draws them (to resample several columns of the same rows alike)."""
    index_by_stratum = [np.flatnonzero(strata == g) for g in np.unique(strata)]
    if len(index_by_stratum) > 1:
        index_by_stratum = [index_by_stratum[j] for j in rng.integers(0, len(index_by_stratum), len(index_by_stratum))]
    return np.concatenate([idx[rng.integers(0, len(idx), len(idx))] for idx in index_by_stratum])


def paired_difference(first: Sequence[float], second: Sequence[float], seed: int = 0,
                      strata: Sequence | None = None, resamples: int = RESAMPLES, level: float = LEVEL) -> dict:
    """Mean of ``first - second`` (paired per subject; pairs with a NaN are left out) with a percentile
    bootstrap interval (over seeds and subjects, the module docstring) and the one-sided bootstrap p-value of "mean <= 0" (the fraction of
    resampled means at or below 0, at least 1 / resamples)."""
    a, b = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values differ in length: {a.shape} vs {b.shape}")
    groups = np.zeros(len(a), dtype=np.int64) if strata is None else np.asarray(strata)
    keep = np.isfinite(a) & np.isfinite(b)
    diff, groups = a[keep] - b[keep], groups[keep]
    if len(diff) < 2:
        return {"mean": float(diff.mean()) if len(diff) else float("nan"), "ci_low": float("nan"),
                "ci_high": float("nan"), "p_value": float("nan"), "n": int(len(diff))}
    means = _resampled_means(diff, groups, np.random.default_rng([0xD1FF, int(seed)]), resamples)
    alpha = (1.0 - level) / 2
    return {"mean": float(diff.mean()), "ci_low": float(np.quantile(means, alpha)),
            "ci_high": float(np.quantile(means, 1.0 - alpha)),
            "p_value": float(max(np.mean(means <= 0.0), 1.0 / resamples)), "n": int(len(diff))}


def follows_condition(delta: dict) -> str:
    """The verdict of a Control Δ: "yes" when its interval lies above 0, "no" otherwise, "n/a" without one."""
    if not np.isfinite(delta.get("ci_low", float("nan"))):
        return "n/a"
    return "yes" if delta["ci_low"] > 0 else "no"


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down; monotone; capped at 1), in the input order. NaN stays NaN."""
    p = np.asarray(p_values, dtype=np.float64)
    finite = np.flatnonzero(np.isfinite(p))
    adjusted = np.full(len(p), np.nan)
    order = finite[np.argsort(p[finite], kind="stable")]
    m, running = len(order), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted.tolist()


def bootstrap_mean(values: Sequence[float], seed: int = 0, strata: Sequence | None = None,
                   resamples: int = RESAMPLES, level: float = LEVEL) -> dict:
    """Mean of ``values`` (NaNs left out) with a percentile bootstrap interval (over seeds and subjects)."""
    v = np.asarray(values, dtype=np.float64)
    groups = np.zeros(len(v), dtype=np.int64) if strata is None else np.asarray(strata)
    keep = np.isfinite(v)
    v, groups = v[keep], groups[keep]
    if len(v) < 2:
        return {"mean": float(v.mean()) if len(v) else float("nan"), "ci_low": float("nan"), "ci_high": float("nan"),
                "n": int(len(v))}
    means = _resampled_means(v, groups, np.random.default_rng([0xB007, int(seed)]), resamples)
    alpha = (1.0 - level) / 2
    return {"mean": float(v.mean()), "ci_low": float(np.quantile(means, alpha)),
            "ci_high": float(np.quantile(means, 1.0 - alpha)), "n": int(len(v))}
