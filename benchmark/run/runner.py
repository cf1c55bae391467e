"""One run: what it does depends on its kind (:class:`benchmark.run.spec.RunKind`). A method run
fits the method (through the suite's engine when it steers the frozen model), generates the test
subjects batch by batch and scores them; the reference rows and the unconditioned base model are
runs too. Each returns the record's fields."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from benchmark.engine.latents import condition_batch, scalar_batch, stable_seed
from benchmark.engine.sampling import sample_unconditioned
from benchmark.engine.speed import SpeedOptions
from benchmark.engine.training import TrainSettings
from benchmark.run.records import jsonable
from benchmark.run.session import RunSession, control_probe  # noqa: F401  (control_probe: for benchmark.cli.train)
from benchmark.run.spec import RunContext, RunKind, RunSpec
from benchmark.run.status import KEPT_BATCHES
from core.files import atomic_npz
from datasets.tasks import Task
from methods.base import BaseMethod
from methods.registry import get_method
from metrics.control_delta import CONTROL_DELTA, paired_difference


# ---- building and training a method ------------------------------------------------------


def build_method(name: str, task: Task, ctx: RunContext, seed: int, speed: SpeedOptions | None = None) -> BaseMethod:
    """Method ``name`` for ``task``, with the same initial weights per seed, set up with the profile's
    speed options (or ``speed``); a method that does not use the base model gets ``base=None`` (the
    base model is then never loaded for it)."""
    cls = get_method(name, task)
    base = ctx.base if cls.uses_base_model else None  # loaded before seeding: same weights either way
    torch.manual_seed(stable_seed(seed, "init", name))
    method = cls(base, task.modalities, ctx.profile.methods.get(name, {})).to(ctx.device)
    return (speed or SpeedOptions.from_profile(ctx.profile)).apply(method)


def run_session(spec: RunSpec, ctx: RunContext, n_train: int, probe="profile", stop_after: int | None = None):
    return RunSession(ctx, ctx.run_dir(spec), spec.seed,
                      TrainSettings.from_profile(ctx.profile, n_train, spec.method, spec.task),
                      probe=probe, stop_after=stop_after)


def train_or_load(spec: RunSpec, task: Task, ctx: RunContext, stop_after: int | None = None, probe=None):
    """Train the run's (steering) method through a run session, resuming if interrupted; returns
    (method, TrainResult)."""
    method = build_method(spec.method, task, ctx, spec.seed)
    subjects = ctx.data.train_subjects(spec.size)
    session = run_session(spec, ctx, len(subjects), probe=probe, stop_after=stop_after)
    method.fit(subjects, task, session)
    return method, session.train_result


# ---- the kinds of run --------------------------------------------------------------------


def execute_run(spec: RunSpec, ctx: RunContext) -> dict:
    """Run ``spec`` by its kind; returns the record's result fields."""
    return RUNS[spec.kind](spec, ctx.task(spec.task), ctx)


def run_reference(spec: RunSpec, task: Task, ctx: RunContext) -> dict:
    """Real test volumes scored as if generated (against the same real set as every row)."""
    wall = time.perf_counter()
    test = ctx.test_subjects()
    metrics, protocol, per_subject = ctx.scorer(task).score(stack_images(test), test, task, paired=False)
    return {"metrics": metrics, "protocol": protocol, "per_subject": per_subject,
            "cost": {"wall_seconds": time.perf_counter() - wall}}


def run_reference_other(spec: RunSpec, task: Task, ctx: RunContext) -> dict:
    """What a perfect generator that ignores its condition scores: real volumes, others' conditions."""
    from benchmark.engine.probe import derangement

    wall = time.perf_counter()
    test = ctx.test_subjects()
    other = derangement(len(test), spec.seed)
    metrics, protocol, per_volume = ctx.scorer(task).dice(stack_images(test), [test[j] for j in other])
    protocol["row"] = "real test volumes against another test subject's condition (a fixed derangement)"
    protocol["derangement"] = other.tolist()
    return {"metrics": metrics, "protocol": protocol, "per_subject": {"ids": [s.id for s in test], "Dice": per_volume},
            "cost": {"wall_seconds": time.perf_counter() - wall}}


