"""Trilinear interpolation: the reference row of the super-resolution table.

Nothing is learned (0 parameters, ``fit`` does nothing). The output is the task's condition
itself: the kept axial slices linearly interpolated back to the full Z grid, with the slices
beyond the last kept one equal to it (``datasets.tasks.degrade_axial``). Only Z was subsampled, so
on the full X-Y grid trilinear interpolation reduces to this linear interpolation along Z.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from methods._sr import SUPER_RESOLUTION, low_res_condition
from methods.base import Conditions, DirectMethod
from methods.registry import register


@register("trilinear")
class Trilinear(DirectMethod):
    family = SUPER_RESOLUTION

    def generate(self, conditions: Conditions, scalars: torch.Tensor, subjects: Sequence[Any],
                 engine: Any = None) -> torch.Tensor:
        return low_res_condition(conditions, self.name).float().clamp(0, 1)
