"""A study of record (benchmark/run/study.py): run what is missing, then rebuild its tables.

    python run_benchmark.py study studies/cpu.yaml            # or: make study
    python run_benchmark.py study studies/cpu.yaml --dry-run  # what would run, and the estimate
    python run_benchmark.py study studies/cpu.yaml --jobs 2   # two runs at once, each with half the threads

Before running, it prints what is done and what is pending, and an estimate of the pending time from
this machine's speed: each pending method's training step and one sampling batch are timed here
(``bench``'s measurement, 3 warm-up + 2 steps), then multiplied by the runs' steps and batches. A
method that fits itself (InverseSR, LIIF-3D, trilinear: no training step to time) is estimated from
what the folder already holds of it: its finished records, or the batches an unfinished run has
kept. Scoring, the probe and the reference rows are not in the estimate; the estimate says so.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections import Counter
from pathlib import Path

from benchmark.cli import load_plugins, writable_folder
from benchmark.cli.run import add_local_flags, make_executor
from benchmark.profiles import load_profile


def register(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("study", parents=[common], help="run a study's missing runs, then rebuild its tables",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study_file", help="the study YAML, e.g. studies/cpu.yaml")
    p.add_argument("--dry-run", action="store_true", help="print what would run and the estimate; run nothing")
    p.add_argument("--no-estimate", action="store_true", help="skip the timing behind the estimate")
    p.add_argument("--redo-stale", action="store_true",
                   help="redo the study's stale runs (records made otherwise than the study would make them now)")
    add_local_flags(p.add_argument_group("runs at once on this machine"))
    p.set_defaults(func=run, executor="local", ddp=1)


def estimate_seconds(pending, ctx) -> tuple[float, list[str]]:
    """Seconds the pending method runs' training and sampling take on this machine, and the lines that say how."""
    from benchmark.cli.bench import time_method
    from benchmark.engine.speed import SpeedOptions
    from benchmark.engine.training import TrainSettings
    from benchmark.run.spec import RunKind
    from methods.base import Method
    from methods.registry import get_method

    s = ctx.profile.sampling
    batches = math.ceil(int(s.n_test) / int(s.batch_size))
    timed: dict[tuple[str, str], dict] = {}
    total, lines, from_folder, unknown = 0.0, [], {}, Counter()
    for spec in pending:
        if spec.kind != RunKind.METHOD:
            continue
        if not issubclass(get_method(spec.method), Method):  # no training step to time (InverseSR, LIIF-3D, ...)
            if spec.method not in from_folder:
                from_folder[spec.method] = folder_timing(ctx.out_dir, spec.method, batches)
                if from_folder[spec.method]:
                    seconds, how = from_folder[spec.method]
                    lines.append(f"  {spec.method}: {seconds / 3600:.2f} h per run ({how})")
            if from_folder[spec.method]:
                total += from_folder[spec.method][0]
            else:
                unknown[f"{spec.task} {spec.method}"] += 1
            continue
        task = ctx.task(spec.task)
        key = (spec.task, spec.method)
        if key not in timed:
            timed[key] = time_method(spec.method, ctx, task, min(spec.size, 10), 2, 0,
                                     SpeedOptions.from_profile(ctx.profile), parts=("train", "sample"))
            lines.append(f"  {spec.task} {spec.method}: {timed[key]['seconds_per_step']:.2f} s/step, "
                         f"{timed[key]['sample_seconds']:.1f} s per sampling batch")
        row = timed[key]
        steps = TrainSettings.from_profile(ctx.profile, spec.size, spec.method, spec.task).steps
        sampling = batches * row["sample_seconds"] * (2 if task.dice is not None else 1)  # own + swapped
        total += steps * row["seconds_per_step"] + sampling
    if unknown:
        lines.append(f"  not in the estimate: {sum(unknown.values())} runs of methods that fit themselves "
                     f"({', '.join(f'{k} x{n}' for k, n in unknown.items())}): no step to time here, and "
                     "no record or kept batch of theirs in the folder yet")
    return total, lines


