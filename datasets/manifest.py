"""Real data: a CSV manifest of NIfTI files, and export of any subjects to that format.

Manifest columns (docs/REAL_DATA.md):

* ``id``, ``image`` (a T1w scan in MNI space), optional ``skull``;
* the labels: ``aseg`` (a FreeSurfer / FastSurfer / SynthSeg label map, read by datasets/freesurfer.py),
  or ``lv_mask`` (0/1) and ``semantics`` (the suite's labels 0-4); a row fills one of the two;
* the scalars, scaled to [0, 1] or in years / mL / F-M (datasets/manifest_scalars.py); without any
  volume column the volumes are measured on the labels.

Paths may be absolute or relative to the CSV's folder. Every file is resampled with MONAI onto the
profile's grid (voxel size and field of view in mm, datasets/manifest_geometry.py): images linearly,
labels by nearest neighbour, oblique scans with their full affine. Label maps may lie on another grid
than the image (SynthSeg writes 1 mm) but must cover the same field of view.

Every problem stops with a :class:`DataError` that names the subject, the file and the fix.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from . import freesurfer
from .manifest_geometry import Grid, check_same_field_of_view, load_volume, resample, scale_intensity
from .manifest_scalars import missing_columns, row_scalars, volumes_given
from .subject import SCALAR_NAMES, SEMANTIC_LABELS, DataError, Subject, skull_image, voxel_volume_ml

LABEL_COLUMNS = ("aseg", "lv_mask", "semantics")
EXPORT_COLUMNS = ("id", "image", "lv_mask", "semantics", "skull") + SCALAR_NAMES


def _resolve(csv_dir: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else csv_dir / path


def _suite_labels(sid: str, column: str, path: Path, data: np.ndarray, allowed) -> np.ndarray:
    """An lv_mask or semantics file's values, checked against the suite's label set."""
    allowed = sorted(allowed)
    if not np.all(np.isfinite(data)):
        raise DataError(f"subject '{sid}': the {column} file {path} contains NaN or infinite values; "
                        "give a label map with integer values")
    rounded = np.rint(data)
    values = np.unique(rounded)
    bad = [v for v in values if int(v) not in allowed]
    if bad or not np.allclose(rounded, data, atol=1e-3):
        shown = ", ".join(f"{v:g}" for v in (bad or values)[:8])
        raise DataError(f"subject '{sid}': the {column} file {path} has labels {shown} outside the expected "
                        f"set {allowed} (semantic labels: {SEMANTIC_LABELS}); give FreeSurfer labels in the "
                        "aseg column instead, or relabel the file")
    return rounded.astype(np.int64)


def _label_columns(sid: str, csv_path: Path, row: dict) -> tuple[str, ...]:
    if (row.get("aseg") or "").strip():
        if (row.get("lv_mask") or "").strip() or (row.get("semantics") or "").strip():
            raise DataError(f"subject '{sid}' in {csv_path}: both aseg and lv_mask/semantics are filled; "
                            "leave one of the two empty")
        return ("aseg",)
    for column in ("lv_mask", "semantics"):
        if not (row.get(column) or "").strip():
            raise DataError(f"subject '{sid}' in {csv_path}: the {column} path is empty; give a NIfTI file, "
                            "or a FreeSurfer/SynthSeg label map in the aseg column")
    return ("lv_mask", "semantics")


def _load_subject(row: dict, csv_path: Path, grid: Grid, line: int, measure: bool) -> Subject:
    sid = (row.get("id") or "").strip()
    if not sid:
        raise DataError(f"{csv_path}, line {line}: the id is empty; give every subject an id")
    columns = ("image",) + _label_columns(sid, csv_path, row) + (("skull",) if (row.get("skull") or "").strip() else ())
    if not (row.get("image") or "").strip():
        raise DataError(f"subject '{sid}' in {csv_path}: the image path is empty; give a NIfTI file")
    paths = {c: _resolve(csv_path.parent, row[c].strip()) for c in columns}
    volumes = {c: load_volume(sid, c, paths[c]) for c in columns}
    for column in columns[1:]:
        check_same_field_of_view(sid, column, paths[column], volumes[column], paths["image"], volumes["image"])
    for column in ("image", "skull"):
        if column in volumes and not bool(np.isfinite(volumes[column].numpy()).all()):
            raise DataError(f"subject '{sid}': the {column} file {paths[column]} contains NaN or infinite "
                            "values; fix or mask them before use")

    # Labels: checked and turned into the suite's classes at the file's own resolution (volumes in mL
    # from its voxel size), then resampled by nearest neighbour.
    if "aseg" in volumes:
        fs = freesurfer.check_labels(sid, paths["aseg"], volumes["aseg"][0].numpy())
        lv_src, sem_src = freesurfer.to_lv_mask(fs), freesurfer.to_semantics(fs)
        lv_vol = sem_vol = volumes["aseg"]
    else:
        lv_src = _suite_labels(sid, "lv_mask", paths["lv_mask"], volumes["lv_mask"][0].numpy(), (0, 1))
        sem_src = _suite_labels(sid, "semantics", paths["semantics"], volumes["semantics"][0].numpy(), SEMANTIC_LABELS)
        lv_vol, sem_vol = volumes["lv_mask"], volumes["semantics"]
    lv_file = paths["aseg" if "aseg" in paths else "lv_mask"]
    if not lv_src.any():
        raise DataError(f"subject '{sid}': the {lv_file.name} file {lv_file} has no lateral-ventricle voxels; "
                        "every subject needs lateral ventricles in its labels")
    measured = None
    if measure:
        measured = {"ventricular_volume": float(lv_src.sum()) * voxel_volume_ml(np.asarray(lv_vol.affine)),
                    "brain_volume": float(np.isin(sem_src, (2, 3)).sum()) * voxel_volume_ml(np.asarray(sem_vol.affine))}
    scalars = row_scalars(sid, csv_path, row, measured)

    image = resample(volumes["image"], grid, labels=False)
    if not image.any():
        raise DataError(f"subject '{sid}': the image file {paths['image']} does not reach the profile's field of "
                        f"view (centre {grid.centre_mm} mm); register the scan to MNI space first")
    image = scale_intensity(image)
    lv = resample(_as_volume(lv_src, lv_vol), grid, labels=True)
    sem = resample(_as_volume(sem_src, sem_vol), grid, labels=True)
    if not lv.any():
        raise DataError(f"subject '{sid}': the lateral ventricles of {lv_file} vanish when resampled to "
                        f"{grid.voxel_mm} mm voxels in the field of view centred at {grid.centre_mm} mm; check "
                        "that the scan is in MNI space, or use a profile with smaller voxels")
    if "skull" in volumes:
        skull = np.clip(resample(volumes["skull"], grid, labels=False), 0.0, 1.0)
    else:
        skull = skull_image(image, sem)
    return Subject(id=sid, image=image[None].astype(np.float32), lv_mask=lv[None].astype(np.uint8),
                   semantics=sem[None].astype(np.uint8), skull=skull[None].astype(np.float32), scalars=scalars,
                   affine=grid.affine)


def _as_volume(labels: np.ndarray, like):
    """Labels as a MetaTensor with the affine of the file they came from."""
    from monai.data import MetaTensor

    return MetaTensor(np.asarray(labels, dtype=np.float32)[None], affine=like.affine)


def load_manifest(csv_path, grid) -> list[Subject]:
    """Subjects of a CSV manifest on ``grid`` (a :class:`Grid`; a bare shape (X, Y, Z) means the synthetic
    population's grid at that shape, which is what :func:`export_subjects` writes)."""
    grid = grid if isinstance(grid, Grid) else Grid.synthetic(grid)
    csv_path = Path(csv_path).expanduser()
    if not csv_path.is_file():
        raise DataError(f"manifest {csv_path} does not exist; give the path of a CSV file")
    try:
        with open(csv_path, newline="") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            reader.fieldnames = header
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"manifest {csv_path} cannot be read as CSV ({err}); save it as a comma-separated "
                        "UTF-8 file") from None
    first = (rows[0].get("id") or "").strip() if rows else ""
    missing = [repr(c) for c in ("id", "image") if c not in header] + missing_columns(header)
    if "aseg" not in header:
        missing += [repr(c) for c in ("lv_mask", "semantics") if c not in header]
    if missing:
        who = f" (subject '{first}' and every other row need it)" if first else ""
        raise DataError(f"manifest {csv_path} has no column {', '.join(missing)}{who}; its columns are "
                        f"{header}; see docs/REAL_DATA.md for the columns")
    if not rows:
        raise DataError(f"manifest {csv_path} lists no subjects; add one row per subject")
    subjects, seen = [], {}
    for line, row in enumerate(rows, start=2):
        subject = _load_subject(row, csv_path, grid, line, measure=not volumes_given(header))
        if subject.id in seen:
            raise DataError(f"subject '{subject.id}' appears twice in {csv_path} (lines {seen[subject.id]} and "
                            f"{line}); ids must be unique")
        seen[subject.id] = line
        subjects.append(subject)
    return subjects


SPLIT_VALUES = ("train", "validation", "test")


def read_split_column(csv_path) -> dict[str, str] | None:
    """The optional ``split`` column of a manifest (id -> ``train`` / ``validation`` / ``test``), or None
    when there is no such column. A row with another value stops with the row's subject named."""
    csv_path = Path(csv_path).expanduser()
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        if "split" not in header:
            return None
        splits = {}
        for row in reader:
            sid, value = (row.get("id") or "").strip(), (row.get("split") or "").strip().lower()
            if value not in SPLIT_VALUES:
                raise DataError(f"subject '{sid}' in {csv_path}: split '{value}' is not one of "
                                f"{', '.join(SPLIT_VALUES)}; fill the split column of every row")
            splits[sid] = value
    return splits


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
        writer = csv.DictWriter(fh, fieldnames=list(EXPORT_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    return manifest
