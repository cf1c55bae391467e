"""Seconds per training step of every method, and its ratio to the frozen model's forward alone.

    python run_benchmark.py bench --profile cpu --task lv --size 50

For each method the engine's own training step (``train_method``: batch assembly,
conditions, the method's loss, backward, AdamW) runs 3 warm-up + ``--steps`` times on the
size-``--size`` training subjects; the median of the measured steps is reported. Right before each
method, the frozen base UNet's forward alone (no gradients, the same batch size) is timed the same
way, and the ratio is taken against that measurement, so slow drifts of a shared machine cancel
out. Peak memory is the process's peak RSS on CPU (monotone over the run: read it as an upper
bound) or torch's peak allocation on CUDA.

The report starts with the machine's speed: the seconds of one step of the base autoencoder's
pretraining (stage 1: the profile's autoencoder batch, L1 + KL, AdamW, on a copy), the yardstick
by which timings of different machines and sessions are compared (they differ 3-10x).

``--random-base`` times a randomly initialised base model of the profile's architecture instead of
the pretrained one (costs depend on the architecture, not on the weights), so the benchmark can
run before pretraining; the output says which base was used.

Writes ``<out>/methods-<profile>-<task>-<size>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmark.engine.latents import LatentCache, stable_seed
from benchmark.engine.training import TrainSettings, train_method
from benchmark.cli import load_plugins, load_profile_from
from benchmark.run.spec import RunContext
from datasets.tasks import get_task
from methods.base import Method
from methods.registry import MethodError, get_method, resolve_methods

from metrics.cost import StepTimer, count_parameters, device_name

WARMUP = 3  # the first steps (allocation, caches) are not typical; train_method discards 3 too


@torch.no_grad()
def time_frozen_forward(base, batch_size: int, warmup: int, steps: int, device: str) -> float:
    """Median seconds of one frozen UNet forward on a batch of noisy latents."""
    z = torch.randn((batch_size, *base.latent_shape), device=device)
    t = torch.randint(0, base.train_scheduler.num_train_timesteps, (batch_size,), device=device)
    scalars = torch.rand((batch_size, 4), device=device)
    timer = StepTimer(warmup=warmup, device=device)
    for _ in range(warmup + steps):
        with timer.step():
            base.unet(z, t, scalars)
    return timer.seconds_per_step


def time_autoencoder_step(base, profile, warmup: int, steps: int, device: str) -> float:
    """Median seconds of one stage-1 pretraining step of (a copy of) the base autoencoder."""
    import copy

    from benchmark.base.pretrain import autoencoder_loss

    ae = copy.deepcopy(base.autoencoder).train().to(device=device, memory_format=torch.channels_last_3d)
    for p in ae.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(ae.parameters(), lr=float(profile.autoencoder.lr))
    x = torch.rand((int(profile.autoencoder.batch_size), 1, *profile.image_shape), device=device)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    timer = StepTimer(warmup=warmup, device=device)
    for _ in range(warmup + steps):
        with timer.step():
            loss, _ = autoencoder_loss(ae, x, float(profile.autoencoder.kl_weight))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return timer.seconds_per_step


def time_method(name: str, ctx: RunContext, task, size: int, steps: int, seed: int) -> dict:
    cls = get_method(name, task.name)
    torch.manual_seed(stable_seed(seed, "init", name))
    method = cls(ctx.base, task.modalities, ctx.profile.methods.get(name, {})).to(ctx.device)
    subjects = ctx.data.train_subjects(size)
    settings = TrainSettings.from_profile(ctx.profile, len(subjects), name)
    settings.steps = WARMUP + steps
    settings.warmup_steps = min(settings.warmup_steps, WARMUP)
    settings.checkpoint_every = 10**9  # only the final checkpoint, in a throw-away folder
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as run_dir:
        wall = time.perf_counter()
        result = train_method(method, ctx.base, subjects, task, settings, ctx.latents, Path(run_dir),
                                     seed, ctx.device, progress=False)
    return {"trainable_parameters": count_parameters(method)["trainable"],
            "seconds_per_step": result.seconds_per_step,
            "wall_seconds": round(time.perf_counter() - wall, 2),
            "peak_memory": result.peak_memory}


def markdown(report: dict) -> str:
    lines = [f"# Seconds per training step: profile `{report['profile']}`, task `{report['task']}`, "
             f"size {report['size']}", "",
             f"Device: {report['device']}; base model: {report['base']}; batch size {report['batch_size']}; "
             f"median of {report['steps']} steps after {report['warmup']} warm-up steps.", "",
             f"Machine speed: one base-autoencoder pretraining step (batch "
             f"{report['autoencoder_batch_size']}) takes {report['autoencoder_step_seconds']:.3f} s.", "",
             f"Command: `{report['command']}`", "",
             "| method | trainable params | s / training step | frozen forward (s) | ratio to frozen forward |",
             "|---|---:|---:|---:|---:|"]
    for row in report["methods"]:
        if "error" in row:
            lines.append(f"| {row['method']} | failed: {row['error']} | | | |")
            continue
        lines.append(f"| {row['method']} | {row['trainable_parameters'] / 1e6:.3f}M | {row['seconds_per_step']:.3f} "
                     f"| {row['frozen_forward_seconds']:.3f} | {row['ratio_to_frozen_forward']:.2f} |")
    return "\n".join(lines) + "\n"


def register(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("bench", parents=[common], help="seconds per training step of every method",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="lv")
    p.add_argument("--methods", default="all")
    p.add_argument("--size", type=int, default=50)
    p.add_argument("--steps", type=int, default=8, help="measured steps per method")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--random-base", action="store_true",
                   help="time a randomly initialised base model of the profile's architecture (no pretraining)")
    p.add_argument("--out", default="results/bench")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.steps < 1:
        raise MethodError(f"--steps must be at least 1, got {args.steps}")
    profile = load_profile_from(args)
    load_plugins(args)
    task = get_task(args.task)
    names = resolve_methods(args.methods, task.name)
    if args.methods.strip() == "all":  # the suite's training step: methods that steer the frozen model
        names = [n for n in names if issubclass(get_method(n), Method)]
    fits_itself = [n for n in names if not issubclass(get_method(n), Method)]
    if fits_itself:
        raise MethodError(f"bench times the suite's training step; {', '.join(fits_itself)} fit(s) itself "
                          "(no noise prediction to train): leave it out")
    ctx = RunContext(profile, Path(args.out), Path(args.cache_dir), args.weights_dir, device=args.device,
                     progress=False)
    ctx.data.splits.training_subset(args.size)  # fails early, with the pool size, if too large
    if args.random_base:
        from benchmark.base.model import BaseLDM

        torch.manual_seed(args.seed)
        ctx.base = BaseLDM.from_profile(profile).freeze().to(ctx.device)
        ctx.latents = LatentCache(ctx.base, None, device=ctx.device)

    rows = []
    batch = int(profile.training.batch_size)
    report = {"profile": args.profile, "task": task.name, "size": args.size, "batch_size": batch,
              "steps": args.steps, "warmup": WARMUP, "device": device_name(ctx.device),
              "torch_threads": torch.get_num_threads(),
              "base": "randomly initialised (timing only)" if args.random_base else "pretrained",
              "command": args.command_line,
              "methods": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"methods-{args.profile}-{task.name}-{args.size}"
    report["autoencoder_batch_size"] = int(profile.autoencoder.batch_size)
    report["autoencoder_step_seconds"] = time_autoencoder_step(ctx.base, profile, WARMUP, args.steps, ctx.device)
    print(f"machine speed: base autoencoder step {report['autoencoder_step_seconds']:.3f} s "
          f"(batch {report['autoencoder_batch_size']})", flush=True)
    for name in names:
        frozen = time_frozen_forward(ctx.base, batch, WARMUP, args.steps, ctx.device)
        try:
            row = time_method(name, ctx, task, args.size, args.steps, args.seed)
        except Exception as err:  # one failing method must not hide the others' numbers
            rows.append({"method": name, "error": f"{type(err).__name__}: {err}"})
        else:
            row.update(method=name, frozen_forward_seconds=frozen,
                       ratio_to_frozen_forward=row["seconds_per_step"] / frozen)
            rows.append(row)
            print(f"{name:16s} {row['seconds_per_step']:.3f} s/step  frozen forward {frozen:.3f} s  "
                  f"ratio {row['ratio_to_frozen_forward']:.2f}", flush=True)
        # Written after every method: an interrupted benchmark keeps what it measured.
        stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
        stem.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {stem}.json and {stem}.md")
    return 1 if any("error" in r for r in rows) else 0

