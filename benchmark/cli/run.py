"""The ``run``, ``tables`` and ``status`` commands: the grid, its outputs, and what a results folder holds."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmark.cli import load_plugins, load_profile_from, writable_folder

EXAMPLES = """examples:
  python run_benchmark.py --profile smoke                       # every method, sizes 10,50,500, task lv
  python run_benchmark.py --methods vcm,controlnet --sizes 50 --seeds 0,1,2
  python run_benchmark.py --task multimodal --profile cpu
  python run_benchmark.py --plugin my_method.py --methods my_method
  python run_benchmark.py tables --out results/cpu              # rebuild tables from records
  python run_benchmark.py status --out results/cpu              # done, stale, running (step), failed, interrupted, pending
  python run_benchmark.py compare results/a results/b           # the same records, apart from timings?
  python run_benchmark.py --profile gpu --executor local --jobs 4 --devices cuda:0,cuda:1,cuda:2,cuda:3
  python run_benchmark.py --profile paper --executor slurm --slurm-partition gpu --slurm-time 2880  # docs/CLUSTER.md
"""


def register(sub, common: argparse.ArgumentParser) -> None:
    from datasets.tasks import DEFAULT_TASK, TASKS

    p = sub.add_parser("run", parents=[common], help="run the grid, then write tables, figures and REPORT.md",
                       description="Train every method on nested training sets, sample the test subjects, score "
                                   "them, then write tables, figures and REPORT.md. A rerun skips finished runs.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="all",
                   help="'all' (every registered method that supports the task) or a comma-separated list")
    p.add_argument("--sizes", default=None,
                   help="training-set sizes, comma-separated (nested subsets of the training pool); "
                        "default: the profile's (10,50,500)")
    p.add_argument("--task", default=DEFAULT_TASK, help=f"one of {', '.join(TASKS)}, a comma-separated list, or 'all'")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; each seed is a separate run")
    p.add_argument("--out", default=None, help="results folder (default results/<profile>)")
    p.add_argument("--data", default=None, metavar="MANIFEST.csv",
                   help="real data (NIfTI listed in a CSV manifest) instead of the embedded synthetic population")
    p.add_argument("--no-validation", action="store_true",
                   help="skip the Table 6 runs (base model alone, VCM with sphere masks) on task lv")
    p.add_argument("--force", action="store_true", help="redo runs whose records already exist")
    p.add_argument("--redo-stale", action="store_true",
                   help="redo the stale runs: finished, but made otherwise than this command would make them")
    p.add_argument("--allow-mixed", action="store_true",
                   help="let the folder hold records of several profiles or base models")
    add_executor_flags(p)
    p.set_defaults(func=run)

    t = sub.add_parser("tables", parents=[common], help="rebuild tables, figures and REPORT.md from records")
    t.add_argument("--out", default=None, help="results folder (default results/<profile>)")
    t.add_argument("--allow-mixed", action="store_true",
                   help="tabulate records made with several profiles or base models together")
    t.set_defaults(func=tables)

    s = sub.add_parser("status", parents=[common], help="list the runs of a results folder: done, stale, running, failed, interrupted, pending")
    s.add_argument("--out", default=None, help="results folder (default results/<profile>)")
    s.add_argument("--data", default=None, metavar="MANIFEST.csv",
                   help="the manifest the runs were made from, if any (records are checked against it)")
    s.set_defaults(func=status)

    r = sub.add_parser("rescore", parents=[common],
                       help="add to finished records the columns the suite scores now and they lack, from their kept volumes",
                       description="Add the judges' anatomy Dice to the finished super-resolution records of a results "
                                   "folder that were made without it, from the volumes their runs kept "
                                   "(runs/<run>/samples.npz); then rebuild the tables with `tables`.")
    r.add_argument("--out", default=None, help="results folder (default results/<profile>)")
    r.add_argument("--data", default=None, metavar="MANIFEST.csv", help="the manifest the runs were made from, if any")
    r.add_argument("--allow-mixed", action="store_true", help="rescore a folder of several profiles or base models")
    r.set_defaults(func=rescore)

    c = sub.add_parser("compare", parents=[common], help="are two results folders the same, run for run (apart from timings)?",
                       description="Compare the records of two results folders field by field, apart from timings, "
                                   "memory, dates and the folders files were read from.")
    c.add_argument("first")
    c.add_argument("second")
    c.add_argument("--tolerance", type=float, default=0.0, help="relative tolerance for numbers (default 0: equal)")
    c.add_argument("--absolute", type=float, default=0.0,
                   help="absolute tolerance for numbers, for values near zero (default 0)")
    c.set_defaults(func=compare, uses_cache=False)  # the common flags are accepted; it reads two folders only


def add_executor_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where the runs execute (docs/CLUSTER.md)")
    g.add_argument("--executor", choices=("local", "slurm"), default="local",
                   help="local: on this machine, --jobs at a time (default); slurm: one Slurm job array "
                        "through submitit (pip install '.[cluster]'), each task one run")
    add_local_flags(g)
    g.add_argument("--ddp", type=int, default=1, metavar="N",
                   help="local: train each run with N data-parallel processes (ranks) on this machine, one device "
                        "each (cuda:0..N-1; on CPU a share of the threads), the minibatch split over them; with "
                        "--jobs 1 (default 1: one process)")
    g.add_argument("--slurm-partition", default=None, help="slurm: partition (default: the cluster's default)")
    g.add_argument("--slurm-gpus", type=int, default=1,
                   help="slurm: GPUs per run (default 1); N > 1 trains each run with N data-parallel ranks, one per GPU")
    g.add_argument("--slurm-cpus", type=int, default=8, help="slurm: CPU cores per run (default 8)")
    g.add_argument("--slurm-mem-gb", type=int, default=64, help="slurm: memory per run in GB (default 64)")
    g.add_argument("--slurm-time", type=int, default=24 * 60,
                   help="slurm: time limit per run in minutes (default 1440); a run that reaches it is requeued "
                        "and resumes from its last checkpoint")
    g.add_argument("--slurm-max-requeue", type=int, default=3,
                   help="slurm: how often one run may be requeued after reaching its time limit (default 3; "
                        "preemptions do not count)")
    g.add_argument("--slurm-array-parallelism", type=int, default=64,
                   help="slurm: array tasks running at once (default 64)")
    g.add_argument("--slurm-option", action="append", default=[], metavar="NAME=VALUE",
                   help="slurm: any other sbatch option without its dashes, e.g. account=mylab or qos=high (repeatable)")
    g.add_argument("--wait", action="store_true",
                   help="slurm: wait until every task has finished, then write the tables (default: submit and return)")


def add_local_flags(g) -> None:
    """Runs at once on this machine (``run`` and ``study``)."""
    g.add_argument("--jobs", type=int, default=1,
                   help="local: runs at once, each in its own process with its share of the CPU threads "
                        "(default 1: one after another, in this process)")
    g.add_argument("--devices", default=None,
                   help="local: comma-separated devices shared out among the jobs, e.g. cuda:0,cuda:1 "
                        "(default: --device; on CPU each job gets its share of the threads)")


def make_executor(args, out: Path):
    """The executor the flags ask for (None: this process)."""
    from benchmark.run.grid import GridError

    if args.executor == "slurm":
        if args.ddp != 1:
            raise GridError("--ddp starts ranks on this machine; on Slurm, --slurm-gpus N trains each run with N ranks")
        from benchmark.run.slurm import SlurmExecutor, SlurmSettings, parse_sbatch_options

        settings = SlurmSettings(partition=args.slurm_partition, gpus_per_run=args.slurm_gpus,
                                 cpus_per_run=args.slurm_cpus, mem_gb=args.slurm_mem_gb, time_min=args.slurm_time,
                                 max_requeue=args.slurm_max_requeue, array_parallelism=args.slurm_array_parallelism,
                                 sbatch=parse_sbatch_options(args.slurm_option))
        return SlurmExecutor(settings, out / "slurm")
    if args.jobs < 1:
        raise GridError(f"--jobs must be at least 1, got {args.jobs}")
    if args.ddp != 1:
        return _data_parallel(args)
    devices = _devices(args.devices)
    if args.jobs == 1:
        if devices:
            args.device = devices[0]
        return None
    from benchmark.run.executors import LocalPoolExecutor

    return LocalPoolExecutor(args.jobs, devices)


def _data_parallel(args):
    from benchmark.run.ddp import DataParallelExecutor
    from benchmark.run.grid import GridError

    if args.ddp < 1:
        raise GridError(f"--ddp must be at least 1 (the processes that train each run), got {args.ddp}")
    if args.jobs != 1 or args.devices:
        raise GridError(f"--ddp {args.ddp} trains one run at a time on this machine's devices (rank r on cuda:r); "
                        "leave out --jobs and --devices, or drop --ddp to run several runs at once")
    import torch

    cuda = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")).type == "cuda"
    if cuda and args.ddp > torch.cuda.device_count():
        raise GridError(f"--ddp {args.ddp} needs {args.ddp} CUDA devices, one per rank; this machine has "
                        f"{torch.cuda.device_count()}")
    return DataParallelExecutor(args.ddp)


def _devices(text: str | None) -> list[str]:
    from benchmark.run.grid import GridError

    if not text:
        return []
    import torch

    devices = [d.strip() for d in text.split(",") if d.strip()]
    for d in devices:
        try:
            device = torch.device(d)
        except RuntimeError:
            raise GridError(f"--devices: '{d}' is not a device; use cpu or cuda:N, comma-separated") from None
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise GridError(f"--devices: {d} is not on this machine, which has {torch.cuda.device_count()} CUDA "
                            "device(s); list the ones it has (nvidia-smi -L)")
    return devices


def _int_list(text: str, what: str) -> list[int]:
    from benchmark.run.grid import GridError

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise GridError(f"--{what} must be comma-separated integers, got '{text}'") from None
    if not values or any(v < 0 for v in values):
        raise GridError(f"--{what} needs at least one non-negative integer, got '{text}'")
    return values


def _results_dir(args, profile) -> Path:
    return Path(args.out or f"results/{profile.name}")


def run(args) -> int:
    from benchmark.report.write import write_outputs
    from benchmark.run.executors import run_grid
    from benchmark.run.data_source import axial_voxel_mm
    from benchmark.run.grid import GridError, build_specs
    from benchmark.run.spec import RunContext
    from datasets.tasks import TASKS

    profile = load_profile_from(args)
    out = writable_folder(_results_dir(args, profile), "--out")
    load_plugins(args)
    if args.task == "all":  # every task that exists at this data's voxel size
        voxel_mm = axial_voxel_mm(profile, args.data)
        tasks = [name for name, task in TASKS.items() if task.exists_at(voxel_mm)]
        if len(tasks) < len(TASKS):
            print(f"--task all: {', '.join(n for n in TASKS if n not in tasks)} left out: their slice spacing is not "
                  f"coarser than these {voxel_mm:.3g} mm voxels", file=sys.stderr)
    else:
        tasks = [t.strip() for t in args.task.split(",") if t.strip()]
    sizes = _int_list(args.sizes, "sizes") if args.sizes else list(profile.data.sizes)
    specs = build_specs(tasks, args.methods, sizes, _int_list(args.seeds, "seeds"), profile,
                        validation=not args.no_validation, manifest=args.data)
    executor = make_executor(args, out)
    ranks = max(args.ddp, args.slurm_gpus if args.executor == "slurm" else 1)
    if ranks > int(profile.training.batch_size):
        raise GridError(f"training.batch_size {profile.training.batch_size} cannot be split over {ranks} ranks; "
                        f"use at most {profile.training.batch_size} ranks or a larger batch "
                        "(--override training.batch_size=N)")
    ctx = RunContext(profile, out, Path(args.cache_dir), args.weights_dir, args.data, args.device,
                     progress=not args.quiet)
    ctx.data.check_grid(sizes, int(profile.sampling.n_test))  # before any run starts: not when one reaches it
    if args.executor == "slurm" and not args.wait:
        return submit_to_slurm(executor, specs, ctx, args)
    started = time.perf_counter()
    summary = run_grid(specs, ctx, executor, force=args.force, plugins=args.plugin, allow_mixed=args.allow_mixed,
                       redo_stale=args.redo_stale)
    write_outputs(out, profile)
    minutes = (time.perf_counter() - started) / 60
    print(f"{summary.line()} in {minutes:.1f} min; tables, figures and REPORT.md in {out}")
    return 0 if summary.ok else 1


def submit_to_slurm(executor, specs, ctx, args) -> int:
    """Queue the pending runs as one job array and return; the tasks write their records."""
    from benchmark.run.executors import GridJob, pending_runs
    from benchmark.run.slurm import array_job_id

    out = ctx.out_dir
    todo = pending_runs(specs, ctx, args.force, args.allow_mixed, args.redo_stale)
    if not todo:
        print(f"nothing to submit: all {len(specs)} runs of this grid are done in {out}; "
              f"python run_benchmark.py tables --out {out} rebuilds the tables")
        return 0
    job = GridJob.from_context(ctx, args.plugin, args.force)
    job.device = args.device  # decided on the compute node (cuda when it has one), not on the login node
    jobs = executor.submit(job, todo)
    print(f"submitted {len(todo)} runs as Slurm job array {array_job_id(jobs)} ({len(specs) - len(todo)} already "
          f"done); logs in {executor.folder}\n"
          f"  follow:   python run_benchmark.py status --out {out} --profile {ctx.profile.name}\n"
          f"  then:     python run_benchmark.py tables --out {out} --profile {ctx.profile.name}")
    return 0


def tables(args) -> int:
    from benchmark.report.write import write_outputs

    profile = load_profile_from(args)
    out = writable_folder(_results_dir(args, profile), "--out")  # the tables, figures and report go into it
    if not (out / "records").is_dir():
        print(f"error: no records in {out}/records; run the benchmark first or point --out at its folder",
              file=sys.stderr)
        return 2
    _refuse_mixed(out, args)
    write_outputs(out, profile)
    print(f"tables, figures and report rebuilt in {out}")
    return 0


def _refuse_mixed(out: Path, args) -> None:
    """Stop when the folder's records were made with several profiles or base models (unless --allow-mixed)."""
    from benchmark.run.grid import GridError
    from benchmark.run.identity import mixed_folder_error
    from benchmark.run.records import iter_records

    error = None if args.allow_mixed else mixed_folder_error(out, iter_records(out))
    if error:
        raise GridError(error)


