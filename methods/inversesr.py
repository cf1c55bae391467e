"""InverseSR, the decoder method (Wang et al., MICCAI 2023; ``BioMedAI-UCSC/InverseSR``,
``project/BRGM_decoder.py``), on the suite's frozen base model.

Nothing is trained. For every test volume a latent z is optimised with Adam so that the frozen
decoder's output, degraded the same way as the input, matches the low-resolution input:

    min_z  L1(D(decode(z)), y)  +  perceptual_weight * P(D(decode(z)), y)

where D keeps axial slices 0, K, 2K, ... (the ``srK`` degradation) and y is the low-resolution
volume (the kept slices, read off the condition). The result is ``decode(z*)``.

Choices where the paper or this suite leave room:

- **Start** (``init``): ``mean_latent``, as the authors' decoder runs
  (``--mean_latent_vector``: the mean of latents sampled from the LDM, 100,000 at the paper).
  Here: the mean of ``init_samples`` latents DDIM-sampled (``init_ddim_steps`` steps) from the
  frozen base model at the scalars of the run's training subjects, computed once in ``fit``
  (seeded). ``zeros`` starts at the latent origin; ``encode`` at the encoding of the condition
  (the interpolated input), which is not the authors' choice.
- **Scalars**: the decoder method optimises the latent only; the autoencoder takes no scalars, so
  there are none to optimise (the authors' DDIM variant optimises them; it is not the method the
  VCM paper used).
- **Perceptual term**: the authors use LPIPS-VGG16 features of 2D slices. Those weights cannot be
  downloaded here, and the suite's own feature networks are its evaluation extractors (optimising
  them would leak into FID/LPIPS). The term used instead is an L1 on image gradients (finite
  differences along X, Y and the low-resolution Z of the degraded volumes), a weight-free
  structure term that, like a perceptual loss, penalises blurred or displaced edges.
  ``perceptual_weight: 0`` leaves plain L1.
- **Optimiser**: Adam, betas (0.9, 0.999), ``lr`` and ``steps`` from the profile (authors: 7e-2,
  601 steps). Up to ``batch_size`` volumes are optimised together, their losses summed, so that
  each volume's gradient is the one it would have alone (Adam then acts element-wise). The L1 is the
  mean over the kept voxels, as the authors' ``sum / total_num_pixels``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from methods._sr import SUPER_RESOLUTION, kept_slices, low_res_condition, module_device, sr_factor
from methods.base import Conditions, DirectMethod, FrozenLDM
from methods.registry import MethodError, register

INITS = ("mean_latent", "zeros", "encode")


def gradient_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-volume mean L1 between the finite differences of ``a`` and ``b`` along X, Y and Z: (B,)."""
    total = 0
    for dim in (2, 3, 4):
        if a.shape[dim] > 1:
            total = total + (a.diff(dim=dim) - b.diff(dim=dim)).abs().flatten(1).mean(1)
    return total


@dataclass(frozen=True)
class InverseSRSettings:
    init: str                  # the start: mean_latent (the authors'), zeros or encode
    init_samples: int          # latents DDIM-sampled for the mean latent (the authors: 100,000)
    init_ddim_steps: int       # DDIM steps of each of those samples
    init_batch_size: int       # latents sampled together
    steps: int                 # Adam steps per test volume (the authors: 601)
    lr: float                  # Adam learning rate (the authors: 7e-2)
    perceptual_weight: float   # weight of the image-gradient L1 beside the plain L1 (0: plain L1)
    batch_size: int            # test volumes optimised together (memory: the decoder runs with gradients)


