"""Shared helpers of the metrics package: errors, array checks, slice rules, hashing.

Volumes everywhere in ``metrics`` are ``(N, 1, X, Y, Z)`` float32 in [0, 1] (numpy arrays or torch
tensors). Orientation follows ``docs/CONVENTIONS.md``: axial slices index Z (the last axis), coronal
slices index Y, sagittal slices index X.
"""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from core.files import sha256_file  # noqa: F401  (re-exported: the first 12 hex digits name weights files)


class MetricError(ValueError):
    """Inputs a metric cannot score (wrong shape, wrong range, too few volumes)."""


class WeightsError(MetricError):
    """A weights file that exists but cannot be used (corrupt, wrong architecture, wrong format)."""


# Orientation name -> spatial axis of a (X, Y, Z) volume.
ORIENTATIONS: dict[str, int] = {"axial": 2, "coronal": 1, "sagittal": 0}
ORIENTATION_LETTER: dict[str, str] = {"axial": "A", "coronal": "C", "sagittal": "S"}

_WARNED: set[str] = set()


class DeferredVolumes:
    """Training arrays known by their shape, read only if a network must be trained on them.

    A judge or in-domain extractor that is shipped or cached is found by (shape, ``data_id``) alone,
    so reading hundreds of training volumes just to look it up would be waste. ``load()`` returns
    the array (called at most once per training)."""

    def __init__(self, shape: Sequence[int], load):
        self.shape = tuple(int(n) for n in shape)
        self._load = load

    def load(self) -> Any:
        array = self._load()
        if tuple(np.shape(array)) != self.shape:  # the shape keyed the cache: it must be the truth
            raise MetricError(f"deferred training data was declared {self.shape} but is {tuple(np.shape(array))}")
        return array


def materialise(x: Any) -> Any:
    """``x`` itself, or the array a :class:`DeferredVolumes` stands for."""
    return x.load() if isinstance(x, DeferredVolumes) else x


def warn_once(key: str, message: str) -> None:
    """Issue ``message`` as a UserWarning the first time ``key`` is seen in this process."""
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(message, UserWarning, stacklevel=3)


def quiet_missing_weights() -> None:
    """Hide the warning that a pretrained extractor's weights are missing (``--quiet``): the records and
    REPORT.md name the extractor behind every column, so stderr need not say it in every process."""
    warnings.filterwarnings("ignore", message="Pretrained .* weights not found", category=UserWarning)