def folder_timing(out: Path, method: str, batches: int) -> tuple[float, str] | None:
    """Seconds one run of ``method`` (one that fits itself: no training step to time) takes, from what the
    study folder already holds, and where that comes from; None when it holds nothing of it. The median
    time of its finished records; else the fastest of its kept sampling batches (an unfinished run's,
    ``runs/*/generated``) times a run's ``batches``: the fastest, because a batch's seconds count any
    time its process waited beside other work. Either may have been measured on another machine."""
    import numpy as np

    from benchmark.run.records import iter_records
    from benchmark.run.status import KEPT_BATCHES

    elapsed = [float(r["elapsed_seconds"]) for r in iter_records(out)
               if r.get("method") == method and r.get("status") == "ok" and r.get("elapsed_seconds")]
    if elapsed:
        return statistics.median(elapsed), f"median of its {len(elapsed)} finished records in this folder"
    kept = [float(np.load(p)["seconds"]) for p in sorted(Path(out).glob(f"runs/*__{method}__*/{KEPT_BATCHES}/own-*.npz"))]
    if kept:
        return min(kept) * batches, (f"{batches} sampling batches at {min(kept):.0f} s, the fastest of its {len(kept)} "
                                     "kept batches in this folder")
    return None


def run(args) -> int:
    from benchmark.report.write import write_outputs
    from benchmark.run.executors import pending_runs, run_grid
    from benchmark.run.spec import RunContext
    from benchmark.run.study import load_study, ready_blocks, study_specs

    study = load_study(args.study_file)
    writable_folder(study.out, f"{study.path} out:")
    overrides = list(study.overrides) + list(args.override or [])
    profile = load_profile(study.profile, overrides)
    load_plugins(args)
    executor = make_executor(args, study.out)  # before anything runs: a bad --jobs stops here
    blocks, waiting = ready_blocks(study, profile)
    for line in waiting:
        print(line)
    specs = study_specs(study, profile, blocks)
    ctx = RunContext(profile, study.out, Path(args.cache_dir), args.weights_dir, device=args.device,
                     progress=not args.quiet)
    ctx.data.check_grid([spec.size for spec in specs], int(profile.sampling.n_test))
    pending = pending_runs(specs, ctx, redo_stale=args.redo_stale)
    print(f"study {study.path}: {len(specs)} runs ready at profile {profile.name}, {len(specs) - len(pending)} done, "
          f"{len(pending)} to run, into {study.out}")
    if pending and not args.no_estimate:
        seconds, lines = estimate_seconds(pending, ctx)
        print("\n".join(lines))
        print(f"estimated {seconds / 3600:.1f} h of training and sampling for the pending runs on this machine "
              "(scoring, the probe and the reference rows come on top)")
    bench = bench_argv(study, overrides, args) if not waiting else None
    if args.dry_run:
        for spec in pending:
            print(f"  would run {spec.name}")
        if bench:
            print(f"  would run python run_benchmark.py {' '.join(bench)}")
        return 1 if waiting else 0
    started = time.perf_counter()
    summary = run_grid(specs, ctx, executor, plugins=args.plugin, redo_stale=args.redo_stale) if pending else None
    bench_code = _run_bench(bench) if bench else 0
    write_outputs(study.out, profile)
    line = summary.line() if summary is not None else "nothing to run"
    print(f"{line} in {(time.perf_counter() - started) / 60:.1f} min; tables, figures and REPORT.md in {study.out}")
    return 0 if (summary is None or summary.ok) and not waiting and bench_code == 0 else 1


def bench_argv(study, overrides: list[str], args) -> list[str] | None:
    """The ``bench`` command of the study's ``bench`` entry when its timings are not yet in the folder:
    every method's training step, timed in one process on this machine."""
    path = study.bench_file()
    if path is None or _bench_complete(path, study.bench.task):
        return None
    argv = ["bench", "--profile", study.profile, "--task", study.bench.task, "--size", str(study.bench.size),
            "--steps", str(study.bench.steps), "--methods", "all", "--out", str(path.parent)]
    if str(args.cache_dir) != os.environ.get("SCB_CACHE_DIR", ".cache"):  # the default is the bench's too
        argv += ["--cache-dir", str(args.cache_dir)]
    for flag, values in (("--override", overrides), ("--plugin", args.plugin)):
        argv += [item for value in values for item in (flag, value)]
    for flag, value in (("--weights-dir", args.weights_dir), ("--device", args.device)):
        argv += [flag, str(value)] if value else []
    return argv + (["--quiet"] if args.quiet else [])


def _bench_complete(path: Path, task: str) -> bool:
    """Whether ``path`` times every method bench times on ``task`` (an interrupted bench leaves a part)."""
    from benchmark.report.tables import read_bench
    from methods.base import Method
    from methods.registry import get_method, resolve_methods

    if not path.is_file():
        return False
    timed = read_bench(path)["seconds_per_step"]
    return all(m in timed for m in resolve_methods("all", task) if issubclass(get_method(m), Method))


def _run_bench(argv: list[str]) -> int:
    from benchmark.cli import main

    print(f"timing every method's training step in one process: python run_benchmark.py {' '.join(argv)}", flush=True)
    return main(argv)
