"""What a Fréchet distance needs beside it to be read: a real-vs-real scale, a confidence interval and
the sample size against the feature size.

* **Relative FD**: the FD divided by the FD between two halves of the real reference set (volumes
  split by a seeded permutation, :func:`half_split`; for 2D features every slice of a volume goes to
  that volume's half), so that 1 means "as far as one half of the real data is from the other".
  The real halves have half the volumes of the full set, so a real set scored against the full
  reference can fall below 1.
* **Bootstrap 95% CI** over volumes: generated and real volumes are resampled with replacement
  (seeded, ``resamples`` times; all slices of a drawn volume come with it), the FD is recomputed on
  the features (the exact SVD form, ``metrics.fid._frechet_svd``), and the 2.5 and 97.5 percentiles
  are reported.
* **Sample size**: the numbers of volumes against the feature size; ``undersampled`` is true when
  either set has fewer volumes than feature dimensions (the covariances are then rank-deficient and
  the mean term dominates; for 2D the slices of one volume are not independent, so volumes count).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .common import MetricError
from .fid import _frechet_svd, frechet_distance

DEFAULT_SPLIT_SEED = 0
DEFAULT_RESAMPLES = 200


def half_split(n_volumes: int, seed: int = DEFAULT_SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Two halves of ``range(n_volumes)`` (sizes floor(n/2) and the rest), by ``default_rng(seed)``."""
    perm = np.random.default_rng(seed).permutation(int(n_volumes))
    half = n_volumes // 2
    return np.sort(perm[:half]), np.sort(perm[half:])


def rows_of(volumes: np.ndarray, per_volume: int) -> torch.Tensor:
    """Feature rows of the given volumes when each volume has ``per_volume`` consecutive rows."""
    v = torch.as_tensor(np.asarray(volumes), dtype=torch.long)
    return (v[:, None] * per_volume + torch.arange(per_volume)[None, :]).reshape(-1)


def real_floor(real: torch.Tensor, per_volume: int, seed: int, method: str) -> dict[str, Any]:
    """FD between the two halves of the real features (n_volumes * per_volume, F), with the split."""
    n = real.shape[0] // per_volume
    a, b = half_split(n, seed)
    try:
        value, how = frechet_distance(real[rows_of(a, per_volume)], real[rows_of(b, per_volume)], return_method=True,
                                      method=method)
    except MetricError as err:
        value, how = None, f"unavailable: {err}"
    return {"fd_real_halves": value, "split_seed": int(seed), "half_a": a.tolist(), "half_b": b.tolist(),
            "frechet": how}


def relative(value: float, floor: float) -> float | None:
    """FD / FD(real half, real half); None when the real halves are at distance 0 (no scale)."""
    return None if floor is None or not floor > 0 else float(value / floor)


def bootstrap(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], per_volume: int, resamples: int,
              seed: int) -> dict[str, np.ndarray]:
    """FDs of ``resamples`` bootstrap draws over volumes, for each name's (generated, real) features;
    the same draw of volumes is used for every name (so a mean over names has its own samples)."""
    fake0, real0 = next(iter(pairs.values()))
    n_fake, n_real = fake0.shape[0] // per_volume, real0.shape[0] // per_volume
    rng = np.random.default_rng(seed)
    out = {name: np.empty(resamples) for name in pairs}
    for i in range(resamples):
        rf = rows_of(rng.integers(0, n_fake, n_fake), per_volume)
        rr = rows_of(rng.integers(0, n_real, n_real), per_volume)
        for name, (fake, real) in pairs.items():
            out[name][i] = max(0.0, _frechet_svd(fake[rf], real[rr]))
    return out


def interval(samples: np.ndarray, resamples: int, seed: int) -> dict[str, Any]:
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return {"ci95": [float(lo), float(hi)], "resamples": int(resamples), "seed": int(seed),
            "resampling": "generated and real volumes each drawn with replacement (all slices of a volume "
                          "together); FD by the exact SVD form; 2.5 and 97.5 percentiles"}


