"""The grid: every (task, method, size, seed) is one run that writes one record. Reruns skip
finished runs; a failing run is recorded with its error and the grid goes on.

An executor decides where the runs execute: this process (:class:`InProcessExecutor`), N processes
at once on this machine, each with its own device or share of CPU threads
(:class:`LocalPoolExecutor`), or a Slurm job array (:mod:`benchmark.run.slurm`). Every one of them
runs a :class:`GridJob`, a picklable recipe that rebuilds the grid's shared context in the process
that runs it, so each run writes the same record wherever it runs."""

from __future__ import annotations

import json
import os
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Iterable, Iterator, Protocol, Sequence

from tqdm.auto import tqdm

from benchmark.engine.speed import SpeedOptions
from benchmark.run.grid import GridError
from benchmark.run.identity import mixed_folder_error, run_identity, stale_fields, uses_base_model
from benchmark.run.records import RECORD_VERSION, iter_records, library_versions, read_record, record_name, write_record
from benchmark.run.runner import execute_run
from benchmark.run.spec import RunContext, RunSpec
from benchmark.run.status import RUN_LOCK, RUNNING, claim_run_folder, running_marker, write_grid_plan
from core.files import LockHeld, file_lock
from metrics.common import quiet_missing_weights
from metrics.cost import device_name


# ---- one run, anywhere ------------------------------------------------------------------


def run_and_record(spec: RunSpec, ctx: RunContext, force: bool = False) -> dict:
    """Run ``spec`` and write its record (``ok`` or ``failed`` with the error); returns the record.
    A run that another process is running now (a second submission of the same grid) is left to it,
    and one already done is not redone unless ``force``: both are decided under the run's lock."""
    base_record = {
        "task": spec.task, "method": spec.method, "size": spec.size, "seed": spec.seed,
        "profile": ctx.profile.name, "config_hash": ctx.config_hash(spec),
        "versions": library_versions(), "device": device_name(ctx.device),
        "data": ctx.data.identity, "record_version": RECORD_VERSION,
        "speed": SpeedOptions.from_profile(ctx.profile).as_dict(),
        "recipe": ctx.recipe(spec) or {"source": f"profile (training.recipe: {ctx.profile.training.get('recipe', 'profile')})"},
        "splits": ctx.data.split_rule,
        "identity": run_identity(spec, ctx),
    }
    run_dir = ctx.run_dir(spec)
    try:
        with file_lock(run_dir / RUN_LOCK, wait=False):
            if not force and is_done(spec, ctx):
                return read_record(ctx.record_path(spec))
            with _lock_of_the_trained_run(spec, ctx):
                return _run_and_write(spec, ctx, base_record)
    except LockHeld:
        return {**base_record, "status": "failed",
                "error": f"{spec.name} is being run by another process ({run_dir / RUNNING} says where); this "
                         "process left it alone (the grid was started twice?): its record appears when it ends"}


@contextmanager
def _lock_of_the_trained_run(spec: RunSpec, ctx: RunContext):
    """A run that reuses another run's checkpoint (sphere validation reuses VCM's) also holds that run's
    lock, waiting while another process (``--jobs``) trains it: two processes never train into one folder,
    and the waiting run then finds the finished checkpoint instead of training its own."""
    if spec.trained() == spec:
        yield
        return
    with file_lock(ctx.run_dir(spec.trained()) / RUN_LOCK):
        yield


def _run_and_write(spec: RunSpec, ctx: RunContext, base_record: dict) -> dict:
    started = time.time()
    with running_marker(ctx.run_dir(spec)):
        try:
            # its folder and the one whose checkpoint it resumes (a sphere run reuses its method's run)
            for owner in dict.fromkeys([spec.trained(), spec]):
                set_aside = claim_run_folder(ctx.run_dir(owner), run_identity(owner, ctx))
                if set_aside:
                    print(f"{owner.name}: its folder held a run made otherwise ({'; '.join(set_aside)}): moved to "
                          f"{ctx.run_dir(owner) / 'stale'}, not resumed", flush=True)
            record = {**base_record, **execute_run(spec, ctx), "status": "ok"}
            used = (record.get("base_model") or {}).get("sha256")
            if used and uses_base_model(spec):  # the file loaded (a base pretrained by this run had none before)
                record["identity"] = {**record["identity"], "base_model_sha256": used}
        except KeyboardInterrupt:
            raise
        except Exception as err:  # a failing run is recorded and the grid goes on
            record = {**base_record, "status": "failed", "error": f"{type(err).__name__}: {err}",
                      "traceback": traceback.format_exc()}
        record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        record["elapsed_seconds"] = time.time() - started
        write_record(ctx.record_path(spec), record)
    return record


