"""Fréchet Radiomics Distance (FRD; Konz et al., proposed for MONAI in Project-MONAI/MONAI#8643).

Radiomics features (pyradiomics, through the ``frd-score`` package's ``compute_frd``, its default
FRD version and settings) of every volume inside one brain mask, normalised jointly over both sets,
and the Fréchet distance of the two feature sets (``frd-score`` reports it log-transformed in v1).
No deep extractor is involved, so the column is plain ``FRD``. Each volume is written with its mask
as NIfTI (1 mm isotropic, SimpleITK) to a temporary folder first, because ``compute_frd`` reads files.

The mask is one array (X, Y, Z) for every volume (e.g. where most real training subjects have brain
tissue): generated volumes have no segmentation of their own. Without ``frd-score`` (and its
``pyradiomics``), or without a mask, the column is ``None`` and the protocol says why.

Every row of a grid is scored against the same real volumes, and extracting their features is half
the cost of FRD (~1 s a volume on one core). With ``cache_dir`` the real set's features, as
``frd-score``'s own ``compute_features`` returned them, are kept in a file named by a digest of the
volumes, the mask and the package versions, and read back instead of extracted again. The package
then normalises, drops and measures exactly as before, so the value is the same to the last bit.
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

from core.files import atomic_npz
from core.processes import worker_context

from .common import array_digest, as_volumes, sha256_bytes


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


def _write(volumes: np.ndarray, mask: np.ndarray, folder: Path, prefix: str,
           write: bool = True) -> tuple[list[str], list[str]]:
    """Each volume and the mask as NIfTI in ``folder``; their paths (only the paths with ``write=False``)."""
    import SimpleITK as sitk

    images, masks = [], []
    m = sitk.GetImageFromArray(mask.astype(np.uint8).transpose(2, 1, 0))  # numpy (Z, Y, X) for SimpleITK
    for i, v in enumerate(volumes):
        ip, mp = folder / f"{prefix}{i:04d}.nii.gz", folder / f"{prefix}{i:04d}_mask.nii.gz"
        if write:
            sitk.WriteImage(sitk.GetImageFromArray(np.asarray(v[0], np.float32).transpose(2, 1, 0)), str(ip))
            sitk.WriteImage(m, str(mp))
        images.append(str(ip))
        masks.append(str(mp))
    return images, masks


def majority_mask(labels: np.ndarray) -> np.ndarray:
    """FRD's one mask for every volume: the voxels where at least half of ``labels`` (N, 1, X, Y, Z),
    real volumes' tissue labels, are above 0 (generated volumes have no segmentation of their own)."""
    return (np.asarray(labels)[:, 0] > 0).mean(0) >= 0.5


def real_features_file(cache_dir: Path, volumes: np.ndarray, mask: np.ndarray) -> Path:
    """Where the radiomics features of ``volumes`` (as written: float32) inside ``mask`` are kept."""
    import frd_score
    import radiomics

    key = (f"frd-real-features/1|frd-score {frd_score.__version__}|pyradiomics {radiomics.__version__}|"
           f"{array_digest(np.asarray(volumes, np.float32))}|{array_digest(np.asarray(mask, np.uint8))}")
    return Path(cache_dir) / f"real-{sha256_bytes(key.encode(), 24)}.npz"


def _features_kept_in(kept: Path, real_files: list[str], compute_features):
    """``frd-score``'s ``compute_features`` that, for the image list ``real_files``, returns what is
    kept in ``kept`` (computing and keeping it the first time) and computes any other list as usual."""
    def features(files, feature_extractor, masks=None, **kwargs):  # the package passes files= by name
        if list(files) != real_files:
            return compute_features(files, feature_extractor, masks=masks, **kwargs)
        if kept.exists():
            with np.load(kept) as f:
                values, names = f["features"], [str(n) for n in f["names"]]
            return values, [dict(zip(names, map(float, row))) for row in values], \
                list(masks) if masks is not None else [None] * len(files)
        values, dicts, mask_paths = compute_features(files, feature_extractor, masks=masks, **kwargs)
        atomic_npz(kept, features=values, names=np.array(list(dicts[0])))
        return values, dicts, mask_paths

    return features


def _compute_frd_in_clean_workers(frd_score, paths, masks, kept: Path | None = None) -> float:
    """``frd_score.compute_frd`` with its feature pool from :func:`core.processes.worker_context`: the
    package's own ``multiprocessing.Pool`` forks this process, whose torch threads can leave the
    forked worker waiting on a lock for ever (seen: a grid hung in FRD). With ``kept``, the features of
    the second image list (the real volumes) are read from, or kept in, that file."""
    import frd_score.frd as module

    plain_mp, plain_features = module.mp, module.compute_features
    module.mp = worker_context()
    if kept is not None:
        module.compute_features = _features_kept_in(kept, paths[1], plain_features)
    try:
        return frd_score.compute_frd(paths, paths_masks=masks, num_workers=1)
    finally:
        module.mp, module.compute_features = plain_mp, plain_features


def frd(real: Any, fake: Any, brain_mask: Any, cache_dir: Path | None = None) -> dict[str, Any]:
    """``{"FRD": value or None, "protocol": {...}}`` of generated ``fake`` against ``real`` volumes;
    with ``cache_dir``, the real volumes' features are kept there (the same value, see the module)."""
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
            kept = None if cache_dir is None else real_features_file(cache_dir, real_t.numpy(), mask)
            fi, fm = _write(fake_t.numpy(), mask, Path(tmp), "gen")
            ri, rm = _write(real_t.numpy(), mask, Path(tmp), "real", write=kept is None or not kept.exists())
            value = float(_compute_frd_in_clean_workers(frd_score, [fi, ri], [fm, rm], kept))
    except Exception as err:  # noqa: BLE001 - the reason goes into the protocol, never a fake number
        return {"FRD": None, "protocol": {**proto, "available": False,
                                           "reason": f"frd-score failed: {type(err).__name__}: {err}"}}
    return {"FRD": value if np.isfinite(value) else None, "protocol": {
        **proto, "available": True, "package": f"frd-score {frd_score.__version__}",
        "version": getattr(frd_score, "FRD_VERSION_DEFAULT", "default"),
        "mask_voxels": int(mask.sum()), "n_real_volumes": int(real_t.shape[0]),
        "n_generated_volumes": int(fake_t.shape[0]),
        "note": "compute_frd defaults (feature classes, joint normalisation, log transform of the v1 distance)"}}
