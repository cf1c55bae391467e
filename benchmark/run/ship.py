"""Writing ``benchmark/shipped/<profile>/`` (the ``ship`` command): copy the base model, the Dice
judges and the in-domain extractors trained for a profile, and record their provenance. Reading
shipped folders is :mod:`benchmark.base.shipped`."""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from benchmark.base.shipped import BASE_MODEL_FILE, PROVENANCE, ShippedError
from core.files import sha256_file


STAGES = ("autoencoder", "diffusion", "decoder_finetune", "diffusion_finetune")  # the trained stages, in order


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

    from benchmark.base.keys import base_model_dir, base_model_key
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
    for kind, ext in ctx.shared_scoring.extractors.items():
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
            "stages": {k: summary[k] for k in STAGES if k in summary},
            "wall_seconds": round(sum(float(summary[k]["seconds"]) for k in STAGES if k in summary)
                                  + float(summary.get("data_seconds", 0.0)), 1),
            "quality": quality,
        },
        "metrics": metrics,
        "files": files,
    }
    (out / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")
    return out