def run_state(spec: RunSpec, ctx: RunContext, now: dict | None = None) -> tuple[str, list[str]]:
    """``done``, ``stale`` (finished, but made otherwise than this context would make it: with what differs)
    or ``todo`` (no record, or a failed one). ``now``: the run's identity here, if already computed."""
    record = read_record(ctx.record_path(spec))
    if not record or record.get("status") != "ok":
        return "todo", []
    differs = stale_fields(record, now if now is not None else run_identity(spec, ctx))
    return ("stale", differs) if differs else ("done", [])


def is_done(spec: RunSpec, ctx: RunContext) -> bool:
    return run_state(spec, ctx)[0] == "done"


# The context this process built for a job, by the job's identity: a process that runs several runs
# loads the base model, the data and the judges once.
_CONTEXTS: dict[str, RunContext] = {}
_WORKER_DEVICE: str | None = None  # set in a LocalPoolExecutor child: the device of its slot


@dataclass
class GridJob:
    """What a process needs to run any spec of one grid: the profile (as data), the folders, the
    device and the plugins to import. Picklable (sent to worker processes and Slurm jobs); calling
    it runs one spec and returns its record. Built from this process's context, it reuses that
    context instead of building another."""

    profile: dict
    out_dir: str
    cache_dir: str
    weights_dir: str | None = None
    manifest: str | None = None
    device: str | None = None
    plugins: tuple[str, ...] = ()
    progress: bool = False
    force: bool = False  # rerun runs that are done
    quiet: bool = False  # --quiet: hide the warnings that the records and REPORT.md already state, here too
    _local: RunContext | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_context(cls, ctx: RunContext, plugins: Sequence[str] = (), force: bool = False) -> "GridJob":
        return cls(profile=ctx.profile.to_dict(), out_dir=str(ctx.out_dir), cache_dir=str(ctx.cache_dir),
                   weights_dir=str(ctx.weights_dir) if ctx.weights_dir else None,
                   manifest=str(ctx.manifest) if ctx.manifest else None, device=ctx.device,
                   plugins=tuple(plugins), progress=ctx.progress, force=force, quiet=not ctx.progress, _local=ctx)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_local"] = None  # a context holds networks and open data: rebuilt where the job runs
        return state

    def without_progress(self) -> "GridJob":
        """The same job with progress bars off: for other processes, whose bars would interleave."""
        return GridJob(**{**self.__getstate__(), "progress": False})

    def identity(self) -> str:
        return json.dumps({k: v for k, v in self.__getstate__().items() if k != "_local"}, sort_keys=True, default=str)

    def context(self) -> RunContext:
        if self._local is not None:
            return self._local
        key = self.identity()
        if key not in _CONTEXTS:
            from benchmark.profiles import Profile
            from methods.registry import load_plugin

            for module in self.plugins:
                load_plugin(module)
            _CONTEXTS[key] = RunContext(Profile(self.profile), Path(self.out_dir), Path(self.cache_dir),
                                        self.weights_dir, Path(self.manifest) if self.manifest else None,
                                        _WORKER_DEVICE or self.device, progress=self.progress)
        return _CONTEXTS[key]

    def __call__(self, spec: RunSpec) -> dict:
        with warnings.catch_warnings():
            if self.quiet:
                quiet_missing_weights()
            return run_and_record(spec, self.context(), self.force)


# ---- executors -------------------------------------------------------------------------------


class Executor(Protocol):
    def map(self, job: GridJob, specs: Sequence[RunSpec]) -> Iterator[tuple[RunSpec, dict]]:
        """Run ``job`` on every spec (in any order, anywhere) and yield (spec, record)."""


class InProcessExecutor:
    """One run after another in this process."""

    def map(self, job, specs):
        for spec in specs:
            yield spec, job(spec)


def _run_in_child(job: "GridJob", spec: RunSpec, device: str | None, threads: int, conn) -> None:
    """A LocalPoolExecutor child process: one run on its device (or share of CPU threads)."""
    global _WORKER_DEVICE
    import torch

    _WORKER_DEVICE = device
    torch.set_num_threads(threads)
    conn.send(job(spec))
    conn.close()


