"""The metrics of the benchmark, listed once, and the suite of a task.

:data:`METRICS` lists every metric family (a :class:`metrics.metric.Metric`: its columns with their
direction and protocol, what it needs, how it computes); :func:`metrics.protocol.score_generated` runs
each of them in this order. Adding a metric is one class (in ``metrics/families.py`` or its own module)
and one line here. A column of a record (``"FID-2D mean [in-domain-2d]"``, ``"Dice"``, ...) is its stem,
plus the extractor in brackets where one is used; :func:`metric_of` maps a column to its
:class:`~metrics.metric.Column`. :func:`metric_suite` is the list of metrics a task reports, from plain
properties of the task (whether a judge scores Dice against its condition, whether it has paired ground
truth); metrics know no task names.
"""
from __future__ import annotations

from . import families
from .metric import HIGHER, LOWER, NEEDS_GROUND_TRUTH, NEEDS_JUDGE, NEEDS_NOTHING, Column, Metric

__all__ = ["HIGHER", "LOWER", "Column", "Metric", "METRICS", "COLUMNS", "metric_of", "metric_suite",
           "suite_columns", "names"]

METRICS: tuple[Metric, ...] = (
    families.FrechetDistance(),
    families.PRDC(),
    families.FRD(),
    families.LPIPS(),
    families.MSSSIM(),
    families.PSNR,
    families.SSIM,
    families.Dice(),
    families.AnatomyDice(),
)


def columns_of(metrics: tuple[Metric, ...]) -> tuple[Column, ...]:
    return tuple(c for m in metrics for c in m.columns)


COLUMNS: tuple[Column, ...] = columns_of(METRICS)


def metric_of(column: str) -> Column | None:
    """The descriptor of a record column (``"FID-3D [medicalnet-resnet10]"`` -> FID-3D), or None."""
    stem = str(column).split(" [")[0]
    return next((c for c in columns_of(METRICS) if stem in c.stems), None)


def _has(dice: bool, paired: bool) -> dict[str, bool]:
    return {NEEDS_NOTHING: True, NEEDS_JUDGE: bool(dice), NEEDS_GROUND_TRUTH: bool(paired)}


def metric_suite(dice: bool, paired: bool) -> tuple[Metric, ...]:
    """The metrics a task reports: FID, PRDC, FRD, LPIPS and MS-SSIM always; Dice when a judge scores its
    condition; PSNR and SSIM (and the fidelity columns) when it has paired ground truth."""
    return tuple(m for m in METRICS if _has(dice, paired)[m.needs])


def suite_columns(dice: bool, paired: bool) -> tuple[Column, ...]:
    """The column descriptors of a task's suite (the fidelity columns only with paired ground truth)."""
    return tuple(c for c in columns_of(metric_suite(dice, paired)) if _has(dice, paired)[c.needs])


def names() -> tuple[str, ...]:
    return tuple(c.name for c in COLUMNS)
