"""The four conditioning scalars of a manifest row, scaled or in natural units.

Each scalar has a scaled column (BrainLDM's [0, 1] value) and a column in natural units; a row fills
one of the two:

| scalar | scaled column | natural column | scaling |
|---|---|---|---|
| sex | ``sex`` = 0 or 1 | ``sex`` = F or M (female, male) | F = 0, M = 1 (UK Biobank's coding) |
| age | ``age`` | ``age_years`` | (age - 44) / (82 - 44), clipped: ``AGE_RANGE``, UK Biobank's imaging ages |
| ventricular volume | ``ventricular_volume`` | ``ventricular_volume_ml`` | over ``VENTRICLE_RANGE_ML`` (0-80 mL), clipped |
| brain volume | ``brain_volume`` | ``brain_volume_ml`` | over ``BRAIN_RANGE_ML`` (600-1900 mL, grey + white), clipped |

The ranges are those of datasets/subject_draw.py (the synthetic population's); BrainLDM's bundle does
not publish its own volume ranges. When a manifest has no column for either volume, both are measured
on the subject's label map at its own resolution (voxel count x the file's voxel volume): lateral
ventricles, and grey + white matter of the semantic map.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .subject import DataError
from .subject_draw import BRAIN_RANGE_ML, VENTRICLE_RANGE_ML, scale_age, scale_volume

# name -> (scaled column, natural column); BrainLDM's order (SCALAR_NAMES)
COLUMNS = {"sex": ("sex", "sex"), "age": ("age", "age_years"),
           "ventricular_volume": ("ventricular_volume", "ventricular_volume_ml"),
           "brain_volume": ("brain_volume", "brain_volume_ml")}
VOLUMES = ("ventricular_volume", "brain_volume")

# Plausible values in natural units; outside them a number is a typo or another unit (months, mm^3).
PLAUSIBLE = {"age": (0.0, 120.0), "ventricular_volume": (0.0, 500.0), "brain_volume": (100.0, 3000.0)}
_UNITS = {"age": "years", "ventricular_volume": "mL", "brain_volume": "mL"}
_SEX = {"f": 0.0, "m": 1.0, "female": 0.0, "male": 1.0}


def missing_columns(header: list[str]) -> list[str]:
    """Scalar columns a manifest lacks: sex and age always; the volumes unless both are absent."""
    missing = [f"{n!r} or {COLUMNS[n][1]!r}" if n != "sex" else "'sex'"
               for n in ("sex", "age") if not set(COLUMNS[n]) & set(header)]
    given = [n for n in VOLUMES if set(COLUMNS[n]) & set(header)]
    if given and len(given) < len(VOLUMES):  # one volume but not the other: an incomplete manifest
        missing += [f"{n!r} or {COLUMNS[n][1]!r}" for n in VOLUMES if n not in given]
    return missing


def volumes_given(header: list[str]) -> bool:
    return any(set(COLUMNS[n]) & set(header) for n in VOLUMES)


def _number(sid: str, csv_path: Path, column: str, raw: str, fix: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise DataError(f"subject '{sid}' in {csv_path}: {column} is '{raw}', not a number; {fix}") from None
    if not math.isfinite(value):
        raise DataError(f"subject '{sid}' in {csv_path}: {column} is '{raw}'; {fix}")
    return value


def _sex(sid: str, csv_path: Path, raw: str) -> float:
    """F/M (female/male) or the scaled number (BrainLDM's 0 = female, 1 = male)."""
    if raw.lower() in _SEX:
        return _SEX[raw.lower()]
    fix = "give F or M (or 0 for female, 1 for male)"
    value = _number(sid, csv_path, "sex", raw, fix) if raw else -1.0
    if not 0.0 <= value <= 1.0:
        raise DataError(f"subject '{sid}' in {csv_path}: sex is '{raw}'; {fix}")
    return value


def row_scalars(sid: str, csv_path: Path, row: dict, measured: dict[str, float] | None) -> np.ndarray:
    """(sex, age, ventricular volume, brain volume) in [0, 1]; ``measured`` holds volumes in mL from the
    labels, used when the manifest has no volume columns."""
    out = [_sex(sid, csv_path, (row.get("sex") or "").strip())]
    for name, (scaled_col, natural_col) in list(COLUMNS.items())[1:]:
        scaled = (row.get(scaled_col) or "").strip()
        natural = (row.get(natural_col) or "").strip()
        if scaled and natural:
            raise DataError(f"subject '{sid}' in {csv_path}: both {scaled_col} and {natural_col} are filled; "
                            "leave one of them empty")
        if scaled:
            value = _number(sid, csv_path, scaled_col, scaled, f"give a value scaled to [0, 1] or use {natural_col}")
            if value < 0.0 or value > 1.0:
                raise DataError(f"subject '{sid}' in {csv_path}: {scaled_col} = {scaled} is outside [0, 1]; give it "
                                f"in {_UNITS[name]} in the column {natural_col} instead, or scale it")
            out.append(value)
            continue
        if natural:
            value = _number(sid, csv_path, natural_col, natural, f"give a number in {_UNITS[name]}")
        elif name in VOLUMES and measured is not None:
            value = measured[name]
        else:
            raise DataError(f"subject '{sid}' in {csv_path}: {scaled_col} and {natural_col} are both empty; "
                            f"fill one of them")
        lo, hi = PLAUSIBLE[name]
        if natural and not lo <= value <= hi:
            raise DataError(f"subject '{sid}' in {csv_path}: {natural_col} = {value:g} is outside the plausible "
                            f"{lo:g}-{hi:g} {_UNITS[name]}; check the value and its unit")
        out.append(scale_age(value) if name == "age" else
                   scale_volume(value, VENTRICLE_RANGE_ML if name == "ventricular_volume" else BRAIN_RANGE_ML))
    return np.array(out, dtype=np.float32)

