"""The same tuning budget for every method: one search space, the same trials, steps and rule.

``python run_benchmark.py tune --task lv --methods all`` trains every method once per value of the
profile's search space (``tuning.learning_rates``) at one training size (``tuning.size``, with the
profile's ``training.budget``), each trial from the same seed, and scores each trial on validation
subjects only (never a test subject):

* the control probe at the last step gives ``noise MSE / frozen``; a trial above
  ``tuning.max_noise_mse_ratio`` (diverged, or not yet denoising) is never selected, nor one whose
  loss became non-finite;
* the trial's samples of ``tuning.validation_subjects`` validation subjects, drawn once with their own
  conditions and once with another validation subject's (a fixed derangement), from the same initial
  noise and with each subject's own scalars, are segmented by the task's judge and scored against each
  subject's own condition: **Control Δ** = Dice(own) − Dice(swapped), paired per subject.

The rule: among the trials that qualify, the one with the largest mean Control Δ is chosen (the
quantity the benchmark's verdict is about: how much a method's samples follow their own condition
rather than any plausible one); Dice(own) is kept beside it. When no trial qualifies the method keeps
the profile's settings and the recipe says why. Each trial's record is written as it ends (an
interrupted tune resumes with the trials it has; they are kept beside the recipe, in
``<task>-trials/``, with their per-subject values), and the recipe file gathers them with the search
space, seed, commit, command and cost. A recipe names the methods tuned so far; ``run`` uses the
profile's settings for a method it does not name, and its record says so.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import yaml

from benchmark.engine.probe import derangement, noise_mse_ratio
from benchmark.engine.recipes import RECIPE_DIR, recipe_path
from benchmark.engine.sampling import sample_method
from benchmark.engine.training import TrainingDiverged, TrainSettings, train_method
from benchmark.run.session import control_probe
from benchmark.run.runner import build_method
from benchmark.run.ship import _git_commit  # one place for the commit a file was made at
from benchmark.run.spec import RunContext
from core.files import atomic_json
from datasets.tasks import Task
from metrics.control_delta import paired_difference
from metrics.cost import device_name

SELECTION_RULE = ("largest mean Control Δ = Dice(own condition) − Dice(another validation subject's condition) of "
                  "the trial's samples of the validation subjects, paired per subject; trials whose noise MSE / "
                  "frozen at the last probe exceeds tuning.max_noise_mse_ratio, or whose loss became non-finite, "
                  "are never selected")


def tuning_settings(ctx: RunContext) -> dict:
    t = ctx.profile.tuning
    lrs = [float(x) for x in t.learning_rates]
    if len(lrs) < 1 or any(not (x > 0 and math.isfinite(x)) for x in lrs):
        raise ValueError(f"tuning.learning_rates must be positive numbers, got {t.learning_rates}")
    return {"size": int(t.size), "learning_rates": lrs, "validation_subjects": int(t.validation_subjects),
            "max_noise_mse_ratio": float(t.max_noise_mse_ratio), "seed": int(t.seed)}


def per_subject_dice(ctx: RunContext, task: Task, volumes: np.ndarray, condition_subjects) -> np.ndarray:
    """The judge's Dice of each volume against the condition of the matching subject."""
    return np.asarray(ctx.scorer(task).dice(volumes, condition_subjects)[2], dtype=np.float64)


def run_trial(ctx: RunContext, task: Task, name: str, lr: float, cfg: dict, trial_dir: Path,
              progress: bool = False) -> dict:
    """Train ``name`` at ``lr`` and score it on validation subjects; returns the trial's record."""
    start = time.perf_counter()
    seed = cfg["seed"]
    subjects = ctx.data.train_subjects(cfg["size"])
    settings = TrainSettings.from_profile(ctx.profile, len(subjects), name, task.name, chosen={"training.lr": lr})
    settings.checkpoint_every = settings.steps  # the probe before training and at the end only
    method = build_method(name, task, ctx, seed)
    probe = control_probe(task, ctx, seed)
    trial = {"method": name, "lr": lr, "steps": settings.steps, "size": cfg["size"], "seed": seed,
             "device": device_name(ctx.device)}  # per trial: one recipe may gather trials from several machines
    try:
        result = train_method(method, ctx.base, subjects, task, settings, ctx.latents, trial_dir, seed,
                              ctx.device, progress=progress, probe=probe)
    except TrainingDiverged as err:
        trial.update(status="diverged", reason=str(err), eligible=False, seconds=time.perf_counter() - start)
        return trial
    final_probe = result.extra.get("control_probe", [])[-1] if probe is not None else {}
    ratio = noise_mse_ratio(final_probe) if final_probe else None
    trial.update(status="ok", seconds_per_step=result.seconds_per_step, final_loss=result.losses[-1],
                 noise_mse_ratio=ratio, probe_gap=[b.get("gap") for b in final_probe.get("bands", [])],
                 probe_bands_ci_above_0=sum(1 for b in final_probe.get("bands", []) if b.get("gap_ci_low", 0) > 0))
    if ratio is None or not ratio <= cfg["max_noise_mse_ratio"]:
        trial.update(eligible=False, reason=f"noise MSE / frozen {ratio} above {cfg['max_noise_mse_ratio']}",
                     seconds=time.perf_counter() - start)
        return trial
    trial.update(score_validation(ctx, task, method, cfg, progress), eligible=True,
                 seconds=time.perf_counter() - start)
    return trial