def run_autoencoder(spec: RunSpec, task: Task, ctx: RunContext) -> dict:
    """The ceiling a latent generator can reach: each test volume encoded to its posterior mean and
    decoded, scored like a method's samples."""
    wall = time.perf_counter()
    test = ctx.test_subjects()
    batch = int(ctx.profile.sampling.batch_size)
    base = ctx.base  # loaded (or pretrained) before gradients are switched off
    out = []
    with torch.no_grad():
        for start in range(0, len(test), batch):
            images = torch.from_numpy(stack_images(test[start : start + batch])).to(ctx.device)
            mu, _ = base.encode(images)
            out.append(base.decode(mu).clamp(0, 1).float().cpu().numpy())
    result = {"cost": {"trainable_parameters": 0},
              "control_probe": {"not_applicable": "the autoencoder's reconstruction has no condition to follow"}}
    return finish(spec, task, ctx, test, np.concatenate(out), task, result, wall)


def run_base_unconditioned(spec: RunSpec, task: Task, ctx: RunContext) -> dict:
    """The frozen base model alone, from the same noise as every method."""
    wall = time.perf_counter()
    test = ctx.test_subjects()
    sampling = ctx.profile.sampling
    generated = sample_unconditioned(ctx.base, test, task, sampling.ddim_steps, sampling.batch_size,
                                     spec.seed, ctx.device, ctx.progress)
    result = {"cost": {"trainable_parameters": 0},
              "control_probe": {"not_applicable": "the base model alone has no spatial condition"}}
    return finish(spec, task, ctx, test, generated, task, result, wall)


def run_method(spec: RunSpec, task: Task, ctx: RunContext) -> dict:
    """Fit the method (a sphere-validation run reuses the method's own run), generate, score."""
    from metrics.cost import PeakMemory

    wall = time.perf_counter()
    test = ctx.test_subjects()
    trained = spec.trained()
    method = build_method(trained.method, task, ctx, spec.seed)
    subjects = ctx.data.train_subjects(spec.size)
    session = run_session(trained, ctx, len(subjects))
    fit_start = time.perf_counter()
    with PeakMemory(ctx.device) as memory:
        info = dict(method.fit(subjects, task, session) or {})
    fit_seconds = time.perf_counter() - fit_start
    sample_task = task
    if spec.kind is RunKind.SPHERE_VALIDATION:
        from benchmark.run.sphere_masks import sphere_task

        sample_task = sphere_task(task)
    torch.manual_seed(stable_seed(spec.seed, "sampling"))
    method.eval()
    kept = ctx.run_dir(spec) / KEPT_BATCHES
    generated, gen_seconds = generate(method, test, sample_task, session, ctx, keep_in=kept)
    swapped = None
    if task.dice is not None and spec.kind is RunKind.METHOD:  # the method's own null: another subject's condition
        from benchmark.engine.probe import derangement

        other = derangement(len(test), spec.seed)
        torch.manual_seed(stable_seed(spec.seed, "sampling"))
        swapped = (other, generate(method, test, sample_task, session, ctx, [test[j] for j in other], keep_in=kept)[0])
    if session.train_result is not None:  # trained by the suite's loop: its cost, and the control probe
        train = session.train_result
        result = {"training": {**training_fields(info), "lr": session.settings.lr},
                  "cost": ctx.scorer(task).cost(method, train, spec.size)}
        if "distributed" in train.extra:  # trained by several ranks (a one-process record has no such field)
            result["training"]["distributed"] = train.extra["distributed"]
        if session.probe is not None:
            result["control_probe"] = {"protocol": session.probe.describe(), "history": train.extra["control_probe"]}
    else:  # the method fitted itself
        result = direct_fields(method, info, ctx, fit_seconds, gen_seconds, len(test), memory.summary())
        result["control_probe"] = {"not_applicable": f"{spec.method} generates volumes directly; it has no noise "
                                                     "prediction to probe"}
    record = finish(spec, task, ctx, test, generated, sample_task, result, wall, swapped)
    shutil.rmtree(kept, ignore_errors=True)  # in samples.npz now
    return record


RUNS = {
    RunKind.AUTOENCODER: run_autoencoder,
    RunKind.METHOD: run_method,
    RunKind.SPHERE_VALIDATION: run_method,
    RunKind.REFERENCE: run_reference,
    RunKind.REFERENCE_OTHER: run_reference_other,
    RunKind.BASE_UNCONDITIONED: run_base_unconditioned,
}


# ---- shared steps ---------------------------------------------------------------------------