@register("inversesr")
class InverseSR(DirectMethod):
    family = SUPER_RESOLUTION
    uses_base_model = True
    Settings = InverseSRSettings

    def __init__(self, base: FrozenLDM, condition_channels: Mapping[str, int], config: Mapping[str, Any]):
        super().__init__(base, condition_channels, config)
        self.init = self.settings.init
        if self.init not in INITS:
            raise MethodError(f"methods.inversesr.init must be one of {', '.join(INITS)}, got '{self.init}'")
        self.factor: int | None = None
        self.register_buffer("mean_latent", torch.zeros(tuple(base.latent_shape)), persistent=True)

    # ---- the start -----------------------------------------------------------------------------
    @torch.no_grad()
    def _sample_mean_latent(self, train_subjects, seed: int, progress: bool) -> torch.Tensor:
        n, steps, batch = self.settings.init_samples, self.settings.init_ddim_steps, self.settings.init_batch_size
        device = module_device(self, self.base)
        scalars = np.stack([s.scalars for s in train_subjects]).astype(np.float32)
        generator = torch.Generator().manual_seed(int(seed) * 7919 + 0x5E)
        total = torch.zeros(tuple(self.base.latent_shape), device=device)
        for start in tqdm(range(0, n, batch), desc="inversesr mean latent", disable=not progress, leave=False):
            m = min(batch, n - start)
            s = torch.from_numpy(scalars[[(start + i) % len(scalars) for i in range(m)]]).to(device)
            z = torch.randn((m, *self.base.latent_shape), generator=generator).to(device)
            scheduler = self.base.inference_scheduler(steps)
            for t in scheduler.timesteps:
                eps = self.base.unet(z, torch.full((m,), int(t), dtype=torch.long, device=device), s)
                z, _ = scheduler.step(eps, int(t), z)
            total += z.sum(0)
        return total / n

    def fit(self, train_subjects, task, engine) -> dict[str, Any]:
        """No training: records K and, for ``init: mean_latent``, the mean sampled latent."""
        self.factor = sr_factor(task)
        seed, progress = engine.seed, engine.progress
        wall = time.perf_counter()
        if self.init == "mean_latent":
            if not train_subjects:
                raise MethodError("inversesr: init 'mean_latent' samples at the training subjects' scalars; "
                                  "give at least one training subject")
            self.mean_latent.copy_(self._sample_mean_latent(train_subjects, seed, progress))
        return {"steps": 0, "wall_seconds": time.perf_counter() - wall}

    def start(self, condition: torch.Tensor) -> torch.Tensor:
        b = condition.shape[0]
        if self.init == "encode":
            with torch.no_grad():
                return self.base.encode(condition)[0]
        if self.init == "zeros":
            return torch.zeros((b, *self.base.latent_shape), device=condition.device)
        return self.mean_latent.to(condition.device).expand(b, *self.mean_latent.shape).clone()

    # ---- the optimisation ----------------------------------------------------------------------
    def objective(self, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-volume loss (B,) of latents ``z`` against low-resolution volumes ``target``."""
        degraded = kept_slices(self.base.decode(z), self.factor)
        loss = (degraded - target).abs().flatten(1).mean(1)
        weight = self.settings.perceptual_weight
        if weight:
            loss = loss + weight * gradient_l1(degraded, target)
        return loss

    def generate(self, conditions: Conditions, scalars: torch.Tensor, subjects: Sequence[Any],
                 engine: Any = None) -> torch.Tensor:
        if self.factor is None:
            raise MethodError("inversesr: call fit(...) with a super-resolution task before generate (it sets the factor K)")
        device = module_device(self, self.base)
        condition = low_res_condition(conditions, self.name).float().to(device)
        per_call = max(1, self.settings.batch_size)  # memory: the decoder runs with gradients
        return torch.cat([self._invert(condition[i:i + per_call]) for i in range(0, condition.shape[0], per_call)])

    def _invert(self, condition: torch.Tensor) -> torch.Tensor:
        steps, lr = self.settings.steps, self.settings.lr
        target = kept_slices(condition, self.factor)
        z = self.start(condition).detach().requires_grad_(True)
        optimizer = torch.optim.Adam([z], lr=lr, betas=(0.9, 0.999))
        curve: list[float] = []
        wall = time.perf_counter()
        with torch.enable_grad():
            for _ in range(steps):
                optimizer.zero_grad(set_to_none=True)
                loss = self.objective(z, target)
                loss.sum().backward()          # each volume's gradient as if alone
                optimizer.step()
                curve.append(float(loss.detach().mean()))
        with torch.no_grad():
            final = self.objective(z, target)
            out = self.base.decode(z).clamp(0, 1)
        info = self.generate_info
        info.setdefault("objective_first", []).append(curve[0] if curve else float(final.mean()))
        info.setdefault("objective_last", []).append(float(final.mean()))
        info.setdefault("objective_curve", []).append(curve[:: max(1, len(curve) // 50)] + [float(final.mean())])
        info["steps"] = steps
        info["seconds_per_step"] = (time.perf_counter() - wall) / max(steps, 1)
        info["init"] = self.init
        return out.detach()
