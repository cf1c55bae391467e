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
pretrained (or loads them from the cache) for that profile; see README "Shipped base models".
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import time
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


# ---------------------------------------------------------------------------------------------
# writing a shipped folder
# ---------------------------------------------------------------------------------------------
def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _device_description(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return f"cuda ({torch.cuda.get_device_name(0)})"
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def ship(profile, cache_dir: Path, out_root: Path, quality: dict[str, Any], device: str = "cpu",
         command: str = "", notes: str = "") -> Path:
    """Copy the profile's pretrained base model, judges and in-domain extractors into
    ``out_root/<profile>/`` and write their provenance."""
    import torch

    from benchmark.base.cache import base_model_dir, base_model_key
    from benchmark.run.spec import RunContext
    from datasets.tasks import TASKS

    name = str(profile.get("name", "profile"))
    out = out_root / name
    if out.exists():
        shutil.rmtree(out)
    (out / "metrics").mkdir(parents=True)
    cached = base_model_dir(profile, cache_dir)
    if not (cached / "done").is_file():
        raise ShippedError(f"the {name} base model is not pretrained in {cached}: run "
                           f"`python run_benchmark.py pretrain --profile {name} --retrain-base` first")
    shutil.copyfile(cached / "model.pt", out / BASE_MODEL_FILE)
    summary = json.loads((cached / "summary.json").read_text())

    from benchmark.profiles import Profile

    own = Profile({**profile.to_dict(), "base_weights": "pretrain"})  # the judges and extractors trained here
    ctx = RunContext(own, out_dir=cache_dir / "ship-scratch", cache_dir=cache_dir, device=device, progress=True)
    networks = []
    judged = {}  # one judge per class count (metrics.judge caches them so): the first task that uses it
    for task in TASKS.values():
        if task.dice is not None:
            judged.setdefault(task.dice.classes, task)
    for task in judged.values():
        judge = ctx.scorer(task).judge
        networks.append((f"Dice judge, task {task.name}", judge.source, judge.meta))
    for kind, ext in ctx.scorer(next(iter(TASKS.values()))).shared.extractors.items():  # shared by all tasks
        networks.append((f"in-domain {kind} feature extractor", ext.source, {}))
    metrics = []
    for what, source, meta in networks:
        target = out / "metrics" / Path(source).name
        shutil.copyfile(source, target)
        metrics.append({"file": f"metrics/{target.name}", "what": what,
                        **{k: meta.get(k) for k in ("train_seconds", "final_loss", "device") if k in meta}})
    files = {str(p.relative_to(out)): {"sha256": sha256_file(p, prefix=64), "bytes": p.stat().st_size}
             for p in sorted(out.rglob("*.pt"))}
    blob = torch.load(out / BASE_MODEL_FILE, map_location="cpu", weights_only=True)
    record = {
        "profile": name,
        "made_with": {"command": command, "commit": _git_commit(), "device": _device_description(device),
                      "shipped_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "notes": notes},
        "base_model": {
            "file": BASE_MODEL_FILE,
            "key": json.loads(json.dumps(base_model_key(profile), default=str)),
            "parameters": summary.get("parameters"),
            "scale_factor": float(blob["scale_factor"]),
            "stages": {k: summary[k] for k in ("autoencoder", "diffusion", "decoder_finetune") if k in summary},
            "wall_seconds": round(sum(float(summary[k]["seconds"]) for k in ("autoencoder", "diffusion",
                                                                             "decoder_finetune") if k in summary)
                                  + float(summary.get("data_seconds", 0.0)), 1),
            "quality": quality,
        },
        "metrics": metrics,
        "files": files,
    }
    (out / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")
    return out
