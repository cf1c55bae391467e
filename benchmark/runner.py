"""The grid runner: every (task, method, size, seed) is one run that trains, samples the test
subjects, scores them and writes one record. Reruns skip finished runs; a failing run is
recorded with its error and the grid goes on.
"""
from __future__ import annotations

import hashlib
import json
import time
import traceback
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from benchmark import engine
from benchmark.datasource import DataSource
from benchmark.records import library_versions, read_record, write_record
from datasets.tasks import Task, get_task
from methods.base import DirectMethod, Method
from methods.registry import get_method
from metrics.cost import device_name

CODE_VERSION = "1"  # bump when a change invalidates finished runs

# Pseudo-methods: the reference rows of the task tables and of Table 6; not in the method registry.
REFERENCE = "reference"         # real test volumes against real training volumes
REFERENCE_OTHER = "reference_other"  # real test volumes against another test subject's condition (Dice)
BASE_UNCONDITIONED = "brainldm"  # the frozen base model alone
SPHERE_SUFFIX = "+sphere"        # a method sampled with sphere masks (out of distribution)


@dataclass(frozen=True)
class RunSpec:
    task: str
    method: str
    size: int
    seed: int

    @property
    def name(self) -> str:
        safe_method = self.method.replace("+", "_")
        return f"{self.task}__{safe_method}__n{self.size}__s{self.seed}"


