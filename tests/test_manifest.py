"""datasets/manifest.py: exported NIfTI read back, other shapes and orientations, bad input named by subject
and file; and the data CLI (summary, export)."""
from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from datasets.manifest import export_subjects, load_manifest
from datasets.subject import SEMANTIC_LABELS, DataError
from tests.test_datasets import SHAPE, assert_same_subject, cache, pop  # noqa: F401 (fixtures)


# --- manifest ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(pop, tmp_path_factory):
    subjects = [pop.subject(i) for i in (0, 1)]
    return subjects, export_subjects(subjects, tmp_path_factory.mktemp("export"))


def test_manifest_round_trip(exported):
    subjects, manifest = exported
    assert manifest.name == "manifest.csv"
    back = load_manifest(manifest, SHAPE)
    assert len(back) == 2
    for a, b in zip(subjects, back):
        assert_same_subject(a, b)
    img = nib.load(str(manifest.parent / f"{subjects[0].id}_image.nii.gz"))
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S") and img.shape == SHAPE


def test_manifest_fits_other_shapes_and_orientations(exported, tmp_path):
    subjects, manifest = exported
    small = load_manifest(manifest, (16, 24, 16))[0]
    assert small.image.shape == (1, 16, 24, 16) and small.lv_mask.any()
    assert set(np.unique(small.semantics)) <= set(SEMANTIC_LABELS)
    assert np.allclose(np.diag(small.affine)[:3], 2 * np.diag(subjects[0].affine)[:3])
    # an LPS-stored copy (x and y flipped) reads back as the same RAS arrays
    rows = _rows(manifest)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.array(SHAPE[:2]) - 1
    for column in ("image", "lv_mask", "semantics", "skull"):
        src = nib.load(str(manifest.parent / rows[0][column]))
        data = np.asanyarray(src.dataobj)[::-1, ::-1, :]
        nib.save(nib.Nifti1Image(data, src.affine @ flip), str(tmp_path / rows[0][column]))
    _write_rows(tmp_path / "m.csv", rows[:1])
    assert_same_subject(load_manifest(tmp_path / "m.csv", SHAPE)[0], subjects[0])


def _rows(manifest: Path) -> list[dict]:
    with open(manifest, newline="") as fh:
        return list(csv.DictReader(fh))


def _write_rows(path: Path, rows: list[dict], columns=None) -> Path:
    columns = columns or list(rows[0])
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _save(path: Path, data, affine) -> str:
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path.name


def _break_missing_file(d, row, s):
    row["lv_mask"] = "nowhere_lv.nii.gz"
    return "nowhere_lv.nii.gz"


def _break_unreadable(d, row, s):
    (d / "garbage.nii.gz").write_bytes(b"this is not a NIfTI file at all")
    row["semantics"] = "garbage.nii.gz"
    return "garbage.nii.gz"


def _break_shape(d, row, s):
    row["semantics"] = _save(d / "sem_small.nii.gz", s.semantics[0, :-2], s.affine)
    return "sem_small.nii.gz"


def _break_affine(d, row, s):
    shifted = s.affine.copy()
    shifted[0, 3] += 3.0
    row["lv_mask"] = _save(d / "lv_moved.nii.gz", s.lv_mask[0], shifted)
    return "lv_moved.nii.gz"


def _break_nan(d, row, s):
    img = s.image[0].copy()
    img[5, 5, 5] = np.nan
    row["image"] = _save(d / "img_nan.nii.gz", img, s.affine)
    return "img_nan.nii.gz"


def _break_inf(d, row, s):
    img = s.image[0].copy()
    img[5, 5, 5] = np.inf
    row["image"] = _save(d / "img_inf.nii.gz", img, s.affine)
    return "img_inf.nii.gz"


def _break_semantic_label(d, row, s):
    sem = s.semantics[0].copy()
    sem[0, 0, 0] = 7
    row["semantics"] = _save(d / "sem_7.nii.gz", sem, s.affine)
    return "sem_7.nii.gz"


