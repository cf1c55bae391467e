"""Shared pieces of the super-resolution methods (``trilinear``, ``liif3d``, ``inversesr``).

The super-resolution tasks (``sr4``, ``sr8``: ``sr_factor`` K) keep axial slices 0, K, 2K, ... of
the full-resolution volume (the last axis, Z) and give the methods that low-resolution volume
linearly interpolated back to the full Z grid (``datasets.tasks.degrade_axial``). At the kept slices
the interpolation weight is zero, so the condition holds the kept slices exactly and
``condition[..., ::K]`` *is* the low-resolution volume.
"""
from __future__ import annotations

from typing import Any

import torch

from methods.registry import MethodError

CONDITION = "low_res"
SUPER_RESOLUTION = "super_resolution"  # the method family (datasets.tasks.SUPER_RESOLUTION)


def sr_factor(task: Any) -> int:
    """K of a super-resolution task (its ``sr_factor``, ``datasets.tasks``)."""
    factor = getattr(task, "sr_factor", None)
    if factor is None:
        raise MethodError(f"super-resolution methods need a task with an sr_factor (e.g. sr4), "
                          f"got '{getattr(task, 'name', task)}'")
    return int(factor)


def low_res_condition(conditions, method: str) -> torch.Tensor:
    """The batch's ``low_res`` condition (B, 1, X, Y, Z)."""
    if CONDITION not in conditions.tensors:
        raise MethodError(f"method '{method}' needs the condition '{CONDITION}'; the batch has {conditions.names}")
    return conditions.tensors[CONDITION]


def kept_slices(volume: torch.Tensor, factor: int) -> torch.Tensor:
    """The low-resolution volume: axial slices 0, K, 2K, ... (B, C, X, Y, ceil(Z / K))."""
    return volume[..., ::factor]


def module_device(module: torch.nn.Module, fallback: Any = None) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    if fallback is not None:
        return module_device(fallback) if isinstance(fallback, torch.nn.Module) else torch.device(fallback)
    return torch.device("cpu")