def generate(method: BaseMethod, test, task: Task, session: RunSession, ctx: RunContext,
             condition_subjects=None, keep_in: Path | None = None) -> tuple[np.ndarray, float]:
    """``method.generate`` on the test subjects, batch by batch: (N, 1, X, Y, Z) float32 in [0, 1], and
    the seconds that took. ``condition_subjects`` (one per test subject) gives the spatial conditions
    instead, each subject keeping its own noise and scalars: the swapped-condition null. Every batch is
    checked against ``generate``'s contract (``methods.base.check_generated``).

    With ``keep_in``, each finished batch is kept there with its subjects, the method's
    ``generate_info``, its seconds and the global torch generator's state after it; a later call (an
    interrupted run resumed, from the same checkpoint) reads it back instead of generating it again and
    restores that state, so the batches after it are those an uninterrupted run makes."""
    from methods.base import DirectMethod, check_generated

    batch_size = ctx.profile.sampling.batch_size
    givers = test if condition_subjects is None else condition_subjects
    tag = "own" if condition_subjects is None else "swapped"
    out, seconds = [], 0.0
    desc = f"generate {method.name}" + ("" if condition_subjects is None else " (swapped conditions)")
    for start in tqdm(range(0, len(test), batch_size), desc=desc, disable=not ctx.progress, leave=False):
        chunk, chunk_givers = test[start : start + batch_size], givers[start : start + batch_size]
        ids = np.array([s.id for s in chunk] + [s.id for s in chunk_givers])
        path = Path(keep_in) / f"{tag}-{start:05d}.npz" if keep_in is not None else None
        kept = _kept_batch(path, ids)
        if kept is not None:
            volumes, method.generate_info, spent, rng_state = kept
            torch.set_rng_state(rng_state)
        else:
            began = time.perf_counter()
            conditions = condition_batch(task, chunk_givers, device=ctx.device)
            made = method.generate(conditions, scalar_batch(chunk, ctx.device), chunk, session)
            # Finite values are required of direct methods, whose volumes no engine check has seen; a steering
            # method's are the sampler's and are scored as before.
            check_generated(method.name, made, (len(chunk), 1, *ctx.profile.image_shape),
                            finite=isinstance(method, DirectMethod))
            volumes = made.detach().clamp(0, 1).float().cpu().numpy()
            spent = time.perf_counter() - began
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_npz(path, volumes=volumes, ids=ids, seconds=spent, rng_state=torch.get_rng_state().numpy(),
                           generate_info=json.dumps(method.generate_info, default=jsonable))
        seconds += spent
        out.append(volumes)
    generated = np.concatenate(out) if out else np.zeros((0, 1, *ctx.profile.image_shape), np.float32)
    return generated, seconds


def _kept_batch(path: Path | None, ids: np.ndarray) -> tuple[np.ndarray, dict, float, torch.Tensor] | None:
    """A batch an earlier attempt kept for the same subjects and conditions: volumes, generate_info,
    seconds and the global torch generator's state after it."""
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path) as kept:
            if not np.array_equal(kept["ids"], ids):
                return None
            return (kept["volumes"], json.loads(str(kept["generate_info"])), float(kept["seconds"]),
                    torch.from_numpy(kept["rng_state"].copy()))
    except (OSError, ValueError, KeyError):  # a damaged file: generate the batch again
        return None


