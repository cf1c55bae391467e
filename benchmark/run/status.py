"""What a results folder holds, run by run: done, stale (finished, but made otherwise than the
command would make it now: with what differs), failed (with the error's first line), running (with the
step of its last checkpoint and the batches of samples it has generated), interrupted, or pending
(planned and not started).

The grid writes its plan (``grid.json``: every run it was asked for) and each run, while it runs,
a marker (``runs/<name>/running.json``: host, process, Slurm job); so a folder that jobs on many
machines write into can be read at any time."""
from __future__ import annotations

import json
import os
import socket
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from benchmark.run.identity import stale_fields
from benchmark.run.records import iter_records, record_name
from core.files import atomic_json, file_lock

CHECKPOINT = "checkpoint.pt"
PLAN = "grid.json"
RUNNING = "running.json"
RUN_LOCK = "run.lock"  # held by the process running the run (core.files.file_lock)
KEPT_BATCHES = "generated"  # each generated batch of samples, kept until samples.npz holds them all
RUN_IDENTITY = "identity.json"  # the identity of the run whose checkpoint the folder holds
SET_ASIDE = "stale"  # where a folder's files made otherwise than the run now asks are moved
STATES = ("done", "stale", "failed", "running", "interrupted", "pending")


@dataclass(frozen=True)
class RunStatus:
    name: str
    state: str          # one of STATES
    detail: str = ""


# ---- written by the grid and by each run ------------------------------------------------------


def write_grid_plan(out: Path, specs: Sequence) -> None:
    """Add the grid's runs to the folder's plan (several invocations, or jobs, may add to it)."""
    path = Path(out) / PLAN
    with file_lock(path.with_suffix(".lock")):
        plan = json.loads(path.read_text()) if path.is_file() else {}
        plan.update({s.name: {**s.identity(), "kind": s.kind.value} for s in specs})
        atomic_json(path, plan, indent=1, sort_keys=True)


def _slurm_job() -> str | None:
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


def claim_run_folder(run_dir: Path, identity: dict) -> list[str]:
    """Make ``run_dir`` hold only what a run of ``identity`` may resume from. Files left by a run made
    otherwise (:func:`benchmark.run.identity.stale_fields` names how: another config hash, method code or
    base model) are moved to ``<run_dir>/stale/<time>/``, so the run starts afresh instead of resuming weights
    trained under other settings; a folder from before identities were written is trusted. Returns what
    differed (empty: nothing was moved)."""
    run_dir = Path(run_dir)
    path = run_dir / RUN_IDENTITY
    found = stale_fields({"identity": json.loads(path.read_text())}, identity) if path.is_file() else []
    if found:
        aside = run_dir / SET_ASIDE / time.strftime("%Y%m%d-%H%M%S")
        aside.mkdir(parents=True, exist_ok=True)
        for item in run_dir.iterdir():
            if item.name not in (RUN_LOCK, RUNNING, RUN_IDENTITY, SET_ASIDE):
                item.rename(aside / item.name)
        path.rename(aside / RUN_IDENTITY)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_json(path, identity, indent=1, sort_keys=True)
    return found


