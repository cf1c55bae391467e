"""Networks shipped with the suite for its embedded data: one folder per profile under
``benchmark/shipped/<profile>/``.

Each folder holds the profile's pretrained base model (``base_model.pt``), the Dice judges and the
in-domain feature extractors (``metrics/``, under the file names their caches use) and a
``provenance.json`` that says how they were made (command, commit, steps, wall time, device,
quality) and the sha256 of every file. The suite uses a shipped network only when what produced it
matches the profile exactly (the base model: :func:`benchmark.base.cache.base_model_key`, covering
architecture, training settings and data version; a judge or extractor: the hash in its file name)
and its file matches its sha256; otherwise it trains its own, as before, and says why.

``python run_benchmark.py ship --profile cpu`` writes the folder from the networks the suite has
pretrained (or loads them from the cache) for that profile; see docs/BASE_MODEL.md.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.files import sha256_file

SHIPPED_ROOT = Path(__file__).resolve().parents[1] / "shipped"
PROVENANCE = "provenance.json"
BASE_MODEL_FILE = "base_model.pt"


class ShippedError(ValueError):
    """A shipped file is missing or does not match its provenance."""


def folders(root: Path = SHIPPED_ROOT) -> list[Path]:
    """The shipped profile folders (those with a provenance file)."""
    return sorted(p.parent for p in root.glob(f"*/{PROVENANCE}")) if root.is_dir() else []


def provenance(folder: Path) -> dict[str, Any]:
    return json.loads((folder / PROVENANCE).read_text())


def verify(folder: Path, relative: str | None = None) -> None:
    """Check the sha256 of one shipped file (``relative``) or of every file in ``folder``."""

    files = provenance(folder)["files"]
    for name in [relative] if relative is not None else sorted(files):
        path = folder / name
        if name not in files or not path.is_file():
            raise ShippedError(f"the shipped file {path} is missing or not listed in {folder / PROVENANCE}; "
                               f"restore it with `git checkout -- {folder}`")
        if sha256_file(path, prefix=64) != files[name]["sha256"]:
            raise ShippedError(
                f"the shipped file {path} does not match its sha256 in {folder / PROVENANCE} (a damaged or "
                f"partial checkout, e.g. a Git LFS pointer): restore it with `git checkout -- {path}`, "
                "or pretrain your own with --retrain-base"
            )


def metric_dirs(root: Path = SHIPPED_ROOT) -> list[Path]:
    """Folders whose ``metrics/`` hold shipped judges and extractors, each file checked against its
    sha256 (for ``metrics.common.trained_weights_path``)."""
    out = []
    for folder in folders(root):
        for name in provenance(folder)["files"]:
            if name.startswith("metrics/"):
                verify(folder, name)
        out.append(folder)
    return out


def _differences(shipped: Any, wanted: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two nested settings differ, with both values."""
    if isinstance(shipped, dict) and isinstance(wanted, dict):
        out = []
        for key in sorted(set(shipped) | set(wanted)):
            out += _differences(shipped.get(key, "(absent)"), wanted.get(key, "(absent)"), f"{prefix}{key}.")
        return out
    return [] if shipped == wanted else [f"{prefix.rstrip('.')} (shipped {shipped}, here {wanted})"]


def find_base_model(key: dict[str, Any], profile_name: str, root: Path = SHIPPED_ROOT) -> tuple[Path | None, str]:
    """The shipped base model file made with exactly ``key``, or ``None`` and one sentence why not."""
    wanted = json.loads(json.dumps(key, default=str))
    for folder in folders(root):
        base = provenance(folder).get("base_model")
        if base and base["key"] == wanted:
            return folder / base["file"], f"shipped base model of profile '{folder.name}'"
    same_name = root / profile_name / PROVENANCE
    if not same_name.is_file():
        return None, f"no base model is shipped for profile '{profile_name}'"
    shipped_key = provenance(same_name.parent)["base_model"]["key"]
    diffs = _differences(shipped_key, wanted)
    shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
    return None, f"the shipped '{profile_name}' base model was made with other settings: {shown}"
