"""What a metric is: a family of columns that scores itself (in the sense of torchmetrics' ``Metric``).

A :class:`Metric` says what it needs (``needs``: nothing beyond the generated and real volumes, paired
ground truth, or a judge with conditions), which columns it writes (:class:`Column`: stems, direction,
what the number means) and how it computes them: :meth:`Metric.score` reads the checked inputs of one
call of :func:`metrics.protocol.score_generated` (:class:`Inputs`) and adds its columns, protocol entry
and per-volume values to :class:`Scores`. A metric whose inputs are absent adds nothing (or ``None``
with the reason in its protocol entry). The metrics are listed once, in :data:`metrics.suite.METRICS`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

HIGHER = "higher"
LOWER = "lower"

NEEDS_NOTHING = ""
NEEDS_GROUND_TRUTH = "ground truth"  # paired tasks (super-resolution)
NEEDS_JUDGE = "judge"                # a task whose condition a judge recovers (Dice)


@dataclass(frozen=True)
class Column:
    """What a column family of the records means (``"FID-2D mean [x]"`` -> FID-2D)."""
    name: str                    # the descriptor, e.g. "FID-2D", "LPIPS fidelity"
    family: str                  # FID-2D, FID-3D, PRDC, FRD, LPIPS, MS-SSIM, Dice, PSNR, SSIM
    direction: str               # HIGHER or LOWER is better
    protocol: str                # how the number is made (docs/METRICS.md has the details)
    columns: tuple[str, ...] = ()  # column stems; default: (name,)
    needs: str = NEEDS_NOTHING   # what the column needs beyond generated and real volumes

    @property
    def stems(self) -> tuple[str, ...]:
        return self.columns or (self.name,)

    @property
    def higher_is_better(self) -> bool:
        return self.direction == HIGHER

    @property
    def arrow(self) -> str:
        return "↑" if self.higher_is_better else "↓"


@dataclass(frozen=True)
class Inputs:
    """The checked inputs of one scoring call; volumes as (N, 1, X, Y, Z) tensors in [0, 1]."""
    fake: Any
    real: Any
    ground_truth: Any            # paired with ``fake``, or None
    conditions: Any              # as passed (see metrics.dice.condition_to_labels), or None
    extractors: list             # FeatureExtractor objects, names unique
    judge: Any                   # metrics.judge.Judge or None
    task: str | None             # a label for the protocol
    lpips: Any                   # metrics.lpips_metric.LPIPSModel (possibly unavailable)
    settings: Any                # metrics.protocol.ScoringSettings
    dice_classes: int | None
    brain_mask: Any
    voxel_ml: float | None
    cache_dir: Any = None        # a folder for what depends on the real volumes only (FRD's real features), or None
    anatomy: tuple = ()          # (label map name, judge, true labels of each volume's subject), for anatomy Dice


@dataclass
class Scores:
    """What the metrics of one call write: columns, protocol entries, per-volume values, seconds."""
    row: dict[str, Any] = field(default_factory=dict)
    protocol: dict[str, Any] = field(default_factory=dict)
    per_volume: dict[str, list] = field(default_factory=dict)

    def timed(self, key: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        out = fn()
        self.protocol["seconds"][key] = round(time.perf_counter() - t0, 3)
        return out


class Metric:
    """One family of columns: set ``name``, ``needs`` and ``columns``, and write :meth:`score`."""
    name: str = ""
    needs: str = NEEDS_NOTHING   # what a task must have for the family to be in its suite
    columns: tuple[Column, ...] = ()

    def score(self, inputs: Inputs, out: Scores) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def column(metric: str, extractor: Any = None) -> str:
    """Column header of a metric, with the extractor name in brackets where one is used."""
    if extractor is None:
        return metric
    name = extractor if isinstance(extractor, str) else extractor.name
    return f"{metric} [{name}]"
