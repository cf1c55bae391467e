"""The grid on a Slurm cluster: every pending run becomes one task of one job array, submitted
through submitit (``pip install '.[cluster]'``, imported only here).

Each array task runs exactly one run (:class:`benchmark.run.executors.GridJob`) and writes its
record into the shared results folder. A task that reaches its time limit or is preempted receives
Slurm's signal; submitit then requeues it (at most ``max_requeue`` times for time limits; preemptions
do not count), and the requeued task resumes the run from its last checkpoint. The submitting
command returns once the array is queued; ``status`` follows it and ``tables`` reads what is done.

With ``gpus_per_run`` N > 1 each array task is N Slurm tasks on one node, one GPU each: the ranks of a
data-parallel run (``benchmark.run.ddp``), with the rendezvous from Slurm's environment through
submitit's ``TorchDistributedEnvironment``; rank 0 writes the record. Untested on a real cluster.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from benchmark.run.executors import GridJob
from benchmark.run.grid import GridError
from benchmark.run.spec import RunSpec

INSTALL = "pip install '.[cluster]'  (or: pip install submitit)"


def _submitit():
    try:
        import submitit
    except ImportError:
        raise GridError(f"--executor slurm needs submitit, which is not installed here: {INSTALL}") from None
    return submitit


@dataclass
class SlurmSettings:
    """What each array task asks Slurm for. ``sbatch`` holds any other sbatch option by its long
    name without dashes (``{"account": "mylab", "qos": "high"}``)."""

    partition: str | None = None
    gpus_per_run: int = 1
    cpus_per_run: int = 8
    mem_gb: int = 64
    time_min: int = 24 * 60
    max_requeue: int = 3
    array_parallelism: int = 64
    job_name: str = "scb"
    sbatch: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("gpus_per_run", "cpus_per_run", "mem_gb", "time_min", "max_requeue", "array_parallelism"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name in ("gpus_per_run", "max_requeue") else 1):
                raise GridError(f"Slurm setting {name} must be a whole number "
                                f"{'>= 0' if name in ('gpus_per_run', 'max_requeue') else '>= 1'}, got {value!r}")

    @property
    def ranks(self) -> int:
        """Processes per run: one per GPU (data parallel when more than one), one without GPUs."""
        return max(1, self.gpus_per_run)

    def parameters(self) -> dict:
        """submitit's ``AutoExecutor.update_parameters`` keywords."""
        params = {
            "name": self.job_name, "timeout_min": self.time_min, "gpus_per_node": self.gpus_per_run,
            "cpus_per_task": max(1, self.cpus_per_run // self.ranks), "mem_gb": self.mem_gb,
            "tasks_per_node": self.ranks, "nodes": 1,
            "slurm_array_parallelism": self.array_parallelism,
        }
        if self.partition:
            params["slurm_partition"] = self.partition
        if self.sbatch:
            params["slurm_additional_parameters"] = dict(self.sbatch)
        return params


def parse_sbatch_options(options: Sequence[str]) -> dict[str, str]:
    """``["account=mylab", "qos=high"]`` -> ``{"account": "mylab", "qos": "high"}``."""
    parsed = {}
    for option in options:
        key, sep, value = option.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not key:
            raise GridError(f"--slurm-option takes NAME=VALUE (an sbatch option without its dashes, e.g. "
                            f"account=mylab), got '{option}'")
        parsed[key] = value.strip()
    return parsed


class RequeueableRun:
    """A grid job that submitit requeues: on the time-limit (or preemption) signal submitit calls
    ``checkpoint``, which resubmits the same call; the run itself resumes from its own checkpoint.
    With ``ranks`` > 1 every Slurm task of the array task calls it: rank 0 runs the run and returns its
    record, the others train beside it and return None."""

    def __init__(self, job: GridJob, ranks: int = 1):
        self.job, self.ranks = job, ranks

    def __call__(self, spec: RunSpec) -> dict | None:
        if self.ranks == 1:
            return self.job(spec)
        from benchmark.run import ddp

        rank = _submitit().JobEnvironment().global_rank
        if not ddp.trains_in_engine(spec):  # nothing to split: rank 0 alone runs it
            return self.job(spec) if rank == 0 else None
        _submitit().helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        with ddp.environment_group(self.job.device) as device:
            return ddp.run_rank(rank, device, self.job, spec)

    def checkpoint(self, spec: RunSpec):
        return _submitit().helpers.DelayedSubmission(self, spec)


class SlurmExecutor:
    """Submits the runs as one job array. ``cluster="local"`` runs the same tasks as local processes
    through submitit's local executor (tests, and a machine without Slurm)."""

    def __init__(self, settings: SlurmSettings, folder: Path, cluster: str = "slurm"):
        _submitit()  # before any work: say how to install it
        missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None] if cluster == "slurm" else []
        if missing:
            raise GridError(f"--executor slurm submits with Slurm's sbatch and srun; {' and '.join(missing)} "
                            "not on this machine's PATH: run the command on the cluster's login node, or use "
                            "--executor local --jobs N here")
        self.settings = settings
        self.folder = Path(folder)
        self.cluster = cluster

    def executor(self):
        """submitit's executor with the settings applied (its parameter names are checked by submitit)."""
        executor = _submitit().AutoExecutor(folder=self.folder / "%j", cluster=self.cluster,
                                         slurm_max_num_timeout=self.settings.max_requeue)
        params = self.settings.parameters()
        if self.cluster != "slurm":  # only the generic settings apply to submitit's other executors
            params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
        executor.update_parameters(**params)
        return executor

    def submit(self, job: GridJob, specs: Sequence[RunSpec]) -> list:
        """One array task per spec; returns submitit's jobs (in the order of ``specs``)."""
        if not specs:
            return []
        executor = self.executor()
        return executor.map_array(RequeueableRun(job.without_progress(), self.settings.ranks), list(specs))

    def map(self, job: GridJob, specs: Sequence[RunSpec]) -> Iterator[tuple[RunSpec, dict]]:
        """Submit and wait for every task: (spec, record) as each finishes."""
        jobs = self.submit(job, specs)
        for spec, task in zip(specs, jobs):
            try:
                record = task.result()
            except Exception as err:  # the task died or was cancelled: its run wrote no record
                first = str(err).strip().splitlines()[-1][:300] if str(err).strip() else type(err).__name__
                record = {"status": "failed", "error": f"Slurm task {task.job_id} ended without a record ({first}); "
                                                      f"its log is in {self.folder}; rerun to resume the run"}
            yield spec, record


def array_job_id(jobs: Sequence) -> str:
    """The array's job id (``12345`` of ``12345_0``)."""
    return str(jobs[0].job_id).split("_")[0] if jobs else ""
