"""Has the training budget converged? Validation Dice and the probe gap against steps.

``python run_benchmark.py plateau --profile cpu --task lv --methods vcm,controlnet --sizes 10,500``
trains each method at each size for ``--steps`` (default: twice the profile's budget at that size;
the learning-rate schedule spans the whole run) with the recipe a run would use, and at every ``--every`` steps measures, on validation subjects
only (never a test subject):

* the control probe (``probe`` section: noise MSE with the own and another subject's condition);
* the samples of ``--subjects`` validation subjects, drawn with their own conditions and with
  another validation subject's (the fixed derangement ``tune`` uses): the judge's Dice(own),
  Dice(swapped) and Control Δ with its paired bootstrap interval.

Each curve is written as it ends to ``<out>/<task>__<method>__n<N>.json`` (an interrupted command
redoes only the missing curves), and the figure ``<out>/plateau-<task>.png`` shows them all: whether
the profile's budget (a dashed line) sits on a plateau, or whether more steps would still buy control.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from benchmark.engine.recipes import load_recipe
from benchmark.engine.training import TrainSettings, train_method
from benchmark.run.session import control_probe
from benchmark.run.runner import build_method
from benchmark.run.ship import _git_commit
from benchmark.run.spec import RunContext
from benchmark.run.tune import score_validation
from core.files import atomic_json, atomic_png
from datasets.tasks import Task
from metrics.cost import device_name


class PlateauProbe:
    """The control probe plus validation samples scored by the judge, measured at every checkpoint."""

    def __init__(self, ctx: RunContext, task: Task, seed: int, subjects: int, progress: bool = False):
        self.ctx, self.task, self.seed = ctx, task, seed
        self.probe = control_probe(task, ctx, seed)
        self.cfg = {"validation_subjects": subjects, "seed": seed}
        self.progress = progress

    def measure(self, method) -> dict:
        start = time.perf_counter()
        out = {"probe": self.probe.measure(method) if self.probe is not None else None}
        was_training = method.training
        scores = score_validation(self.ctx, self.task, method, self.cfg, self.progress)  # sets eval mode
        if was_training:
            method.train()
        out.update({k: scores[k] for k in ("dice_own", "dice_swapped", "control_delta")})
        out["sampling_seconds"] = time.perf_counter() - start
        return out


def curve(ctx: RunContext, task: Task, name: str, size: int, steps: int, every: int, subjects: int, seed: int,
          work_dir: Path, progress: bool = False) -> dict:
    """Train ``name`` at ``size`` for ``steps`` and measure the plateau probe every ``every`` steps."""
    train = ctx.data.train_subjects(size)
    settings = TrainSettings.from_profile(ctx.profile, size, name, task.name)
    budget = settings.steps
    settings.steps, settings.checkpoint_every = steps, every
    recipe = load_recipe(ctx.profile, task.name)
    method = build_method(name, task, ctx, seed)
    result = train_method(method, ctx.base, train, task, settings, ctx.latents, work_dir, seed, ctx.device,
                          progress=progress, probe=PlateauProbe(ctx, task, seed, subjects, progress))
    points = []
    for h in result.extra["control_probe"]:
        probe = h.get("probe") or {}
        bands = probe.get("bands", [])
        points.append({"step": h["step"], "dice_own": h["dice_own"], "dice_swapped": h["dice_swapped"],
                       "control_delta": h["control_delta"],
                       "probe_gap_mean": float(np.mean([b["gap"] for b in bands])) if bands else None,
                       "probe_gap": [b["gap"] for b in bands], "seconds": h["seconds"]})
    return {"task": task.name, "method": name, "size": size, "seed": seed, "profile": ctx.profile.name,
            "budget_steps": budget, "steps": steps, "every": every, "lr": settings.lr,
            "recipe": recipe.describe(name) if recipe is not None else None, "validation_subjects": subjects, "seconds_per_step": result.seconds_per_step,
            "device": device_name(ctx.device), "commit": _git_commit(), "points": sorted(points, key=lambda p: p["step"])}


def plateau(ctx: RunContext, task: Task, names: Sequence[str], sizes: Sequence[int], out_dir: Path,
            steps: int | None, every: int | None, subjects: int, seed: int, command: str,
            progress: bool = False) -> Path:
    """Every missing curve of ``names`` × ``sizes``, then the figure; returns the figure's path."""
    if task.dice is None:
        raise ValueError(f"task '{task.name}' has no condition to judge: the plateau is measured by Dice (lv, multimodal)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        for size in sizes:
            path = out_dir / f"{task.name}__{name}__n{size}.json"
            if path.is_file():
                continue
            budget = TrainSettings.from_profile(ctx.profile, size, name, task.name).steps
            n_steps = int(steps or 2 * budget)
            n_every = int(every or max(1, budget // 3))
            if n_steps < 1 or n_every < 1:
                raise ValueError(f"--steps and --every must be positive, got {n_steps} and {n_every}")
            record = curve(ctx, task, name, size, n_steps, n_every, subjects, seed,
                           ctx.out_dir / "plateau-work" / f"{name}-n{size}", progress)
            record["command"] = command
            atomic_json(path, json.loads(json.dumps(record, default=float)))
            last = record["points"][-1]
            print(f"plateau {task.name} {name} N={size}: {len(record['points'])} points, last step {last['step']}: "
                  f"Dice {last['dice_own']:.3f}, Control Δ {last['control_delta']['mean']:+.3f}", flush=True)
    return plot(out_dir, task.name)


def plot(out_dir: Path, task: str) -> Path:
    """The figure of every curve in ``out_dir`` for ``task``: Dice(own) with Control Δ, and the probe gap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(p.read_text()) for p in sorted(Path(out_dir).glob(f"{task}__*__n*.json"))]
    if not records:
        raise FileNotFoundError(f"no plateau curves for task '{task}' in {out_dir}")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for r in records:
        steps = [p["step"] for p in r["points"]]
        label = f"{r['method']} N={r['size']}"
        line, = axes[0].plot(steps, [p["dice_own"] for p in r["points"]], marker="o", label=label)
        axes[0].plot(steps, [p["dice_swapped"] for p in r["points"]], ls=":", color=line.get_color())
        delta = [p["control_delta"] for p in r["points"]]
        axes[1].errorbar(steps, [d["mean"] for d in delta],
                         yerr=[[d["mean"] - d["ci_low"] for d in delta], [d["ci_high"] - d["mean"] for d in delta]],
                         marker="o", capsize=3, color=line.get_color(), label=label)
        axes[2].plot(steps, [p["probe_gap_mean"] for p in r["points"]], marker="o", color=line.get_color(), label=label)
        for ax in axes:
            ax.axvline(r["budget_steps"], ls="--", lw=0.8, color=line.get_color())
    axes[0].set_title("validation Dice: own condition (solid), another's (dotted)")
    axes[1].set_title("validation Control Δ (95% CI)")
    axes[1].axhline(0, color="grey", lw=0.8)
    axes[2].set_title("probe gap (noise MSE other − own), mean of bands")
    for ax in axes:
        ax.set_xlabel("training step (dashed: the profile's budget)")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"Plateau, task {task}, profile {records[0]['profile']}: validation subjects only")
    fig.tight_layout()
    path = Path(out_dir) / f"plateau-{task}.png"
    atomic_png(path, fig)
    plt.close(fig)
    return path
