"""Precision, recall, density and coverage of generated samples in a feature space.

Precision and recall: Kynkäänniemi et al., "Improved precision and recall metric for assessing
generative models", NeurIPS 2019. Density and coverage: Naeem et al., "Reliable fidelity and
diversity metrics for generative models", ICML 2020. The definitions are those of the reference
implementation (the ``prdc`` package, NAVER, checked to 1e-6 in the tests): with Euclidean distances,
the radius of a sample is the distance to its ``k``-th nearest neighbour in its own set (the sample
itself excluded), and every comparison is strict (``<``):

* precision: fraction of generated samples inside at least one real sample's ball;
* recall: fraction of real samples inside at least one generated sample's ball;
* density: mean over generated samples of (number of real balls that contain it) / k;
* coverage: fraction of real samples whose nearest generated sample is inside its ball.

A collapsed generator (copies of one volume) has generated radii of 0 (its k nearest neighbours are
its copies), so its recall is 0, and it lies only in the balls of the real samples near the copied
one, so its coverage is about k/n.

Feature spaces (:func:`prdc_volumes`, :func:`prdc_slices`): the FID extractors'. 3D: one feature
vector per volume. 2D: per orientation, the slice features of the FID-2D slice rule pooled over
volumes (the same sets FID-A/C/S use), and the reported value is the mean over the three
orientations; the per-orientation values are in the protocol.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .common import ORIENTATIONS, MetricError, as_volumes
from .extractors import FeatureExtractor
from .fid import slice_features, volume_features

DEFAULT_K = 5  # Naeem et al.'s choice
NAMES = ("Precision", "Recall", "Density", "Coverage")
_CHUNK_ELEMENTS = 20_000_000  # rows x columns x features per block of exact distances


def _array(x: Any) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return a.astype(np.float64)


def pairwise_distances(a: Any, b: Any) -> np.ndarray:
    """Exact Euclidean distances (float64, differences summed in blocks; identical rows give 0)."""
    a, b = _array(a), _array(b)
    rows = max(1, _CHUNK_ELEMENTS // max(1, b.shape[0] * a.shape[1]))
    out = np.empty((a.shape[0], b.shape[0]))
    for i in range(0, a.shape[0], rows):
        d = a[i : i + rows, None, :] - b[None, :, :]
        out[i : i + rows] = np.sqrt(np.einsum("ijk,ijk->ij", d, d))
    return out


def kth_neighbour_radii(features: Any, k: int) -> np.ndarray:
    """Distance of each sample to its k-th nearest neighbour in its own set (itself excluded)."""
    d = pairwise_distances(features, features)
    return np.partition(d, k, axis=1)[:, k]


def prdc(real: Any, fake: Any, k: int = DEFAULT_K) -> dict[str, float]:
    """``{"Precision", "Recall", "Density", "Coverage"}`` of ``fake`` (n, F) against ``real`` (m, F)."""
    r, f = _array(real), _array(fake)
    if r.ndim != 2 or f.ndim != 2 or r.shape[1] != f.shape[1]:
        raise MetricError(f"feature sets must be (n, F) with the same F, got {r.shape} and {f.shape}")
    if min(r.shape[0], f.shape[0]) <= k:
        raise MetricError(
            f"precision/recall/density/coverage with k={k} need more than {k} samples per set, "
            f"got {f.shape[0]} generated and {r.shape[0]} real"
        )
    real_r = kth_neighbour_radii(r, k)
    fake_r = kth_neighbour_radii(f, k)
    d = pairwise_distances(r, f)  # (real, fake)
    inside_real = d < real_r[:, None]
    return {
        "Precision": float(inside_real.any(axis=0).mean()),
        "Recall": float((d < fake_r[None, :]).any(axis=1).mean()),
        "Density": float(inside_real.sum(axis=0).mean() / k),
        "Coverage": float((d.min(axis=1) < real_r).mean()),
    }


def _protocol(extractor: FeatureExtractor, k: int, n_real: int, n_fake: int, space: str) -> dict[str, Any]:
    return {
        "extractor": extractor.describe(),
        "k": int(k),
        "feature_space": space,
        "n_real_volumes": int(n_real),
        "n_generated_volumes": int(n_fake),
        "definition": "Kynkäänniemi et al. 2019 (precision, recall), Naeem et al. 2020 (density, coverage); "
                      "Euclidean k-NN radii, self excluded, strict comparisons (as the prdc package)",
    }


def prdc_volumes(real: Any, fake: Any, extractor: FeatureExtractor, k: int = DEFAULT_K) -> dict[str, Any]:
    """P/R/D/C on whole-volume features of a 3D extractor: ``{name: value, "protocol": ...}``."""
    real_t, fake_t = as_volumes(real, "real volumes"), as_volumes(fake, "generated volumes")
    out: dict[str, Any] = prdc(volume_features(real_t, extractor, "real volumes"),
                               volume_features(fake_t, extractor, "generated volumes"), k)
    out["protocol"] = _protocol(extractor, k, real_t.shape[0], fake_t.shape[0], "one feature vector per volume")
    return out


def prdc_slices(real: Any, fake: Any, extractor: FeatureExtractor, slices_per_axis: int, central_fraction: float,
                k: int = DEFAULT_K) -> dict[str, Any]:
    """P/R/D/C on slice features of a 2D extractor, per orientation (the FID-2D slice rule), and their
    mean (the reported value): ``{name: mean value, "protocol": {... "per_orientation": ...}}``."""
    real_t, fake_t = as_volumes(real, "real volumes"), as_volumes(fake, "generated volumes")
    fr = slice_features(real_t, extractor, slices_per_axis, central_fraction, "real volumes")
    ff = slice_features(fake_t, extractor, slices_per_axis, central_fraction, "generated volumes")
    per = {o: prdc(fr[o], ff[o], k) for o in ORIENTATIONS}
    out: dict[str, Any] = {n: float(np.mean([per[o][n] for o in ORIENTATIONS])) for n in NAMES}
    out["protocol"] = _protocol(
        extractor, k, real_t.shape[0], fake_t.shape[0],
        "per orientation, the FID-2D slice features pooled over volumes; the value is the mean over the "
        "axial, coronal and sagittal values")
    out["protocol"]["per_orientation"] = per
    out["protocol"]["n_real_slices"] = {o: int(fr[o].shape[0]) for o in ORIENTATIONS}
    out["protocol"]["n_generated_slices"] = {o: int(ff[o].shape[0]) for o in ORIENTATIONS}
    return out
