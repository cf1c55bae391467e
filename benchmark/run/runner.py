"""One run: train (or fit) the method, sample the test subjects, score them; returns the record's
fields. Reference rows and the unconditioned base model are runs too."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from benchmark.engine.latents import condition_batch, scalar_batch, stable_seed
from benchmark.engine.sampling import sample_method, sample_unconditioned
from benchmark.engine.training import TrainSettings, train_method
from core.files import atomic_npz
from datasets.tasks import Task, get_task
from methods.base import DirectMethod, Method
from methods.registry import get_method

from benchmark.run.spec import BASE_UNCONDITIONED, REFERENCE, REFERENCE_OTHER, SPHERE_SUFFIX, RunContext, RunSpec


# ---- one run -------------------------------------------------------------------------


def build_method(name: str, task: Task, ctx: RunContext, seed: int) -> Method:
    cls = get_method(name, task.name)
    torch.manual_seed(stable_seed(seed, "init", name))  # the same initial weights per seed
    config = ctx.profile.methods.get(name, {})
    return cls(ctx.base, task.modalities, config).to(ctx.device)


def control_probe(task: Task, ctx: RunContext, seed: int):
    """The profile's control probe (``probe`` section) on the first test subjects, or None when off."""
    from benchmark.engine.probe import ControlProbe

    cfg = ctx.profile.get("probe", {})
    if not cfg.get("enabled", True):
        return None
    test = ctx.test_subjects()[: int(cfg.get("subjects", 16))]
    latents = ctx.latents.get(test, progress=False)[:, 0, 0]  # plain (not mirrored) posterior means
    return ControlProbe(ctx.base, task, test, latents, seed=seed, bands=int(cfg.get("bands", 4)),
                        draws=int(cfg.get("draws", 2)), batch_size=int(ctx.profile.sampling.batch_size),
                        device=ctx.device)


def train_or_load(spec: RunSpec, task: Task, ctx: RunContext, stop_after: int | None = None, probe=None):
    """Train the run's method (resuming if interrupted); returns (method, TrainResult)."""
    method = build_method(spec.method, task, ctx, spec.seed)
    subjects = ctx.data.train_subjects(spec.size)
    settings = TrainSettings.from_profile(ctx.profile, len(subjects))
    result = train_method(method, ctx.base, subjects, task, settings, ctx.latents,
                                 ctx.run_dir(spec), spec.seed, ctx.device, ctx.progress, stop_after, probe)
    return method, result


