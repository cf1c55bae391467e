"""The suite's one command line: ``python run_benchmark.py COMMAND [flags]`` (or ``python -m benchmark``).

    run       train, sample and score a grid, then write tables, figures and REPORT.md (the default)
    tables    rebuild tables, figures and the report from the records of a results folder
    status    list the runs of a results folder: done, running, failed, interrupted, pending
    rescore   add to finished records a column scored since (anatomy Dice), from their kept volumes
    compare   are two results folders the same, run for run, apart from timings?
    train     one method, one size: the control probe at every checkpoint, then samples
    tune      the same tuning budget for every method, scored on validation subjects: a recipe file
    plateau   validation Dice and the probe gap against training steps: has the budget converged?
    pretrain  pretrain (or load) the profile's base model; --eval measures its autoencoder
    ship      write benchmark/shipped/<profile>/ from the networks pretrained for a profile
    data      summary | export of the profile's synthetic population
    sample    unconditional samples of the base model at given scalars
    bench     seconds per training step of every method
    bench-scoring  seconds to score generated volumes with every metric; the judge's Dice

Every command takes the common flags (``--profile``, ``--override``, ``--cache-dir``, ``--weights-dir``,
``--device``, ``--plugin``, ``--retrain-base``, ``--quiet``, ``--debug``) with the same meaning and defaults.
The device, the cache folder and a command's output folder are checked before any work: a problem is one
line ``error: ...`` and exit status 2, nothing written; Ctrl-C is one line and exit status 130.
Each command lives in its own module here, named in ``COMMANDS``, and registers itself with
``register(subparsers, common)``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from pathlib import Path
from typing import Sequence

# the modules of this package that register commands, in the order --help lists them
COMMANDS = ("run", "study", "train", "tune", "plateau", "pretrain", "data", "sample", "bench", "bench_scoring")
DEFAULT_PROFILE = "cpu"
INTERRUPTED = "interrupted; rerun the same command to resume from the last checkpoint"


class SetupError(ValueError):
    """This machine cannot do what a flag asks: a device it lacks, a folder it cannot write."""


def common_flags() -> argparse.ArgumentParser:
    """The flags every command shares (an argparse parent parser)."""
    from benchmark.base.keys import add_retrain_base_flag
    from benchmark.profiles import available_profiles

    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("common flags")
    g.add_argument("--profile", default=DEFAULT_PROFILE,
                   help=f"sizes and budgets: {', '.join(available_profiles())} (default {DEFAULT_PROFILE})")
    g.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="change one profile setting, e.g. training.steps=20 (repeatable)")
    g.add_argument("--cache-dir", default=os.environ.get("SCB_CACHE_DIR", ".cache"),
                   help="where data, base models, latents, judges and extractors are cached "
                        "(default $SCB_CACHE_DIR or .cache)")
    g.add_argument("--weights-dir", default=None,
                   help="folder with pretrained weights: BrainLDM (paper profile), RadImageNet, MedicalNet, "
                        "AlexNet for LPIPS (see README)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--plugin", action="append", default=[],
                   help="import a module (dotted name or .py path) whose @register'ed methods then run like built-ins")
    g.add_argument("--quiet", action="store_true",
                   help="no progress bars, no warnings that the records and REPORT.md already state")
    g.add_argument("--debug", action="store_true", help="show the traceback of an error")
    add_retrain_base_flag(g)
    return p


def load_profile_from(args: argparse.Namespace):
    """The profile the common flags ask for (``--retrain-base`` becomes ``base_weights=pretrain``)."""
    from benchmark.base.keys import overrides_with_retrain_flag
    from benchmark.profiles import load_profile

    load_plugins(args)  # first: a plugin's declared settings may be overridden (methods.<plugin>.<key>=...)
    return load_profile(args.profile, overrides_with_retrain_flag(args))


def load_plugins(args: argparse.Namespace) -> None:
    from methods.registry import load_plugin

    for module in args.plugin:
        load_plugin(module)


def device_from(args: argparse.Namespace) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def check_device(text: str | None) -> None:
    """Raise SetupError unless ``--device`` is cpu or a CUDA device this machine has (None: the default)."""
    if text is None:
        return
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise SetupError(f"--device {text} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return
    if device.type != "cuda":
        raise SetupError(f"--device {text}: the suite runs on cpu or cuda only; use one of those")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise SetupError(f"--device {text}: this machine has no CUDA device that torch can use; "
                         "use --device cpu or leave --device out")
    if (device.index or 0) >= count:
        raise SetupError(f"--device {text}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}; "
                         "choose one of them")


def writable_folder(path: str | Path, flag: str) -> Path:
    """``path``, once it is sure that a command can write there: an existing folder this user may write to,
    or a missing one whose nearest existing parent is such a folder. Creates nothing; raises SetupError,
    naming ``flag`` (e.g. ``--out``), otherwise. Every command checks its output and cache folders with it
    before any work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SetupError(f"{flag} {path} is a file, not a folder; give a folder (new or existing)")
    existing = path
    while not existing.exists():  # the nearest parent that exists: where the folder would be created
        existing = existing.parent
    if not existing.is_dir():
        raise SetupError(f"{flag} {path} cannot be created because {existing} is a file; give another folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SetupError(f"{flag} {path} is not writable ({existing} is read-only for this user); "
                         "give a folder you can write to")
    return path


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by what the user asked for: printed as one line, exit status 2."""
    from benchmark.base.keys import BaseModelError
    from benchmark.base.shipped import ShippedError
    from benchmark.engine.recipes import RecipeError
    from benchmark.profiles import ProfileError
    from benchmark.run.grid import GridError
    from datasets.subject import DataError
    from methods.registry import MethodError

    return ProfileError, MethodError, DataError, BaseModelError, GridError, ShippedError, RecipeError, SetupError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_benchmark.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train every spatial-control method on nested training sets, sample the test subjects, "
                    "score them and write the VCM paper's tables from the suite's own runs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = common_flags()
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv.insert(0, "run")  # `run_benchmark.py --methods vcm` means `run_benchmark.py run --methods vcm`
    debug = "--debug" in argv  # known before parsing, for a Ctrl-C during the imports too
    try:
        return _run_command(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print(INTERRUPTED, file=sys.stderr)
        return 130
    except user_errors() as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


def _run_command(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    args.command_line = "python run_benchmark.py " + " ".join(argv)  # recorded by commands that write reports
    check_device(args.device)
    if getattr(args, "uses_cache", True):
        writable_folder(args.cache_dir, "--cache-dir")
    with warnings.catch_warnings():
        if args.quiet:
            from metrics.common import quiet_missing_weights

            quiet_missing_weights()
        return int(args.func(args) or 0)
