"""The control probe: does a method use its spatial condition? Cheap enough for every checkpoint.

On validation subjects (never test subjects), with the clean latents, noise and timesteps fixed by seed, the probe asks
for the noise prediction of

* the frozen base model (no spatial condition),
* the method with each subject's **own** condition, and
* the method with **another** subject's condition (a fixed derangement: nobody keeps their own),

and reports the mean squared error against the true noise of each, per timestep band. The
**control gap** is MSE(other) - MSE(own), per subject (averaged over that subject's draws in the
band), with a bootstrap 95% confidence interval over subjects. A method that ignores its condition
gets a gap of exactly 0 (the two predictions are the same); a method that uses it for the better
gets a positive gap. The gap is a property of the noise predictor alone, so it can show control
before it is visible in samples, and it says when during training control emerged.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from datasets.subject import Subject
from datasets.tasks import Task
from methods.base import FrozenLDM, Method

DEFAULT_BANDS = 4        # equal bands of the training timesteps: [0, T/4), [T/4, T/2), ...
DEFAULT_DRAWS = 2        # noise draws per subject and band
BOOTSTRAP_RESAMPLES = 2000


class ProbeError(ValueError):
    """A probe that cannot be built (too few subjects, a bad band count)."""


def derangement(n: int, seed: int) -> np.ndarray:
    """A fixed permutation of ``range(n)`` with no fixed point: subject i gets the condition of
    subject ``perm[i] != i``. Seeded; the same on every machine."""
    if n < 2:
        raise ProbeError(f"the control probe needs at least 2 test subjects to swap conditions, got {n}")
    rng = np.random.default_rng([0xC0DE, int(seed)])
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            return perm


def bootstrap_ci(values: np.ndarray, seed: int, resamples: int = BOOTSTRAP_RESAMPLES,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampled over subjects)."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng([0xB007, int(seed)])
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(axis=1)
    alpha = (1.0 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha))


@dataclass(frozen=True)
class Band:
    lo: int
    hi: int  # exclusive

    @property
    def label(self) -> str:
        return f"t{self.lo}-{self.hi - 1}"


class ControlProbe:
    """Fixed probe inputs for one task and one set of test subjects; :meth:`measure` scores a method.

    ``latents`` is (N, C, x, y, z): the scaled posterior means of the subjects' images (no flip).
    """

    def __init__(self, base: FrozenLDM, task: Task, subjects: Sequence[Subject], latents: torch.Tensor,
                 seed: int = 0, bands: int = DEFAULT_BANDS, draws: int = DEFAULT_DRAWS, batch_size: int = 8,
                 device: str = "cpu", reuse_frozen: bool = True):
        from benchmark.engine.latents import ConditionStore, scalar_batch

        if bands < 1 or draws < 1:
            raise ProbeError(f"the control probe needs at least one band and one draw, got {bands} and {draws}")
        n = len(subjects)
        if latents.shape[0] != n:
            raise ProbeError(f"{latents.shape[0]} latents for {n} subjects; give one latent per subject")
        self.base, self.task, self.seed = base, task, int(seed)
        self.ids = [s.id for s in subjects]
        self.batch_size, self.device = int(batch_size), device
        self.reuse_frozen = bool(reuse_frozen)  # the profile's speed.reuse_frozen_prediction
        self._frozen_mse: torch.Tensor | None = None  # (bands, subjects), after the first measurement
        self.other = derangement(n, seed)
        total = int(base.train_scheduler.num_train_timesteps)
        edges = np.linspace(0, total, bands + 1).round().astype(int)
        self.bands = [Band(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]
        gen = torch.Generator().manual_seed(int(seed) * 7919 + 17)
        # One fixed (noise, timestep) per subject, band and draw.
        self.noise = torch.randn((bands, draws) + tuple(latents.shape), generator=gen)
        self.timesteps = torch.stack([torch.randint(b.lo, b.hi, (draws, n), generator=gen) for b in self.bands])
        self.latents = latents.float()
        self.scalars = scalar_batch(subjects)
        self.conditions = ConditionStore(task, subjects)

    @torch.no_grad()
    def measure(self, method: Method | None) -> dict:
        """MSE of the frozen model and of ``method`` (own and other condition) per band, and the gap.

        With ``method=None`` only the frozen model's MSE is computed (the floor of the loss).

        Per batch of subjects the own and the deranged conditions are built once and every band and
        draw reuses them, so a condition encoder that does not depend on time runs once per batch
        (``Method.reusing_condition_features``), and the frozen model's prediction for one noisy latent
        is computed once for the three predictions that need it (``reuse_frozen``); the frozen model's own
        errors, the same at every checkpoint, are computed at the first measurement only (``reuse_frozen``)."""
        was_training = method.training if method is not None else False
        if method is not None:
            method.eval()
        n, n_bands, draws = len(self.ids), len(self.bands), int(self.noise.shape[1])
        mse = {k: torch.zeros(n_bands, n) for k in ("frozen", "own", "other")}
        # The frozen model and the probe's inputs never change: its errors are the same at every checkpoint.
        known_frozen = self._frozen_mse if self.reuse_frozen else None
        if known_frozen is not None:
            mse["frozen"] = known_frozen.clone()
        reuse_frozen = getattr(self.base, "reusing_predictions", None)
        reusing = reuse_frozen(self.reuse_frozen) if reuse_frozen is not None else contextlib.nullcontext()
        features = method.reusing_condition_features() if method is not None else contextlib.nullcontext()
        try:
            with reusing, features:
                for start in range(0, n, self.batch_size):
                    index = np.arange(start, min(n, start + self.batch_size))
                    idx = torch.from_numpy(index)
                    own = self.conditions.batch(index, device=self.device)
                    other = self.conditions.batch(self.other[index], device=self.device)
                    scalars = self.scalars[idx].to(self.device)
                    for b in range(n_bands):
                        for d in range(draws):
                            noise = self.noise[b, d][idx]
                            t = self.timesteps[b, d][idx]
                            z_t = self.base.train_scheduler.add_noise(self.latents[idx], noise, t).to(self.device)
                            t = t.to(self.device)

                            def error(pred: torch.Tensor) -> torch.Tensor:
                                return ((pred.float().cpu() - noise) ** 2).flatten(1).mean(dim=1) / draws

                            if known_frozen is None:
                                mse["frozen"][b, idx] += error(self.base.unet(z_t, t, scalars))
                            if method is not None:
                                mse["own"][b, idx] += error(method.predict_noise(z_t, t, own, scalars))
                                mse["other"][b, idx] += error(method.predict_noise(z_t, t, other, scalars))
        finally:
            if method is not None and was_training:
                method.train()
        self._frozen_mse = mse["frozen"].clone()
        bands = []
        for b, band in enumerate(self.bands):
            row = {"band": band.label, "t_lo": band.lo, "t_hi": band.hi - 1,
                   "mse_frozen": float(mse["frozen"][b].mean())}
            if method is not None:
                gap = (mse["other"][b] - mse["own"][b]).numpy().astype(np.float64)
                lo, hi = bootstrap_ci(gap, self.seed + b)
                row.update({"mse_own": float(mse["own"][b].mean()), "mse_other": float(mse["other"][b].mean()),
                            "gap": float(gap.mean()), "gap_ci_low": lo, "gap_ci_high": hi})
            bands.append(row)
        return {"bands": bands, "subjects": n, "draws": draws, "seed": self.seed}

    def describe(self) -> dict:
        return {"subjects": len(self.ids), "bands": [b.label for b in self.bands], "draws": int(self.noise.shape[1]),
                "seed": self.seed, "derangement": self.other.tolist(),
                "gap": "MSE(another subject's condition) - MSE(own condition), per subject; "
                       f"mean and {BOOTSTRAP_RESAMPLES}-resample percentile bootstrap 95% CI over subjects"}


def bands_above_zero(result: dict) -> int:
    """How many bands have a gap whose 95% CI lies above 0 (the method measurably uses its condition)."""
    return sum(1 for row in result.get("bands", []) if row.get("gap_ci_low", 0.0) > 0.0)


NOISE_MSE_RATIO = "noise MSE / frozen"


def noise_mse_ratio(result: dict) -> float | None:
    """Own-condition noise MSE over the frozen base model's, geometric mean over the bands: about 1 for a
    method that keeps the prior, far above 1 for one that has not learnt to denoise (diverged, or a model
    trained from scratch that is still early)."""
    ratios = [row["mse_own"] / row["mse_frozen"] for row in result.get("bands", [])
              if "mse_own" in row and row.get("mse_frozen", 0.0) > 0.0]
    return float(np.exp(np.mean(np.log(ratios)))) if ratios else None


def summary_columns(result: dict) -> dict[str, float]:
    """The probe's result as task-table columns (final checkpoint): the gap per band, the count of
    bands whose CI excludes 0 from above, and the noise MSE relative to the frozen model."""
    columns = {f"control gap {row['band']}": row["gap"] for row in result.get("bands", []) if "gap" in row}
    if columns:
        columns["control gap: bands CI>0"] = bands_above_zero(result)
        columns[NOISE_MSE_RATIO] = noise_mse_ratio(result)
    return columns
