"""The manifest's aseg column (FreeSurfer labels), scalars in natural units, volumes measured when
absent, and bad inputs that stop with a sentence naming the subject, the file and the fix."""
import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from datasets import freesurfer
from datasets.manifest import export_subjects, load_manifest
from datasets.subject import DataError
from datasets.subject_draw import AGE_RANGE, BRAIN_RANGE_ML, VENTRICLE_RANGE_ML, unscale
from datasets.synthetic import SyntheticPopulation

SHAPE = (32, 48, 32)  # the smoke profile's; a bare shape loads on the synthetic population's grid


def _fs_labels(semantics: np.ndarray, seed: int) -> np.ndarray:
    """The suite's classes as FreeSurfer labels: each voxel a random label of its class's group, so that
    every entry of the table is read."""
    rng = np.random.default_rng(seed)
    groups = {}
    for label, cls in freesurfer.FREESURFER_TO_SEMANTIC.items():
        groups.setdefault(cls, []).append(label)
    out = np.zeros(semantics.shape, np.int32)
    for cls, labels in groups.items():
        where = semantics == cls
        out[where] = [0] if cls == 0 else rng.choice(labels, size=int(where.sum()))
    return out


def _save(path: Path, data, affine) -> str:
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return str(path)


def _write(path: Path, rows: list[dict]) -> Path:
    columns = list(dict.fromkeys(c for row in rows for c in row))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    subjects = SyntheticPopulation(SHAPE, seed=0, cache_dir=cache).subjects([0, 1])
    d = tmp_path_factory.mktemp("aseg")
    manifest = export_subjects(subjects, d)
    for i, s in enumerate(subjects):
        _save(d / f"{s.id}_aseg.nii.gz", _fs_labels(s.semantics[0], i), s.affine)
    return subjects, manifest


def _natural_rows(subjects, d: Path, volumes: bool = True) -> list[dict]:
    rows = []
    for s in subjects:
        sex, age, ventricles, brain = (float(v) for v in s.scalars)
        row = {"id": s.id, "image": str(d / f"{s.id}_image.nii.gz"), "aseg": str(d / f"{s.id}_aseg.nii.gz"),
               "sex": "M" if sex == 1.0 else "F", "age_years": repr(unscale(age, AGE_RANGE))}
        if volumes:
            row["ventricular_volume_ml"] = repr(unscale(ventricles, VENTRICLE_RANGE_ML))
            row["brain_volume_ml"] = repr(unscale(brain, BRAIN_RANGE_ML))
        rows.append(row)
    return rows


def test_aseg_gives_the_suites_lv_mask_and_semantic_map(data, tmp_path):
    subjects, manifest = data
    back = load_manifest(_write(tmp_path / "m.csv", _natural_rows(subjects, manifest.parent)), SHAPE)
    for s, b in zip(subjects, back):
        assert np.array_equal(s.lv_mask, b.lv_mask) and np.array_equal(s.semantics, b.semantics)
        assert np.array_equal(s.image, b.image) and np.array_equal(s.skull, b.skull)


def test_freesurfer_mgz_files_are_read_as_they_are(data, tmp_path):
    """FreeSurfer writes aseg.mgz (and T1.mgz): read directly, no conversion to NIfTI needed."""
    subjects, manifest = data
    rows = _natural_rows(subjects, manifest.parent)
    for row in rows:
        for column in ("image", "aseg"):
            nifti = nib.load(row[column])
            row[column] = str(tmp_path / Path(row[column]).name.replace(".nii.gz", ".mgz"))
            nib.save(nib.MGHImage(np.asarray(nifti.dataobj, dtype=np.float32 if column == "image" else np.int32),
                                  nifti.affine), row[column])
    back = load_manifest(_write(tmp_path / "m.csv", rows), SHAPE)
    for s, b in zip(subjects, back):
        assert np.array_equal(s.lv_mask, b.lv_mask) and np.array_equal(s.semantics, b.semantics)
        np.testing.assert_allclose(s.image, b.image, atol=1e-6)


def test_lv_labels_are_the_lateral_and_inferior_lateral_ventricles():
    labels = np.array([4, 43, 5, 44, 14, 15, 24, 31, 63, 2, 3])
    assert freesurfer.to_lv_mask(labels).tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    assert freesurfer.to_semantics(labels).tolist() == [4, 4, 4, 4, 1, 1, 1, 1, 1, 3, 2]


def test_natural_units_load_to_the_scaled_values(data, tmp_path):
    subjects, manifest = data
    back = load_manifest(_write(tmp_path / "m.csv", _natural_rows(subjects, manifest.parent)), SHAPE)
    for s, b in zip(subjects, back):
        assert np.allclose(s.scalars, b.scalars, atol=1e-6), (s.scalars, b.scalars)


