"""One JSON record per run, written atomically, read back by the tables."""
from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Iterator

from core.files import atomic_json

RECORD_VERSION = 1  # bump when a record's fields change meaning; older records stay readable


class RecordError(ValueError):
    """A record this version of the suite cannot read."""


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "monai", "numpy", "lpips", "nilearn", "nibabel", "pandas"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def write_record(path: Path, record: dict) -> None:
    """Atomic: a reader (or a rerun after a kill) sees the old file or the new one, never half."""
    atomic_json(path, record, indent=2, sort_keys=True, default=jsonable)


def jsonable(value):
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:  # numpy is a dependency; this only guards odd environments
        pass
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in a record")


def read_record(path: Path) -> dict | None:
    """The record, or None when it is missing or unreadable (then the run is redone). A record newer than
    this suite raises :class:`RecordError`: skipping it would have the grid redo the run and overwrite
    it, and the tables drop it without a word."""
    try:
        with open(path) as fh:
            record = json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None
    if not (isinstance(record, dict) and "status" in record):
        return None
    version = record.get("record_version", 1)  # the first records had no version field
    if not isinstance(version, int) or version > RECORD_VERSION:
        raise RecordError(f"{path} is a record of version {version!r}, newer than this suite reads "
                          f"({RECORD_VERSION}): update the suite, or move the record out of the folder")
    return record


def record_name(record: dict) -> str:
    """The run name a record is filed under (``RunSpec.name``)."""
    method = str(record.get("method", "?")).replace("+", "_")
    return f"{record.get('task')}__{method}__n{record.get('size')}__s{record.get('seed')}"


def iter_records(folder: Path) -> Iterator[dict]:
    for path in sorted(Path(folder).glob("records/*.json")):
        record = read_record(path)
        if record is not None:
            yield record
