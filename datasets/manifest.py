"""Real data: a CSV manifest of NIfTI files, and export of any subjects to that format.

Manifest columns: ``id, image, lv_mask, semantics, skull (optional), sex, age, ventricular_volume,
brain_volume``. Paths may be absolute or relative to the CSV's folder. Scalars must already be scaled
to [0, 1] (BrainLDM's conditioning values). Volumes are reoriented to RAS and fitted to the profile's
shape: when the file's shape is within 20 % of it, by centre crop / zero pad alone; otherwise by an
isotropic resampling that fits the whole volume, then crop / pad (images linearly, with an anti-alias
blur when shrinking; labels by nearest neighbour). Images outside [0, 1] are rescaled from their
minimum to their 99.5th percentile and clipped.

Every problem stops with a :class:`DataError` that names the subject and the file.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Iterable

import numpy as np
from scipy import ndimage as ndi

from .subject import SCALAR_NAMES, SEMANTIC_LABELS, DataError, Subject, skull_image

REQUIRED_COLUMNS = ("id", "image", "lv_mask", "semantics") + SCALAR_NAMES
OPTIONAL_COLUMNS = ("skull",)
_IMAGE_COLUMNS = ("image", "lv_mask", "semantics", "skull")


class _Fit:
    """Index mapping from the target grid to a source grid (centre-aligned, isotropic factor)."""

    def __init__(self, source: tuple[int, ...], target: tuple[int, int, int]):
        ratios = np.array(target, dtype=float) / np.array(source, dtype=float)
        self.factor = 1.0 if np.all((ratios >= 0.8) & (ratios <= 1.25)) else float(ratios.min())
        self.source, self.target = source, target
        if self.factor == 1.0:
            self.offset = np.array([(s - t) // 2 for s, t in zip(source, target)], dtype=float)
        else:
            self.offset = np.array([(s - 1) / 2 - (t - 1) / 2 / self.factor for s, t in zip(source, target)])

    def apply(self, data: np.ndarray, order: int) -> np.ndarray:
        if self.factor == 1.0 and tuple(self.source) == tuple(self.target):
            return data
        if order == 1 and self.factor < 1.0:
            data = ndi.gaussian_filter(data, 0.4 / self.factor)  # keep the shrink free of aliasing
        axes = [np.arange(t) / self.factor + o for t, o in zip(self.target, self.offset)]
        if order == 0:  # nearest neighbour, by indexing: exact and fast
            idx = [np.rint(a).astype(int) for a in axes]
            valid = [(i >= 0) & (i < s) for i, s in zip(idx, self.source)]
            out = data[np.ix_(*[np.clip(i, 0, s - 1) for i, s in zip(idx, self.source)])]
            inside = valid[0][:, None, None] & valid[1][None, :, None] & valid[2][None, None, :]
            return np.where(inside, out, 0).astype(data.dtype)
        coords = np.stack(np.meshgrid(*axes, indexing="ij"))
        return ndi.map_coordinates(data, coords, order=1, mode="constant", cval=0.0)

    def affine(self, affine: np.ndarray) -> np.ndarray:
        step = np.eye(4)
        step[:3, :3] /= self.factor
        step[:3, 3] = self.offset
        return affine @ step


def _resolve(csv_dir: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else csv_dir / path


def _load_nifti(sid: str, column: str, path: Path):
    import nibabel as nib

    if not path.is_file():
        raise DataError(f"subject '{sid}': the {column} file {path} does not exist; fix the path in the manifest "
                        "(relative paths are read from the manifest's folder)")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as err:  # nibabel raises many kinds for a damaged or foreign file
        raise DataError(f"subject '{sid}': the {column} file {path} cannot be read as NIfTI ({err}); "
                        "re-export it as .nii or .nii.gz") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"subject '{sid}': the {column} file {path} has shape {data.shape}; "
                        "expected one 3D volume")
    return img, data


def _to_ras(img, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient to RAS by axis flips and permutations only (no interpolation)."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(img.affine)
    ras = nib.orientations.axcodes2ornt(("R", "A", "S"))
    transform = nib.orientations.ornt_transform(ornt, ras)
    out = nib.orientations.apply_orientation(data, transform)
    affine = img.affine @ nib.orientations.inv_ornt_aff(transform, data.shape)
    return np.ascontiguousarray(out), np.asarray(affine, dtype=np.float64)


def _scalar(sid: str, csv_path: Path, row: dict, name: str) -> float:
    raw = (row.get(name) or "").strip()
    try:
        value = float(raw)
    except ValueError:
        raise DataError(f"subject '{sid}' in {csv_path}: {name} is '{raw}', not a number; "
                        "give a value scaled to [0, 1]") from None
    if not math.isfinite(value) or value < 0.0 or value > 1.0:
        raise DataError(f"subject '{sid}' in {csv_path}: {name} = {raw} is outside [0, 1]; "
                        "scale the scalars to [0, 1] as BrainLDM expects")
    return value


def _labels(sid: str, column: str, path: Path, data: np.ndarray, allowed: Iterable[int]) -> np.ndarray:
    allowed = sorted(allowed)
    if not np.all(np.isfinite(data)):
        raise DataError(f"subject '{sid}': the {column} file {path} contains NaN or infinite values")
    rounded = np.rint(data)
    values = np.unique(rounded)
    bad = [v for v in values if int(v) not in allowed]
    if bad or not np.allclose(rounded, data, atol=1e-3):
        shown = ", ".join(f"{v:g}" for v in (bad or values)[:8])
        raise DataError(f"subject '{sid}': the {column} file {path} has labels {shown} outside the expected "
                        f"set {allowed} (semantic labels: {SEMANTIC_LABELS})")
    return rounded.astype(np.uint8)


def _load_subject(row: dict, csv_path: Path, shape: tuple[int, int, int], line: int) -> Subject:
    sid = (row.get("id") or "").strip()
    if not sid:
        raise DataError(f"{csv_path}, line {line}: the id is empty; give every subject an id")
    scalars = np.array([_scalar(sid, csv_path, row, n) for n in SCALAR_NAMES], dtype=np.float32)

    columns = [c for c in _IMAGE_COLUMNS if c != "skull" or (row.get("skull") or "").strip()]
    loaded = {}
    for column in columns:
        value = (row.get(column) or "").strip()
        if not value:
            raise DataError(f"subject '{sid}' in {csv_path}: the {column} path is empty; give a NIfTI file")
        path = _resolve(csv_path.parent, value)
        loaded[column] = (path,) + _load_nifti(sid, column, path)

    ref_path, ref_img, ref_data = loaded["image"]
    for column, (path, img, data) in loaded.items():
        if data.shape != ref_data.shape:
            raise DataError(f"subject '{sid}': the {column} file {path} has shape {data.shape} but the image "
                            f"{ref_path} has {ref_data.shape}; the label maps must lie on the image's grid")
        if not np.allclose(img.affine, ref_img.affine, atol=1e-3):
            raise DataError(f"subject '{sid}': the {column} file {path} has a different affine from the image "
                            f"{ref_path}; resample the label maps onto the image's grid")

    arrays, affine = {}, None
    for column, (path, img, data) in loaded.items():
        if column in ("image", "skull") and not np.all(np.isfinite(data)):
            raise DataError(f"subject '{sid}': the {column} file {path} contains NaN or infinite values; "
                            "fix or mask them before use")
        if column == "lv_mask":
            data = _labels(sid, column, path, data, (0, 1))
        elif column == "semantics":
            data = _labels(sid, column, path, data, SEMANTIC_LABELS)
        arrays[column], affine = _to_ras(img, data)

    fit = _Fit(arrays["image"].shape, shape)
    image = _normalise(fit.apply(arrays["image"].astype(np.float32), order=1))
    lv = fit.apply(arrays["lv_mask"], order=0).astype(np.uint8)
    sem = fit.apply(arrays["semantics"], order=0).astype(np.uint8)
    if not lv.any():
        raise DataError(f"subject '{sid}': the lv_mask file {loaded['lv_mask'][0]} is empty"
                        + (" after fitting it to the shape " + str(tuple(shape)) if arrays["lv_mask"].any() else "")
                        + "; every subject needs lateral ventricles in its mask")
    if "skull" in arrays:
        skull = np.clip(fit.apply(arrays["skull"].astype(np.float32), order=1), 0.0, 1.0)
    else:
        skull = skull_image(image, sem)
    return Subject(id=sid, image=image[None].astype(np.float32), lv_mask=lv[None], semantics=sem[None],
                   skull=skull[None].astype(np.float32), scalars=scalars, affine=fit.affine(affine))


def _normalise(image: np.ndarray) -> np.ndarray:
    lo, hi = float(image.min()), float(image.max())
    if lo >= 0.0 and hi <= 1.0:
        return image.astype(np.float32)
    top = float(np.percentile(image, 99.5))
    if top <= lo:
        top = hi if hi > lo else lo + 1.0
    return np.clip((image - lo) / (top - lo), 0.0, 1.0).astype(np.float32)


def load_manifest(csv_path, shape: tuple[int, int, int]) -> list[Subject]:
    """Subjects of a CSV manifest, fitted to ``shape`` (X, Y, Z)."""
    csv_path = Path(csv_path).expanduser()
    shape = tuple(int(s) for s in shape)
    if not csv_path.is_file():
        raise DataError(f"manifest {csv_path} does not exist; give the path of a CSV file")
    try:
        with open(csv_path, newline="") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            reader.fieldnames = header
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"manifest {csv_path} cannot be read as CSV ({err})") from None
    first = (rows[0].get("id") or "").strip() if rows else ""
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        who = f" (subject '{first}' and every other row need it)" if first else ""
        raise DataError(f"manifest {csv_path} has no column {', '.join(repr(m) for m in missing)}{who}; "
                        f"its columns are {header}; required: {', '.join(REQUIRED_COLUMNS)}")
    if not rows:
        raise DataError(f"manifest {csv_path} lists no subjects; add one row per subject")
    subjects, seen = [], {}
    for line, row in enumerate(rows, start=2):
        subject = _load_subject(row, csv_path, shape, line)
        if subject.id in seen:
            raise DataError(f"subject '{subject.id}' appears twice in {csv_path} (lines {seen[subject.id]} and "
                            f"{line}); ids must be unique")
        seen[subject.id] = line
        subjects.append(subject)
    return subjects


def export_subjects(subjects, out_dir) -> Path:
    """Write each subject as NIfTI (<id>_image.nii.gz, _lv_mask, _semantics, _skull) plus manifest.csv.

    Returns the manifest's path; :func:`load_manifest` reads it back to equal arrays and scalars.
    """
    import nibabel as nib

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in subjects:
        if not s.id or any(ch in s.id for ch in '/\\:*?"<>|') or s.id.startswith("."):
            raise DataError(f"subject id '{s.id}' cannot be used in a file name; use letters, digits, '-' and '_'")
        row = {"id": s.id}
        for column, array, dtype in (("image", s.image, np.float32), ("lv_mask", s.lv_mask, np.uint8),
                                     ("semantics", s.semantics, np.uint8), ("skull", s.skull, np.float32)):
            img = nib.Nifti1Image(np.asarray(array[0], dtype=dtype), np.asarray(s.affine, dtype=np.float64))
            img.header.set_xyzt_units("mm")
            img.set_qform(s.affine, code=1)
            img.set_sform(s.affine, code=1)
            name = f"{s.id}_{column}.nii.gz"
            nib.save(img, str(out_dir / name))
            row[column] = name
        for name, value in zip(SCALAR_NAMES, np.asarray(s.scalars, dtype=np.float32)):
            row[name] = repr(float(value))  # exact: reads back to the same float32
        rows.append(row)
    manifest = out_dir / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(REQUIRED_COLUMNS[:4]) + ["skull"] + list(SCALAR_NAMES))
        writer.writeheader()
        writer.writerows(rows)
    return manifest
