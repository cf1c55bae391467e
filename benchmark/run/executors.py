"""The grid: every (task, method, size, seed) is one run that writes one record. Reruns skip
finished runs; a failing run is recorded with its error and the grid goes on. An executor decides
where the runs execute (this process today)."""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Protocol, Sequence

from tqdm.auto import tqdm

from benchmark.run.records import library_versions, read_record, write_record
from metrics.cost import device_name

from benchmark.run.runner import execute_run
from benchmark.run.spec import RunContext, RunSpec


# ---- executors and the grid ------------------------------------------------------------


class Executor(Protocol):
    def map(self, fn: Callable[[RunSpec], dict], specs: Sequence[RunSpec]) -> Iterator[tuple[RunSpec, dict]]:
        """Apply fn to every spec (in any order, anywhere) and yield (spec, record)."""


class InProcessExecutor:
    """Runs one after another in this process. A cluster executor would submit fn(spec) as jobs."""

    def map(self, fn, specs):
        for spec in specs:
            yield spec, fn(spec)


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


def run_and_record(spec: RunSpec, ctx: RunContext) -> dict:
    base_record = {
        "task": spec.task, "method": spec.method, "size": spec.size, "seed": spec.seed,
        "profile": ctx.profile.name, "config_hash": ctx.config_hash(spec),
        "versions": library_versions(), "device": device_name(ctx.device),
        "data": ctx.data.identity, "record_version": 1,
    }
    started = time.time()
    try:
        record = {**base_record, **execute_run(spec, ctx), "status": "ok"}
    except KeyboardInterrupt:
        raise
    except Exception as err:  # a failing run is recorded and the grid goes on
        record = {**base_record, "status": "failed", "error": f"{type(err).__name__}: {err}",
                  "traceback": traceback.format_exc()}
    record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    record["elapsed_seconds"] = time.time() - started
    write_record(ctx.record_path(spec), record)
    return record


def is_done(spec: RunSpec, ctx: RunContext) -> bool:
    record = read_record(ctx.record_path(spec))
    return bool(record) and record.get("status") == "ok" and record.get("config_hash") == ctx.config_hash(spec)


def run_grid(specs: Iterable[RunSpec], ctx: RunContext, executor: Executor | None = None,
             force: bool = False) -> GridSummary:
    specs = list(specs)
    todo = [s for s in specs if force or not is_done(s, ctx)]
    skipped = [s.name for s in specs if s not in todo]
    summary = GridSummary(done=[], skipped=skipped, failed=[])
    executor = executor or InProcessExecutor()
    for spec, record in tqdm(executor.map(lambda s: run_and_record(s, ctx), todo), total=len(todo),
                             desc="grid", disable=not ctx.progress):
        if record["status"] == "ok":
            summary.done.append(spec.name)
        else:
            summary.failed.append((spec.name, record["error"]))
            tqdm.write(f"run {spec.name} failed: {record['error']}")
    return summary
