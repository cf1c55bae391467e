"""One entry point that scores a set of generated volumes with every metric, and the reference row.

:func:`score_generated` returns a flat dict ``{column name: value}`` plus ``"protocol"``: a nested,
JSON-serialisable description of how every number was made (extractor name and weights hash, slice
rule and counts per orientation, preprocessing, pair rules, numbers of real and generated volumes,
judge identity, settings). Column names carry the extractor, e.g. ``"FID-2D mean [in-domain-2d]"``,
``"FID-3D [medicalnet-resnet10]"``, so numbers from different extractors never share a column.

Columns (present when their inputs are):

* ``FID-A [x]``, ``FID-C [x]``, ``FID-S [x]``, ``FID-2D mean [x]`` for each 2D extractor x
* ``FID-3D [x]`` for each 3D extractor x
* ``FID-A rel [x]`` ... ``FID-2D mean rel [x]``, ``FID-3D rel [x]``: each FID over the FID between two
  halves of the real reference (:mod:`metrics.fd_context`; bootstrap CI and sample size in the protocol)
* ``Precision-2D [x]``, ``Recall-2D [x]``, ``Density-2D [x]``, ``Coverage-2D [x]`` and the same with
  ``-3D`` (:mod:`metrics.prdc`)
* ``FRD`` (with ``brain_mask`` and ``frd-score`` installed; else ``None`` and the reason)
* ``LPIPS diversity``; ``LPIPS fidelity`` (with ``ground_truth``); ``None`` when LPIPS is
  unavailable, the reason is in ``protocol["LPIPS"]["reason"]``
* ``MS-SSIM diversity``; ``MS-SSIM fidelity`` (with ``ground_truth``)
* ``PSNR``, ``SSIM`` (with ``ground_truth``)
* ``Dice`` and ``volume error`` (with ``judge`` and ``conditions``: a task whose condition a judge recovers);
  ``volume error mL`` and ``volume r`` (also with ``voxel_ml``)

``"per_volume"`` holds the per-volume values behind the means (Dice, volume error, MS-SSIM / LPIPS-free
fidelity, PSNR, SSIM), in the order of the volumes, so that intervals and paired comparisons can be
computed from a record later.

Each metric family of :data:`metrics.suite.METRICS` (a :class:`metrics.metric.Metric`) adds its columns,
protocol entry and per-volume values in turn; this module only checks the inputs and runs them.
What a task reports is its suite (:func:`metrics.suite.metric_suite`); metrics know no task names:
``task`` is only a label written into the protocol, the caller passes what a task implies (Dice
classes, ground truth).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

from . import suite
from .common import MetricError, as_volumes
from .extractors import FeatureExtractor
from .fd_context import DEFAULT_RESAMPLES, DEFAULT_SPLIT_SEED
from .fid import DEFAULT_CENTRAL_FRACTION, DEFAULT_SLICES_PER_AXIS
from .judge import Judge
from .lpips_metric import (
    DEFAULT_CENTRAL_FRACTION as LPIPS_CENTRAL,
    DEFAULT_FRACTION as LPIPS_FRACTION,
    DEFAULT_MIN_SIDE,
    LPIPSModel,
)
from .metric import Inputs, Scores
from .msssim import DEFAULT_MAX_PAIRS
from .prdc import DEFAULT_K

# Constants, not profile keys: every record's numbers were made with them (a new profile key would change
# every record's config hash, a new value every record's numbers).
DEFAULT_PAIR_SEED = 0           # drawing of diversity pairs and of the FD bootstrap resamples
DEFAULT_FRECHET = "monai"       # the Fréchet distance's matrix square root


@dataclass(frozen=True)
class ScoringSettings:
    slices_per_axis: int = DEFAULT_SLICES_PER_AXIS  # FID-2D slices per orientation
    fid_central_fraction: float = DEFAULT_CENTRAL_FRACTION
    lpips_fraction: float = LPIPS_FRACTION  # LPIPS: fraction of each axis' slices
    lpips_central_fraction: float = LPIPS_CENTRAL
    lpips_min_side: int = DEFAULT_MIN_SIDE
    max_pairs: int = DEFAULT_MAX_PAIRS  # diversity pairs (LPIPS and MS-SSIM)
    seed: int = DEFAULT_PAIR_SEED  # drawing of diversity pairs
    frechet: str = DEFAULT_FRECHET  # "monai" (FIDMetric, sqrtm) or "svd" (exact, faster for wide features)
    split_seed: int = DEFAULT_SPLIT_SEED  # relative FD: the seeded split of the real reference volumes in halves
    bootstrap_resamples: int = DEFAULT_RESAMPLES  # FD 95% CI over volumes (0 = none); drawn with ``seed``
    prdc_k: int = DEFAULT_K  # precision/recall/density/coverage: k nearest neighbours
    frd: bool = True  # Fréchet Radiomics Distance (needs frd-score and a brain mask)


def _no_lpips() -> LPIPSModel:
    return LPIPSModel(None, "no LPIPS model was passed to score_generated", None, None)


def _extractor_list(extractors: Any) -> list[FeatureExtractor]:
    if extractors is None:
        return []
    if isinstance(extractors, FeatureExtractor):
        return [extractors]
    if isinstance(extractors, Mapping):
        items = list(extractors.values())
    else:
        items = list(extractors)
    for e in items:
        if not isinstance(e, FeatureExtractor):
            raise MetricError(f"extractors must be FeatureExtractor objects (metrics.extractors), got {type(e).__name__}")
    names = [e.name for e in items]
    if len(set(names)) != len(names):
        raise MetricError(f"two extractors share a name ({names}); each column must name exactly one extractor")
    return items


def score_generated(
    fake: Any,
    real_ref: Any,
    *,
    conditions: Any = None,
    ground_truth: Any = None,
    extractors: Any,
    judge: Judge | None = None,
    task: str | None = None,
    lpips: LPIPSModel | None = None,
    settings: ScoringSettings | None = None,
    dice_classes: int | None = None,
    brain_mask: Any = None,
    voxel_ml: float | None = None,
    cache_dir: Any = None,
    anatomy: Any = (),
) -> dict[str, Any]:
    """Score generated volumes ``fake`` (N, 1, X, Y, Z) in [0, 1] against real reference volumes
    ``real_ref`` (M, 1, X, Y, Z).

    ``conditions``: the spatial condition each generated volume was made from, for Dice: a mask
    (N, 1, ...), labels (N, 1, ...) or one-hot over the foreground labels (N, K-1, ...), see
    :func:`metrics.dice.condition_to_labels`; ``dice_classes``: its number of classes K (default: the
    judge's; when given, the judge must segment that many). ``ground_truth``: the real volume each
    generated one should reproduce (paired tasks such as super-resolution), for LPIPS/MS-SSIM
    fidelity, PSNR and SSIM. ``task``: a label for the protocol. ``extractors``: FeatureExtractor
    objects (a mapping such as :func:`metrics.extractors.get_extractors`' result, or a list).
    ``lpips``: from :func:`metrics.lpips_metric.load_lpips` (``None`` = report LPIPS as unavailable).
    ``brain_mask``: one (X, Y, Z) mask for every volume, inside which FRD's radiomics are computed
    (``None``: FRD is reported unavailable, with that reason). ``voxel_ml``: the volume of one voxel in
    mL, for the structure volumes in mL (their absolute error and correlation with the conditions').
    ``cache_dir``: a folder where what depends on ``real_ref`` alone is kept between calls (FRD's
    radiomics features of the real volumes; the values are the same with or without it). ``anatomy``:
    ``(name, judge, labels)`` per label map, the true labels (as for ``conditions``) of the subject each
    volume should reproduce, for the anatomy Dice columns (``"anatomy Dice [name]"``).
    """
    st = settings or ScoringSettings()
    fake_t = as_volumes(fake, "generated volumes")
    real_t = as_volumes(real_ref, "real reference volumes")
    if fake_t.shape[2:] != real_t.shape[2:]:
        raise MetricError(
            f"generated volumes are {tuple(fake_t.shape[2:])} but real reference volumes {tuple(real_t.shape[2:])}; "
            "score volumes of one shape"
        )
    gt_t = None
    if ground_truth is not None:
        gt_t = as_volumes(ground_truth, "ground-truth volumes")
        if gt_t.shape != fake_t.shape:
            raise MetricError(
                f"ground truth {tuple(gt_t.shape)} must pair one to one with generated volumes {tuple(fake_t.shape)}"
            )
    inputs = Inputs(fake_t, real_t, gt_t, conditions, _extractor_list(extractors), judge, task,
                    lpips if lpips is not None else _no_lpips(), st, dice_classes, brain_mask, voxel_ml,
                    None if cache_dir is None else Path(cache_dir), tuple(anatomy))
    out = Scores(protocol={
        "task": task,
        "n_generated_volumes": int(fake_t.shape[0]),
        "n_real_reference_volumes": int(real_t.shape[0]),
        "n_ground_truth_volumes": None if gt_t is None else int(gt_t.shape[0]),
        "image_shape": list(fake_t.shape[2:]),
        "settings": asdict(st),
        "seconds": {},
    })
    for metric in suite.METRICS:
        metric.score(inputs, out)
    return {**out.row, "protocol": out.protocol, "per_volume": out.per_volume}


def reference_row(
    real_test: Any,
    real_train: Any,
    *,
    conditions_test: Any = None,
    extractors: Any,
    judge: Judge | None = None,
    task: str | None = None,
    lpips: LPIPSModel | None = None,
    settings: ScoringSettings | None = None,
    dice_classes: int | None = None,
    brain_mask: Any = None,
    voxel_ml: float | None = None,
) -> dict[str, Any]:
    """The reference row: real test volumes scored as if generated, against real training volumes
    (the floor for FID, the ceiling for Dice; diversity of real data). No ground truth is passed, so
    no fidelity columns appear."""
    out = score_generated(
        real_test,
        real_train,
        conditions=conditions_test,
        ground_truth=None,
        extractors=extractors,
        judge=judge,
        task=task,
        lpips=lpips,
        settings=settings,
        dice_classes=dice_classes,
        brain_mask=brain_mask,
        voxel_ml=voxel_ml,
    )
    out["protocol"]["row"] = "reference: real test volumes scored against real training volumes"
    return out
