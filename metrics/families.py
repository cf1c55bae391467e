"""The benchmark's metric families, each a :class:`metrics.metric.Metric` (columns, protocol, computation).

The numerical work is in the metric modules (``fid``, ``fd_context``, ``prdc``, ``frd``, ``lpips_metric``,
``msssim``, ``paired``, ``dice``); a family here only says which columns, protocol entry and per-volume
values that work becomes. They are listed once in :data:`metrics.suite.METRICS`.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .common import MetricError
from .dice import condition_to_labels, dice_score, structure_volumes_ml, volume_agreement, volume_error
from .fd_context import context_2d, context_3d
from .fid import fid_2d, fid_3d
from .frd import frd
from .lpips_metric import lpips_diversity, lpips_fidelity
from .metric import (HIGHER, LOWER, NEEDS_GROUND_TRUTH, NEEDS_JUDGE, Column, Inputs, Metric, Scores,
                     column)
from .msssim import msssim_diversity, msssim_fidelity
from .paired import psnr, ssim
from .prdc import NAMES as PRDC_NAMES, prdc_slices, prdc_volumes

_REL = "divided by the FID-{d} between two halves of the real reference volumes (seeded split, protocol " \
       "'relative'); 1 = as far as real data is from itself"


class FrechetDistance(Metric):
    """FID-2D (per orientation and mean) and FID-3D per extractor, each with its relative FD."""
    name = "FID"
    columns = (
        Column("FID-2D", "FID-2D", LOWER, "Fréchet distance of 2D slice features per orientation (axial, coronal, "
               "sagittal) and their mean, generated vs real reference volumes",
               columns=("FID-A", "FID-C", "FID-S", "FID-2D mean")),
        Column("FID-3D", "FID-3D", LOWER, "Fréchet distance of 3D volume features, generated vs real reference "
               "volumes"),
        Column("FID-2D rel", "FID-2D", LOWER, "each FID-2D column " + _REL.format(d="2D"),
               columns=("FID-A rel", "FID-C rel", "FID-S rel", "FID-2D mean rel")),
        Column("FID-3D rel", "FID-3D", LOWER, "FID-3D " + _REL.format(d="3D")),
    )

    def score(self, inp: Inputs, out: Scores) -> None:
        st, real, fake = inp.settings, inp.real, inp.fake
        for e in inp.extractors:
            if e.spatial_dims == 2:
                r = out.timed(column("FID-2D", e), lambda: fid_2d(
                    real, fake, e, st.slices_per_axis, st.fid_central_fraction, st.frechet))
                for k in ("FID-A", "FID-C", "FID-S", "FID-2D mean"):
                    out.row[column(k, e)] = r[k]
                rel, extra = out.timed(column("FID-2D rel", e), lambda: context_2d(
                    real, fake, e, r, st.slices_per_axis, st.fid_central_fraction, st.frechet, st.split_seed,
                    st.bootstrap_resamples, st.seed))
            else:
                r = out.timed(column("FID-3D", e), lambda: fid_3d(real, fake, e, st.frechet))
                out.row[column("FID-3D", e)] = r["FID-3D"]
                rel, extra = out.timed(column("FID-3D rel", e), lambda: context_3d(
                    real, fake, e, r, st.frechet, st.split_seed, st.bootstrap_resamples, st.seed))
            out.protocol[column(f"FID-{e.spatial_dims}D", e)] = {**r["protocol"], **extra}
            out.row.update({column(k, e): v for k, v in rel.items()})


def _prdc_column(name: str, protocol: str) -> Column:
    return Column(name, "PRDC", HIGHER, protocol, columns=(f"{name}-2D", f"{name}-3D"))


class PRDC(Metric):
    """Precision, recall, density and coverage of 2D slice and 3D volume features, per extractor."""
    name = "PRDC"
    columns = (
        _prdc_column("Precision", "fraction of generated samples inside the k-NN ball of some real sample "
                     "(Kynkäänniemi et al. 2019; k in the protocol); 2D: mean over orientations of slice features"),
        _prdc_column("Recall", "fraction of real samples inside the k-NN ball of some generated sample; near 0 "
                     "for a collapsed generator"),
        _prdc_column("Density", "mean number of real k-NN balls holding a generated sample, over k (Naeem et al. "
                     "2020; can exceed 1)"),
        _prdc_column("Coverage", "fraction of real samples whose k-NN ball holds a generated sample (Naeem et al. "
                     "2020); near 0 for a collapsed generator"),
    )

    def score(self, inp: Inputs, out: Scores) -> None:
        st = inp.settings
        for e in inp.extractors:
            dim = f"{e.spatial_dims}D"
            fn, args = ((prdc_slices, (st.slices_per_axis, st.fid_central_fraction, st.prdc_k))
                        if e.spatial_dims == 2 else (prdc_volumes, (st.prdc_k,)))
            p = out.timed(column(f"PRDC-{dim}", e), lambda: _or_reason(lambda: fn(inp.real, inp.fake, e, *args)))
            for name in PRDC_NAMES:
                out.row[column(f"{name}-{dim}", e)] = p.get(name)
            out.protocol[column(f"PRDC-{dim}", e)] = p["protocol"]


def _or_reason(fn: Callable[[], dict]) -> dict[str, Any]:
    """The result, or no values with the reason in the protocol (e.g. too few volumes for k)."""
    try:
        return fn()
    except MetricError as err:
        return {"protocol": {"available": False, "reason": str(err)}}


class FRD(Metric):
    """Fréchet Radiomics Distance inside the brain mask (no deep extractor)."""
    name = "FRD"
    columns = (Column("FRD", "FRD", LOWER, "Fréchet Radiomics Distance (frd-score, pyradiomics features inside the "
                      "brain mask, no deep extractor); None with the reason in the protocol when it cannot run"),)

    def score(self, inp: Inputs, out: Scores) -> None:
        if inp.settings.frd:
            kept = None if inp.cache_dir is None else inp.cache_dir / "frd"
            r = out.timed("FRD", lambda: frd(inp.real, inp.fake, inp.brain_mask, cache_dir=kept))
            out.row["FRD"], out.protocol["FRD"] = r["FRD"], r["protocol"]
        else:
            out.row["FRD"] = None
            out.protocol["FRD"] = {"available": False,
                                   "reason": "not computed: turned off (the profile's metrics.frd is false)"}


class DiversityFidelity(Metric):
    """``<name> diversity`` between pairs of generated volumes (with two or more), ``<name> fidelity``
    against the ground truth (when given); one protocol entry ``<name>`` with both."""

    def diversity(self, inp: Inputs) -> dict:
        raise NotImplementedError

    def fidelity(self, inp: Inputs) -> dict:
        raise NotImplementedError

    def entry(self, inp: Inputs) -> dict:
        """Protocol items besides the diversity's and fidelity's."""
        return {}

    def score(self, inp: Inputs, out: Scores) -> None:
        entry: dict[str, Any] = {}
        parts = {"diversity": (inp.fake.shape[0] >= 2, self.diversity),
                 "fidelity": (inp.ground_truth is not None, self.fidelity)}
        for part, (present, fn) in parts.items():
            if present:
                key = f"{self.name} {part}"
                r = out.timed(key, lambda: fn(inp))
                out.row[key] = r[key]
                entry[part] = r["protocol"]
                if f"{key} per volume" in r:
                    out.per_volume[key] = r[f"{key} per volume"]
        out.protocol[self.name] = {**entry, **self.entry(inp)}


class LPIPS(DiversityFidelity):
    """LPIPS on 2D slices; ``None`` with the reason when no LPIPS model is available."""
    name = "LPIPS"
    columns = (
        Column("LPIPS diversity", "LPIPS", HIGHER, "mean LPIPS between pairs of generated volumes (2D slices); "
               "the real-vs-real row is the target"),
        Column("LPIPS fidelity", "LPIPS", LOWER, "LPIPS of each generated volume against its ground truth",
               needs=NEEDS_GROUND_TRUTH),
    )

    @staticmethod
    def _kw(inp: Inputs) -> dict:
        st = inp.settings
        return dict(fraction=st.lpips_fraction, central_fraction=st.lpips_central_fraction, min_side=st.lpips_min_side)

    def diversity(self, inp: Inputs) -> dict:
        st = inp.settings
        return lpips_diversity(inp.fake, inp.lpips, max_pairs=st.max_pairs, seed=st.seed, **self._kw(inp))

    def fidelity(self, inp: Inputs) -> dict:
        return lpips_fidelity(inp.fake, inp.ground_truth, inp.lpips, **self._kw(inp))

    def entry(self, inp: Inputs) -> dict:
        return {"available": inp.lpips.available, "reason": inp.lpips.reason}


class MSSSIM(DiversityFidelity):
    """3D MS-SSIM."""
    name = "MS-SSIM"
    columns = (
        Column("MS-SSIM diversity", "MS-SSIM", LOWER, "mean 3D MS-SSIM between pairs of generated volumes; "
               "the real-vs-real row is the target"),
        Column("MS-SSIM fidelity", "MS-SSIM", HIGHER, "3D MS-SSIM of each generated volume against its ground "
               "truth", needs=NEEDS_GROUND_TRUTH),
    )

    def diversity(self, inp: Inputs) -> dict:
        return msssim_diversity(inp.fake, max_pairs=inp.settings.max_pairs, seed=inp.settings.seed)

    def fidelity(self, inp: Inputs) -> dict:
        return msssim_fidelity(inp.fake, inp.ground_truth)


class PairedMetric(Metric):
    """A metric of each generated volume against its ground truth: its mean, protocol and per-volume values."""
    needs = NEEDS_GROUND_TRUTH

    def __init__(self, name: str, fn: Callable[[Any, Any], dict], protocol: str):
        self.name, self.fn = name, fn
        self.columns = (Column(name, name, HIGHER, protocol, needs=NEEDS_GROUND_TRUTH),)

    def score(self, inp: Inputs, out: Scores) -> None:
        if inp.ground_truth is not None:
            r = out.timed(self.name, lambda: self.fn(inp.fake, inp.ground_truth))
            out.row[self.name], out.protocol[self.name] = r[self.name], r["protocol"]
            out.per_volume[self.name] = r[f"{self.name} per volume"]


PSNR = PairedMetric("PSNR", psnr, "peak signal-to-noise ratio against the ground truth (max 1)")
SSIM = PairedMetric("SSIM", ssim, "3D SSIM against the ground truth")


def _judge_dice(judge, volumes, labels, classes: int, what: str, out: Scores, timing: str):
    """The steps every Dice column shares: ``labels`` (one-hot or class indices, one per volume) as class indices,
    checked to pair with ``volumes``, the judge's segmentation of ``volumes`` (timed as ``timing``) and its Dice
    against them. Returns ``(segmentation, labels, dice_score's dict)``."""
    labels = condition_to_labels(labels, classes)
    if labels.shape[0] != volumes.shape[0] or labels.shape[2:] != volumes.shape[2:]:
        raise MetricError(f"{what} {tuple(labels.shape)} must pair one to one with the volumes {tuple(volumes.shape)}")
    segmented = out.timed(timing, lambda: judge.segment(volumes))
    return segmented, labels, dice_score(segmented, labels, classes)


class Dice(Metric):
    """A judge's segmentation of each generated volume against the condition it was made from: Dice, the
    structure volumes' error and, with ``voxel_ml``, their error in mL and correlation."""
    name = "Dice"
    needs = NEEDS_JUDGE
    columns = (Column("Dice", "Dice", HIGHER, "a trained judge's segmentation of each generated volume against the "
                      "condition it was generated from (mean foreground Dice)", needs=NEEDS_JUDGE),)

    def score(self, inp: Inputs, out: Scores) -> None:
        judge = inp.judge
        if judge is None or inp.conditions is None:
            return
        classes = judge.num_classes if inp.dice_classes is None else int(inp.dice_classes)
        if judge.num_classes != classes:
            raise MetricError(
                f"the judge segments {judge.num_classes} classes but the conditions of task '{inp.task}' have "
                f"{classes}; train the judge for these conditions (metrics.judge.train_judge)"
            )
        segmented, labels, r = _judge_dice(judge, inp.fake, inp.conditions, classes, "conditions", out, "segmentation")
        out.row["Dice"] = r["Dice"]
        out.protocol["Dice"] = {**r["protocol"], "judge": judge.describe(), "per_class": r["Dice per class"]}
        out.per_volume["Dice"] = r["Dice per volume"]
        out.per_volume["volume error"] = volume_error(segmented, labels, classes)
        errors = [v for v in out.per_volume["volume error"] if v == v]  # NaN: no foreground class in the condition
        out.row["volume error"] = float(sum(errors) / len(errors)) if errors else None
        out.protocol["volume error"] = {
            "definition": "|V(judge's segmentation) - V(condition)| / V(condition) per foreground class present "
                          "in the condition, mean over classes, then over volumes"}
        if inp.voxel_ml is not None:
            self._volumes_ml(segmented, labels, classes, inp.voxel_ml, out)

    @staticmethod
    def _volumes_ml(segmented, labels, classes: int, voxel_ml, out: Scores) -> None:
        seg_ml = structure_volumes_ml(segmented, classes, voxel_ml)
        cond_ml = structure_volumes_ml(labels, classes, voxel_ml)
        agreement = volume_agreement(seg_ml, cond_ml)
        out.per_volume["volume mL"] = seg_ml.round(3).tolist()
        out.per_volume["condition volume mL"] = cond_ml.round(3).tolist()
        out.per_volume["volume error mL"] = agreement["error mL per volume"]
        errors_ml = [v for v in agreement["error mL per volume"] if v == v]
        out.row["volume error mL"] = float(np.mean(errors_ml)) if errors_ml else None
        rs = [r for r in agreement["r per class"] if r is not None]
        out.row["volume r"] = float(np.mean(rs)) if rs else None
        out.protocol["volume mL"] = {
            "definition": "the judge's segmented volume of each foreground class against the condition's, in mL: "
                          "|V(segmentation) - V(condition)| per class present in the condition, mean over classes, "
                          "then over volumes ('volume error mL'); Pearson r across volumes per class, mean over "
                          "classes ('volume r')",
            "voxel_ml": float(voxel_ml), "r_per_class": agreement["r per class"],
            "mean_abs_error_ml_per_class": agreement["mean abs error mL per class"]}


ANATOMY_DICE = "anatomy Dice"


class AnatomyDice(Metric):
    """Whether a volume keeps its subject's anatomy: a judge's segmentation of each volume against the
    true label map of the subject it should reproduce (paired tasks: a super-resolved volume and its
    subject's ventricles or tissue classes). One column per label map, named in brackets."""
    name = ANATOMY_DICE
    needs = NEEDS_GROUND_TRUTH
    columns = (Column(ANATOMY_DICE, "Dice", HIGHER, "a trained judge's segmentation of each volume against the "
                      "true label map of its own subject (mean foreground Dice), one column per label map",
                      needs=NEEDS_GROUND_TRUTH),)

    def score(self, inp: Inputs, out: Scores) -> None:
        score_anatomy(inp.fake, inp.anatomy, out)


def score_anatomy(volumes, anatomy, out: Scores) -> None:
    """The anatomy Dice columns of ``volumes`` ((N, 1, X, Y, Z) tensor in [0, 1]): one per ``(label map name,
    judge, true labels of each volume's subject)`` in ``anatomy``."""
    for labels_name, judge, labels in anatomy:
        key = column(ANATOMY_DICE, labels_name)
        _, _, r = _judge_dice(judge, volumes, labels, judge.num_classes, f"the true '{labels_name}' labels", out, key)
        out.row[key] = r["Dice"]
        out.protocol[key] = {**r["protocol"], "judge": judge.describe(), "per_class": r["Dice per class"],
                             "against": f"the subject's own true '{labels_name}' (not a condition)"}
        out.per_volume[key] = r["Dice per volume"]
