"""Which method is better, subject by subject: the probability of improvement and ranks, with intervals.

Following rliable (Agarwal et al., NeurIPS 2021), a ranking is reported with its uncertainty:

* **probability of improvement** P(A > B): over the subjects both methods were sampled for (the same
  subject, seed and initial noise), the fraction where A's score is higher, ties counting one half;
  its 95% interval is a percentile bootstrap over subjects, over seeds and then subjects with several
  seeds (:mod:`metrics.control_delta`);
* **rank intervals**: in every bootstrap resample (the same resample for every method, drawn the
  same way) the methods are ranked by their mean score (1 = best, ties share the
  mean rank); each method's interval is the 2.5-97.5% range of its rank over the resamples.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.stats import rankdata

from metrics.control_delta import LEVEL, RESAMPLES, bootstrap_mean, resample_indices


def probability_of_improvement(first: Sequence[float], second: Sequence[float], strata: Sequence | None = None,
                               seed: int = 0, resamples: int = RESAMPLES, level: float = LEVEL) -> dict:
    """P(first > second) over paired subjects (pairs with a NaN left out), with its bootstrap interval."""
    a, b = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired scores differ in length: {a.shape} vs {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    wins = (a[keep] > b[keep]) + 0.5 * (a[keep] == b[keep])
    groups = None if strata is None else np.asarray(strata)[keep]
    return bootstrap_mean(wins, seed=seed, strata=groups, resamples=resamples, level=level)


def rank_intervals(scores: np.ndarray, strata: Sequence | None = None, seed: int = 0, resamples: int = RESAMPLES,
                   level: float = LEVEL) -> list[dict]:
    """Per column of ``scores`` (subjects x methods, higher is better; rows with a NaN left out): its rank
    by mean score (1 = best), its mean rank over the bootstrap resamples and their interval."""
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"scores must be (subjects, methods), got shape {x.shape}")
    keep = np.isfinite(x).all(axis=1)
    x = x[keep]
    groups = np.zeros(len(x), dtype=np.int64) if strata is None else np.asarray(strata)[keep]
    if len(x) < 2:
        raise ValueError(f"ranking needs at least 2 subjects scored for every method, got {len(x)}")
    observed = rankdata(-x.mean(axis=0))
    rng = np.random.default_rng([0x5A7E, int(seed)])
    ranks = np.empty((resamples, x.shape[1]))
    for r in range(resamples):
        ranks[r] = rankdata(-x[resample_indices(groups, rng)].mean(axis=0))
    alpha = (1.0 - level) / 2
    return [{"rank": float(observed[j]), "mean_rank": float(ranks[:, j].mean()),
             "ci_low": float(np.quantile(ranks[:, j], alpha)), "ci_high": float(np.quantile(ranks[:, j], 1 - alpha)),
             "n": int(len(x))} for j in range(x.shape[1])]
