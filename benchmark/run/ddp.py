"""Starting the ranks of a data-parallel run (docs/CLUSTER.md, "One run on several devices").

Three ways in, one set-up (:func:`join_process_group`): ``torchrun --nproc_per_node N run_benchmark.py
train ...`` (torchrun's RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT), ``run --ddp N`` (N
processes per run on this machine: :class:`DataParallelExecutor`) and a Slurm task of ``--slurm-gpus N``
(``benchmark.run.slurm``). Rank 0 runs the run as one process would and writes everything (checkpoint,
record, samples, logs); every other rank waits until rank 0 is about to train, trains the same method
on its share of every minibatch (``benchmark.engine.distributed``) and ends, leaving sampling and
scoring to rank 0.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch.multiprocessing import ProcessExitedException, ProcessRaisedException, start_processes

from benchmark.engine import distributed
from benchmark.run.spec import RunContext, RunKind, RunSpec


class RankFailed(RuntimeError):
    """A rank of a data-parallel run raised or died; the message names it."""


def join_process_group(rank: int, world_size: int, local_rank: int, device: str | None) -> str:
    """Join the process group of ``world_size`` ranks (MASTER_ADDR and MASTER_PORT from the environment);
    returns this rank's device: ``cuda:LOCAL_RANK`` (backend nccl) on CUDA, else ``cpu`` (gloo)."""
    cuda = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")).type == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank)  # nccl's collectives, broadcast_object_list too, use the current device
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world_size)
    return f"cuda:{local_rank}" if cuda else "cpu"


@contextlib.contextmanager
def environment_group(device: str | None) -> Iterator[str | None]:
    """Within this block, the process group of the ranks the environment names (torchrun's, or a Slurm
    task's as exported: RANK, WORLD_SIZE > 1, LOCAL_RANK), and this rank's device; None (one process)
    when WORLD_SIZE is unset or 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        yield None
        return
    device = join_process_group(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")), device)
    try:
        yield device
    finally:
        dist.destroy_process_group()


def lead(job: Callable[[RunSpec], dict], spec: RunSpec) -> dict:
    """Rank 0: the run, as one process would run it; returns its record."""
    try:
        return job(spec)
    finally:
        distributed.tell_followers(False)  # a run that ended without training lets the other ranks go


def follow(spec: RunSpec, ctx: RunContext) -> None:
    """A rank other than 0: once rank 0 is about to train the run, train the same method beside it."""
    from benchmark.run.runner import train_or_load

    if distributed.wait_for_lead():
        train_or_load(spec.trained(), ctx.task(spec.task), ctx)


def run_rank(rank: int, device: str, job, spec: RunSpec) -> dict | None:
    """One rank of a grid job's run on ``device``: rank 0's record, None elsewhere."""
    job = dataclasses.replace(job, device=device)
    return lead(job, spec) if rank == 0 else follow(spec, job.context())


def trains_in_engine(spec: RunSpec) -> bool:
    """Whether the run trains a method through the suite's loop, the part data parallelism splits (a
    reference row or a method that fits itself runs in one process)."""
    from methods.base import Method
    from methods.registry import get_method

    return (spec.kind in (RunKind.METHOD, RunKind.SPHERE_VALIDATION)
            and issubclass(get_method(spec.trained().method, spec.task), Method))


def write_caches(ctx: RunContext, spec: RunSpec) -> None:
    """Build what every rank of the run reads (the base model, the data, the training latents) in this
    process, before the ranks start: they then wait on rank 0 for seconds, not for a pretraining."""
    ctx.latents.get(ctx.data.train_subjects(spec.size), progress=ctx.progress)


# ---- N ranks on this machine ------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, device: str | None, results, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    rank_device = join_process_group(rank, world_size, rank, device)
    if rank_device == "cpu":  # the ranks share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        result = fn(rank, rank_device, *args)
        if rank == 0:
            results.put((rank, None, result))
    except BaseException as err:  # told before the process ends: the parent sees every rank's error
        results.put((rank, (isinstance(err, distributed.RankLost), f"{type(err).__name__}: {err}"), None))
        raise
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., Any], world_size: int, device: str | None, *args) -> Any:
    """``fn(rank, device, *args)`` in ``world_size`` fresh processes on this machine, joined in one process
    group on a free local port; returns rank 0's result. A rank that raises or dies ends every rank and
    raises :class:`RankFailed`, naming the rank whose error caused it (not one that only lost the others:
    :class:`~benchmark.engine.distributed.RankLost`); if only such ranks raised, rank 0's result (a run's
    failed record) names the cause and is returned."""
    results = torch.multiprocessing.get_context("spawn").SimpleQueue()
    context = start_processes(_rank_main, (world_size, _free_port(), device, results, fn, args),
                              nprocs=world_size, start_method="spawn", join=False)
    got, errors = [], {}  # rank 0's result once it came; rank -> (only lost the others, error)

    def receive() -> None:  # as it comes: a large result would block its sender's exit
        while not results.empty():
            rank, error, result = results.get()
            if error is None:
                got.append(result)
            else:
                errors[rank] = error

    try:
        while not context.join(timeout=0.5):
            receive()
            if got and not context.processes[0].is_alive():
                break  # rank 0 ended the run; a rank still waiting on it has nothing left to do
    except (ProcessRaisedException, ProcessExitedException) as err:
        receive()
        causes = sorted((rank, text) for rank, (lost, text) in errors.items() if not lost)
        if causes:
            raise RankFailed(f"rank {causes[0][0]} of {world_size} raised {causes[0][1]}") from None
        if not got:
            error = (f"raised {errors[err.error_index][1]}" if err.error_index in errors else
                     f"died with exit code {getattr(err, 'exit_code', None)} (killed, or out of memory?)")
            raise RankFailed(f"rank {err.error_index} of {world_size} {error}") from None
    finally:
        for process in context.processes:  # none is left behind
            if process.is_alive():
                process.terminate()
            process.join()
    receive()
    return got[0] if got else None


class DataParallelExecutor:
    """``run --ddp N``: every run that trains through the suite's loop is trained by ``ranks`` processes
    on this machine, started for that run (rank 0 writes its record, as one process would); the other
    runs run in this process, one after another. A run whose rank fails is reported failed, naming the
    rank, and the grid goes on; a rerun resumes it from its last checkpoint."""

    def __init__(self, ranks: int):
        self.ranks = int(ranks)

    def map(self, job, specs: Sequence[RunSpec]) -> Iterator[tuple[RunSpec, dict]]:
        for spec in specs:
            if not trains_in_engine(spec):
                yield spec, job(spec)
                continue
            write_caches(job.context(), spec)
            try:
                record = spawn(run_rank, self.ranks, job.device, job, spec)
            except RankFailed as err:
                record = {"status": "failed", "error": f"{err}; rerun the grid to resume the run from its last checkpoint"}
            yield spec, record
