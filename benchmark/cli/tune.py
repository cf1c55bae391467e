"""The same tuning budget for every method (benchmark/run/tune.py), scored on validation subjects.

    python run_benchmark.py tune --profile cpu --task lv --methods all
    python run_benchmark.py tune --profile cpu --task multimodal --methods vcm,controlnet,controlnet_lite,t2i_adapter,ldm_finetune

Writes each trial's record under --out (an interrupted tune resumes with the trials it has) and the
recipe file benchmark/recipes/<profile>/<task>.yaml, which `run` then uses (training.recipe: tuned).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from benchmark.cli import load_plugins, load_profile_from, writable_folder
from benchmark.run.spec import RunContext
from benchmark.engine.recipes import recipe_path
from benchmark.engine.training import TrainSettings
from benchmark.run.tune import summary, tune
from datasets.tasks import DEFAULT_TASK, get_task
from methods.base import Method
from methods.registry import MethodError, get_method, resolve_methods


def register(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("tune", parents=[common], help="the same tuning budget for every method: a recipe file",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default=DEFAULT_TASK)
    p.add_argument("--methods", default="all", help="'all' (every method the suite trains for the task) or a list")
    p.add_argument("--out", default=None, help="trial records (default results/tune/<profile>-<task>)")
    p.add_argument("--recipe-dir", default=None, help="where the recipe file goes (default benchmark/recipes)")
    p.add_argument("--show", action="store_true", help="print the committed recipe as a table; run nothing")
    p.set_defaults(func=run)


def run(args) -> int:
    profile = load_profile_from(args)
    load_plugins(args)
    task = get_task(args.task)
    if args.show:
        path = recipe_path(profile.name, task.name, Path(args.recipe_dir) if args.recipe_dir else None)
        if not path.is_file():
            raise SystemExit(f"no recipe for profile {profile.name}, task {task.name}: {path} does not exist; run tune")
        print(summary(path, lambda name: TrainSettings.from_profile(profile, 50, name, task.name, chosen={}).lr))
        return 0
    names = resolve_methods(args.methods, task.name)
    if args.methods.strip() == "all":  # methods trained by the suite's loop: the ones a recipe steers
        names = [n for n in names if issubclass(get_method(n), Method)]
    direct = [n for n in names if not issubclass(get_method(n), Method)]
    if direct:
        raise MethodError(f"tune chooses the training recipe of the suite's loop; {', '.join(direct)} fit(s) "
                          "itself: leave it out")
    out = writable_folder(args.out or f"results/tune/{profile.name}-{task.name}", "--out")
    recipe_dir = Path(args.recipe_dir) if args.recipe_dir else None
    writable_folder(recipe_path(profile.name, task.name, recipe_dir).parent, "--recipe-dir")  # the recipe goes there
    ctx = RunContext(profile, out, Path(args.cache_dir), args.weights_dir, device=args.device, progress=not args.quiet)
    path = tune(ctx, ctx.task(task.name), names, out, args.command_line, recipe_dir, progress=not args.quiet)
    print(f"wrote {path}")
    return 0
