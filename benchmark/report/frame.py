"""The run records of a results folder as one frame (a row per run), which every table and figure reads.

Beside the records' fixed fields, metrics and ``cost: …`` figures, a row holds hidden columns that
come from its scoring protocol: the undersampled Fréchet columns (``UNDERSAMPLED``), the axial voxel
size (``AXIAL_MM``) and each Fréchet column's bootstrap interval (``FD_CI`` + column).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from benchmark.run.records import iter_records

FIXED = ("task", "method", "size", "seed", "status", "error", "device", "profile")
UNDERSAMPLED = "undersampled FD"  # records_frame: "|"-joined FD columns computed with fewer volumes than features
AXIAL_MM = "axial voxel mm"  # records_frame: the test volumes' axial (Z) voxel size, from the scoring protocol
FD_CI = "95% CI: "  # hidden columns: a Fréchet column's bootstrap interval over volumes, from the protocol


def undersampled_columns(protocol: dict | None) -> str:
    """The FD columns (raw and rel) whose protocol flags fewer volumes than feature dimensions."""
    out = []
    for key, entry in (protocol or {}).items():
        if isinstance(entry, dict) and (entry.get("sample_size") or {}).get("undersampled"):
            stem, _, extractor = key.partition(" [")
            stems = ("FID-A", "FID-C", "FID-S", "FID-2D mean") if stem == "FID-2D" else (stem,)
            out += [f"{s}{rel} [{extractor}" for s in stems for rel in ("", " rel")]
    return "|".join(sorted(out))


def records_frame(folder: Path) -> pd.DataFrame:
    """One row per run record; metrics as columns, cost figures as ``cost: …`` columns, and the
    undersampled FD columns of its protocol (``UNDERSAMPLED``)."""
    rows = []
    for rec in iter_records(folder):
        row = {k: rec.get(k) for k in FIXED}
        row.update(rec.get("metrics") or {})
        row[UNDERSAMPLED] = undersampled_columns(rec.get("protocol"))
        row[AXIAL_MM] = ((rec.get("protocol") or {}).get("voxel_mm") or [None] * 3)[2]
        row.update({f"{FD_CI}{k}": v for k, v in fd_intervals(rec.get("protocol")).items()})
        row.update({f"cost: {k}": v for k, v in (rec.get("cost") or {}).items()})
        rows.append(row)
    return pd.DataFrame(rows)


def fd_intervals(protocol: dict | None) -> dict[str, list[float]]:
    """Metric column -> [low, high]: the 95% bootstrap CI over volumes that the protocol holds for each
    Fréchet distance (``FID-2D [x]`` keeps one per orientation and the mean; ``FID-3D [x]`` one)."""
    out = {}
    for key, entry in (protocol or {}).items():
        boot = entry.get("bootstrap") if isinstance(entry, dict) else None
        if not boot or "[" not in key:
            continue
        extractor = key[key.index("["):]
        if "ci95" in boot:
            out[key] = boot["ci95"]
        else:
            out.update({f"{name} {extractor}": b["ci95"] for name, b in boot.items() if isinstance(b, dict) and "ci95" in b})
    return out


def metric_columns(frame: pd.DataFrame) -> list[str]:
    """The metric columns of ``frame``: every column but the fixed fields, the hidden ones and the costs."""
    fixed = set(FIXED) | {UNDERSAMPLED, AXIAL_MM}
    return [c for c in frame.columns if c not in fixed and not c.startswith(("cost: ", FD_CI))]


def fd_span(runs: pd.DataFrame, column: str) -> tuple[float, float] | None:
    """The 95% bootstrap interval of a Fréchet column over ``runs``: the run's own with one seed, from the
    lowest seed's low to the highest seed's high with several; None when the records hold none."""
    bounds = [b for b in runs[FD_CI + column] if isinstance(b, list)] if FD_CI + column in runs else []
    return (min(b[0] for b in bounds), max(b[1] for b in bounds)) if bounds else None