def test_volumes_are_measured_on_the_labels_when_absent(data, tmp_path):
    subjects, manifest = data
    rows = _natural_rows(subjects, manifest.parent, volumes=False)
    for row, s in zip(rows, subjects):  # the suite's own label columns measure alike
        if s is subjects[1]:
            del row["aseg"]
            row["lv_mask"], row["semantics"] = (str(manifest.parent / f"{s.id}_{c}.nii.gz") for c in ("lv_mask", "semantics"))
            row["aseg"] = ""
    for s, b in zip(subjects, load_manifest(_write(tmp_path / "m.csv", rows), SHAPE)):
        assert np.allclose(s.scalars, b.scalars, atol=1e-6), (s.scalars, b.scalars)


# --- bad inputs -----------------------------------------------------------------------------------
def _2d(d, row, s):
    row["image"] = _save(d / "flat.nii.gz", s.image[0, :, :, 10], s.affine)
    return "flat.nii.gz", "one 3D volume"


def _4d(d, row, s):
    row["image"] = _save(d / "series.nii.gz", np.stack([s.image[0]] * 3, -1), s.affine)
    return "series.nii.gz", "pick one"


def _unknown_label(d, row, s):
    aseg = _fs_labels(s.semantics[0], 5)
    aseg[0, 0, 0], aseg[1, 0, 0] = 999, 1234
    row["aseg"] = _save(d / "aseg_999.nii.gz", aseg, s.affine)
    return "aseg_999.nii.gz", "999, 1234"


def _other_fov(d, row, s):
    moved = s.affine.copy()
    moved[1, 3] += 20.0
    row["aseg"] = _save(d / "aseg_moved.nii.gz", _fs_labels(s.semantics[0], 5), moved)
    return "aseg_moved.nii.gz", "different field of view"


def _age_250(d, row, s):
    row["age_years"] = "250"
    return "m.csv", "check the value and its unit"


def _nan(d, row, s):
    img = s.image[0].copy()
    img[4, 4, 4] = np.nan
    row["image"] = _save(d / "nan.nii.gz", img, s.affine)
    return "nan.nii.gz", "NaN"


def _lv_vanishes(d, row, s):
    """A 3x finer aseg whose only LV voxel lies between the target grid's sampling points."""
    fine = np.repeat(np.repeat(np.repeat(_fs_labels(s.semantics[0], 5), 3, 0), 3, 1), 3, 2)
    fine[np.isin(fine, freesurfer.LV_LABELS)] = 2
    fine[3 * 15, 3 * 20, 3 * 16] = 4
    step = np.diag([1 / 3, 1 / 3, 1 / 3, 1.0])
    step[:3, 3] = -1 / 3
    row["aseg"] = _save(d / "aseg_fine.nii.gz", fine, s.affine @ step)
    return "aseg_fine.nii.gz", "vanish"


def _non_integer(d, row, s):
    row["aseg"] = _save(d / "aseg_linear.nii.gz", _fs_labels(s.semantics[0], 5) + 0.5, s.affine)
    return "aseg_linear.nii.gz", "nearest neighbour"


def _sex_x(d, row, s):
    row["sex"] = "X"
    return "m.csv", "F or M"


def _mm3(d, row, s):
    row["ventricular_volume_ml"] = "45000"
    return "m.csv", "unit"


def _both_ages(d, row, s):
    row["age"] = "0.5"
    return "m.csv", "leave one"


def _outside_fov(d, row, s):
    far = s.affine.copy()
    far[0, 3] += 400.0
    row["image"] = _save(d / "far_image.nii.gz", s.image[0], far)
    row["aseg"] = _save(d / "far_aseg.nii.gz", _fs_labels(s.semantics[0], 5), far)
    return "far_image.nii.gz", "MNI space"


def _missing(d, row, s):
    row["aseg"] = str(d / "nowhere_aseg.nii.gz")
    return "nowhere_aseg.nii.gz", "fix the path"


@pytest.mark.parametrize("breaker", [_2d, _4d, _unknown_label, _other_fov, _age_250, _nan, _lv_vanishes,
                                     _non_integer, _sex_x, _mm3, _both_ages, _outside_fov, _missing])
def test_bad_input_stops_naming_subject_file_and_fix(data, tmp_path, breaker):
    subjects, manifest = data
    rows = _natural_rows(subjects, manifest.parent)
    file_name, fix = breaker(tmp_path, rows[1], subjects[1])
    with pytest.raises(DataError) as err:
        load_manifest(_write(tmp_path / "m.csv", rows), SHAPE)
    message = str(err.value)
    assert subjects[1].id in message and file_name in message and fix in message, message
