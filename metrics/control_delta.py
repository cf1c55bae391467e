"""Paired comparisons over subjects: the mean of a per-subject difference with a bootstrap interval.

The control verdict of a method is one such difference: Control Δ = Dice(own condition) −
Dice(another subject's condition), per subject, for the same samples' noise and scalars. A method
*follows its condition* when the 95% interval of the mean Δ lies above 0.

The interval is a percentile bootstrap over subjects, resampled within strata (training seeds) when
given, so that every resample keeps each seed's share of the subjects (as rliable's stratified
bootstrap over runs and tasks).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95
CONTROL_DELTA = "Control Δ"  # the column name


def _resampled_means(values: np.ndarray, strata: np.ndarray, rng: np.random.Generator, resamples: int) -> np.ndarray:
    """Means of ``resamples`` stratified bootstrap resamples of ``values``."""
    total = np.zeros(resamples)
    for stratum in np.unique(strata):
        chosen = values[strata == stratum]
        picks = chosen[rng.integers(0, len(chosen), (resamples, len(chosen)))]
        total += picks.sum(axis=1)
    return total / len(values)


def paired_difference(first: Sequence[float], second: Sequence[float], seed: int = 0,
                      strata: Sequence | None = None, resamples: int = RESAMPLES, level: float = LEVEL) -> dict:
    """Mean of ``first - second`` (paired per subject; pairs with a NaN are left out) with a stratified
    percentile bootstrap interval and the one-sided bootstrap p-value of "mean <= 0" (the fraction of
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
    """Mean of ``values`` (NaNs left out) with a stratified percentile bootstrap interval."""
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