class RunContext:
    """What the runs of one grid share: profile, data, base model, scorer, folders."""

    def __init__(self, profile, out_dir: Path, cache_dir: Path, weights_dir: Path | None = None,
                 manifest: Path | None = None, device: str | None = None, progress: bool = True):
        self.profile = profile
        self.out_dir = Path(out_dir)
        self.cache_dir = Path(cache_dir)
        self.weights_dir = Path(weights_dir) if weights_dir else None
        self.manifest = manifest
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.progress = progress
        self._scorers: dict[str, object] = {}

    @cached_property
    def data(self) -> DataSource:
        return DataSource(self.profile, self.cache_dir, self.manifest)

    @cached_property
    def base(self):
        from benchmark.pretrain import load_base_model

        return load_base_model(self.profile, self.cache_dir, weights_dir=self.weights_dir,
                               device=self.device, progress=self.progress)

    @cached_property
    def base_hash(self) -> str:
        state = self.base.state_dict()
        digest = hashlib.sha256()
        for key in sorted(state):
            digest.update(key.encode())
            digest.update(state[key].detach().cpu().numpy().tobytes())
        return digest.hexdigest()[:12]

    @cached_property
    def latents(self) -> engine.LatentCache:
        path = self.cache_dir / "latents" / f"{self.base_hash}_{hashlib.sha256(self.data.identity.encode()).hexdigest()[:8]}.pt"
        return engine.LatentCache(self.base, path, device=self.device)

    def test_subjects(self):
        return self.data.test_subjects(self.profile.sampling.n_test)

    def scorer(self, task: Task):
        from benchmark.scoring import Scorer

        if task.name not in self._scorers:
            self._scorers[task.name] = Scorer(self, task)
        return self._scorers[task.name]

    def run_dir(self, spec: RunSpec) -> Path:
        return self.out_dir / "runs" / spec.name

    def record_path(self, spec: RunSpec) -> Path:
        return self.out_dir / "records" / f"{spec.name}.json"

    def config_hash(self, spec: RunSpec) -> str:
        blob = json.dumps(
            {"profile": self.profile.to_dict(), "spec": asdict(spec), "code": CODE_VERSION,
             "data": self.data.identity, "weights": str(self.weights_dir)},
            sort_keys=True, default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---- one run -------------------------------------------------------------------------


def build_method(name: str, task: Task, ctx: RunContext, seed: int) -> Method:
    cls = get_method(name, task.name)
    torch.manual_seed(engine.stable_seed(seed, "init", name))  # the same initial weights per seed
    config = ctx.profile.methods.get(name, {})
    return cls(ctx.base, task.modalities, config).to(ctx.device)


def control_probe(task: Task, ctx: RunContext, seed: int):
    """The profile's control probe (``probe`` section) on the first test subjects, or None when off."""
    from benchmark.control_probe import ControlProbe

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
    settings = engine.TrainSettings.from_profile(ctx.profile, len(subjects))
    result = engine.train_method(method, ctx.base, subjects, task, settings, ctx.latents,
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
        from benchmark.control_probe import derangement

        other = derangement(len(test), spec.seed)
        metrics, protocol = ctx.scorer(task).dice(stack_images(test), [test[j] for j in other])
        protocol["row"] = "real test volumes against another test subject's condition (a fixed derangement)"
        protocol["derangement"] = other.tolist()
        return {"metrics": metrics, "protocol": protocol, "cost": {"wall_seconds": time.perf_counter() - wall}}
    if spec.method == BASE_UNCONDITIONED:
        generated = engine.sample_unconditioned(ctx.base, test, task, sampling.ddim_steps, sampling.batch_size,
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
            from benchmark.validation import sphere_task

            sample_task = sphere_task(task)
        torch.manual_seed(engine.stable_seed(spec.seed, "sampling"))
        generated = engine.sample_method(method, ctx.base, test, sample_task, sampling.ddim_steps,
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
        from benchmark.control_probe import summary_columns

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
        torch.manual_seed(engine.stable_seed(spec.seed, "init", spec.method))
        method = cls(None, task.modalities, ctx.profile.methods.get(spec.method, {})).to(ctx.device)
    subjects = ctx.data.train_subjects(spec.size)
    settings = engine.TrainSettings.from_profile(ctx.profile, len(subjects))
    fit_start = time.perf_counter()
    with PeakMemory(ctx.device) as memory:
        info = dict(method.fit(subjects, task, settings, ctx.run_dir(spec), spec.seed, ctx.progress) or {})
    fit_seconds = time.perf_counter() - fit_start
    torch.manual_seed(engine.stable_seed(spec.seed, "sampling"))
    method.eval()
    batch_size = ctx.profile.sampling.batch_size
    gen_start = time.perf_counter()
    out = []
    for start in tqdm(range(0, len(test), batch_size), desc=f"generate {method.name}", disable=not ctx.progress,
                      leave=False):
        chunk = test[start : start + batch_size]
        volumes = method.generate(engine.condition_batch(task, chunk, device=ctx.device),
                                  engine.scalar_batch(chunk, ctx.device), chunk)
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


def _atomic_npz(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)


def save_samples(run_dir: Path, subjects, generated: np.ndarray, task) -> None:
    """Generated volumes and, for the record, the conditions they were generated from."""
    conditions = {}
    for name in task.modalities:
        conditions[f"condition_{name}"] = np.stack([task.conditions(s)[name] for s in subjects]).astype(np.float16)
    _atomic_npz(run_dir / "samples.npz", ids=np.array([s.id for s in subjects]),
                volumes=generated.astype(np.float16), **conditions)


def save_real(out_dir: Path, subjects) -> None:
    """The real test volumes once per results folder, for montages beside the generated ones."""
    path = out_dir / "runs" / "real_test.npz"
    if not path.is_file():
        _atomic_npz(path, ids=np.array([s.id for s in subjects]), volumes=stack_images(subjects).astype(np.float16),
                    lv_mask=np.stack([s.lv_mask for s in subjects]).astype(np.uint8))


# ---- executors and the grid ------------------------------------------------------------


class Executor(Protocol):
    def map(self, fn: Callable[[RunSpec], dict], specs: Sequence[RunSpec]) -> Iterator[tuple[RunSpec, dict]]:
        """Apply fn to every spec (in any order, anywhere) and yield (spec, record)."""


class InProcessExecutor:
    """Runs one after another in this process. A cluster executor would submit fn(spec) as jobs."""

    def map(self, fn, specs):
        for spec in specs:
            yield spec, fn(spec)


@dataclass
class GridSummary:
    done: list[str]
    skipped: list[str]
    failed: list[tuple[str, str]]

    @property
    def ok(self) -> bool:
        return not self.failed

    def line(self) -> str:
        text = f"{len(self.done)} runs done, {len(self.skipped)} already done, {len(self.failed)} failed"
        if self.failed:
            text += ": " + "; ".join(f"{name} ({error.splitlines()[0][:160]})" for name, error in self.failed)
        return text


def run_and_record(spec: RunSpec, ctx: RunContext) -> dict:
    base_record = {
        "task": spec.task, "method": spec.method, "size": spec.size, "seed": spec.seed,
        "profile": ctx.profile.name, "config_hash": ctx.config_hash(spec),
        "versions": library_versions(), "device": device_name(ctx.device),
        "data": ctx.data.identity, "record_version": 1,
    }
    started = time.time()
    try:
        record = {**base_record, **execute_run(spec, ctx), "status": "ok"}
    except KeyboardInterrupt:
        raise
    except Exception as err:  # a failing run is recorded and the grid goes on
        record = {**base_record, "status": "failed", "error": f"{type(err).__name__}: {err}",
                  "traceback": traceback.format_exc()}
    record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    record["elapsed_seconds"] = time.time() - started
    write_record(ctx.record_path(spec), record)
    return record


def is_done(spec: RunSpec, ctx: RunContext) -> bool:
    record = read_record(ctx.record_path(spec))
    return bool(record) and record.get("status") == "ok" and record.get("config_hash") == ctx.config_hash(spec)


def run_grid(specs: Iterable[RunSpec], ctx: RunContext, executor: Executor | None = None,
             force: bool = False) -> GridSummary:
    specs = list(specs)
    todo = [s for s in specs if force or not is_done(s, ctx)]
    skipped = [s.name for s in specs if s not in todo]
    summary = GridSummary(done=[], skipped=skipped, failed=[])
    executor = executor or InProcessExecutor()
    for spec, record in tqdm(executor.map(lambda s: run_and_record(s, ctx), todo), total=len(todo),
                             desc="grid", disable=not ctx.progress):
        if record["status"] == "ok":
            summary.done.append(spec.name)
        else:
            summary.failed.append((spec.name, record["error"]))
            tqdm.write(f"run {spec.name} failed: {record['error']}")
    return summary
