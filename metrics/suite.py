"""What each metric column means: a small descriptor per column family, and the suite of a task.

A column of a record (``"FID-2D mean [in-domain-2d]"``, ``"Dice"``, ...) is its stem, plus the
extractor in brackets where one is used; :func:`metric_of` maps a column to its :class:`Metric`.
:func:`metric_suite` is the list of metrics a task reports, from plain properties of the task
(whether a judge scores Dice against its condition, whether it has paired ground truth); metrics
know no task names.
"""
from __future__ import annotations

from dataclasses import dataclass

HIGHER = "higher"
LOWER = "lower"


@dataclass(frozen=True)
class Metric:
    name: str                    # the descriptor, e.g. "FID-2D", "LPIPS fidelity"
    family: str                  # FID-2D, FID-3D, PRDC, FRD, LPIPS, MS-SSIM, Dice, PSNR, SSIM
    direction: str               # HIGHER or LOWER is better
    protocol: str                # how the number is made (docs/METRICS.md has the details)
    columns: tuple[str, ...] = ()  # column stems; default: (name,)
    needs: str = ""              # "" | "ground truth" (paired tasks) | "judge" (a Dice condition)

    @property
    def stems(self) -> tuple[str, ...]:
        return self.columns or (self.name,)

    @property
    def higher_is_better(self) -> bool:
        return self.direction == HIGHER

    @property
    def arrow(self) -> str:
        return "↑" if self.higher_is_better else "↓"


METRICS: tuple[Metric, ...] = (
    Metric("FID-2D", "FID-2D", LOWER, "Fréchet distance of 2D slice features per orientation (axial, coronal, "
           "sagittal) and their mean, generated vs real reference volumes",
           columns=("FID-A", "FID-C", "FID-S", "FID-2D mean")),
    Metric("FID-3D", "FID-3D", LOWER, "Fréchet distance of 3D volume features, generated vs real reference volumes"),
    Metric("FID-2D rel", "FID-2D", LOWER, "each FID-2D column divided by the FID-2D between two halves of the real "
           "reference volumes (seeded split, protocol 'relative'); 1 = as far as real data is from itself",
           columns=("FID-A rel", "FID-C rel", "FID-S rel", "FID-2D mean rel")),
    Metric("FID-3D rel", "FID-3D", LOWER, "FID-3D divided by the FID-3D between two halves of the real reference "
           "volumes (seeded split, protocol 'relative'); 1 = as far as real data is from itself"),
    Metric("Precision", "PRDC", HIGHER, "fraction of generated samples inside the k-NN ball of some real sample "
           "(Kynkäänniemi et al. 2019; k in the protocol); 2D: mean over orientations of slice features",
           columns=("Precision-2D", "Precision-3D")),
    Metric("Recall", "PRDC", HIGHER, "fraction of real samples inside the k-NN ball of some generated sample; "
           "near 0 for a collapsed generator", columns=("Recall-2D", "Recall-3D")),
    Metric("Density", "PRDC", HIGHER, "mean number of real k-NN balls holding a generated sample, over k "
           "(Naeem et al. 2020; can exceed 1)", columns=("Density-2D", "Density-3D")),
    Metric("Coverage", "PRDC", HIGHER, "fraction of real samples whose k-NN ball holds a generated sample "
           "(Naeem et al. 2020); near 0 for a collapsed generator", columns=("Coverage-2D", "Coverage-3D")),
    Metric("FRD", "FRD", LOWER, "Fréchet Radiomics Distance (frd-score, pyradiomics features inside the brain "
           "mask, no deep extractor); None with the reason in the protocol when it cannot run"),
    Metric("LPIPS diversity", "LPIPS", HIGHER, "mean LPIPS between pairs of generated volumes (2D slices); "
           "the real-vs-real row is the target"),
    Metric("LPIPS fidelity", "LPIPS", LOWER, "LPIPS of each generated volume against its ground truth",
           needs="ground truth"),
    Metric("MS-SSIM diversity", "MS-SSIM", LOWER, "mean 3D MS-SSIM between pairs of generated volumes; "
           "the real-vs-real row is the target"),
    Metric("MS-SSIM fidelity", "MS-SSIM", HIGHER, "3D MS-SSIM of each generated volume against its ground truth",
           needs="ground truth"),
    Metric("Dice", "Dice", HIGHER, "a trained judge's segmentation of each generated volume against the condition "
           "it was generated from (mean foreground Dice)", needs="judge"),
    Metric("PSNR", "PSNR", HIGHER, "peak signal-to-noise ratio against the ground truth (max 1)", needs="ground truth"),
    Metric("SSIM", "SSIM", HIGHER, "3D SSIM against the ground truth", needs="ground truth"),
)

_BY_STEM = {stem: m for m in METRICS for stem in m.stems}


def metric_of(column: str) -> Metric | None:
    """The descriptor of a record column (``"FID-3D [medicalnet-resnet10]"`` -> FID-3D), or None."""
    return _BY_STEM.get(str(column).split(" [")[0])


def metric_suite(dice: bool, paired: bool) -> tuple[Metric, ...]:
    """The metrics a task reports: FID, LPIPS and MS-SSIM always; Dice when a judge scores its condition;
    PSNR, SSIM and the fidelity columns when it has paired ground truth."""
    have = {"": True, "judge": bool(dice), "ground truth": bool(paired)}
    return tuple(m for m in METRICS if have[m.needs])


def names() -> tuple[str, ...]:
    return tuple(m.name for m in METRICS)