def finish(spec: RunSpec, task: Task, ctx: RunContext, test, generated: np.ndarray, conditions_used,
           result: dict, wall: float, swapped=None) -> dict:
    """Save the samples, score them, add the probe's summary columns, the Control Δ of the swapped-condition
    samples (``swapped``: the derangement and the volumes) and the wall time."""
    save_samples(ctx.run_dir(spec), test, generated, conditions_used)
    save_real(ctx.out_dir, test)
    result["metrics"], result["protocol"], result["per_subject"] = ctx.scorer(task).score(generated, test, conditions_used)
    if swapped is not None:
        other, volumes = swapped
        result["per_subject"]["Dice swapped"] = ctx.scorer(task).dice(volumes, test)[2]
        delta = paired_difference(result["per_subject"]["Dice"], result["per_subject"]["Dice swapped"], seed=spec.seed)
        result["metrics"].update({CONTROL_DELTA: delta["mean"], f"{CONTROL_DELTA} CI low": delta["ci_low"],
                                  f"{CONTROL_DELTA} CI high": delta["ci_high"], f"{CONTROL_DELTA} p": delta["p_value"],
                                  "Dice swapped": float(np.nanmean(result["per_subject"]["Dice swapped"]))})
        result["protocol"][CONTROL_DELTA] = {
            "definition": "Dice(own condition) - Dice(another test subject's condition) of the method's samples, "
                          "both scored against each subject's own condition; the same initial noise and scalars",
            "derangement": other.tolist(), "bootstrap": "percentile, 2000 resamples over subjects",
            "verdict": "follows its condition when the 95% CI lies above 0 (tables: Holm-corrected across methods)"}
    history = result.get("control_probe", {}).get("history")
    if history and spec.kind is not RunKind.SPHERE_VALIDATION:
        from benchmark.engine.probe import summary_columns

        result["metrics"].update(summary_columns(history[-1]))
    result["cost"]["wall_seconds"] = time.perf_counter() - wall
    if "base" in vars(ctx):  # the run used the base model: say which one (shipped, pretrained here, BrainLDM)
        result["base_model"] = getattr(ctx.base, "origin", {})
    return result


def training_fields(info: dict) -> dict:
    losses = [float(v) for v in info.get("losses", [])]
    return {"steps": int(info.get("steps", len(losses))), "final_loss": losses[-1] if losses else None,
            "first_loss": losses[0] if losses else None, "loss_curve": losses[:: max(1, len(losses) // 100)],
            "resumed_from": int(info.get("resumed_from", 0))}


def direct_fields(method: BaseMethod, info: dict, ctx: RunContext, fit_seconds: float, gen_seconds: float,
                  n_test: int, memory: dict) -> dict:
    """The record's training and cost of a method that fitted itself (not through a run session)."""
    from metrics.cost import PAPER_PROTOCOL, count_parameters, device_days

    params = count_parameters(method)
    cost = {
        "trainable_parameters": params["trainable"],
        "method_parameters": params["total"],
        "seconds_per_step": info.get("seconds_per_step"),
        "train_wall_seconds": fit_seconds,
        "generate_wall_seconds": gen_seconds,
        "generate_seconds_per_volume": gen_seconds / max(n_test, 1),
        **{k: v for k, v in memory.items() if k != "peak_memory_gib"},
    }
    if method.uses_base_model:
        cost["base_parameters"] = sum(ctx.base.num_parameters().values())
    if method.generate_info.get("seconds_per_step") is not None:  # optimisation at test time (InverseSR)
        cost["generate_seconds_per_step"] = method.generate_info["seconds_per_step"]
    if info.get("batch_size"):
        cost["batch_size"] = int(info["batch_size"])
    sps = info.get("seconds_per_step")
    if sps is not None and np.isfinite(sps) and info.get("losses"):
        # The same projection as the diffusion methods: the paper's protocol.
        projection = device_days(sps, **PAPER_PROTOCOL, device=ctx.device,
                                 measured_batch_size=cost.get("batch_size"))
        cost["device_days_paper_protocol"] = projection["device_days"]
        cost["device_days_rule"] = projection["rule"] + (f"; {projection['scaling']}" if projection["scaling"] else "")
    fields = {"training": training_fields(info), "cost": cost}
    if method.generate_info:
        fields["generation"] = method.generate_info
    return fields


def stack_images(subjects) -> np.ndarray:
    return np.stack([s.image for s in subjects]).astype(np.float32)


def save_samples(run_dir: Path, subjects, generated: np.ndarray, task) -> None:
    """Generated volumes and, for the record, the conditions they were generated from."""
    conditions = {}
    for name in task.modalities:
        conditions[f"condition_{name}"] = np.stack([task.conditions(s)[name] for s in subjects]).astype(np.float16)
    atomic_npz(run_dir / "samples.npz", ids=np.array([s.id for s in subjects]),
                volumes=generated.astype(np.float16), **conditions)


def save_real(out_dir: Path, subjects, name: str = "real_test") -> Path:
    """The real volumes of ``subjects`` once per results folder, for montages beside the generated ones."""
    path = out_dir / "runs" / f"{name}.npz"
    if not path.is_file():
        atomic_npz(path, ids=np.array([s.id for s in subjects]), volumes=stack_images(subjects).astype(np.float16),
                    lv_mask=np.stack([s.lv_mask for s in subjects]).astype(np.uint8))
    return path
