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

``--compare-off`` times every method twice in the same process, with the profile's ``speed`` options
and with all of them off (plain PyTorch), alternating per method so that drifts of a shared machine
fall on both alike (``--repeats R``: R times each, alternating, each setting's median), and reports
the ratio off/on per method and its geometric mean, for the training step, for sampling one batch
(``sampling.batch_size`` subjects, ``sampling.ddim_steps`` DDIM steps), for a control-probe
measurement at a checkpoint after the first (the first, which also computes the frozen model's
errors, is reported beside it) and for one AdamW step over the method's trainable parameters alone
(``optimizer``: a small share of the step, timed apart from the step's noise) (``--parts`` picks).
It also reports how far the two agree: the first training losses (relative), the sampled volumes
(largest absolute difference) and the probe's control gaps.

``--profile-ops`` writes each method's top operators by self time (``torch.profiler``) for training
steps, sampling and the probe, to ``<stem>-ops.md``.

Writes ``<out>/methods-<profile>-<task>-<size>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmark.engine.latents import LatentCache, condition_batch, scalar_batch
from benchmark.engine.speed import SpeedOptions
from benchmark.engine.training import TrainSettings, train_method
from benchmark.run.session import RunSession, control_probe
from benchmark.run.runner import build_method
from benchmark.cli import load_plugins, load_profile_from
from benchmark.run.spec import RunContext
from datasets.tasks import DEFAULT_TASK, get_task
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


def time_optimizer_step(method, fused: bool, lr: float, weight_decay: float, device: str, steps: int = 30) -> float:
    """Median seconds of one AdamW step over (copies of) the method's trainable parameters, with random
    gradients: the training step's optimizer share, timed alone because it is small beside the step's noise."""
    generator = torch.Generator().manual_seed(0)
    params = [p.detach().clone().requires_grad_(True) for p in method.trainable_parameters()]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator).to(device)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)
    timer = StepTimer(warmup=WARMUP, device=device)
    for _ in range(WARMUP + steps):
        with timer.step():
            optimizer.step()
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


PARTS = ("train", "sample", "probe", "optimizer")
TOP_OPS = 15


def _ops_table(prof, title: str) -> str:
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=TOP_OPS, max_name_column_width=44)
    return f"### {title}\n\n```\n{table}\n```\n"


@contextlib.contextmanager
def _maybe_profile(enabled: bool, sink: list, title: str):
    if not enabled:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        yield
    sink.append(_ops_table(prof, title))


def timing_settings(profile, n_train: int, name: str, steps: int) -> TrainSettings:
    """The method's training settings, cut to ``WARMUP + steps`` steps with only a final checkpoint."""
    settings = TrainSettings.from_profile(profile, n_train, name)
    settings.steps = WARMUP + steps
    settings.warmup_steps = min(settings.warmup_steps, WARMUP)
    settings.checkpoint_every = 10**9  # only the final checkpoint, in a throw-away folder
    return settings


def time_method(name: str, ctx: RunContext, task, size: int, steps: int, seed: int,
                speed: SpeedOptions, parts=PARTS, ops: list | None = None) -> dict:
    """Times ``parts`` of method ``name`` built with ``speed``; returns timings and what was computed
    (first losses, the sampled batch, the probe's gaps), so that two settings can be compared."""
    label = "on" if speed != SpeedOptions.off() else "off"
    speed.apply_base(ctx.base)
    method = build_method(name, task, ctx, seed, speed)
    subjects = ctx.data.train_subjects(size)
    settings = timing_settings(ctx.profile, len(subjects), name, steps)
    settings.fused_optimizer = speed.fused_optimizer
    row: dict = {"trainable_parameters": count_parameters(method)["trainable"]}
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as run_dir:
        if "train" in parts:
            wall = time.perf_counter()
            with _maybe_profile(ops is not None, ops if ops is not None else [], f"{name}, speed {label}: training"):
                result = train_method(method, ctx.base, subjects, task, settings, ctx.latents, Path(run_dir),
                                      seed, ctx.device, progress=False)
            row.update(seconds_per_step=result.seconds_per_step, wall_seconds=round(time.perf_counter() - wall, 2),
                       peak_memory=result.peak_memory, first_losses=result.losses[:WARMUP])
        method.eval()
        if "sample" in parts:
            test = ctx.data.validation_subjects(int(ctx.profile.sampling.batch_size))  # timing only; never test subjects
            session = RunSession(ctx, Path(run_dir), seed, settings, probe=None)
            conditions, scalars = condition_batch(task, test, device=ctx.device), scalar_batch(test, ctx.device)
            start = time.perf_counter()
            with _maybe_profile(ops is not None, ops if ops is not None else [], f"{name}, speed {label}: sampling"):
                volumes = method.generate(conditions, scalars, test, session)
            row.update(sample_seconds=time.perf_counter() - start, sample_batch=len(test),
                       ddim_steps=int(ctx.profile.sampling.ddim_steps), _volumes=volumes.detach().cpu())
        if "probe" in parts:
            probe = control_probe(task, ctx, seed)
            if probe is None:
                raise MethodError("the profile's probe is off (probe.enabled: false); leave 'probe' out of --parts")
            probe.reuse_frozen = speed.reuse_frozen_prediction
            start = time.perf_counter()
            probe.measure(method)  # the first measurement of a run (before training)
            first = time.perf_counter() - start
            start = time.perf_counter()
            with _maybe_profile(ops is not None, ops if ops is not None else [], f"{name}, speed {label}: probe"):
                measured = probe.measure(method)  # every later checkpoint
            row.update(probe_seconds=time.perf_counter() - start, probe_first_seconds=first,
                       probe_gaps=[band["gap"] for band in measured["bands"]],
                       probe_mse_own=[band["mse_own"] for band in measured["bands"]])
        if "optimizer" in parts:
            row["optimizer_seconds"] = time_optimizer_step(method, settings.fused_optimizer, settings.lr,
                                                           settings.weight_decay, ctx.device)
    return row


