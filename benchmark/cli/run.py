"""The ``run``, ``tables`` and ``status`` commands: the grid, its outputs, and what a results folder holds."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmark.cli import load_plugins, load_profile_from

EXAMPLES = """examples:
  python run_benchmark.py --profile smoke                       # every method, sizes 10,50,500, task lv
  python run_benchmark.py --methods vcm,controlnet --sizes 50 --seeds 0,1,2
  python run_benchmark.py --task multimodal --profile cpu
  python run_benchmark.py --plugin my_method.py --methods my_method
  python run_benchmark.py tables --out results/cpu              # rebuild tables from records
  python run_benchmark.py status --out results/cpu              # which runs are done, failed, interrupted
  python run_benchmark.py compare results/a results/b           # the same records, apart from timings?
"""


def register(sub, common: argparse.ArgumentParser) -> None:
    from datasets.tasks import TASKS

    p = sub.add_parser("run", parents=[common], help="run the grid, then write tables, figures and REPORT.md",
                       description="Train every method on nested training sets, sample the test subjects, score "
                                   "them, then write tables, figures and REPORT.md. A rerun skips finished runs.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="all",
                   help="'all' (every registered method that supports the task) or a comma-separated list")
    p.add_argument("--sizes", default=None,
                   help="training-set sizes, comma-separated (nested subsets of the training pool); "
                        "default: the profile's (10,50,500)")
    p.add_argument("--task", default="lv", help=f"one of {', '.join(TASKS)}, a comma-separated list, or 'all'")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; each seed is a separate run")
    p.add_argument("--out", default=None, help="results folder (default results/<profile>)")
    p.add_argument("--data", default=None, metavar="MANIFEST.csv",
                   help="real data (NIfTI listed in a CSV manifest) instead of the embedded synthetic population")
    p.add_argument("--no-validation", action="store_true",
                   help="skip the Table 6 runs (base model alone, VCM with sphere masks) on task lv")
    p.add_argument("--force", action="store_true", help="redo runs whose records already exist")
    p.set_defaults(func=run)

    t = sub.add_parser("tables", parents=[common], help="rebuild tables, figures and REPORT.md from records")
    t.add_argument("--out", default=None, help="results folder (default results/<profile>)")
    t.set_defaults(func=tables)

    s = sub.add_parser("status", parents=[common], help="list the runs of a results folder")
    s.add_argument("--out", default=None, help="results folder (default results/<profile>)")
    s.set_defaults(func=status)

    c = sub.add_parser("compare", help="are two results folders the same, run for run (apart from timings)?",
                       description="Compare the records of two results folders field by field, apart from timings, "
                                   "memory, dates and the folders files were read from.")
    c.add_argument("first")
    c.add_argument("second")
    c.add_argument("--tolerance", type=float, default=0.0, help="relative tolerance for numbers (default 0: equal)")
    c.set_defaults(func=compare)


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
    from benchmark.run.grid import build_specs
    from benchmark.run.spec import RunContext
    from datasets.tasks import TASKS

    profile = load_profile_from(args)
    out = _results_dir(args, profile)
    load_plugins(args)
    tasks = list(TASKS) if args.task == "all" else [t.strip() for t in args.task.split(",") if t.strip()]
    sizes = _int_list(args.sizes, "sizes") if args.sizes else list(profile.data.sizes)
    specs = build_specs(tasks, args.methods, sizes, _int_list(args.seeds, "seeds"), profile,
                        validation=not args.no_validation)
    ctx = RunContext(profile, out, Path(args.cache_dir), args.weights_dir, args.data, args.device,
                     progress=not args.quiet)
    started = time.perf_counter()
    summary = run_grid(specs, ctx, force=args.force)
    write_outputs(out, profile)
    minutes = (time.perf_counter() - started) / 60
    print(f"{summary.line()} in {minutes:.1f} min; tables, figures and REPORT.md in {out}")
    return 0 if summary.ok else 1


def tables(args) -> int:
    from benchmark.report.write import write_outputs

    profile = load_profile_from(args)
    out = _results_dir(args, profile)
    if not (out / "records").is_dir():
        print(f"error: no records in {out}/records; run the benchmark first or point --out at its folder",
              file=sys.stderr)
        return 2
    write_outputs(out, profile)
    print(f"tables, figures and report rebuilt in {out}")
    return 0


def status(args) -> int:
    from benchmark.run.status import folder_status, status_lines

    profile = load_profile_from(args)
    out = _results_dir(args, profile)
    if not out.is_dir():
        print(f"error: {out} does not exist; point --out at a results folder", file=sys.stderr)
        return 2
    print("\n".join(status_lines(folder_status(out))))
    return 0


def compare(args) -> int:
    from benchmark.report.compare import compare_folders

    for folder in (args.first, args.second):
        if not (Path(folder) / "records").is_dir():
            print(f"error: {folder} holds no records/ folder; give two results folders", file=sys.stderr)
            return 2
    both, diffs = compare_folders(Path(args.first), Path(args.second), args.tolerance)
    print("\n".join(diffs[:200]) + ("\n" if diffs else "")
          + f"{len(both)} records in both folders; {len(diffs)} differences"
          + (" (first 200 shown)" if len(diffs) > 200 else ""))
    return 1 if diffs else 0
