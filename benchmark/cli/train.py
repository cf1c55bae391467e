"""Train one method on one training-set size, follow its control probe, and sample validation subjects
(a recipe check: choices are never made on test subjects).

    python run_benchmark.py train --task lv --method vcm --size 50 --profile smoke
    python run_benchmark.py train --task lv --method vcm --size 50 --profile cpu --no-sampling \
        --override methods.vcm.l1_weight=0 --out results/sweep/vcm-l1-0      # a recipe sweep point

Under torchrun every rank trains its share of each minibatch and rank 0 alone probes, samples and writes
(docs/CLUSTER.md):

    torchrun --nproc_per_node 2 run_benchmark.py train --task lv --method vcm --size 50 --profile smoke

Writes the checkpoint, the control probe's history (probe.json: the gap per timestep band at every
checkpoint) and, unless --no-sampling, the generated volumes (samples.npz) and a montage under --out,
and prints the probe table and a one-line summary. Scoring and records are the grid runner's job
(run_benchmark.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmark.cli import load_plugins, load_profile_from, writable_folder
from benchmark.engine.distributed import rank_and_size
from benchmark.engine.sampling import sample_method
from benchmark.run import ddp
from benchmark.run.spec import RunContext, RunSpec
from benchmark.run.runner import control_probe, save_real, save_samples, train_or_load
from datasets.subject import DataError
from datasets.tasks import DEFAULT_TASK, get_task


def register(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("train", parents=[common], help="one method, one size: probe at every checkpoint, then samples",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default=DEFAULT_TASK)
    p.add_argument("--method", help="a registered method (required unless --sweep-table)")
    p.add_argument("--size", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="default results/<profile>-train")
    p.add_argument("--no-sampling", action="store_true", help="train and probe only (a fast recipe check)")
    p.add_argument("--sweep-table", metavar="FOLDER", default=None,
                   help="print one Markdown row per probe.json under FOLDER (the --out folders of train runs)")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.sweep_table is not None:
        if not Path(args.sweep_table).is_dir():
            print(f"error: --sweep-table {args.sweep_table} is not a folder; give the folder that holds the "
                  "--out folders of train runs", file=sys.stderr)
            return 2
        print(sweep_table(Path(args.sweep_table)))
        return 0
    if not args.method:
        print("error: train needs --method NAME (a registered method; see README)", file=sys.stderr)
        return 2
    profile = load_profile_from(args)
    load_plugins(args)
    task = get_task(args.task)
    from methods.base import Method
    from methods.registry import get_method

    if not issubclass(get_method(args.method, task), Method):
        print(f"error: train runs the suite's training loop and probe; method '{args.method}' fits itself "
              "(it steers no sampler): run it with `run_benchmark.py run --methods ...`", file=sys.stderr)
        return 2
    if not 1 <= args.size <= profile.data.train_pool:
        raise DataError(f"--size {args.size} must be between 1 and the training pool of "
                        f"{profile.data.train_pool} subjects")
    with ddp.environment_group(args.device) as device:  # torchrun's ranks; None: one process
        args.device = device or args.device
        return _train(args, profile, task)


def _train(args, profile, task) -> int:
    out = writable_folder(args.out or f"results/{profile.name}-train", "--out")
    ctx = RunContext(profile, out, Path(args.cache_dir), args.weights_dir, None, args.device,
                     progress=not args.quiet)
    task = ctx.task(task.name)
    spec = RunSpec(task.name, args.method, args.size, args.seed)
    if rank_and_size()[0] > 0:  # train beside rank 0, which probes, samples and writes
        ddp.follow(spec, ctx)
        return 0
    started = time.perf_counter()
    probe = control_probe(task, ctx, args.seed)
    method, result = train_or_load(spec, task, ctx, probe=probe)
    run_dir = ctx.run_dir(spec)
    history = result.extra.get("control_probe", [])
    if probe is not None:
        (run_dir / "probe.json").write_text(json.dumps({"protocol": probe.describe(), "history": history,
                                                          "overrides": args.override}, indent=1))
        print(probe_table(history))
    final = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
    summary = (f"{args.method} on {task.name}, N={args.size}: {result.steps} steps, "
               f"{result.seconds_per_step:.3f} s/step, final loss {final}")
    if args.no_sampling:
        print(f"{summary}; {time.perf_counter() - started:.0f} s total; outputs in {run_dir}")
        return 0
    s = profile.sampling
    subjects = ctx.data.validation_subjects(min(int(s.n_test), len(ctx.data.splits.validation)))
    generated = sample_method(method, ctx.base, subjects, task, s.ddim_steps, s.batch_size, args.seed, ctx.device)
    save_samples(run_dir, subjects, generated, task)
    real = save_real(out, subjects, "real_validation")
    from benchmark.report.figures import montage  # matplotlib: imported where drawn, not by every process

    figure = montage(run_dir / "samples.npz", real, spec.name, run_dir / "montage.png")
    print(f"{summary}, {len(subjects)} validation volumes sampled in {time.perf_counter() - started:.0f} s total; "
          f"outputs in {run_dir} (montage {figure.name})")
    return 0


def probe_table(history: list[dict]) -> str:
    """The probe per checkpoint: the gap (x 1e4) and its 95% CI per band; * where the CI excludes 0."""
    if not history:
        return "(no probe measurements)"
    bands = [row["band"] for row in history[0]["bands"]]
    lines = ["control gap x 1e4 [95% CI] per band; * = CI above 0",
             "step  " + "  ".join(f"{b:>24}" for b in bands)]
    for h in history:
        cells = []
        for row in h["bands"]:
            mark = "*" if row["gap_ci_low"] > 0 else " "
            cells.append(f"{1e4 * row['gap']:+7.2f} [{1e4 * row['gap_ci_low']:+6.2f},{1e4 * row['gap_ci_high']:+6.2f}]{mark}")
        lines.append(f"{h['step']:>5} " + "  ".join(f"{c:>24}" for c in cells))
    return "\n".join(lines)



def sweep_table(folder: Path) -> str:
    """One Markdown row per probe.json under ``folder``: the run, its overrides, per band the gap at the
    last checkpoint (x 1e4, * where its 95% CI lies above 0) and the first step whose CI did, and how much
    worse (+) or better (-) the method's own-condition MSE is than the frozen model's."""
    rows = []
    for path in sorted(folder.glob("**/probe.json")):
        data = json.loads(path.read_text())
        history = data.get("history") or []
        if not history:
            continue
        last = history[-1]
        cells = []
        for b, row in enumerate(last["bands"]):
            first = next((h["step"] for h in history if h["bands"][b]["gap_ci_low"] > 0), None)
            mark = "*" if row["gap_ci_low"] > 0 else ""
            cells.append(f"{1e4 * row['gap']:+.2f}{mark} ({'-' if first is None else first})")
        worse = sum(row["mse_own"] - row["mse_frozen"] for row in last["bands"]) / len(last["bands"])
        name = path.relative_to(folder).parts[0]
        rows.append(f"| {name} | {' '.join(data.get('overrides', [])) or '(profile)'} | {last['step']} | "
                    + " | ".join(cells) + f" | {1e4 * worse:+.1f} |")
    if not rows:
        return f"(no probe.json under {folder})"
    bands = [row["band"] for row in json.loads(next(folder.glob("**/probe.json")).read_text())["history"][0]["bands"]]
    head = ("| run | overrides | steps | " + " | ".join(f"gap {b} x1e4 (first step CI>0)" for b in bands)
            + " | MSE own - frozen x1e4 (band mean) |")
    return "\n".join([head, "|" + "---|" * (4 + len(bands))] + rows)