def score_validation(ctx: RunContext, task: Task, method, cfg: dict, progress: bool = False) -> dict:
    """Dice of the method's validation samples with their own and with another subject's conditions."""
    validation = ctx.data.validation_subjects(cfg["validation_subjects"])
    other = derangement(len(validation), cfg["seed"])
    givers = [validation[j] for j in other]
    s = ctx.profile.sampling
    own = sample_method(method, ctx.base, validation, task, s.ddim_steps, s.batch_size, cfg["seed"], ctx.device, progress)
    swapped = sample_method(method, ctx.base, validation, task, s.ddim_steps, s.batch_size, cfg["seed"], ctx.device,
                            progress, condition_subjects=givers)
    dice_own = per_subject_dice(ctx, task, own, validation)
    dice_swapped = per_subject_dice(ctx, task, swapped, validation)
    delta = paired_difference(dice_own, dice_swapped, seed=cfg["seed"])
    return {"validation_ids": [v.id for v in validation], "derangement": other.tolist(),
            "dice_own": float(np.nanmean(dice_own)), "dice_swapped": float(np.nanmean(dice_swapped)),
            "dice_own_per_subject": dice_own.tolist(), "dice_swapped_per_subject": dice_swapped.tolist(),
            "control_delta": delta}


def select(trials: Sequence[dict]) -> tuple[dict, str]:
    """(chosen settings, why) by :data:`SELECTION_RULE`."""
    eligible = [t for t in trials if t.get("eligible")]
    if not eligible:
        return {}, "no trial qualified (every one diverged or stayed above the noise-MSE limit): the profile's settings"
    best = max(eligible, key=lambda t: (t["control_delta"]["mean"], t["dice_own"]))
    return {"training.lr": best["lr"]}, (f"lr {best['lr']:g}: Control Δ {best['control_delta']['mean']:+.3f} "
                                         f"[{best['control_delta']['ci_low']:+.3f}, {best['control_delta']['ci_high']:+.3f}], "
                                         f"Dice(own) {best['dice_own']:.3f}")


def trial_records_dir(recipe: Path) -> Path:
    """Where a recipe's trial records live (committed beside it, so an interrupted tune resumes anywhere)."""
    return recipe.parent / f"{recipe.stem}-trials"


