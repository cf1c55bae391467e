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

What a task reports is its suite (:func:`metrics.suite.metric_suite`); metrics know no task names:
``task`` is only a label written into the protocol, the caller passes what a task implies (Dice
classes, ground truth).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np

from .common import MetricError, as_volumes
from .dice import condition_to_labels, dice_score, structure_volumes_ml, volume_agreement, volume_error
from .extractors import FeatureExtractor
from .fd_context import DEFAULT_RESAMPLES, DEFAULT_SPLIT_SEED, context_2d, context_3d
from .frd import frd
from .fid import DEFAULT_CENTRAL_FRACTION, DEFAULT_SLICES_PER_AXIS, fid_2d, fid_3d
from .judge import Judge
from .lpips_metric import (
    DEFAULT_CENTRAL_FRACTION as LPIPS_CENTRAL,
    DEFAULT_FRACTION as LPIPS_FRACTION,
    DEFAULT_MIN_SIDE,
    LPIPSModel,
    lpips_diversity,
    lpips_fidelity,
)
from .msssim import msssim_diversity, msssim_fidelity
from .paired import psnr, ssim
from .prdc import DEFAULT_K, NAMES as PRDC_NAMES, prdc_slices, prdc_volumes

@dataclass(frozen=True)
class ScoringSettings:
    slices_per_axis: int = DEFAULT_SLICES_PER_AXIS  # FID-2D slices per orientation
    fid_central_fraction: float = DEFAULT_CENTRAL_FRACTION
    lpips_fraction: float = LPIPS_FRACTION  # LPIPS: fraction of each axis' slices
    lpips_central_fraction: float = LPIPS_CENTRAL
    lpips_min_side: int = DEFAULT_MIN_SIDE
    max_pairs: int = 100  # diversity pairs (LPIPS and MS-SSIM)
    seed: int = 0  # drawing of diversity pairs
    frechet: str = "monai"  # "monai" (FIDMetric, sqrtm) or "svd" (exact, faster for wide features)
    split_seed: int = DEFAULT_SPLIT_SEED  # relative FD: the seeded split of the real reference volumes in halves
    bootstrap_resamples: int = DEFAULT_RESAMPLES  # FD 95% CI over volumes (0 = none); drawn with ``seed``
    prdc_k: int = DEFAULT_K  # precision/recall/density/coverage: k nearest neighbours
    frd: bool = True  # Fréchet Radiomics Distance (needs frd-score and a brain mask)


def column(metric: str, extractor: FeatureExtractor | str | None = None) -> str:
    """Column header of a metric, with the extractor name in brackets where one is used."""
    if extractor is None:
        return metric
    name = extractor if isinstance(extractor, str) else extractor.name
    return f"{metric} [{name}]"


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


