"""Sampling: DDIM, batched; the initial noise of a test subject is a function of (seed, subject
id) only, so every method starts from the same noise for the same subject."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from datasets.subject import Subject
from datasets.tasks import Task
from methods.base import Conditions, FrozenLDM, Method, check_noise_prediction

from benchmark.engine.latents import condition_batch, scalar_batch, stable_seed


# ---- sampling --------------------------------------------------------------------------


def initial_noise(subject_id: str, seed: int, latent_shape: Sequence[int]) -> torch.Tensor:
    """The starting noise of a test subject: the same for every method."""
    generator = torch.Generator().manual_seed(stable_seed(seed, "sample", subject_id))
    return torch.randn(tuple(latent_shape), generator=generator)


def predictor_name(predict_noise: Callable) -> str:
    """The name of the method whose bound ``predict_noise`` this is, for errors (else the function's)."""
    owner = getattr(predict_noise, "__self__", None)
    return getattr(owner, "name", None) or getattr(predict_noise, "__qualname__", repr(predict_noise))


@torch.no_grad()
def sample_batch(
    predict_noise: Callable[[torch.Tensor, torch.Tensor, Conditions, torch.Tensor], torch.Tensor],
    base: FrozenLDM,
    subjects: Sequence[Subject],
    conditions: Conditions,
    scalars: torch.Tensor,
    num_steps: int,
    seed: int,
    device: str = "cpu",
) -> torch.Tensor:
    """DDIM-sample one batch: each subject from its own initial noise, with the batch's conditions and
    scalars; returns the decoded volumes (B, 1, X, Y, Z), not clamped."""
    z = torch.stack([initial_noise(s.id, seed, base.latent_shape) for s in subjects]).to(device)
    scheduler = base.inference_scheduler(num_steps)
    for step, t in enumerate(scheduler.timesteps):
        t_batch = torch.full((len(subjects),), int(t), dtype=torch.long, device=device)
        eps = predict_noise(z, t_batch, conditions, scalars)
        if step == 0:  # once per batch: the scheduler would broadcast a wrong shape silently
            check_noise_prediction(predictor_name(predict_noise), eps, z)
        z, _ = scheduler.step(eps, int(t), z)
    return base.decode(z)


@torch.no_grad()
def sample(
    predict_noise: Callable[[torch.Tensor, torch.Tensor, Conditions, torch.Tensor], torch.Tensor],
    base: FrozenLDM,
    subjects: Sequence[Subject],
    task: Task,
    num_steps: int,
    batch_size: int,
    seed: int,
    device: str = "cpu",
    progress: bool = True,
    desc: str = "sample",
    condition_subjects: Sequence[Subject] | None = None,
) -> np.ndarray:
    """DDIM-sample one volume per subject, conditioned on its conditions and scalars.

    ``predict_noise(z_t, t, conditions, scalars)`` is a method's (or the base model's)
    noise prediction. ``condition_subjects`` (one per subject) gives the spatial conditions instead
    (another subject's: the swapped-condition null), with each subject's own noise and scalars.
    Returns (N, 1, X, Y, Z) float32 in [0, 1].
    """
    if condition_subjects is not None and len(condition_subjects) != len(subjects):
        raise ValueError(f"{len(condition_subjects)} condition subjects for {len(subjects)} subjects; give one each")
    givers = subjects if condition_subjects is None else condition_subjects
    out = []
    batches = range(0, len(subjects), batch_size)
    for start in tqdm(batches, desc=desc, disable=not progress, leave=False):
        chunk = subjects[start : start + batch_size]
        conditions = condition_batch(task, givers[start : start + batch_size], device=device)
        volumes = sample_batch(predict_noise, base, chunk, conditions,
                               scalar_batch(chunk, device), num_steps, seed, device)
        out.append(volumes.clamp(0, 1).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 1, *base.image_shape), np.float32)


def sample_method(method: Method, base: FrozenLDM, subjects: Sequence[Subject], task: Task,
                  num_steps: int, batch_size: int, seed: int, device: str = "cpu",
                  progress: bool = True, condition_subjects: Sequence[Subject] | None = None) -> np.ndarray:
    method.eval()
    with method.reusing_condition_features():
        return sample(method.predict_noise, base, subjects, task, num_steps, batch_size, seed,
                      device, progress, desc=f"sample {method.name}", condition_subjects=condition_subjects)


def sample_unconditioned(base: FrozenLDM, subjects: Sequence[Subject], task: Task, num_steps: int,
                         batch_size: int, seed: int, device: str = "cpu", progress: bool = True) -> np.ndarray:
    """The frozen base model alone, at each subject's scalars (paper Table 6, first row)."""
    return sample(lambda z, t, _c, s: base.unet(z, t, s), base, subjects, task, num_steps,
                  batch_size, seed, device, progress, desc="sample base")