@contextmanager
def running_marker(run_dir: Path) -> Iterator[None]:
    """``running.json`` in the run's folder while the block runs; left behind if the process is killed."""
    path = Path(run_dir) / RUNNING
    atomic_json(path, {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": _slurm_job(),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


# ---- read by `status` -------------------------------------------------------------------------


def _checkpoint_step(path: Path) -> str:
    """The step of a run's checkpoint, read without building the method (or why it cannot be read); empty
    when there is none."""
    if not path.is_file():
        return ""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a checkpoint being written right now, or a damaged one
        return f"checkpoint unreadable ({type(err).__name__})"
    return f"last checkpoint at step {state.get('step', '?')}" if isinstance(state, dict) else "checkpoint"


def _kept_batches(run_dir: Path) -> str:
    """The batches of samples a run has generated and kept so far, by condition (own, swapped), and when
    the newest was written; empty when none. A run that trains nothing (InverseSR, hours per run) shows
    its progress only here."""
    files = sorted((run_dir / KEPT_BATCHES).glob("*.npz"))
    if not files:
        return ""
    counts = Counter(f.name.split("-")[0] for f in files)
    newest = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(max(f.stat().st_mtime for f in files)))
    what = " and ".join(f"{n} with {tag} conditions" for tag, n in sorted(counts.items()))
    return f"batches generated: {what}, the last at {newest}"


def _progress(run_dir: Path) -> str:
    found = [part for part in (_checkpoint_step(run_dir / CHECKPOINT), _kept_batches(run_dir)) if part]
    return "; ".join(found) or "no checkpoint yet"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _in_progress(run_dir: Path) -> RunStatus | None:
    """running (its marker names a live process, or another machine's) or interrupted; None if never started."""
    marker = run_dir / RUNNING
    step = _progress(run_dir)
    if marker.is_file():
        try:
            info = json.loads(marker.read_text())
        except (OSError, ValueError):
            info = {}
        where = f"{info.get('host', '?')} pid {info.get('pid', '?')}" + (
            f", Slurm job {info['slurm_job']}" if info.get("slurm_job") else "")
        if info.get("host") != socket.gethostname() or _alive(int(info.get("pid", -1))):
            return RunStatus(run_dir.name, "running", f"{step} (on {where}, since {info.get('started', '?')})")
        return RunStatus(run_dir.name, "interrupted", f"{step} (its process {where} has ended; rerun to resume)")
    if run_dir.is_dir():
        return RunStatus(run_dir.name, "interrupted", f"{step}; rerun to resume")
    return None


def folder_status(out: Path, stale: Callable[[dict], list[str]] | None = None) -> list[RunStatus]:
    """One entry per run that is planned, has a record or has a run folder under ``out``, by name.
    ``stale(record)`` says what differs between a finished record and what the command would make now
    (:func:`benchmark.run.identity.stale_fields`); without it finished records are done."""
    out = Path(out)
    found: dict[str, RunStatus] = {}
    for record in iter_records(out):
        name = record_name(record)
        differs = stale(record) if stale is not None and record.get("status") == "ok" else []
        if differs:
            found[name] = RunStatus(name, "stale", "; ".join(differs))
        elif record.get("status") == "ok":
            found[name] = RunStatus(name, "done", f"{record.get('elapsed_seconds', 0):.0f} s")
        else:
            first = str(record.get("error", "")).splitlines()[0][:160] if record.get("error") else ""
            found[name] = RunStatus(name, "failed", first)
    runs = out / "runs"
    for run_dir in sorted(runs.glob("*")) if runs.is_dir() else []:
        if not run_dir.is_dir():
            continue
        if (run_dir / RUNNING).is_file() or run_dir.name not in found:  # a rerun in progress counts too
            state = _in_progress(run_dir)
            if state is not None and (state.state == "running" or run_dir.name not in found):
                found[run_dir.name] = state
    plan = out / PLAN
    for name in json.loads(plan.read_text()) if plan.is_file() else {}:
        found.setdefault(name, RunStatus(name, "pending", "not started"))
    return [found[k] for k in sorted(found)]


def planned_without_record(out: Path) -> list[dict]:
    """The identities (task, method, size, seed, kind) of the runs in the folder's plan that have no record
    yet, by name: what a report of an unfinished grid must say is missing. Empty without a plan."""
    plan_path = Path(out) / PLAN
    if not plan_path.is_file():
        return []
    recorded = {record_name(record) for record in iter_records(out)}
    plan = json.loads(plan_path.read_text())
    return [plan[name] for name in sorted(plan) if name not in recorded]


def status_lines(runs: list[RunStatus]) -> list[str]:
    if not runs:
        return ["no runs in this folder yet"]
    counts = {s: sum(r.state == s for r in runs) for s in STATES}
    width = max(len(r.name) for r in runs)
    lines = [f"{r.name:<{width}}  {r.state:<11}  {r.detail}".rstrip() for r in runs]
    lines.append(f"{len(runs)} runs: " + ", ".join(f"{counts[s]} {s}" for s in STATES))
    return lines