def agreement(on: dict, off: dict) -> dict:
    """How far the numbers computed with the speed options on and off differ."""
    out = {}
    if "first_losses" in on:
        out["loss_max_rel_diff"] = max(abs(a - b) / max(abs(a), abs(b), 1e-12)
                                       for a, b in zip(on["first_losses"], off["first_losses"]))
    if "_volumes" in on:
        out["sample_max_abs_diff"] = float((on["_volumes"] - off["_volumes"]).abs().max())
    if "probe_gaps" in on:
        out["probe_gap_max_abs_diff"] = max(abs(a - b) for a, b in zip(on["probe_gaps"], off["probe_gaps"]))
        out["probe_mse_max_rel_diff"] = max(abs(a - b) / max(abs(a), abs(b), 1e-12)
                                            for a, b in zip(on["probe_mse_own"], off["probe_mse_own"]))
    return out


TIMED = {"train": "seconds_per_step", "sample": "sample_seconds", "probe": "probe_seconds",
         "optimizer": "optimizer_seconds"}


def geometric_mean(values) -> float | None:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def compare_markdown(report: dict) -> str:
    parts = report["parts"]
    lines = [f"# Speed options on vs off: profile `{report['profile']}`, task `{report['task']}`, size {report['size']}",
             "", f"Device: {report['device']}; {report['torch_threads']} torch threads; batch size {report['batch_size']}; "
             f"training: median of {report['steps']} steps after {report['warmup']} warm-up steps; sampling: one batch of "
             f"{report['sample_batch']} subjects, {report['ddim_steps']} DDIM steps; probe: a measurement at a checkpoint after "
             "the first (the first, with the frozen model's errors, in the JSON as probe_first_seconds); "
             f"optimizer: one AdamW step alone. Each setting timed {report.get('repeats', 1)} time(s), alternating; "
             "the median is shown (each repeat in the JSON as <key>_repeats).", "",
             f"Machine speed: one base-autoencoder pretraining step (batch {report['autoencoder_batch_size']}) takes "
             f"{report['autoencoder_step_seconds']:.3f} s.", "",
             f"Options on: {', '.join(k for k, v in report['speed_on'].items() if v) or 'none'}.", "",
             f"Command: `{report['command']}`", ""]
    head = ["method"] + [f"{p} off (s)" for p in parts] + [f"{p} on (s)" for p in parts] + [f"{p} speed-up" for p in parts]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in report["methods"]:
        if "error" in row:
            lines.append(f"| {row['method']} | failed: {row['error']} |" + " |" * (len(head) - 2))
            continue
        cells = [row["method"]]
        cells += [f"{row['off'][TIMED[p]]:.3f}" for p in parts]
        cells += [f"{row['on'][TIMED[p]]:.3f}" for p in parts]
        cells += [f"{row['speedup'][p]:.2f}x" for p in parts]
        lines.append("| " + " | ".join(cells) + " |")
    gm = report["geometric_mean_speedup"]
    lines.append("| **geometric mean** |" + " |" * (2 * len(parts)) + " | ".join(
        f"**{gm[p]:.2f}x**" if gm.get(p) else "" for p in parts) + " |")
    lines += ["", "Agreement of what was computed (options on vs off):", "",
              "| method | first losses, max rel. diff | sampled volumes, max abs diff | probe gap, max abs diff | probe MSE, max rel. diff |",
              "|---|---:|---:|---:|---:|"]
    for row in report["methods"]:
        if "agreement" in row:
            a = row["agreement"]
            lines.append(f"| {row['method']} | " + " | ".join(
                f"{a[k]:.2e}" if k in a else "" for k in ("loss_max_rel_diff", "sample_max_abs_diff",
                                                          "probe_gap_max_abs_diff", "probe_mse_max_rel_diff")) + " |")
    return "\n".join(lines) + "\n"


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
    p.add_argument("--task", default=DEFAULT_TASK)
    p.add_argument("--methods", default="all")
    p.add_argument("--size", type=int, default=50)
    p.add_argument("--steps", type=int, default=8, help="measured steps per method")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--random-base", action="store_true",
                   help="time a randomly initialised base model of the profile's architecture (no pretraining)")
    p.add_argument("--compare-off", action="store_true",
                   help="time every method with the profile's speed options and with all of them off, and report the ratios")
    p.add_argument("--repeats", type=int, default=1, metavar="R",
                   help="with --compare-off: time each method R times with the options on and off, alternating, and "
                        "take each setting's median (a noisy shared machine; default 1)")
    p.add_argument("--parts", default="train",
                   help=f"with --compare-off: what to time, comma-separated from {', '.join(PARTS)} (default train)")
    p.add_argument("--profile-ops", action="store_true",
                   help="write each method's top operators by self time (torch.profiler) to <stem>-ops.md")
    p.add_argument("--ddp", type=int, default=1, metavar="N",
                   help="time each method's step trained by 1 process and by N data-parallel ranks (docs/CLUSTER.md)")
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
    task = ctx.task(task.name)
    if args.random_base:
        from benchmark.base.model import BaseLDM

        torch.manual_seed(args.seed)
        ctx.base = BaseLDM.from_profile(profile).freeze().to(ctx.device)
        ctx.latents = LatentCache(ctx.base, None, device=ctx.device)

    if args.ddp > 1:
        from benchmark.cli.bench_ddp import time_ranks

        if args.random_base or args.compare_off:
            raise MethodError("--ddp times the profile's base model in fresh processes: leave out --random-base and --compare-off")
        return time_ranks(args, ctx, task, names)
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
    speed_on = SpeedOptions.from_profile(profile)
    ops: list | None = [] if args.profile_ops else None
    if args.compare_off:
        parts = [p.strip() for p in args.parts.split(",") if p.strip()]
        unknown = sorted(set(parts) - set(PARTS))
        if unknown or not parts:
            raise MethodError(f"--parts {args.parts!r}: choose from {', '.join(PARTS)}")
        if args.repeats < 1:
            raise MethodError(f"--repeats {args.repeats}: give at least 1")
        return _compare(args, ctx, task, names, report, rows, stem, speed_on, parts, ops)
    for name in names:
        frozen = time_frozen_forward(ctx.base, batch, WARMUP, args.steps, ctx.device)
        try:
            row = time_method(name, ctx, task, args.size, args.steps, args.seed, speed_on, ("train",), ops)
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
        _write_ops(stem, ops)
    print(f"wrote {stem}.json and {stem}.md")
    return 1 if any("error" in r for r in rows) else 0



