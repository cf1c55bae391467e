"""Tasks: which spatial conditions a method receives, and how they are dropped in training.

* ``lv``: the lateral-ventricle mask (1 channel).
* ``multimodal``: the semantic map, one-hot over labels 1-4 (4 channels), and the skull image
  (1 channel); in training one of them may be dropped: semantics only 0.3, skull only 0.3, both 0.4.
* ``sr4``, ``sr8``: axial super-resolution; the condition is the volume with only every 4th / 8th
  axial slice kept, brought back to the full grid by linear interpolation along Z. Paired: the
  subject's own image is the target.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .subject import DataError, Subject


def degrade_axial(image: np.ndarray, factor: int) -> np.ndarray:
    """Keep axial slices 0, k, 2k, ... (the last axis) and interpolate linearly back to the full Z grid.

    Beyond the last kept slice the values are those of the last kept slice (clamped).
    """
    if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 1:
        raise DataError(f"super-resolution factor must be a positive integer, got {factor!r}")
    image = np.asarray(image)
    z = image.shape[-1]
    kept = image[..., ::factor].astype(np.float32)
    pos = np.arange(z) / factor                       # position in units of kept slices
    lo = np.minimum(np.floor(pos).astype(int), kept.shape[-1] - 1)
    hi = np.minimum(lo + 1, kept.shape[-1] - 1)
    w = np.where(hi > lo, pos - lo, 0.0).astype(np.float32)  # clamp beyond the last kept slice
    return (kept[..., lo] * (1.0 - w) + kept[..., hi] * w).astype(np.float32)


def _one_hot_semantics(subject: Subject) -> np.ndarray:
    sem = subject.semantics[0]
    return np.stack([(sem == k) for k in (1, 2, 3, 4)]).astype(np.float32)


@dataclass(frozen=True)
class Task:
    name: str
    modalities: dict[str, int]                          # condition name -> channel count, in order
    modality_drop: tuple[float, float, float] | None    # P(first only), P(second only), P(both) in training
    paired: bool                                        # True when the ground-truth image is the target
    _builders: tuple[Callable[[Subject], np.ndarray], ...] = field(default=(), repr=False, compare=False)
    description: str = ""

    def conditions(self, subject: Subject) -> dict[str, np.ndarray]:
        """Each condition as (C, X, Y, Z) float32, in the order of ``modalities``."""
        out = {}
        for (name, channels), build in zip(self.modalities.items(), self._builders):
            array = np.ascontiguousarray(build(subject), dtype=np.float32)
            if array.shape != (channels,) + subject.image.shape[1:]:
                raise DataError(f"task '{self.name}': condition '{name}' of subject {subject.id} has shape "
                                f"{array.shape}, expected {(channels,) + subject.image.shape[1:]}")
            out[name] = array
        return out

    def sample_presence(self, rng: np.random.Generator, batch: int) -> dict[str, np.ndarray]:
        """Which modalities each training example keeps: (B,) float32 of 0/1 per modality."""
        names = list(self.modalities)
        if self.modality_drop is None:
            return {name: np.ones(batch, dtype=np.float32) for name in names}
        p_first, p_second, _ = self.modality_drop
        u = rng.random(batch)
        first_only = u < p_first
        second_only = (u >= p_first) & (u < p_first + p_second)
        return {names[0]: (~second_only).astype(np.float32), names[1]: (~first_only).astype(np.float32)}


def _check_drop(drop):
    if drop is not None and (len(drop) != 3 or abs(sum(drop) - 1.0) > 1e-9 or min(drop) < 0):
        raise ValueError(f"modality_drop must be three probabilities summing to 1, got {drop}")
    return drop


TASKS: dict[str, Task] = {
    "lv": Task("lv", {"lv_mask": 1}, None, False,
               (lambda s: s.lv_mask.astype(np.float32),), "lateral-ventricle mask"),
    "multimodal": Task("multimodal", {"semantics": 4, "skull": 1}, _check_drop((0.3, 0.3, 0.4)), False,
                       (_one_hot_semantics, lambda s: s.skull), "semantic map (one-hot, labels 1-4) + skull image"),
    "sr4": Task("sr4", {"low_res": 1}, None, True,
                (lambda s: degrade_axial(s.image, 4),), "axial super-resolution x4"),
    "sr8": Task("sr8", {"low_res": 1}, None, True,
                (lambda s: degrade_axial(s.image, 8),), "axial super-resolution x8"),
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise DataError(f"unknown task '{name}'; known tasks: {', '.join(TASKS)}") from None
