"""Fréchet Radiomics Distance (FRD; Konz et al., proposed for MONAI in Project-MONAI/MONAI#8643).

Radiomics features (pyradiomics, through the ``frd-score`` package's ``compute_frd``, its default
FRD version and settings) of every volume inside one brain mask, normalised jointly over both sets,
and the Fréchet distance of the two feature sets (``frd-score`` reports it log-transformed in v1).
No deep extractor is involved, so the column is plain ``FRD``. Each volume is written with its mask
as NIfTI (1 mm isotropic, SimpleITK) to a temporary folder first, because ``compute_frd`` reads files.

The mask is one array (X, Y, Z) for every volume (e.g. where most real training subjects have brain
tissue): generated volumes have no segmentation of their own. Without ``frd-score`` (and its
``pyradiomics``), or without a mask, the column is ``None`` and the protocol says why.
"""
from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from core.processes import worker_context

from .common import as_volumes


def frd_unavailable() -> str | None:
    """Why FRD cannot be computed here (None when it can)."""
    try:
        import SimpleITK  # noqa: F401
        import frd_score  # noqa: F401
        import radiomics  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure is a reason
        return (f"frd-score cannot be imported ({type(err).__name__}: {err}); it is a dependency of the suite: "
                "reinstall it (pip install -e .; frd-score and pyradiomics-bhklab)")
    return None


def _write(volumes: np.ndarray, mask: np.ndarray, folder: Path, prefix: str) -> tuple[list[str], list[str]]:
    import SimpleITK as sitk

    images, masks = [], []
    m = sitk.GetImageFromArray(mask.astype(np.uint8).transpose(2, 1, 0))  # numpy (Z, Y, X) for SimpleITK
    for i, v in enumerate(volumes):
        img = sitk.GetImageFromArray(np.asarray(v[0], np.float32).transpose(2, 1, 0))
        ip, mp = folder / f"{prefix}{i:04d}.nii.gz", folder / f"{prefix}{i:04d}_mask.nii.gz"
        sitk.WriteImage(img, str(ip))
        sitk.WriteImage(m, str(mp))
        images.append(str(ip))
        masks.append(str(mp))
    return images, masks


def _compute_frd_in_clean_workers(frd_score, paths, masks) -> float:
    """``frd_score.compute_frd`` with its feature pool from :func:`core.processes.worker_context`: the
    package's own ``multiprocessing.Pool`` forks this process, whose torch threads can leave the
    forked worker waiting on a lock for ever (seen: a grid hung in FRD)."""
    import frd_score.frd as module

    plain = module.mp
    module.mp = worker_context()
    try:
        return frd_score.compute_frd(paths, paths_masks=masks, num_workers=1)
    finally:
        module.mp = plain


def frd(real: Any, fake: Any, brain_mask: Any) -> dict[str, Any]:
    """``{"FRD": value or None, "protocol": {...}}`` of generated ``fake`` against ``real`` volumes."""
    reason = frd_unavailable()
    if reason is None and brain_mask is None:
        reason = "no brain mask was passed (score_generated(..., brain_mask=...))"
    proto: dict[str, Any] = {"extractor": "none (pyradiomics features inside the brain mask)"}
    if reason is not None:
        return {"FRD": None, "protocol": {**proto, "available": False, "reason": reason}}
    import frd_score

    real_t, fake_t = as_volumes(real, "real volumes"), as_volumes(fake, "generated volumes")
    mask = np.asarray(brain_mask).astype(bool)
    mask = mask.reshape(mask.shape[-3:])
    if mask.shape != tuple(real_t.shape[2:]):
        return {"FRD": None, "protocol": {**proto, "available": False, "reason":
                f"brain mask {mask.shape} does not match the volumes {tuple(real_t.shape[2:])}"}}
    try:
        with tempfile.TemporaryDirectory(prefix="frd-") as tmp, warnings.catch_warnings(), \
                contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            logging.getLogger("radiomics").setLevel(logging.ERROR)
            fi, fm = _write(fake_t.numpy(), mask, Path(tmp), "gen")
            ri, rm = _write(real_t.numpy(), mask, Path(tmp), "real")
            value = float(_compute_frd_in_clean_workers(frd_score, [fi, ri], [fm, rm]))
    except Exception as err:  # noqa: BLE001 - the reason goes into the protocol, never a fake number
        return {"FRD": None, "protocol": {**proto, "available": False,
                                           "reason": f"frd-score failed: {type(err).__name__}: {err}"}}
    return {"FRD": value if np.isfinite(value) else None, "protocol": {
        **proto, "available": True, "package": f"frd-score {frd_score.__version__}",
        "version": getattr(frd_score, "FRD_VERSION_DEFAULT", "default"),
        "mask_voxels": int(mask.sum()), "n_real_volumes": int(real_t.shape[0]),
        "n_generated_volumes": int(fake_t.shape[0]),
        "note": "compute_frd defaults (feature classes, joint normalisation, log transform of the v1 distance)"}}
