"""Cost of a method: parameters, seconds per training step, peak memory, wall time, device-days.

* :func:`count_parameters`: trainable (``requires_grad``) and total parameter counts of a module.
* :class:`StepTimer`: wrap each training step (``with timer.step(): ...``); the first ``warmup``
  steps are discarded and the median of the rest is the seconds per step. On CUDA it synchronises
  before reading the clock.
* :class:`PeakMemory`: ``torch.cuda.max_memory_allocated`` on a GPU (reset when entered); on the CPU
  the peak resident set size of the process (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which is
  a high-water mark over the whole process lifetime, not just the block).
* :class:`WallTimer`: elapsed wall-clock seconds of a block.
* :func:`device_days`: seconds per step projected to the paper's protocol: ``steps = epochs *
  ceil(n_train / batch_size)``, days = steps x seconds per step / 86400, with the device recorded.
"""
from __future__ import annotations

import math
import platform
import resource
import statistics
import sys
import time
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any, Iterator

import torch
from torch import nn

from .common import MetricError


def count_parameters(module: nn.Module) -> dict[str, int]:
    """``{"trainable": n, "total": n}`` (shared parameters counted once)."""
    seen: set[int] = set()
    total = trainable = 0
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return {"trainable": int(trainable), "total": int(total)}


def device_name(device: torch.device | str | None = None) -> str:
    """A human-readable device name: the GPU model on CUDA, else the CPU model and thread count."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"CPU {cpu} ({threads} thread{'s' if threads != 1 else ''})"


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(device)


class StepTimer:
    """Median seconds per step after ``warmup`` discarded steps.

    >>> timer = StepTimer(warmup=2)
    >>> for batch in loader:
    ...     with timer.step():
    ...         train_step(batch)
    >>> timer.seconds_per_step
    """

    def __init__(self, warmup: int = 2, device: torch.device | str | None = None):
        if warmup < 0:
            raise MetricError(f"warmup must be >= 0, got {warmup}")
        self.warmup = warmup
        self.device = torch.device(device) if device is not None else None
        self.times: list[float] = []  # every step, warm-up included

    @contextmanager
    def step(self) -> Iterator[None]:
        _sync(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            _sync(self.device)
            self.times.append(time.perf_counter() - t0)

    def record(self, seconds: float) -> None:
        """Add a step duration measured elsewhere."""
        self.times.append(float(seconds))

    @property
    def measured(self) -> list[float]:
        return self.times[self.warmup :]

    @property
    def seconds_per_step(self) -> float | None:
        """Median of the steps after warm-up; ``None`` until at least one such step exists."""
        m = self.measured
        return float(statistics.median(m)) if m else None

    def summary(self) -> dict[str, Any]:
        return {
            "seconds_per_step": self.seconds_per_step,
            "steps_measured": len(self.measured),
            "warmup_steps": min(self.warmup, len(self.times)),
            "rule": "median of step durations after the warm-up steps",
        }


def _rss_peak_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)  # Linux reports KiB, macOS bytes


class PeakMemory:
    """Peak memory of a block: GPU bytes allocated by torch on CUDA, else peak RSS of the process."""

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu"
        )
        self.peak_bytes: int | None = None

    @property
    def kind(self) -> str:
        return "cuda max_memory_allocated" if self.device.type == "cuda" else "process peak RSS (getrusage)"

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        self.peak_bytes = peak_memory_bytes(self.device)

    def summary(self) -> dict[str, Any]:
        return {"peak_memory_bytes": self.peak_bytes, "peak_memory_kind": self.kind,
                "peak_memory_gib": None if self.peak_bytes is None else self.peak_bytes / 2**30}


def peak_memory_bytes(device: torch.device | str | None = None) -> int:
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        return int(torch.cuda.max_memory_allocated(dev))
    return _rss_peak_bytes()


class WallTimer:
    """``with WallTimer() as w: ...`` then ``w.seconds``."""

    def __enter__(self) -> "WallTimer":
        self._t0 = time.perf_counter()
        self.seconds: float | None = None
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._t0


# The paper's training protocol, which every method's cost is projected to (device-days): 500 training
# volumes, 10,000 epochs, minibatch 16 -> 10,000 x ceil(500 / 16) = 320,000 steps. A fact of the paper,
# not a setting: ``device_days(sps, **PAPER_PROTOCOL, ...)``.
PAPER_PROTOCOL = MappingProxyType({"n_train": 500, "epochs": 10000, "batch_size": 16})


def device_days(
    seconds_per_step: float,
    *,
    n_train: int,
    epochs: int,
    batch_size: int,
    device: torch.device | str | None = None,
    measured_batch_size: int | None = None,
) -> dict[str, Any]:
    """Project seconds per step to a protocol of ``epochs`` over ``n_train`` volumes in minibatches of
    ``batch_size`` (the paper's: :data:`PAPER_PROTOCOL`).

    If the steps were timed at another minibatch (``measured_batch_size``), the time per step is
    scaled linearly to ``batch_size`` first (an estimate; the record says so)."""
    if seconds_per_step is None or not math.isfinite(seconds_per_step) or seconds_per_step < 0:
        raise MetricError(f"seconds_per_step must be a finite non-negative number, got {seconds_per_step}")
    if n_train < 1 or epochs < 1 or batch_size < 1:
        raise MetricError("n_train, epochs and batch_size must be positive")
    steps_per_epoch = math.ceil(n_train / batch_size)
    steps = epochs * steps_per_epoch
    sps = float(seconds_per_step)
    scaling = None
    if measured_batch_size is not None and measured_batch_size != batch_size:
        if measured_batch_size < 1:
            raise MetricError(f"measured_batch_size must be positive, got {measured_batch_size}")
        sps = sps * batch_size / measured_batch_size
        scaling = f"seconds per step scaled linearly from minibatch {measured_batch_size} to {batch_size}"
    return {
        "device_days": steps * sps / 86400.0,
        "steps": steps,
        "seconds_per_step": sps,
        "seconds_per_step_measured": float(seconds_per_step),
        "scaling": scaling,
        "n_train": n_train,
        "epochs": epochs,
        "batch_size": batch_size,
        "device": device_name(device),
        "rule": "epochs x ceil(n_train / batch_size) steps x seconds_per_step / 86400",
    }