def sample_size(n_real: int, n_fake: int, feature_dim: int, per_volume: int = 1) -> dict[str, Any]:
    return {
        "n_real_volumes": int(n_real),
        "n_generated_volumes": int(n_fake),
        "samples_per_volume": int(per_volume),
        "feature_dim": int(feature_dim),
        "undersampled": bool(min(n_real, n_fake) < feature_dim),
        "rule": "undersampled: fewer volumes than feature dimensions in either set",
    }


def _letters() -> dict[str, str]:
    from .common import ORIENTATION_LETTER, ORIENTATIONS

    return {o: f"FID-{ORIENTATION_LETTER[o]}" for o in ORIENTATIONS}


def context_2d(real_t, fake_t, extractor, fid: dict[str, Any], slices_per_axis: int, central_fraction: float,
               method: str, split_seed: int, resamples: int, seed: int) -> tuple[dict[str, float | None], dict]:
    """Relative FIDs (``{"FID-A rel": ..., "FID-2D mean rel": ...}``) and the protocol additions of an
    FID-2D result ``fid`` (from :func:`metrics.fid.fid_2d` on the same volumes)."""
    from .fid import slice_features

    fr = slice_features(real_t, extractor, slices_per_axis, central_fraction, "real volumes")
    ff = slice_features(fake_t, extractor, slices_per_axis, central_fraction, "generated volumes")
    letters = _letters()
    k = fr[next(iter(letters))].shape[0] // real_t.shape[0]
    floors = {o: real_floor(fr[o], k, split_seed, method) for o in letters}
    values = [f["fd_real_halves"] for f in floors.values()]
    mean_floor = None if None in values else float(np.mean(values))
    rel = {f"{col} rel": relative(fid[col], floors[o]["fd_real_halves"]) for o, col in letters.items()}
    rel["FID-2D mean rel"] = relative(fid["FID-2D mean"], mean_floor)
    boot = bootstrap({o: (ff[o], fr[o]) for o in letters}, k, resamples, seed) if resamples else {}
    proto: dict[str, Any] = {
        "relative": {"definition": "FID / FID between two halves of the real reference volumes (all slices of a "
                                   "volume in its half); FID-2D mean rel = FID-2D mean / mean of the three halves' FIDs",
                     "per_orientation": floors, "fd_real_halves_mean": mean_floor},
        "sample_size": sample_size(real_t.shape[0], fake_t.shape[0], int(fr[next(iter(letters))].shape[1]), k),
    }
    if boot:
        ci = {letters[o]: interval(boot[o], resamples, seed) for o in letters}
        ci["FID-2D mean"] = interval(np.mean([boot[o] for o in letters], axis=0), resamples, seed)
        proto["bootstrap"] = ci
    return rel, proto


def context_3d(real_t, fake_t, extractor, fid: dict[str, Any], method: str, split_seed: int, resamples: int,
               seed: int) -> tuple[dict[str, float | None], dict]:
    """``{"FID-3D rel": ...}`` and the protocol additions of an FID-3D result."""
    from .fid import volume_features

    fr = volume_features(real_t, extractor, "real volumes")
    ff = volume_features(fake_t, extractor, "generated volumes")
    floor = real_floor(fr, 1, split_seed, method)
    proto: dict[str, Any] = {
        "relative": {"definition": "FID-3D / FID-3D between two halves of the real reference volumes", **floor},
        "sample_size": sample_size(real_t.shape[0], fake_t.shape[0], int(fr.shape[1]), 1),
    }
    if resamples:
        proto["bootstrap"] = interval(bootstrap({"3d": (ff, fr)}, 1, resamples, seed)["3d"], resamples, seed)
    return {"FID-3D rel": relative(fid["FID-3D"], floor["fd_real_halves"])}, proto
