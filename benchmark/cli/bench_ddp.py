"""``bench --ddp N``: seconds per training step of each method trained by 1 process and by N
data-parallel ranks on this machine, in one invocation (docs/CLUSTER.md):

    python run_benchmark.py bench --profile smoke --methods vcm --size 10 --steps 8 --ddp 2

Both are started alike, as fresh processes (``benchmark.run.ddp.spawn``), each rank with its device (on
CPU: its share of the threads); the step time is rank 0's median after the warm-up steps, its wait for
the gradient all-reduce included. Writes ``<out>/ddp-<profile>-<task>-<size>.json``.
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

from benchmark.cli.bench import timing_settings
from benchmark.engine.distributed import wait_for_lead
from benchmark.engine.training import train_method
from benchmark.run.ddp import spawn, write_caches
from benchmark.run.executors import GridJob
from benchmark.run.runner import build_method
from benchmark.run.spec import RunSpec
from metrics.cost import device_name


def _time_rank(rank: int, device: str, job: GridJob, name: str, task_name: str, size: int, steps: int, seed: int,
               run_dir: Path) -> float | None:
    ctx = dataclasses.replace(job, device=device).context()
    if rank > 0:
        wait_for_lead()  # rank 0's training says when to start
    task = ctx.task(task_name)
    method = build_method(name, task, ctx, seed)
    subjects = ctx.data.train_subjects(size)
    result = train_method(method, ctx.base, subjects, task, timing_settings(ctx.profile, len(subjects), name, steps),
                          ctx.latents, run_dir, seed, device, progress=False)
    return result.seconds_per_step


def time_ranks(args, ctx, task, names) -> int:
    write_caches(ctx, RunSpec(task.name, names[0], args.size, args.seed))
    job = GridJob.from_context(ctx)
    rows = []
    report = {"profile": args.profile, "task": task.name, "size": args.size, "steps": args.steps,
              "batch_size": int(ctx.profile.training.batch_size), "device": device_name(ctx.device),
              "command": args.command_line, "methods": rows}
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
        for name in names:
            row = {"method": name}
            for ranks in (1, args.ddp):
                row[f"seconds_per_step_{ranks}_ranks"] = spawn(_time_rank, ranks, ctx.device, job, name, task.name,
                                                               args.size, args.steps, args.seed, Path(tmp) / f"{name}-{ranks}")
            row["speed_up"] = row["seconds_per_step_1_ranks"] / row[f"seconds_per_step_{args.ddp}_ranks"]
            rows.append(row)
            print(f"{name:16s} 1 rank {row['seconds_per_step_1_ranks']:.3f} s/step, {args.ddp} ranks "
                  f"{row[f'seconds_per_step_{args.ddp}_ranks']:.3f} s/step: speed-up {row['speed_up']:.2f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"ddp-{args.profile}-{task.name}-{args.size}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
    return 0