def status(args) -> int:
    from benchmark.run.identity import staleness_in
    from benchmark.run.spec import RunContext
    from benchmark.run.status import folder_status, status_lines

    profile = load_profile_from(args)
    out = _results_dir(args, profile)
    if not out.is_dir():
        print(f"error: {out} {'is a file' if out.exists() else 'does not exist'}; point --out at a results folder",
              file=sys.stderr)  # status only reads: a read-only folder is fine
        return 2
    load_plugins(args)  # a plugin's records are checked against its code
    ctx = RunContext(profile, out, Path(args.cache_dir), args.weights_dir, args.data, args.device, progress=False)
    print("\n".join(status_lines(folder_status(out, staleness_in(ctx)))))
    return 0


def rescore(args) -> int:
    from benchmark.run.rescore import rescore_folder
    from benchmark.run.spec import RunContext

    profile = load_profile_from(args)
    out = writable_folder(_results_dir(args, profile), "--out")
    if not (out / "records").is_dir():
        print(f"error: no records in {out}/records; point --out at a results folder", file=sys.stderr)
        return 2
    _refuse_mixed(out, args)
    ctx = RunContext(profile, out, Path(args.cache_dir), args.weights_dir, args.data, args.device,
                     progress=not args.quiet)
    done, left = rescore_folder(ctx)
    print("\n".join(done + left + [f"{len(done)} records rescored, {len(left)} could not be; "
                                    f"rebuild the tables: python run_benchmark.py tables --out {out}"]))
    return 1 if left else 0


def compare(args) -> int:
    from benchmark.report.compare import compare_folders

    for folder in (args.first, args.second):
        if not (Path(folder) / "records").is_dir():
            print(f"error: {folder} holds no records/ folder; give two results folders", file=sys.stderr)
            return 2
    both, diffs = compare_folders(Path(args.first), Path(args.second), args.tolerance, args.absolute)
    print("\n".join(diffs[:200]) + ("\n" if diffs else "")
          + f"{len(both)} records in both folders; {len(diffs)} differences"
          + (" (first 200 shown)" if len(diffs) > 200 else ""))
    return 1 if diffs else 0
