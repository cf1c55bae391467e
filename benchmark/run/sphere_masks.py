"""The out-of-distribution condition of the paper's Table 6: each lateral-ventricle mask (the Dice
mask of a task with validation rows) is replaced by a sphere of the same volume centred at its centroid.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from datasets.tasks import Modality, Task


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


def sphere_task(task: Task) -> Task:
    """The task with its Dice mask (``lv``: the LV mask) swapped for its sphere; used for sampling only."""
    if not task.validation:
        raise ValueError(f"sphere masks replace the Dice mask of a task with validation rows; task '{task.name}' "
                         "has none (its definition sets validation=False)")
    name = task.dice.condition
    build = task.inputs[name].build
    sphere = Modality(1, lambda subject: sphere_like(np.ascontiguousarray(build(subject), dtype=np.float32))
                      .astype(np.float32))
    return replace(task, inputs={**task.inputs, name: sphere})