def execute_run(spec: RunSpec, ctx: RunContext) -> dict:
    """Train, sample and score one run; returns the record's result fields."""
    task = get_task(spec.task)
    wall = time.perf_counter()
    test = ctx.test_subjects()
    sampling = ctx.profile.sampling
    result: dict = {}
    if spec.method == REFERENCE:
        # Real test volumes scored as if generated, against real training volumes.
        real = ctx.data.train_subjects(min(len(test), ctx.data.splits.train_pool.__len__()))
        metrics, protocol = ctx.scorer(task).score(stack_images(test), test, task, real_reference=real)
        return {"metrics": metrics, "protocol": protocol,
                "cost": {"wall_seconds": time.perf_counter() - wall}}
    if spec.method == REFERENCE_OTHER:
        # What a perfect generator that ignores its condition scores: real volumes, others' conditions.
        from benchmark.engine.probe import derangement

        other = derangement(len(test), spec.seed)
        metrics, protocol = ctx.scorer(task).dice(stack_images(test), [test[j] for j in other])
        protocol["row"] = "real test volumes against another test subject's condition (a fixed derangement)"
        protocol["derangement"] = other.tolist()
        return {"metrics": metrics, "protocol": protocol, "cost": {"wall_seconds": time.perf_counter() - wall}}
    if spec.method == BASE_UNCONDITIONED:
        generated = sample_unconditioned(ctx.base, test, task, sampling.ddim_steps, sampling.batch_size,
                                                spec.seed, ctx.device, ctx.progress)
        conditions_used = task
        result["cost"] = {"trainable_parameters": 0}
        result["control_probe"] = {"not_applicable": "the base model alone has no spatial condition"}
    elif issubclass(get_method(spec.method.removesuffix(SPHERE_SUFFIX), task.name), DirectMethod):
        # Methods that make volumes themselves (super-resolution baselines): fit, then generate.
        generated, direct = run_direct(spec, task, ctx, test)
        conditions_used = task
        result.update(direct)
        result["control_probe"] = {"not_applicable": f"{spec.method} generates volumes directly; it has no noise "
                                                     "prediction to probe"}
    else:
        method_name = spec.method.removesuffix(SPHERE_SUFFIX)
        inner = RunSpec(spec.task, method_name, spec.size, spec.seed)
        probe = control_probe(task, ctx, spec.seed)
        method, train = train_or_load(inner, task, ctx, probe=probe)
        if probe is not None:
            result["control_probe"] = {"protocol": probe.describe(), "history": train.extra["control_probe"]}
        sample_task = task
        if spec.method.endswith(SPHERE_SUFFIX):
            from benchmark.run.sphere_masks import sphere_task

            sample_task = sphere_task(task)
        torch.manual_seed(stable_seed(spec.seed, "sampling"))
        generated = sample_method(method, ctx.base, test, sample_task, sampling.ddim_steps,
                                         sampling.batch_size, spec.seed, ctx.device, ctx.progress)
        conditions_used = sample_task
        result["training"] = {"steps": train.steps, "final_loss": train.losses[-1] if train.losses else None,
                              "first_loss": train.losses[0] if train.losses else None,
                              "loss_curve": train.losses[:: max(1, len(train.losses) // 100)],
                              "resumed_from": train.resumed_from}
        result["cost"] = ctx.scorer(task).cost(method, train, spec.size)
    save_samples(ctx.run_dir(spec), test, generated, conditions_used)
    save_real(ctx.out_dir, test)
    result["metrics"], result["protocol"] = ctx.scorer(task).score(generated, test, conditions_used)
    history = result.get("control_probe", {}).get("history")
    if history and not spec.method.endswith(SPHERE_SUFFIX):
        from benchmark.engine.probe import summary_columns

        result["metrics"].update(summary_columns(history[-1]))
    result["cost"]["wall_seconds"] = time.perf_counter() - wall
    if "base" in vars(ctx):  # the run used the base model: say which one (shipped, pretrained here, BrainLDM)
        result["base_model"] = getattr(ctx.base, "origin", {})
    return result


def run_direct(spec: RunSpec, task: Task, ctx: RunContext, test) -> tuple[np.ndarray, dict]:
    """A ``DirectMethod`` run: fit on the training subjects (resuming from the run folder), then
    generate the test volumes batch by batch; returns (volumes, record fields)."""
    from metrics.cost import PeakMemory, count_parameters, device_days

    cls = get_method(spec.method, task.name)
    if cls.uses_base_model:
        method = build_method(spec.method, task, ctx, spec.seed)
    else:  # as build_method, without loading (or pretraining) the base model it does not use
        torch.manual_seed(stable_seed(spec.seed, "init", spec.method))
        method = cls(None, task.modalities, ctx.profile.methods.get(spec.method, {})).to(ctx.device)
    subjects = ctx.data.train_subjects(spec.size)
    settings = TrainSettings.from_profile(ctx.profile, len(subjects))
    fit_start = time.perf_counter()
    with PeakMemory(ctx.device) as memory:
        info = dict(method.fit(subjects, task, settings, ctx.run_dir(spec), spec.seed, ctx.progress) or {})
    fit_seconds = time.perf_counter() - fit_start
    torch.manual_seed(stable_seed(spec.seed, "sampling"))
    method.eval()
    batch_size = ctx.profile.sampling.batch_size
    gen_start = time.perf_counter()
    out = []
    for start in tqdm(range(0, len(test), batch_size), desc=f"generate {method.name}", disable=not ctx.progress,
                      leave=False):
        chunk = test[start : start + batch_size]
        volumes = method.generate(condition_batch(task, chunk, device=ctx.device),
                                  scalar_batch(chunk, ctx.device), chunk)
        out.append(volumes.detach().clamp(0, 1).float().cpu().numpy())
    generated = np.concatenate(out) if out else np.zeros((0, 1, *ctx.profile.image_shape), np.float32)
    gen_seconds = time.perf_counter() - gen_start

    losses = [float(v) for v in info.get("losses", [])]
    params = count_parameters(method)
    cost = {
        "trainable_parameters": params["trainable"],
        "method_parameters": params["total"],
        "seconds_per_step": info.get("seconds_per_step"),
        "train_wall_seconds": fit_seconds,
        "generate_wall_seconds": gen_seconds,
        "generate_seconds_per_volume": gen_seconds / max(len(test), 1),
        **{k: v for k, v in memory.summary().items() if k != "peak_memory_gib"},
    }
    if method.uses_base_model:
        cost["base_parameters"] = sum(ctx.base.num_parameters().values())
    if method.generate_info.get("seconds_per_step") is not None:  # optimisation at test time (InverseSR)
        cost["generate_seconds_per_step"] = method.generate_info["seconds_per_step"]
    if info.get("batch_size"):
        cost["batch_size"] = int(info["batch_size"])
    sps = info.get("seconds_per_step")
    if sps is not None and np.isfinite(sps) and losses:
        # The same projection as the diffusion methods (N=500, 10,000 epochs, minibatch 16).
        projection = device_days(sps, n_train=500, epochs=10000, batch_size=16, device=ctx.device,
                                 measured_batch_size=cost.get("batch_size"))
        cost["device_days_paper_protocol"] = projection["device_days"]
        cost["device_days_rule"] = projection["rule"] + (f"; {projection['scaling']}" if projection["scaling"] else "")
    fields = {
        "training": {"steps": int(info.get("steps", len(losses))), "final_loss": losses[-1] if losses else None,
                     "first_loss": losses[0] if losses else None,
                     "loss_curve": losses[:: max(1, len(losses) // 100)],
                     "resumed_from": int(info.get("resumed_from", 0))},
        "cost": cost,
    }
    if method.generate_info:
        fields["generation"] = method.generate_info
    return generated, fields


def stack_images(subjects) -> np.ndarray:
    return np.stack([s.image for s in subjects]).astype(np.float32)


def save_samples(run_dir: Path, subjects, generated: np.ndarray, task) -> None:
    """Generated volumes and, for the record, the conditions they were generated from."""
    conditions = {}
    for name in task.modalities:
        conditions[f"condition_{name}"] = np.stack([task.conditions(s)[name] for s in subjects]).astype(np.float16)
    atomic_npz(run_dir / "samples.npz", ids=np.array([s.id for s in subjects]),
                volumes=generated.astype(np.float16), **conditions)


def save_real(out_dir: Path, subjects) -> None:
    """The real test volumes once per results folder, for montages beside the generated ones."""
    path = out_dir / "runs" / "real_test.npz"
    if not path.is_file():
        atomic_npz(path, ids=np.array([s.id for s in subjects]), volumes=stack_images(subjects).astype(np.float16),
                    lv_mask=np.stack([s.lv_mask for s in subjects]).astype(np.uint8))