def _prdc(fn) -> dict[str, Any]:
    """P/R/D/C, or ``None`` values with the reason in the protocol (e.g. too few volumes for k)."""
    try:
        return fn()
    except MetricError as err:
        return {"protocol": {"available": False, "reason": str(err)}}


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
    exts = _extractor_list(extractors)

    row: dict[str, Any] = {}
    per_volume: dict[str, list] = {}
    proto: dict[str, Any] = {
        "task": task,
        "n_generated_volumes": int(fake_t.shape[0]),
        "n_real_reference_volumes": int(real_t.shape[0]),
        "n_ground_truth_volumes": None if gt_t is None else int(gt_t.shape[0]),
        "image_shape": list(fake_t.shape[2:]),
        "settings": asdict(st),
        "seconds": {},
    }

    def timed(key: str, fn):
        t0 = time.perf_counter()
        out = fn()
        proto["seconds"][key] = round(time.perf_counter() - t0, 3)
        return out

    # FID, relative FID (CI, sample size in the protocol), precision / recall / density / coverage
    for e in exts:
        if e.spatial_dims == 2:
            r = timed(column("FID-2D", e),
                      lambda: fid_2d(real_t, fake_t, e, st.slices_per_axis, st.fid_central_fraction, st.frechet))
            for k in ("FID-A", "FID-C", "FID-S", "FID-2D mean"):
                row[column(k, e)] = r[k]
            rel, extra = timed(column("FID-2D rel", e), lambda: context_2d(
                real_t, fake_t, e, r, st.slices_per_axis, st.fid_central_fraction, st.frechet, st.split_seed,
                st.bootstrap_resamples, st.seed))
            proto[column("FID-2D", e)] = {**r["protocol"], **extra}
            p = timed(column("PRDC-2D", e), lambda: _prdc(lambda: prdc_slices(
                real_t, fake_t, e, st.slices_per_axis, st.fid_central_fraction, st.prdc_k)))
        else:
            r = timed(column("FID-3D", e), lambda: fid_3d(real_t, fake_t, e, st.frechet))
            row[column("FID-3D", e)] = r["FID-3D"]
            rel, extra = timed(column("FID-3D rel", e), lambda: context_3d(
                real_t, fake_t, e, r, st.frechet, st.split_seed, st.bootstrap_resamples, st.seed))
            proto[column("FID-3D", e)] = {**r["protocol"], **extra}
            p = timed(column("PRDC-3D", e), lambda: _prdc(lambda: prdc_volumes(real_t, fake_t, e, st.prdc_k)))
        row.update({column(k, e): v for k, v in rel.items()})
        dim = f"{e.spatial_dims}D"
        for name in PRDC_NAMES:
            row[column(f"{name}-{dim}", e)] = p.get(name)
        proto[column(f"PRDC-{dim}", e)] = p["protocol"]

    # FRD (radiomics features inside the brain mask, no deep extractor)
    if st.frd:
        r = timed("FRD", lambda: frd(real_t, fake_t, brain_mask))
        row["FRD"] = r["FRD"]
        proto["FRD"] = r["protocol"]
    else:
        row["FRD"] = None
        proto["FRD"] = {"available": False, "reason": "not computed: turned off (the profile's metrics.frd is false)"}

    # LPIPS
    lp = lpips if lpips is not None else LPIPSModel(None, "no LPIPS model was passed to score_generated", None, None)
    lp_kw = dict(fraction=st.lpips_fraction, central_fraction=st.lpips_central_fraction, min_side=st.lpips_min_side)
    lp_proto: dict[str, Any] = {}
    if fake_t.shape[0] >= 2:
        r = timed("LPIPS diversity", lambda: lpips_diversity(fake_t, lp, max_pairs=st.max_pairs, seed=st.seed, **lp_kw))
        row["LPIPS diversity"] = r["LPIPS diversity"]
        lp_proto["diversity"] = r["protocol"]
    if gt_t is not None:
        r = timed("LPIPS fidelity", lambda: lpips_fidelity(fake_t, gt_t, lp, **lp_kw))
        row["LPIPS fidelity"] = r["LPIPS fidelity"]
        lp_proto["fidelity"] = r["protocol"]
    lp_proto["available"] = lp.available
    lp_proto["reason"] = lp.reason
    proto["LPIPS"] = lp_proto

    # MS-SSIM
    ms_proto: dict[str, Any] = {}
    if fake_t.shape[0] >= 2:
        r = timed("MS-SSIM diversity", lambda: msssim_diversity(fake_t, max_pairs=st.max_pairs, seed=st.seed))
        row["MS-SSIM diversity"] = r["MS-SSIM diversity"]
        ms_proto["diversity"] = r["protocol"]
    if gt_t is not None:
        r = timed("MS-SSIM fidelity", lambda: msssim_fidelity(fake_t, gt_t))
        row["MS-SSIM fidelity"] = r["MS-SSIM fidelity"]
        per_volume["MS-SSIM fidelity"] = r["MS-SSIM fidelity per volume"]
        ms_proto["fidelity"] = r["protocol"]
    proto["MS-SSIM"] = ms_proto

    # PSNR / SSIM
    if gt_t is not None:
        r = timed("PSNR", lambda: psnr(fake_t, gt_t))
        row["PSNR"] = r["PSNR"]
        proto["PSNR"] = r["protocol"]
        per_volume["PSNR"] = r["PSNR per volume"]
        r = timed("SSIM", lambda: ssim(fake_t, gt_t))
        row["SSIM"] = r["SSIM"]
        proto["SSIM"] = r["protocol"]
        per_volume["SSIM"] = r["SSIM per volume"]

    # Dice
    if judge is not None and conditions is not None:
        classes = judge.num_classes if dice_classes is None else int(dice_classes)
        if judge.num_classes != classes:
            raise MetricError(
                f"the judge segments {judge.num_classes} classes but the conditions of task '{task}' have {classes}; "
                "train the judge for these conditions (metrics.judge.train_judge)"
            )
        labels = condition_to_labels(conditions, classes)
        if labels.shape[0] != fake_t.shape[0] or labels.shape[2:] != fake_t.shape[2:]:
            raise MetricError(
                f"conditions {tuple(labels.shape)} must pair one to one with generated volumes {tuple(fake_t.shape)}"
            )
        segmented = timed("segmentation", lambda: judge.segment(fake_t))
        r = timed("Dice", lambda: dice_score(segmented, labels, classes))
        row["Dice"] = r["Dice"]
        proto["Dice"] = {**r["protocol"], "judge": judge.describe(), "per_class": r["Dice per class"]}
        per_volume["Dice"] = r["Dice per volume"]
        per_volume["volume error"] = volume_error(segmented, labels, classes)
        errors = [v for v in per_volume["volume error"] if v == v]
        row["volume error"] = float(sum(errors) / len(errors)) if errors else None
        proto["volume error"] = {"definition": "|V(judge's segmentation) - V(condition)| / V(condition) per foreground "
                                               "class present in the condition, mean over classes, then over volumes"}
        if voxel_ml is not None:
            seg_ml = structure_volumes_ml(segmented, classes, voxel_ml)
            cond_ml = structure_volumes_ml(labels, classes, voxel_ml)
            agreement = volume_agreement(seg_ml, cond_ml)
            per_volume["volume mL"] = seg_ml.round(3).tolist()
            per_volume["condition volume mL"] = cond_ml.round(3).tolist()
            per_volume["volume error mL"] = agreement["error mL per volume"]
            errors_ml = [v for v in agreement["error mL per volume"] if v == v]
            row["volume error mL"] = float(np.mean(errors_ml)) if errors_ml else None
            rs = [r for r in agreement["r per class"] if r is not None]
            row["volume r"] = float(np.mean(rs)) if rs else None
            proto["volume mL"] = {
                "definition": "the judge's segmented volume of each foreground class against the condition's, in mL: "
                              "|V(segmentation) - V(condition)| per class present in the condition, mean over classes, "
                              "then over volumes ('volume error mL'); Pearson r across volumes per class, mean over "
                              "classes ('volume r')",
                "voxel_ml": float(voxel_ml), "r_per_class": agreement["r per class"],
                "mean_abs_error_ml_per_class": agreement["mean abs error mL per class"]}

    row["protocol"] = proto
    row["per_volume"] = per_volume
    return row


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
