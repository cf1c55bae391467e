"""What a results folder holds, run by run: done, failed (with the error's first line), or started
and not finished (interrupted or still running, with the step of its last checkpoint)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from benchmark.run.records import iter_records

CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class RunStatus:
    name: str
    state: str          # done | failed | started
    detail: str = ""


def _checkpoint_step(path: Path) -> str:
    """The step of a run's checkpoint, read without building the method (or why it cannot be read)."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a checkpoint being written right now, or a damaged one
        return f"checkpoint unreadable ({type(err).__name__})"
    return f"last checkpoint at step {state.get('step', '?')}" if isinstance(state, dict) else "checkpoint"


def folder_status(out: Path) -> list[RunStatus]:
    """One entry per run that has a record or a run folder under ``out``, sorted by name."""
    found: dict[str, RunStatus] = {}
    for record in iter_records(out):
        name = _name(record)
        if record.get("status") == "ok":
            found[name] = RunStatus(name, "done", f"{record.get('elapsed_seconds', 0):.0f} s")
        else:
            first = str(record.get("error", "")).splitlines()[0][:160] if record.get("error") else ""
            found[name] = RunStatus(name, "failed", first)
    for run_dir in sorted((out / "runs").glob("*")) if (out / "runs").is_dir() else []:
        if run_dir.is_dir() and run_dir.name not in found:
            ckpt = run_dir / CHECKPOINT
            found[run_dir.name] = RunStatus(run_dir.name, "started",
                                            _checkpoint_step(ckpt) if ckpt.is_file() else "no checkpoint yet")
    return [found[k] for k in sorted(found)]


def _name(record: dict) -> str:
    method = str(record.get("method", "?")).replace("+", "_")
    return f"{record.get('task')}__{method}__n{record.get('size')}__s{record.get('seed')}"


def status_lines(runs: list[RunStatus]) -> list[str]:
    if not runs:
        return ["no runs in this folder yet"]
    counts = {s: sum(r.state == s for r in runs) for s in ("done", "failed", "started")}
    width = max(len(r.name) for r in runs)
    lines = [f"{r.name:<{width}}  {r.state:<7}  {r.detail}".rstrip() for r in runs]
    lines.append(f"{len(runs)} runs: {counts['done']} done, {counts['failed']} failed, "
                 f"{counts['started']} started and not finished (interrupted, or running now)")
    return lines