def _write_ops(stem: Path, ops: list | None) -> None:
    if ops:
        Path(f"{stem}-ops.md").write_text("# Top operators by self time\n\n" + "\n".join(ops))


def _median_of(timings: list[dict], parts) -> dict:
    """The first timing of a setting, with each timed part replaced by its median over the repeats (each
    repeat's value kept beside it, ``<key>_repeats``); what was computed is the first repeat's."""
    first = dict(timings[0])
    for p in parts:
        values = [t[TIMED[p]] for t in timings]
        first[TIMED[p]] = float(statistics.median(values))
        if len(values) > 1:
            first[f"{TIMED[p]}_repeats"] = values
    return first


def _compare(args, ctx, task, names, report, rows, stem, speed_on, parts, ops) -> int:
    stem = stem.with_name(stem.name + "-speed")
    report.update(speed_on=speed_on.as_dict(), parts=parts, repeats=args.repeats,
                  sample_batch=int(ctx.profile.sampling.batch_size),
                  ddim_steps=int(ctx.profile.sampling.ddim_steps))
    for name in names:
        try:
            ons, offs = [], []
            for _ in range(args.repeats):  # alternating, so that a drift of the machine falls on both alike
                ons.append(time_method(name, ctx, task, args.size, args.steps, args.seed, speed_on, parts, ops))
                offs.append(time_method(name, ctx, task, args.size, args.steps, args.seed, SpeedOptions.off(), parts, ops))
            on, off = _median_of(ons, parts), _median_of(offs, parts)
        except Exception as err:  # one failing method must not hide the others' numbers
            rows.append({"method": name, "error": f"{type(err).__name__}: {err}"})
        else:
            speedup = {p: off[TIMED[p]] / on[TIMED[p]] for p in parts}
            row = {"method": name, "agreement": agreement(on, off), "speedup": speedup,
                   "on": {k: v for k, v in on.items() if not k.startswith("_")},
                   "off": {k: v for k, v in off.items() if not k.startswith("_")}}
            rows.append(row)
            print(f"{name:16s} " + "  ".join(f"{p} {off[TIMED[p]]:.3f} -> {on[TIMED[p]]:.3f} s ({speedup[p]:.2f}x)"
                                             for p in parts), flush=True)
        report["geometric_mean_speedup"] = {
            p: geometric_mean(r["speedup"][p] for r in rows if "speedup" in r) for p in parts}
        stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
        stem.with_suffix(".md").write_text(compare_markdown(report))
        _write_ops(stem, ops)
    gm = report["geometric_mean_speedup"]
    print("geometric mean speed-up: " + ", ".join(f"{p} {gm[p]:.2f}x" for p in parts if gm.get(p)))
    print(f"wrote {stem}.json and {stem}.md")
    return 1 if any("error" in r for r in rows) else 0