def as_volumes(x: Any, name: str = "volumes", check_range: bool = True) -> torch.Tensor:
    """Numpy array or tensor -> float32 CPU tensor (N, 1, X, Y, Z); a (1, X, Y, Z) volume gains N=1.

    Raises :class:`MetricError` on a wrong shape, NaN/inf, or values outside [0, 1] (beyond 1e-3).
    """
    if isinstance(x, (list, tuple)):
        x = np.stack([np.asarray(v) if not isinstance(v, torch.Tensor) else v.detach().cpu().numpy() for v in x])
    t = torch.as_tensor(x) if not isinstance(x, torch.Tensor) else x.detach()
    t = t.to("cpu", torch.float32)
    if t.ndim == 4:
        t = t.unsqueeze(0)
    if t.ndim != 5 or t.shape[1] != 1:
        raise MetricError(
            f"{name} have shape {tuple(t.shape)}; metrics expect volumes shaped (N, 1, X, Y, Z) "
            "(one channel, float32 in [0, 1])"
        )
    if t.shape[0] == 0:
        raise MetricError(f"{name} are empty; pass at least one volume")
    if not torch.isfinite(t).all():
        raise MetricError(f"{name} contain NaN or infinite values; fix the generator output before scoring")
    if check_range:
        lo, hi = float(t.min()), float(t.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise MetricError(
                f"{name} have values in [{lo:.3g}, {hi:.3g}]; metrics expect images scaled to [0, 1] "
                "(clip or rescale them first)"
            )
        t = t.clamp(0.0, 1.0)
    return t


def as_label_maps(x: Any, name: str = "label maps") -> torch.Tensor:
    """Integer label maps (N, 1, X, Y, Z) (or (1, X, Y, Z)) -> int64 CPU tensor."""
    t = torch.as_tensor(x) if not isinstance(x, torch.Tensor) else x.detach()
    t = t.to("cpu")
    if t.ndim == 4:
        t = t.unsqueeze(0)
    if t.ndim != 5 or t.shape[1] != 1:
        raise MetricError(f"{name} have shape {tuple(t.shape)}; expected integer label maps (N, 1, X, Y, Z)")
    if t.is_floating_point():
        if not torch.equal(t, t.round()):
            raise MetricError(f"{name} hold non-integer values; pass integer labels (0 = background)")
    return t.to(torch.int64)


def central_slice_indices(depth: int, count: int, central_fraction: float) -> list[int]:
    """The slice rule used by FID-2D and LPIPS.

    Take the central ``central_fraction`` of the axis, i.e. indices
    ``[floor(depth*(1-f)/2), ceil(depth*(1+f)/2) - 1]``, and pick ``count`` indices evenly spaced in
    it (``round(linspace(lo, hi, count))``, duplicates removed; a single slice is the middle one,
    ``(lo + hi) // 2``). ``count`` is clipped to the number of slices in the central range.
    """
    if depth < 1:
        raise MetricError(f"an axis of length {depth} has no slices")
    if not 0.0 < central_fraction <= 1.0:
        raise MetricError(f"central_fraction must lie in (0, 1], got {central_fraction}")
    lo = int(np.floor(depth * (1.0 - central_fraction) / 2.0))
    hi = int(np.ceil(depth * (1.0 + central_fraction) / 2.0)) - 1
    hi = max(lo, min(hi, depth - 1))
    count = max(1, min(int(count), hi - lo + 1))
    if count == 1:
        return [(lo + hi) // 2]
    idx = np.round(np.linspace(lo, hi, count)).astype(int)
    return sorted(set(int(i) for i in idx))


def extract_slices(volumes: torch.Tensor, orientation: str, indices: Sequence[int]) -> torch.Tensor:
    """(N, 1, X, Y, Z) -> (N * len(indices), 1, H, W) slices of one orientation, volume-major order.

    axial: slices (X, Y) at Z = i; coronal: (X, Z) at Y = i; sagittal: (Y, Z) at X = i.
    """
    axis = ORIENTATIONS[orientation] + 2
    idx = torch.as_tensor(list(indices), dtype=torch.long)
    sl = volumes.index_select(axis, idx)  # (N, 1, ..k.., ...)
    sl = sl.movedim(axis, 1)  # (N, k, 1, H, W)
    n, k = sl.shape[0], sl.shape[1]
    return sl.reshape(n * k, 1, sl.shape[-2], sl.shape[-1])


def trained_weights_path(name: str, cache_dir: str | Path, shipped_dirs: Sequence[str | Path] = ()) -> Path:
    """Where the weights file ``name`` of a network the suite trains itself is read from: the first
    read-only folder in ``shipped_dirs`` (weights shipped with the suite) whose ``metrics/`` holds
    it, else ``cache_dir/metrics/`` (trained here, on first use)."""
    for folder in shipped_dirs:
        candidate = Path(folder) / "metrics" / name
        if candidate.is_file():
            return candidate
    return Path(cache_dir) / "metrics" / name


def weights_remedy(path: str | Path, cache_dir: str | Path) -> str:
    """What to do about a weights file from :func:`trained_weights_path` that cannot be loaded: a
    cached one is retrained once deleted; a shipped one is restored from the repository."""
    if Path(path).parent == Path(cache_dir) / "metrics":
        return "delete the file and the suite will retrain it"
    return (f"it ships with the suite: restore it (`git checkout -- {path}`), or delete it and the suite "
            f"will train its own in {Path(cache_dir) / 'metrics'}")


def sha256_bytes(data: bytes, prefix: int = 12) -> str:
    return hashlib.sha256(data).hexdigest()[:prefix]


def array_digest(x: torch.Tensor | np.ndarray) -> str:
    """A short content hash of an array (shape, dtype and bytes)."""
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    a = np.ascontiguousarray(a)
    h = hashlib.sha256()
    h.update(str(a.shape).encode())
    h.update(str(a.dtype).encode())
    h.update(a.tobytes())
    return h.hexdigest()[:16]


def pick_pairs(n: int, max_pairs: int, seed: int) -> list[tuple[int, int]]:
    """Unordered pairs (i < j) of n items: all of them if there are at most ``max_pairs``,
    else ``max_pairs`` distinct pairs drawn without replacement with ``numpy.random.default_rng(seed)``,
    returned in lexicographic order."""
    if n < 2:
        raise MetricError(f"diversity needs at least 2 generated volumes, got {n}")
    all_pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    if len(all_pairs) <= max_pairs:
        return all_pairs
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(all_pairs), size=max_pairs, replace=False)
    return sorted(all_pairs[int(c)] for c in chosen)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
