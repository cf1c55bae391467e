"""The one resumable training loop of the suite.

One step: set the learning rate (``lr_at``), zero the gradients, ``loss, logs = step_fn(step)``,
check that the loss is finite, backward (unless ``step_fn`` returned a float: it backpropagated
itself, e.g. in micro-batches), clip the gradient norm, optimiser step, scheduler step, EMA update.
When a checkpoint is due, ``on_checkpoint(done)`` runs first (so what it adds to ``extra_state`` is
saved) and then the checkpoint is written atomically: module, optimiser, scheduler, the state of
every generator in ``rngs`` (and of the global torch/CUDA/numpy/python generators with
``global_rngs``), EMA, step, training seconds, loss history, running logs and ``extra_state``.
``run`` resumes from it, so an interrupted run ends with the same weights, bit for bit, as an
uninterrupted one, provided ``step_fn`` draws its randomness from ``rngs`` only.
"""
from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from core.files import atomic_torch_save

FORMAT = "core.loop/1"  # checkpoints of another format are refused, never half-read
StepFn = Callable[[int], tuple[torch.Tensor | float, dict[str, Any]]]
Rng = torch.Generator | np.random.Generator | np.random.RandomState | random.Random


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite (the default error; ``on_diverged`` may supply another)."""


@dataclass
class LoopSettings:
    """What decides the numbers. Every default is stated here; a user that needs another value says so
    (pretraining: checkpoint_at_end=False, grad_clip=1.0, its ema_decay, check_finite=False)."""

    steps: int                         # optimiser steps in all
    checkpoint_every: int | None = None  # a checkpoint after every n-th step (None or 0: none)
    checkpoint_at_end: bool = True     # and one after the last step
    grad_clip: float | None = None     # max norm of the optimiser's parameters' gradient (None: no clipping)
    ema_decay: float = 0.0             # EMA of the weights, loaded into the module after the last step (0: none)
    log_weight: float = 0.02           # a step's weight in the running logs; 1 - 0.02 is exactly 0.98
    check_finite: bool = True          # a non-finite loss raises before the optimiser step
    global_rngs: bool = False          # also checkpoint the global torch, CUDA, numpy and python generators
    timing_warmup: int = 3             # steps left out of seconds_per_step (at most half of them)
    desc: str = "train"                # progress bar label
    progress: bool = True

    def __post_init__(self) -> None:
        if self.steps < 0 or (self.checkpoint_every or 0) < 0 or self.timing_warmup < 0:
            raise ValueError(f"steps, checkpoint_every and timing_warmup cannot be negative: {self}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1) (0: no averaging), got {self.ema_decay}")
        if (self.grad_clip is not None and not self.grad_clip > 0) or not 0.0 < self.log_weight <= 1.0:
            raise ValueError(f"grad_clip must be positive or None and log_weight in (0, 1]: {self}")


@dataclass
class LoopResult:
    steps: int                       # steps done over every call (settings.steps once finished)
    resumed_from: int                # the step this call started from
    seconds: float                   # training seconds over every call (kept in the checkpoint)
    wall_seconds: float              # this call's
    seconds_per_step: float | None   # median of this call's steps after the warm-up steps
    losses: list[float]              # every step's loss, over every call
    running: dict[str, float]        # running averages of step_fn's logs
    finished: bool


def warmup_cosine_lr(base_lr: float, total: int, warmup: int, floor: float) -> Callable[[int], float]:
    """The learning rate of a step (for ``lr_at``): linear warm-up to ``base_lr`` over ``warmup`` steps
    (step 0 at base_lr / warmup), then half a cosine down to ``floor * base_lr`` (pretraining: 0.01)."""
    def lr_at(step: int) -> float:
        if warmup > 0 and step < warmup:
            return base_lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return base_lr * (floor + (1 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))
    return lr_at


_RNG_ACCESS = {  # kind: (get state, set state)
    torch.Generator: (lambda r: r.get_state(), lambda r, s: r.set_state(s)),
    np.random.Generator: (lambda r: r.bit_generator.state, lambda r, s: setattr(r.bit_generator, "state", s)),
    np.random.RandomState: (lambda r: r.get_state(), lambda r, s: r.set_state(s)),
    random.Random: (lambda r: r.getstate(), lambda r, s: r.setstate(s)),
}


def _rng_access(r) -> tuple[Callable, Callable]:
    kind = next((k for k in _RNG_ACCESS if isinstance(r, k)), None)
    if kind is None:
        raise TypeError(f"cannot checkpoint a generator of type {type(r).__name__}")
    return _RNG_ACCESS[kind]


def _global_rngs() -> dict[str, Any]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return {"torch": torch.get_rng_state(), "cuda": cuda, "numpy": np.random.get_state(), "python": random.getstate()}


def _set_global_rngs(g: dict[str, Any]) -> None:
    torch.set_rng_state(g["torch"])
    np.random.set_state(g["numpy"])
    random.setstate(g["python"])
    if g["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(g["cuda"])


class TrainingLoop:
    """Trains ``module`` with ``optimizer`` for ``settings.steps`` steps of ``step_fn(step)``.

    ``step_fn(step) -> (loss, logs)``: ``loss`` a tensor (the loop backpropagates it) or a float
    (``step_fn`` already did); ``logs`` floats or 0-d tensors averaged into ``running``. The learning
    rate comes from ``schedule`` (a torch scheduler, stepped after the optimiser) or ``lr_at(step)``
    (absolute, set on every parameter group before the step), or neither. ``rngs``: every generator
    ``step_fn`` draws from. ``extra_state``: a dict saved with the checkpoint and updated in place on
    resume. ``on_step(done, loss, logs)`` runs after every step (an exception stops training; the
    next run resumes from the last checkpoint); ``on_diverged(done, loss)`` makes the exception a
    non-finite loss raises. ``writes_checkpoint=False`` (data-parallel ranks other than 0) resumes from
    the checkpoint and keeps the same state, but leaves writing it to the one rank that does.
    """

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, step_fn: StepFn,
                 settings: LoopSettings, *, checkpoint_path: str | Path | None = None, schedule=None,
                 lr_at: Callable[[int], float] | None = None, rngs: Sequence[Rng] = (),
                 extra_state: dict | None = None, on_checkpoint: Callable[[int], None] | None = None,
                 on_step: Callable[[int, float, dict], None] | None = None,
                 on_diverged: Callable[[int, float], BaseException] | None = None, writes_checkpoint: bool = True):
        if schedule is not None and lr_at is not None:
            raise ValueError("give a learning-rate schedule or lr_at, not both")
        if settings.checkpoint_every and checkpoint_path is None:
            raise ValueError("checkpoint_every needs a checkpoint_path")
        self.module, self.optimizer, self.step_fn, self.settings = module, optimizer, step_fn, settings
        self.path = Path(checkpoint_path) if checkpoint_path is not None else None
        self.schedule, self.lr_at, self.rngs = schedule, lr_at, list(rngs)
        self._access = [_rng_access(r) for r in self.rngs]  # an unsupported kind fails now, not at a checkpoint
        self.extra = extra_state if extra_state is not None else {}
        self.on_checkpoint, self.on_step, self.on_diverged = on_checkpoint, on_step, on_diverged
        self.writes_checkpoint = writes_checkpoint
        # Copied now, from the initial weights; a resumed run overwrites it from the checkpoint.
        decay = settings.ema_decay
        self.ema = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(decay)) if decay > 0 else None
        self.step, self.seconds, self.losses, self.running = 0, 0.0, [], {}
        self._resumed = False

    def state_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "step": self.step, "seconds": self.seconds, "model": self.module.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict() if self.schedule is not None else None,
                "rngs": [get(r) for r, (get, _) in zip(self.rngs, self._access)],
                "global_rngs": _global_rngs() if self.settings.global_rngs else None,
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "losses": list(self.losses), "running": dict(self.running), "extra": dict(self.extra)}

    def resume(self) -> int:
        """Load the checkpoint, if there is one, once; returns the step training continues from.
        Call it before ``run`` to act on a fresh start (e.g. measure something at step 0)."""
        if not self._resumed and self.path is not None and self.path.is_file():
            self._load()
        self._resumed = True
        return self.step

    def _load(self) -> None:
        try:  # our own file (RNG states are not tensors): weights_only would refuse it
            s = torch.load(self.path, map_location="cpu", weights_only=False)
            if not isinstance(s, dict) or s.get("format") != FORMAT or len(s["rngs"]) != len(self.rngs):
                raise ValueError(f"not a {FORMAT} checkpoint with {len(self.rngs)} generators")
        except Exception as err:
            raise ValueError(f"the training checkpoint {self.path} cannot be resumed ({type(err).__name__}: "
                             f"{err}); delete it to train from the start") from err
        self.module.load_state_dict(s["model"])
        self.optimizer.load_state_dict(s["optimizer"])
        if self.schedule is not None:
            self.schedule.load_state_dict(s["schedule"])
        for r, (_, set_state), state in zip(self.rngs, self._access, s["rngs"]):
            set_state(r, state)
        if self.settings.global_rngs and s["global_rngs"]:
            _set_global_rngs(s["global_rngs"])
        if self.ema is not None:
            self.ema.load_state_dict(s["ema"])
        self.step, self.seconds = int(s["step"]), float(s["seconds"])
        self.losses, self.running = list(s["losses"]), dict(s["running"])
        self.extra.update(s["extra"])

    def _checkpoint_due(self, done: int) -> bool:
        s = self.settings
        if self.path is None:
            return False
        if done == s.steps:
            return s.checkpoint_at_end
        return bool(s.checkpoint_every) and done % s.checkpoint_every == 0

    def _one_step(self, step: int, params: list[torch.Tensor]) -> tuple[float, dict]:
        s, opt = self.settings, self.optimizer
        if self.lr_at is not None:
            lr = self.lr_at(step)
            for group in opt.param_groups:
                group["lr"] = lr
        opt.zero_grad(set_to_none=True)  # before step_fn: it may backpropagate itself
        loss, logs = self.step_fn(step)
        tensor = isinstance(loss, torch.Tensor)
        value = float(loss.detach()) if tensor else float(loss)
        if s.check_finite and not math.isfinite(value):  # before the update: the weights stay usable
            make = self.on_diverged or (lambda n, v: TrainingDiverged(
                f"{s.desc}: the loss became {v} at step {n}; lower the learning rate or check the inputs"))
            raise make(step + 1, value)
        if tensor:
            loss.backward()
        if s.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        opt.step()
        if self.schedule is not None:
            self.schedule.step()
        if self.ema is not None:
            self.ema.update_parameters(self.module)
        return value, {k: float(v) for k, v in logs.items()}

    def run(self, stop_after: int | None = None) -> LoopResult:
        """Train from the checkpoint (if any) to ``settings.steps``; ``stop_after`` ends the call
        after that many steps, without a checkpoint of its own, as a kill would (for tests)."""
        s, start = self.settings, self.resume()
        end = s.steps if stop_after is None else min(s.steps, start + stop_after)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        cuda = any(p.is_cuda for p in params)
        sync = torch.cuda.synchronize if cuda else (lambda: None)  # time the GPU's work, not its queueing
        times: list[float] = []
        call_start, seconds_before = time.perf_counter(), self.seconds
        self.module.train()
        bar = tqdm(total=s.steps, initial=start, desc=s.desc, unit="step", disable=not s.progress, leave=False)
        try:
            for step in range(start, end):
                sync()
                t0 = time.perf_counter()
                value, logs = self._one_step(step, params)
                sync()
                times.append(time.perf_counter() - t0)
                done = self.step = step + 1
                self.losses.append(value)
                w = s.log_weight
                self.running = {k: (1 - w) * self.running[k] + w * v if k in self.running else v
                                for k, v in logs.items()}
                bar.update(1)
                bar.set_postfix({k: f"{v:.4f}" for k, v in {"loss": value, **self.running}.items()}, refresh=False)
                if self._checkpoint_due(done):
                    if self.on_checkpoint is not None:
                        self.on_checkpoint(done)
                    self.seconds = seconds_before + time.perf_counter() - call_start
                    if self.writes_checkpoint:
                        atomic_torch_save(self.state_dict(), self.path)
                if self.on_step is not None:
                    self.on_step(done, value, logs)
        finally:
            bar.close()
            self.seconds = seconds_before + time.perf_counter() - call_start
        finished = self.step >= s.steps
        if finished and self.ema is not None:
            self.module.load_state_dict(self.ema.module.state_dict())
        measured = times[min(s.timing_warmup, max(len(times) - 1, 0) // 2):]
        return LoopResult(self.step, start, self.seconds, time.perf_counter() - call_start,
                          statistics.median(measured) if measured else None, list(self.losses),
                          dict(self.running), finished)