def _break_mask_label(d, row, s):
    lv = s.lv_mask[0].copy()
    lv[lv > 0] = 2
    row["lv_mask"] = _save(d / "lv_2.nii.gz", lv, s.affine)
    return "lv_2.nii.gz"


def _break_scalar(d, row, s):
    row["age"] = "63.5"  # years, not scaled
    return "m.csv"


def _break_scalar_text(d, row, s):
    row["brain_volume"] = "large"
    return "m.csv"


def _break_empty_lv(d, row, s):
    row["lv_mask"] = _save(d / "lv_empty.nii.gz", np.zeros(SHAPE, np.uint8), s.affine)
    return "lv_empty.nii.gz"


@pytest.mark.parametrize("breaker", [_break_missing_file, _break_unreadable, _break_shape, _break_affine,
                                     _break_nan, _break_inf, _break_semantic_label, _break_mask_label,
                                     _break_scalar, _break_scalar_text, _break_empty_lv])
def test_manifest_bad_input_names_subject_and_file(exported, tmp_path, breaker):
    subjects, manifest = exported
    rows = _rows(manifest)
    for row in rows:  # absolute paths to the good files; the broken one is relative to tmp_path
        for column in ("image", "lv_mask", "semantics", "skull"):
            row[column] = str(manifest.parent / row[column])
    culprit = rows[1]
    file_name = breaker(tmp_path, culprit, subjects[1])
    _write_rows(tmp_path / "m.csv", rows)
    with pytest.raises(DataError) as err:
        load_manifest(tmp_path / "m.csv", SHAPE)
    message = str(err.value)
    assert culprit["id"] in message and file_name in message, message


def test_manifest_missing_column_names_column_and_file(exported, tmp_path):
    _, manifest = exported
    rows = _rows(manifest)
    columns = [c for c in rows[0] if c != "brain_volume"]
    _write_rows(tmp_path / "m.csv", rows, columns)
    with pytest.raises(DataError) as err:
        load_manifest(tmp_path / "m.csv", SHAPE)
    message = str(err.value)
    assert "brain_volume" in message and "m.csv" in message and rows[0]["id"] in message, message


def test_manifest_without_skull_column_derives_it(exported, tmp_path):
    subjects, manifest = exported
    rows = _rows(manifest)
    for row in rows:
        for column in ("image", "lv_mask", "semantics"):
            row[column] = str(manifest.parent / row[column])
    columns = [c for c in rows[0] if c != "skull"]
    back = load_manifest(_write_rows(tmp_path / "m.csv", rows, columns), SHAPE)
    assert np.array_equal(back[0].skull, subjects[0].skull)


# --- CLI --------------------------------------------------------------------------------------------
def test_cli_summary_and_export(pop, cache, tmp_path, capsys):
    from benchmark.cli import main

    assert main(["data", "summary", "--profile", "smoke", "--n", "8", "--cache-dir", str(cache), "--out", str(tmp_path)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("8 subjects at (32, 48, 32)") and "LV masks of different subjects overlap" in line
    table = _rows(tmp_path / "summary.csv")
    assert len(table) == 8 and {"sex", "age", "ventricular_volume", "brain_volume", "split"} <= set(table[0])
    assert (tmp_path / "population.png").stat().st_size > 10_000
    out = tmp_path / "nifti"
    assert main(["data", "export", "--profile", "smoke", "--out", str(out), "--n", "2", "--cache-dir", str(cache)]) == 0
    back = load_manifest(out / "manifest.csv", SHAPE)
    first = pop.subjects([0, 1])
    assert [s.id for s in back] == [s.id for s in first]  # the test split starts at index 0
    assert_same_subject(back[1], first[1])
    assert main(["data", "summary", "--profile", "nosuch", "--cache-dir", str(cache)]) == 2
