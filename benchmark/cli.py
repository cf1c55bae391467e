"""Command line of the suite (``run_benchmark.py`` is a thin wrapper around ``main``)."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from benchmark.pretrain import add_retrain_base_flag, overrides_with_retrain_flag
from benchmark.profiles import ProfileError, available_profiles, load_profile

TASKS = ("lv", "multimodal", "sr4", "sr8")

EPILOG = """examples:
  python run_benchmark.py --profile smoke                       # every method, sizes 10,50,500, task lv
  python run_benchmark.py --methods vcm,controlnet --sizes 50 --seeds 0,1,2
  python run_benchmark.py --task multimodal --profile cpu
  python run_benchmark.py --plugin my_method.py --methods my_method
  python run_benchmark.py tables --out results/cpu              # rebuild tables from records
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_benchmark.py",
        description="Train every spatial-control method on nested training sets, sample the test "
                    "subjects, score them and write the VCM paper's tables from the suite's own runs.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("command", nargs="?", default="run", choices=("run", "tables"),
                   help="'run' (default) runs the grid, then writes tables, figures and the report; "
                        "'tables' only rebuilds them from the records in --out")
    p.add_argument("--methods", default="all",
                   help="'all' (every registered method that supports the task) or a comma-separated list")
    p.add_argument("--sizes", default=None,
                   help="training-set sizes, comma-separated (nested subsets of the training pool); "
                        "default: the profile's (10,50,500)")
    p.add_argument("--task", default="lv",
                   help=f"one of {', '.join(TASKS)}, a comma-separated list, or 'all'")
    p.add_argument("--profile", default="cpu", help=f"sizes and budgets: {', '.join(available_profiles())}")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="change one profile setting, e.g. training.steps=20 (repeatable)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; each seed is a separate run")
    p.add_argument("--out", default=None, help="results folder (default results/<profile>)")
    p.add_argument("--cache-dir", default=os.environ.get("SCB_CACHE_DIR", ".cache"),
                   help="where the base model, data, latents, judges and extractors are cached")
    p.add_argument("--weights-dir", default=None,
                   help="folder with pretrained weights: BrainLDM (paper profile), RadImageNet, MedicalNet, "
                        "AlexNet for LPIPS (see README)")
    p.add_argument("--data", default=None, metavar="MANIFEST.csv",
                   help="real data (NIfTI listed in a CSV manifest) instead of the embedded synthetic population")
    p.add_argument("--plugin", action="append", default=[],
                   help="import a module (dotted name or .py path) whose @register'ed methods then run like built-ins")
    p.add_argument("--no-validation", action="store_true",
                   help="skip the Table 6 runs (base model alone, VCM with sphere masks) on task lv")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--force", action="store_true", help="redo runs whose records already exist")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_retrain_base_flag(p)
    return p


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{what} must be comma-separated integers, got '{text}'") from None
    if not values or any(v < 0 for v in values):
        raise ValueError(f"--{what} needs at least one non-negative integer, got '{text}'")
    return values


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        profile = load_profile(args.profile, overrides_with_retrain_flag(args))
    except ProfileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out or f"results/{profile.name}")

    from benchmark.outputs import write_outputs

    if args.command == "tables":
        if not (out / "records").is_dir():
            print(f"error: no records in {out}/records; run the benchmark first or point --out at its folder",
                  file=sys.stderr)
            return 2
        write_outputs(out, profile)
        print(f"tables, figures and report rebuilt in {out}")
        return 0

    from benchmark.grid import GridError, build_specs
    from benchmark.runner import RunContext, run_grid
    from methods.registry import MethodError, load_plugin

    tasks = list(TASKS) if args.task == "all" else [t.strip() for t in args.task.split(",") if t.strip()]
    try:
        for module in args.plugin:
            load_plugin(module)
        sizes = _int_list(args.sizes, "sizes") if args.sizes else list(profile.data.sizes)
        seeds = _int_list(args.seeds, "seeds")
        specs = build_specs(tasks, args.methods, sizes, seeds, profile, validation=not args.no_validation)
    except (MethodError, GridError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    ctx = RunContext(profile, out, Path(args.cache_dir), args.weights_dir, args.data, args.device,
                     progress=not args.quiet)
    started = time.perf_counter()
    summary = run_grid(specs, ctx, force=args.force)
    write_outputs(out, profile)
    minutes = (time.perf_counter() - started) / 60
    print(f"{summary.line()} in {minutes:.1f} min; tables, figures and REPORT.md in {out}")
    return 0 if summary.ok else 1
