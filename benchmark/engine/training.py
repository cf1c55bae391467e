"""Method training: everything a method does not do itself.

Every step draws a fresh latent sample z = mu + sigma * e, a uniform random DDPM timestep and
noise, applies the task's modality drop, and asks the method for its loss. AdamW with the VCM
authors' schedule (warm-up, cosine to lr/10) or linear warm-up and annealing; the minibatch's
gradient may be accumulated over micro-batches, under bf16 autocast on CUDA
(``training.micro_batch_size``, ``mixed_precision``). Checkpoints are written atomically as
training goes and an interrupted run resumes from the last one with the same numbers. Under a
torch.distributed process group each rank backpropagates its share of every minibatch
(``benchmark.engine.distributed``); rank 0 alone probes, logs and writes."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from core.loop import LoopSettings, TrainingDiverged, TrainingLoop  # TrainingDiverged: the engine's error too
from datasets.subject import Subject
from datasets.tasks import Task
from methods.base import FrozenLDM, Method, check_noise_prediction
from methods.registry import known_methods
from metrics.cost import PeakMemory

from benchmark.engine import distributed
from benchmark.engine.latents import ConditionStore, LatentCache, scalar_batch, stable_seed
from benchmark.engine.recipes import load_recipe

# Learning-rate schedules of method training (training.schedule): "authors" = the VCM authors'
# warm-up of 1/30 of the run from lr/10 to lr, then cosine to lr/10; "linear" = training.warmup_steps
# of linear warm-up from 0, then linear to 0.
SCHEDULES = ("authors", "linear")


# ---- training --------------------------------------------------------------------------


@dataclass
class TrainSettings:
    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int
    checkpoint_every: int
    # Given by the profile (training.*) by name, never defaulted here:
    micro_batch_size: int | None = field(kw_only=True)  # gradients accumulated over micro-batches of this size (None: none)
    mixed_precision: str = field(kw_only=True)          # "bf16": autocast on CUDA (the VCM authors' setting)
    schedule: str = field(kw_only=True)                 # learning-rate schedule, see SCHEDULES
    warmup_fraction: float = field(kw_only=True)        # "authors" schedule: warm-up share of the run
    lr_floor: float = field(kw_only=True)               # "authors" schedule: lr multiplier at both ends
    flip_probability: float = field(kw_only=True)       # left-right flip of a training example
    fused_optimizer: bool = field(kw_only=True)         # speed.fused_optimizer: AdamW's fused kernel (same update)

    def __post_init__(self) -> None:
        if self.micro_batch_size is None:
            self.micro_batch_size = self.batch_size
        if self.micro_batch_size < 1:
            raise ValueError(f"training.micro_batch_size must be at least 1, got {self.micro_batch_size}")
        self.micro_batch_size = min(self.micro_batch_size, self.batch_size)
        if self.mixed_precision not in ("fp32", "bf16"):
            raise ValueError(f"training.mixed_precision must be 'fp32' or 'bf16', got {self.mixed_precision!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"training.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.schedule == "authors" and not (0 <= self.warmup_fraction < 1 and 0 <= self.lr_floor <= 1):
            raise ValueError("the 'authors' schedule needs training.warmup_fraction in [0, 1) and training.lr_floor "
                             f"in [0, 1] in the profile, got {self.warmup_fraction} and {self.lr_floor}")
        if not 0 <= self.flip_probability <= 1:
            raise ValueError(f"training.flip_probability must lie in [0, 1] (set it in the profile), got {self.flip_probability}")

    def lr_factor(self) -> Callable[[int], float]:
        """The learning-rate multiplier per step (for ``torch.optim.lr_scheduler.LambdaLR``)."""
        if self.schedule == "linear":
            return warmup_then_linear(self.warmup_steps, self.steps)
        return warmup_then_cosine(self.steps, self.warmup_fraction, self.lr_floor)

    @classmethod
    def from_profile(cls, profile, n_train: int, method: str | None = None, task: str | None = None,
                     chosen: dict | None = None) -> "TrainSettings":
        """The profile's training settings for ``method``: the tuned recipe's choice for ``method`` on
        ``task`` where there is one (``benchmark/recipes``; or ``chosen``, dotted keys), else its
        ``training.lr_by_method`` entry, else ``training.lr``. Steps follow ``training.budget``."""
        t = profile.training
        steps = budget_steps(profile, n_train)
        lr_by_method = dict(t.get("lr_by_method") or {})
        unknown = sorted(set(lr_by_method) - set(known_methods()))
        if unknown:
            raise ValueError(f"training.lr_by_method names {', '.join(map(repr, unknown))}, which is not a method; "
                             f"use one of: {', '.join(known_methods())}")
        if chosen is None:
            recipe = load_recipe(profile, task) if task is not None and method is not None else None
            chosen = recipe.chosen(method) if recipe is not None else {}
        lr = float(chosen.get("training.lr", lr_by_method.get(method, t.lr)))
        return cls(steps, int(t.batch_size), lr, float(t.weight_decay),
                   int(t.warmup_steps), int(t.checkpoint_every), micro_batch_size=int(t.micro_batch_size),
                   mixed_precision=str(t.mixed_precision), schedule=str(t.schedule),
                   warmup_fraction=float(t.warmup_fraction), lr_floor=float(t.lr_floor),
                   flip_probability=float(t.flip_probability),
                   fused_optimizer=bool(profile.speed.fused_optimizer))


BUDGETS = ("steps", "epochs")


def budget_steps(profile, n_train: int) -> int:
    """Training steps at ``n_train`` subjects by ``training.budget``: ``steps``, the same at every N (what
    a fixed compute buys); ``epochs``, epochs x ceil(N / batch_size) (the paper's rule)."""
    t = profile.training
    budget = t.get("budget", "steps" if int(t.steps) > 0 else "epochs")
    if budget not in BUDGETS:
        raise ValueError(f"training.budget must be one of {', '.join(BUDGETS)}, got {budget!r}")
    if budget == "steps":
        if int(t.steps) < 1:
            raise ValueError(f"training.budget is 'steps' but training.steps is {t.steps}; give a positive number")
        return int(t.steps)
    return int(t.epochs) * math.ceil(n_train / int(t.batch_size))


@dataclass
class TrainResult:
    steps: int
    losses: list[float]
    seconds_per_step: float | None  # median over the steps after the warm-up steps
    wall_seconds: float
    peak_memory: dict = field(default_factory=dict)
    resumed_from: int = 0
    extra: dict = field(default_factory=dict)


def warmup_then_cosine(total_steps: int, warmup_fraction: float, floor: float) -> Callable[[int], float]:
    """The VCM authors' schedule (their script's ``CosineAnnealingWarmupRestarts`` over one cycle):
    linear from ``floor * lr`` to ``lr`` over the first ``warmup_fraction`` of the steps (the script:
    1/30, floor 0.1), then half a cosine back down to ``floor * lr`` at the last step."""
    warmup = int(total_steps * warmup_fraction)

    def factor(step: int) -> float:
        if step < warmup:
            return floor + (1.0 - floor) * step / warmup
        progress = (step - warmup) / max(total_steps - warmup, 1)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def warmup_then_linear(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        remaining = max(total_steps - warmup_steps, 1)
        return max(0.0, 1.0 - (step - warmup_steps) / remaining)

    return factor


def backward_in_micro_batches(loss_of: Callable[[object], torch.Tensor], n: int, micro_batch_size: int,
                              precision: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                              share: range | None = None) -> float:
    """Backpropagate a minibatch of ``n`` examples in micro-batches; returns the minibatch's loss.

    ``loss_of(index)`` is the mean loss of the examples at ``index``; each micro-batch's loss is
    weighted by its share of the minibatch, so the accumulated gradient is the minibatch's (the
    VCM authors split their minibatch of 16 over GPUs, 2 per GPU). ``share``: the examples this
    data-parallel rank backpropagates (default all), still weighted by their share of all ``n``; the
    loss returned is then their part of it. Stops at the first non-finite loss, before its backward,
    and returns it.
    """
    share = range(n) if share is None else share
    if len(share) == n and micro_batch_size >= n:
        parts = [slice(None)]
    else:
        parts = torch.split(torch.arange(share.start, share.stop), micro_batch_size)
    value = 0.0
    for part in parts:
        weight = 1.0 if isinstance(part, slice) else len(part) / n  # of the whole minibatch, on every rank
        with precision():
            loss = loss_of(part)
        part_value = float(loss.detach())
        if not math.isfinite(part_value):
            return part_value
        (loss * weight).backward()
        value += part_value * weight
    return value


@contextlib.contextmanager
def checking_first_prediction(method: Method):
    """Within this block, the first call of ``method.predict_noise`` (the control probe's before the first
    step, or the training loss's) is checked against the noisy latent it was given. An instance
    attribute shadows the method's own ``predict_noise`` until that call: no extra forward pass, so the
    numbers stay those of an unchecked run. (A ``training_loss`` that does not call ``predict_noise`` is
    checked at sampling.)"""
    predict_noise = method.predict_noise

    def checked(z_t, t, conditions, scalars):
        del method.predict_noise  # once is enough: the method's own from the next call on
        eps = predict_noise(z_t, t, conditions, scalars)
        check_noise_prediction(method.name, eps, z_t)
        return eps

    method.predict_noise = checked
    try:
        yield
    finally:
        vars(method).pop("predict_noise", None)


def train_method(
    method: Method,
    base: FrozenLDM,
    subjects: Sequence[Subject],
    task: Task,
    settings: TrainSettings,
    latents: LatentCache,
    run_dir: Path,
    seed: int,
    device: str = "cpu",
    progress: bool = True,
    stop_after: int | None = None,
    probe=None,
) -> TrainResult:
    """Train ``method`` on ``subjects``; resumes from ``run_dir/checkpoint.pt`` if present.

    ``stop_after`` ends the call after that many steps without a final checkpoint, as a kill
    would; used to test resumption. ``probe`` (a :class:`benchmark.engine.probe.ControlProbe`)
    is measured before the first step and at every checkpoint; its history is kept in the
    checkpoint and returned in ``TrainResult.extra["control_probe"]``.

    Under a process group every rank calls this alike; rank 0 alone probes, shows progress and writes
    the checkpoint, and ``TrainResult.extra["distributed"]`` says how the minibatch was split. Rank 0's
    first call in a process tells the other ranks, waiting in ``distributed.wait_for_lead``, that the
    caches they read are written.
    """
    rank, world_size = distributed.rank_and_size()
    writer = rank == 0
    probe, progress = (probe, progress) if writer else (None, False)
    run_dir = Path(run_dir)
    if writer:
        run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / "checkpoint.pt"
    torch.manual_seed(stable_seed(seed, "init"))
    method.to(device)
    method.prepare(subjects)
    params = method.trainable_parameters()
    if not params:
        raise ValueError(f"method '{method.name}' has no trainable parameters; nothing to train")
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay,
                                  fused=settings.fused_optimizer or None)  # None: PyTorch's default kernel
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, settings.lr_factor())
    rng = np.random.default_rng(stable_seed(seed, "batches"))
    noise_gen = torch.Generator().manual_seed(stable_seed(seed, "noise"))
    batch_n = min(settings.batch_size, len(subjects))
    mine = distributed.shares(batch_n, world_size)[rank]  # every rank draws the whole batch, then takes its share
    extra: dict = {"probe_history": []}  # kept in the checkpoint; a resumed run's replaces the list

    def measure_probe(step: int) -> None:
        history = extra["probe_history"]  # read now: resuming replaces the list
        if probe is not None and not any(h["step"] == step for h in history):
            start = time.perf_counter()
            result = probe.measure(method)
            history.append({"step": step, **result, "seconds": time.perf_counter() - start})

    def train_step(step: int) -> tuple[float, dict]:
        batch = rng.choice(len(subjects), size=min(settings.batch_size, len(subjects)),
                           replace=len(subjects) < settings.batch_size)
        flip = rng.random(len(batch)) < settings.flip_probability
        present = task.sample_presence(rng, len(batch))
        views = encoded[torch.from_numpy(batch), torch.from_numpy(flip.astype(np.int64))]
        mu, sigma = views[:, 0], views[:, 1]
        z0 = mu + sigma * torch.randn(mu.shape, generator=noise_gen)  # a fresh latent sample
        noise = torch.randn(z0.shape, generator=noise_gen)
        t = torch.randint(0, num_timesteps, (len(batch),), generator=noise_gen)
        z_t = base.train_scheduler.add_noise(z0, noise, t)
        conditions = conditions_all.batch(batch, present, flip, device)
        scalars, z_t, t, noise = scalars_all[torch.from_numpy(batch)].to(device), z_t.to(device), t.to(device), noise.to(device)
        loss = backward_in_micro_batches(  # a float: the micro-batches backpropagated themselves
            lambda part: method.training_loss(z_t[part], t[part], conditions.select(part), scalars[part], noise[part]),
            len(batch), settings.micro_batch_size, precision, mine)
        return (distributed.sum_over_ranks(params, loss) if world_size > 1 else loss), {}

    loop = TrainingLoop(
        method, optimizer, train_step,
        LoopSettings(settings.steps, checkpoint_every=settings.checkpoint_every, checkpoint_at_end=True,
                     desc=f"train {method.name}", progress=progress),
        checkpoint_path=ckpt_path, schedule=schedule, rngs=[rng, noise_gen], extra_state=extra,
        on_checkpoint=measure_probe,  # before the checkpoint, outside the step timing
        on_diverged=lambda n, v: TrainingDiverged(
            f"method '{method.name}' diverged: the loss became {v} at step {n}; "
            "lower training.lr in the profile or check the inputs"), writes_checkpoint=writer)
    start_step = loop.resume()

    base.train_scheduler  # noqa: B018  (fail early if the base model lacks a scheduler)
    encoded = latents.get(subjects, progress=progress)  # (N, 2, 2, C, x, y, z)
    distributed.tell_followers(True)  # rank 0: the caches the other ranks read are written now
    scalars_all = scalar_batch(subjects)
    conditions_all = ConditionStore(task, subjects, device)
    num_timesteps = base.train_scheduler.num_train_timesteps
    use_bf16 = settings.mixed_precision == "bf16" and torch.device(device).type == "cuda"  # CPU stays float32

    def precision():
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    wall_start = time.perf_counter()
    with checking_first_prediction(method):
        if start_step == 0:
            measure_probe(0)  # before training: the gap the initialisation already has
        with PeakMemory(device) as memory:
            r = loop.run(stop_after)
    extra_out = {"control_probe": extra["probe_history"]} if probe is not None else {}
    if world_size > 1:  # a one-process record stays as it was
        extra_out["distributed"] = distributed.describe(batch_n, world_size)
    return TrainResult(
        steps=r.steps,
        losses=r.losses,
        seconds_per_step=r.seconds_per_step,
        wall_seconds=time.perf_counter() - wall_start,
        peak_memory=memory.summary(),
        resumed_from=r.resumed_from,
        extra=extra_out,
    )