def tune(ctx: RunContext, task: Task, names: Sequence[str], out_dir: Path, command: str,
         recipe_root: Path | None = None, progress: bool = False,
         trial_runner: Callable[..., dict] = run_trial) -> Path:
    """Run every missing trial of ``names`` and write the recipe file; returns its path."""
    cfg = tuning_settings(ctx)
    if task.dice is None:
        raise ValueError(f"task '{task.name}' has no condition to judge: tune selects by Control Δ (lv, multimodal)")
    out_dir = Path(out_dir)
    path = recipe_path(ctx.profile.name, task.name, recipe_root or RECIPE_DIR)
    protocol = {"profile": ctx.profile.name, "task": task.name, "size": cfg["size"],
                "budget": ctx.profile.training.get("budget", "steps"),
                "steps": TrainSettings.from_profile(ctx.profile, cfg["size"], chosen={}).steps,
                "search_space": {"training.lr": cfg["learning_rates"]}, "seed": cfg["seed"],
                "validation_subjects": cfg["validation_subjects"], "max_noise_mse_ratio": cfg["max_noise_mse_ratio"],
                "selection": SELECTION_RULE, "used_at": "every training size (tuned at tuning.size)"}
    existing = yaml.safe_load(path.read_text()) if path.is_file() else {}
    methods = {}
    if existing and all(existing.get(k) == protocol[k] for k in ("size", "steps", "search_space", "seed")):
        methods = dict(existing.get("methods") or {})  # methods tuned earlier under the same protocol
    trials_dir = trial_records_dir(path)
    for name in names:
        trials = []
        for lr in cfg["learning_rates"]:
            trial_dir = out_dir / name / f"lr{lr:g}"  # checkpoints (not committed)
            record = trials_dir / f"{name}__lr{lr:g}.json"  # the evidence, per-subject values included
            if record.is_file():
                trial = json.loads(record.read_text())
                if all(trial.get(k) == v for k, v in (("steps", protocol["steps"]), ("size", cfg["size"]),
                                                       ("seed", cfg["seed"]))):
                    trials.append(trial)
                    continue
            torch.manual_seed(0)
            trial = json.loads(json.dumps(trial_runner(ctx, task, name, lr, cfg, trial_dir, progress), default=float))
            trials_dir.mkdir(parents=True, exist_ok=True)
            atomic_json(record, trial)
            trials.append(trial)
            delta = trial.get("control_delta", {}).get("mean")
            print(f"tune {task.name} {name} lr {lr:g}: {trial['status']}, noise MSE / frozen "
                  f"{trial.get('noise_mse_ratio')}, Control Δ {delta if delta is None else round(delta, 4)}, "
                  f"{trial['seconds']:.0f} s", flush=True)
        chosen, why = select(trials)
        methods[name] = {"chosen": chosen, "why": why, "trial_seconds": round(sum(t["seconds"] for t in trials), 1),
                         "device": " + ".join(sorted({t.get("device", "unknown") for t in trials})),
                         "trials": [{k: v for k, v in t.items() if not k.endswith("_per_subject") and k not in
                                     ("validation_ids", "derangement")} for t in trials]}
        hours: dict[str, float] = {}
        for entry in methods.values():
            hours[entry.get("device", "unknown")] = hours.get(entry.get("device", "unknown"), 0.0) + entry["trial_seconds"] / 3600
        recipe = {**protocol, "commit": _git_commit(), "command": command, "device": device_name(ctx.device),
                  "torch_threads": torch.get_num_threads(),
                  "tuning_cost": {"wall_hours": round(sum(hours.values()), 3),
                                  "wall_hours_by_device": {d: round(h, 3) for d, h in sorted(hours.items())},
                                  "note": "wall-clock hours of all trials; each method's entry names the device its "
                                          "trials ran on ('device' above is the last tune's)"},
                  "methods": methods}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("# Made by `python run_benchmark.py tune` (benchmark/run/tune.py); do not edit by hand.\n"
                        + yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True, width=120))
    return path


def summary(path: Path, profile_lr: Callable[[str], float]) -> str:
    """A Markdown table of a recipe file: each method's chosen lr beside ``profile_lr(method)`` (what it
    trains at without the recipe), the validation evidence, the device and the tuning hours."""
    recipe = yaml.safe_load(Path(path).read_text()) or {}
    shown = Path(path).resolve()
    shown = shown.relative_to(Path.cwd()) if shown.is_relative_to(Path.cwd()) else shown
    lines = [f"Recipe `{shown}` (profile {recipe.get('profile')}, task {recipe.get('task')}, N = {recipe.get('size')}, "
             f"{recipe.get('steps')} steps, seed {recipe.get('seed')}, {recipe.get('validation_subjects')} validation "
             f"subjects; commit {str(recipe.get('commit'))[:10]})", "",
             "| method | lr chosen | lr without the recipe | why (validation) | device | tuning hours |",
             "|---|---|---|---|---|---|"]
    for name, entry in (recipe.get("methods") or {}).items():
        lr = (entry.get("chosen") or {}).get("training.lr")
        lines.append(f"| {name} | {'–' if lr is None else f'{lr:g}'} | {profile_lr(name):g} | {entry.get('why')} | "
                     f"{entry.get('device', recipe.get('device'))} | {entry.get('trial_seconds', 0) / 3600:.3f} |")
    cost = recipe.get("tuning_cost") or {}
    lines += ["", f"Total: {cost.get('wall_hours')} wall-hours ({cost.get('wall_hours_by_device', {})})."]
    return "\n".join(lines)
