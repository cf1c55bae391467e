"""One run's session: the suite's training loop and DDIM sampler bound to one run, the object a
method's ``fit`` and ``generate`` receive (their argument ``engine``, typed ``methods.base.Engine``;
both names stay because method code is hashed into records). "Engine" otherwise means the package
:mod:`benchmark.engine` this session calls. Methods never import the benchmark; a steering
method's default ``fit``/``generate`` call ``engine.train``/``engine.sample``, a method that makes
volumes itself reads ``settings``, ``run_dir``, ``seed`` and ``progress`` only."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from benchmark.engine.distributed import rank_and_size
from benchmark.engine.sampling import sample_batch
from benchmark.engine.speed import SpeedOptions
from benchmark.engine.training import TrainResult, TrainSettings, train_method
from datasets.tasks import Task


def control_probe(task: Task, ctx, seed: int):
    """The profile's control probe (``probe`` section) on the first validation subjects (never test
    subjects: the probe's history informs choices), or None when off."""
    from benchmark.engine.probe import ControlProbe

    cfg = ctx.profile.probe
    if not cfg.enabled:
        return None
    subjects, _ = ctx.data.held_out_subjects(int(cfg.subjects))
    latents = ctx.latents.get(subjects, progress=False)[:, 0, 0]  # plain (not mirrored) posterior means
    return ControlProbe(ctx.base, task, subjects, latents, seed=seed, bands=int(cfg.bands),
                        draws=int(cfg.draws), batch_size=int(ctx.profile.sampling.batch_size),
                        device=ctx.device, reuse_frozen=SpeedOptions.from_profile(ctx.profile).reuse_frozen_prediction)


class RunSession:
    """One run's session. ``probe``: a ControlProbe, ``"profile"`` (made from the profile when a method
    trains through the session) or None. After ``train``, ``train_result`` holds the loop's result."""

    def __init__(self, ctx, run_dir: Path, seed: int, settings: TrainSettings, probe: Any = "profile",
                 stop_after: int | None = None):
        self.ctx = ctx
        self.run_dir = Path(run_dir)
        self.seed = int(seed)
        self.settings = settings
        self.probe = probe
        self.stop_after = stop_after
        self.train_result: TrainResult | None = None

    @property
    def progress(self) -> bool:
        return self.ctx.progress

    @property
    def device(self) -> str:
        return self.ctx.device

    def train(self, method, train_subjects: Sequence, task: Task) -> dict[str, Any]:
        """The suite's training loop (``benchmark.engine.training.train_method``), resuming from the run
        folder, with the control probe before the first step and at every checkpoint."""
        if isinstance(self.probe, str):  # rank 0 alone probes (the others would write its latents too)
            self.probe = control_probe(task, self.ctx, self.seed) if rank_and_size()[0] == 0 else None
        result = train_method(method, self.ctx.base, train_subjects, task, self.settings, self.ctx.latents,
                              self.run_dir, self.seed, self.device, self.progress, self.stop_after, self.probe)
        self.train_result = result
        return {"steps": result.steps, "losses": result.losses, "seconds_per_step": result.seconds_per_step,
                "wall_seconds": result.wall_seconds, "peak_memory": result.peak_memory,
                "resumed_from": result.resumed_from, "batch_size": self.settings.batch_size}

    def sample(self, predict_noise, conditions, scalars: torch.Tensor, subjects: Sequence) -> torch.Tensor:
        """DDIM sampling of one batch from the frozen base model steered by ``predict_noise``; every method
        starts a test subject from the same noise."""
        return sample_batch(predict_noise, self.ctx.base, subjects, conditions, scalars,
                            self.ctx.profile.sampling.ddim_steps, self.seed, self.device)
