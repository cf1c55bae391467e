"""Are two results folders the same run for run? Compares their records field by field, apart from
what a rerun may change without changing a result: timings and the measurements derived from them,
memory high-water marks, dates, the folders files were read from (only their file names are
compared; the weights themselves are compared through the hashes the records hold), and the hashes of
the code that made them (method code, suite version).

    python run_benchmark.py compare results/a results/b

Used to show that a refactoring changed no number (the same grid before and after), or that two
machines agree.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Iterator

from benchmark.run.records import read_record

# Record fields (at any depth) that measure the machine rather than the method; ``speed`` (the options
# that change how fast the same numbers come) too, so that a grid run with them on and off compares.
MEASUREMENT_KEYS = re.compile(r"(seconds|wall|elapsed|finished_at|started_at|peak_memory|device_days|"
                              r"gpu_days|per_step|_at$|^device$|^speed$)", re.IGNORECASE)
# The identity fields that name the code rather than what it computed: a refactoring changes them by
# definition, and comparing what the code computed before and after is what `compare` is for.
CODE_KEYS = ("method_code_sha256", "suite_version")


def _same_path(a: str, b: str) -> bool:
    return Path(a).name == Path(b).name


def _differences(a: Any, b: Any, where: str, tolerance: float, absolute: float = 0.0) -> Iterator[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if MEASUREMENT_KEYS.search(str(key)) or key in CODE_KEYS:
                continue
            if key not in a or key not in b:
                yield f"{where}/{key}: only in {'the second' if key not in a else 'the first'} folder"
                continue
            yield from _differences(a[key], b[key], f"{where}/{key}", tolerance, absolute)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            yield f"{where}: {len(a)} vs {len(b)} items"
        else:
            for i, (x, y) in enumerate(zip(a, b)):
                yield from _differences(x, y, f"{where}[{i}]", tolerance, absolute)
    elif isinstance(a, float) and isinstance(b, float):
        if not (a == b or (math.isnan(a) and math.isnan(b))
                or abs(a - b) <= max(tolerance * max(abs(a), abs(b)), absolute)):
            yield f"{where}: {a!r} vs {b!r}"
    elif isinstance(a, str) and isinstance(b, str) and a.startswith("/") and b.startswith("/"):
        if not _same_path(a, b):
            yield f"{where}: {a!r} vs {b!r}"
    elif a != b:
        yield f"{where}: {str(a)[:80]!r} vs {str(b)[:80]!r}"


def compare_folders(first: Path, second: Path, tolerance: float = 0.0,
                    absolute: float = 0.0) -> tuple[list[str], list[str]]:
    """(names of the records compared, differences); a record in only one folder is a difference.
    Two numbers agree when equal, or within ``tolerance`` relative or ``absolute``."""
    names_a = {p.name for p in Path(first).glob("records/*.json")}
    names_b = {p.name for p in Path(second).glob("records/*.json")}
    diffs = [f"{name}: only in {first if name in names_a else second}" for name in sorted(names_a ^ names_b)]
    both = sorted(names_a & names_b)
    for name in both:
        a, b = read_record(Path(first) / "records" / name), read_record(Path(second) / "records" / name)
        if a is None or b is None:
            diffs.append(f"{name}: unreadable in {'the first' if a is None else 'the second'} folder")
            continue
        diffs.extend(f"{name}{d}" for d in _differences(a, b, "", tolerance, absolute))
    return both, diffs
