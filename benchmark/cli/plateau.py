"""Has the training budget converged? (benchmark/run/plateau.py), on validation subjects only.

    python run_benchmark.py plateau --profile cpu --task lv --methods vcm,controlnet --sizes 10,500

Writes one curve per method and size (JSON, resumable) and the figure plateau-<task>.png to --out.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from benchmark.cli import load_plugins, load_profile_from
from benchmark.run.plateau import plateau
from benchmark.run.spec import RunContext
from datasets.tasks import DEFAULT_TASK, get_task
from methods.base import Method
from methods.registry import MethodError, get_method, resolve_methods


def register(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("plateau", parents=[common], help="validation Dice and the probe gap against training steps",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default=DEFAULT_TASK)
    p.add_argument("--methods", default="vcm,controlnet")
    p.add_argument("--sizes", default="10,500", help="comma-separated training sizes")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: twice the profile's budget)")
    p.add_argument("--every", type=int, default=None, help="measure every this many steps (default: a third of the budget)")
    p.add_argument("--subjects", type=int, default=16, help="validation subjects sampled at every measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="where the curves and the figure go (default results/plateau/<profile>)")
    p.set_defaults(func=run)


def run(args) -> int:
    profile = load_profile_from(args)
    load_plugins(args)
    task = get_task(args.task)
    names = resolve_methods(args.methods, task.name)
    direct = [n for n in names if not issubclass(get_method(n), Method)]
    if direct:
        raise MethodError(f"plateau follows the suite's training loop; {', '.join(direct)} fit(s) itself: leave it out")
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--sizes must be comma-separated whole numbers, got {args.sizes!r}") from None
    out = Path(args.out or f"results/plateau/{profile.name}")
    ctx = RunContext(profile, out, Path(args.cache_dir), args.weights_dir, device=args.device, progress=not args.quiet)
    path = plateau(ctx, ctx.task(task.name), names, sizes, out, args.steps, args.every, args.subjects, args.seed,
                   args.command_line, progress=not args.quiet)
    print(f"wrote {path}")
    return 0
