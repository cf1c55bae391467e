"""The out-of-distribution condition of the paper's Table 6: each lateral-ventricle mask is
replaced by a sphere of the same volume centred at the ventricles' centroid.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from datasets.subject import Subject
from datasets.tasks import Task


def sphere_like(mask: np.ndarray) -> np.ndarray:
    """A ball with (about) the voxel count of ``mask`` (C, X, Y, Z), at its centroid."""
    binary = mask[0] > 0
    count = int(binary.sum())
    if count == 0:
        raise ValueError("cannot build a sphere mask from an empty lateral-ventricle mask")
    centre = np.argwhere(binary).mean(axis=0)
    grid = np.indices(binary.shape).reshape(3, -1).T
    distance = np.linalg.norm(grid - centre, axis=1)
    # The `count` voxels nearest the centroid: a discrete ball of exactly the mask's volume.
    ball = np.zeros(distance.shape, dtype=mask.dtype)
    ball[np.argsort(distance, kind="stable")[:count]] = 1
    return ball.reshape((1,) + binary.shape)


@dataclass(frozen=True)
class SphereTask:
    """The ``lv`` task with every mask swapped for its sphere; used for sampling only."""

    inner: Task

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def modalities(self) -> dict[str, int]:
        return self.inner.modalities

    @property
    def paired(self) -> bool:
        return self.inner.paired

    def conditions(self, subject: Subject) -> dict[str, np.ndarray]:
        conds = dict(self.inner.conditions(subject))
        conds["lv_mask"] = sphere_like(conds["lv_mask"]).astype(np.float32)
        return conds

    def sample_presence(self, rng, batch):
        return self.inner.sample_presence(rng, batch)


def sphere_task(task: Task) -> SphereTask:
    if "lv_mask" not in task.modalities:
        raise ValueError(f"sphere masks replace the LV mask; task '{task.name}' has none")
    return SphereTask(task)