class LocalPoolExecutor:
    """``jobs`` runs at once on this machine, each run in a process of its own: with ``devices``
    (e.g. ``["cuda:0", "cuda:1"]``) each of the ``jobs`` slots has one (round robin when there are
    fewer devices than jobs); on CPU each process gets ``cpu_count // jobs`` threads. A run whose
    process dies (killed, out of memory) is reported failed and the others go on; a rerun resumes it
    from its checkpoint."""

    def __init__(self, jobs: int, devices: Sequence[str] = ()):
        if jobs < 1:
            raise ValueError(f"--jobs must be at least 1, got {jobs}")
        self.jobs = int(jobs)
        self.devices = list(devices)
        self.threads = max(1, (os.cpu_count() or 1) // self.jobs)

    def map(self, job, specs):
        from multiprocessing.connection import wait

        context = get_context("spawn")  # torch and CUDA are not safe to fork
        child_job = job.without_progress()
        waiting, free = list(specs), list(range(self.jobs))
        running: dict[int, tuple] = {}  # slot -> (process, spec, receiving end)
        try:
            while waiting or running:
                while waiting and free:
                    slot, spec = free.pop(0), waiting.pop(0)
                    device = self.devices[slot % len(self.devices)] if self.devices else None
                    receive, send = context.Pipe(duplex=False)
                    process = context.Process(target=_run_in_child, args=(child_job, spec, device, self.threads, send),
                                              name=f"scb-{spec.name}")
                    process.start()
                    send.close()  # the child holds the sending end: EOF here when it dies
                    running[slot] = (process, spec, receive)
                wait([entry[2] for entry in running.values()])
                for slot, (process, spec, receive) in list(running.items()):
                    if not receive.poll():
                        continue
                    try:
                        record = receive.recv()
                    except EOFError:  # the process ended without sending its record
                        process.join()
                        record = {"status": "failed", "error": f"its process ended with exit code {process.exitcode} "
                                                              "before writing a record (killed, or out of memory); "
                                                              "rerun the grid to resume it from its checkpoint"}
                    process.join()
                    del running[slot]
                    free.append(slot)
                    yield spec, record
        finally:  # interrupted (Ctrl-C): stop the children too; their runs resume on the next call
            for process, _, _ in running.values():
                process.terminate()
                process.join()


# ---- the grid ---------------------------------------------------------------------------------


@dataclass
class GridSummary:
    done: list[str]
    skipped: list[str]
    failed: list[tuple[str, str]]

    @property
    def ok(self) -> bool:
        return not self.failed

    def line(self) -> str:
        text = f"{len(self.done)} runs done, {len(self.skipped)} already done, {len(self.failed)} failed"
        if self.failed:
            text += ": " + "; ".join(f"{name} ({error.splitlines()[0][:160]})" for name, error in self.failed)
        return text


def pending_runs(specs: Iterable[RunSpec], ctx: RunContext, force: bool = False,
                 allow_mixed: bool = False, redo_stale: bool = False) -> list[RunSpec]:
    """The specs still to run (all with ``force``; the stale ones too with ``redo_stale``); the grid's
    plan is written for ``status``. Before anything is written, a grid with stale records (without
    ``force`` or ``redo_stale``) or a folder mixing profiles or base models (without ``allow_mixed``)
    stops with a GridError."""
    specs = list(specs)
    identities = {s.name: run_identity(s, ctx) for s in specs}  # once per spec: both checks below use them
    states = {s.name: run_state(s, ctx, identities[s.name]) for s in specs}
    stale = [f"{name} ({'; '.join(differs)})" for name, (state, differs) in states.items() if state == "stale"]
    if stale and not (force or redo_stale):
        shown = "; ".join(stale[:3]) + (f"; and {len(stale) - 3} more" if len(stale) > 3 else "")
        raise GridError(f"{ctx.out_dir} holds {len(stale)} finished record(s) that this command would make otherwise "
                        f"(stale): {shown}. Rerun with --redo-stale to redo them (--force redoes every run), or give a "
                        "new --out to keep them")
    if not allow_mixed:
        redone = {s.name for s in specs} if force else {n for n, (state, _) in states.items() if state != "done"}
        kept = [r for r in iter_records(ctx.out_dir) if record_name(r) not in redone]
        made_now = [{"identity": identity} for identity in identities.values()]
        error = mixed_folder_error(ctx.out_dir, kept + made_now)
        if error:
            raise GridError(error)
    write_grid_plan(ctx.out_dir, specs)
    return [s for s in specs if force or states[s.name][0] != "done"]


def run_grid(specs: Iterable[RunSpec], ctx: RunContext, executor: Executor | None = None,
             force: bool = False, plugins: Sequence[str] = (), allow_mixed: bool = False,
             redo_stale: bool = False) -> GridSummary:
    specs = list(specs)
    todo = pending_runs(specs, ctx, force, allow_mixed, redo_stale)
    skipped = [s.name for s in specs if s not in todo]
    summary = GridSummary(done=[], skipped=skipped, failed=[])
    executor = executor or InProcessExecutor()
    job = GridJob.from_context(ctx, plugins, force)
    for spec, record in tqdm(executor.map(job, todo), total=len(todo), desc="grid", disable=not ctx.progress):
        if record["status"] == "ok":
            summary.done.append(spec.name)
        else:
            summary.failed.append((spec.name, record["error"]))
            tqdm.write(f"run {spec.name} failed: {record['error'].splitlines()[0]}")
    return summary
