"""Dice between label maps with MONAI's ``DiceMetric``, and conversion of conditions to label maps.

Dice of one volume = mean over the foreground classes (``include_background=False``) that are present
in the reference (classes absent from the reference are ignored, MONAI's ``ignore_empty=True``); the
reported Dice is the mean over volumes that have any foreground in the reference.

Metrics know no task names: a condition is turned into labels from its number of classes alone
(the task's definition, ``datasets.tasks``, says how many).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .common import MetricError, as_label_maps

def _check_classes(num_classes: int) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise MetricError(f"Dice needs at least 2 classes (background and one label), got {num_classes!r}")
    return int(num_classes)


def condition_to_labels(condition: Any, num_classes: int) -> torch.Tensor:
    """A spatial condition as an integer label map (N, 1, X, Y, Z) with labels 0..num_classes-1.

    ``condition`` is (N, C, X, Y, Z) (or one (C, X, Y, Z)) and either a mask (1 channel, 2 classes:
    nonzero above 0.5 = 1), a label map (1 channel, labels 0..num_classes-1) or one-hot over labels
    1..num_classes-1 (num_classes-1 channels; all-zero voxels -> 0). Pass the labelled part of a
    condition only (e.g. the semantic map without the skull image).
    """
    num_classes = _check_classes(num_classes)
    c = torch.as_tensor(condition) if not isinstance(condition, torch.Tensor) else condition.detach().cpu()
    if c.ndim == 4:
        c = c.unsqueeze(0)
    if c.ndim != 5:
        raise MetricError(f"conditions have shape {tuple(c.shape)}; expected (N, C, X, Y, Z)")
    if c.shape[1] == 1 and num_classes == 2:
        return (c > 0.5).to(torch.int64)
    if c.shape[1] == 1:
        lab = as_label_maps(c, "label maps")
        if lab.min() < 0 or lab.max() > num_classes - 1:
            raise MetricError(f"labels must lie in 0..{num_classes - 1}, got {int(lab.min())}..{int(lab.max())}")
        return lab
    if c.shape[1] == num_classes - 1:
        c = c.float()
        lab = c.argmax(dim=1, keepdim=True) + 1
        lab[c.sum(dim=1, keepdim=True) < 0.5] = 0
        return lab.to(torch.int64)
    raise MetricError(
        f"a condition with {num_classes} Dice classes must be labels (N, 1, ...) or one-hot over labels "
        f"1-{num_classes - 1} (N, {num_classes - 1}, ...); got {c.shape[1]} channels (pass the labelled part of "
        "the condition only, e.g. the semantic map without the skull image)"
    )


def _one_hot(lab: torch.Tensor, num_classes: int) -> torch.Tensor:
    from monai.networks.utils import one_hot

    return one_hot(lab, num_classes=num_classes, dim=1)


@torch.no_grad()
def dice_score(pred: Any, target: Any, num_classes: int) -> dict[str, Any]:
    """``{"Dice": float, "Dice per volume": [...], "Dice per class": {c: float}, "protocol"}``.

    ``pred`` and ``target`` are integer label maps (N, 1, X, Y, Z) with labels 0..num_classes-1."""
    from monai.metrics import DiceMetric

    p = as_label_maps(pred, "predicted label maps")
    t = as_label_maps(target, "reference label maps")
    if p.shape != t.shape:
        raise MetricError(f"label maps differ in shape: {tuple(p.shape)} vs {tuple(t.shape)}")
    for name, lab in (("predicted", p), ("reference", t)):
        if lab.min() < 0 or lab.max() >= num_classes:
            raise MetricError(f"{name} labels lie in {int(lab.min())}..{int(lab.max())}, outside 0..{num_classes - 1}")
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    per = metric(_one_hot(p, num_classes), _one_hot(t, num_classes)).double()  # (N, C-1), nan where reference class empty
    per_np = per.cpu().numpy()
    with np.errstate(all="ignore"):
        valid = ~np.all(np.isnan(per_np), axis=1)
        per_volume = np.where(valid, np.nanmean(np.where(np.isnan(per_np), np.nan, per_np), axis=1), np.nan)
        per_class = {c + 1: float(np.nanmean(per_np[:, c])) if np.any(~np.isnan(per_np[:, c])) else float("nan")
                     for c in range(per_np.shape[1])}
    if not valid.any():
        raise MetricError("no reference label map has any foreground; Dice is undefined")
    return {
        "Dice": float(np.mean(per_volume[valid])),
        "Dice per volume": [float(v) for v in per_volume],
        "Dice per class": per_class,
        "protocol": {
            "implementation": "monai.metrics.DiceMetric(include_background=False, ignore_empty=True)",
            "num_classes": num_classes,
            "reduction": "mean over foreground classes present in the reference, then mean over volumes",
            "n_volumes": int(p.shape[0]),
            "n_volumes_scored": int(valid.sum()),
        },
    }


@torch.no_grad()
def volume_error(pred: Any, target: Any, num_classes: int) -> list[float]:
    """Per volume: the relative error of each foreground class's volume, |V(pred) - V(target)| / V(target),
    averaged over the classes present in the target (NaN for a target without foreground). For the LV
    mask, how far the segmented ventricles' volume is from the condition's, whatever their overlap."""
    p = as_label_maps(pred, "predicted label maps")
    t = as_label_maps(target, "reference label maps")
    if p.shape != t.shape:
        raise MetricError(f"label maps differ in shape: {tuple(p.shape)} vs {tuple(t.shape)}")
    out = []
    for pv, tv in zip(p, t):
        errors = []
        for c in range(1, num_classes):
            reference = float((tv == c).sum())
            if reference > 0:
                errors.append(abs(float((pv == c).sum()) - reference) / reference)
        out.append(float(np.mean(errors)) if errors else float("nan"))
    return out


@torch.no_grad()
def structure_volumes_ml(label_maps: Any, num_classes: int, voxel_ml: float) -> np.ndarray:
    """(N, K-1): the volume in mL of each foreground class 1..K-1 of each label map."""
    maps = as_label_maps(label_maps, "label maps")
    if not (voxel_ml > 0 and np.isfinite(voxel_ml)):
        raise MetricError(f"voxel volume must be a positive number of mL, got {voxel_ml}")
    counts = [[float((m == c).sum()) for c in range(1, num_classes)] for m in maps]
    return np.asarray(counts, dtype=np.float64).reshape(len(counts), num_classes - 1) * voxel_ml


def volume_agreement(segmented_ml: np.ndarray, condition_ml: np.ndarray) -> dict[str, Any]:
    """How well segmented structure volumes follow the conditions' (both (N, K-1) in mL), the check
    anatomists make: per volume the mean absolute error over classes present in the condition (mL), and
    per class the Pearson correlation across volumes (None with fewer than 3 volumes or a constant side)."""
    seg, cond = np.asarray(segmented_ml, dtype=np.float64), np.asarray(condition_ml, dtype=np.float64)
    present = cond > 0
    abs_error = np.where(present, np.abs(seg - cond), np.nan)
    per_volume = [float(np.nanmean(row)) if np.isfinite(row).any() else float("nan") for row in abs_error]
    correlation = []
    for c in range(cond.shape[1]):
        x, y = seg[:, c], cond[:, c]
        ok = len(x) >= 3 and x.std() > 0 and y.std() > 0
        correlation.append(float(np.corrcoef(x, y)[0, 1]) if ok else None)
    return {"error mL per volume": per_volume, "r per class": correlation,
            "mean abs error mL per class": [float(np.nanmean(col)) if np.isfinite(col).any() else None
                                            for col in abs_error.T]}

