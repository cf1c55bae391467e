"""Unconditional DDIM samples of the base model at given scalars, and their slice montage (the
``sample`` command, :mod:`benchmark.cli.sample`, writes them as NIfTI)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from core.files import atomic_png
from datasets.subject import SCALAR_NAMES


def parse_scalars(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or not all(0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"--scalars needs four comma-separated numbers in [0, 1] ({', '.join(SCALAR_NAMES)}), "
                         f"got '{text}'")
    return values


@torch.no_grad()
def sample_volumes(base, scalars, n: int, num_steps: int, seed: int = 0, batch_size: int = 8,
                   device: str | torch.device = "cpu", progress: bool = False) -> np.ndarray:
    """``n`` volumes (n,1,X,Y,Z) in [0, 1] sampled with DDIM (eta 0) at ``scalars`` (4 values, or
    (n,4)). The initial noise of sample i depends only on (seed, i), so two calls with the same
    seed and different scalars start from the same noise."""
    scalars = torch.as_tensor(np.asarray(scalars, dtype=np.float32))
    if scalars.ndim == 1:
        scalars = scalars.expand(n, -1)
    gen = torch.Generator().manual_seed(int(seed))
    noise = torch.randn((n, *base.latent_shape), generator=gen)
    out = []
    for start in range(0, n, batch_size):
        z = noise[start:start + batch_size].to(device)
        s = scalars[start:start + batch_size].to(device)
        scheduler = base.inference_scheduler(num_steps)
        for t in tqdm(scheduler.timesteps, desc=f"sampling {start + 1}-{start + z.shape[0]}/{n}",
                      disable=not progress, leave=False):
            timesteps = torch.full((z.shape[0],), int(t), dtype=torch.long, device=device)
            eps = base.unet(z, timesteps, s)
            z, _ = scheduler.step(eps, int(t), z)
        out.append(base.decode(z).clamp(0, 1).float().cpu().numpy())
    return np.concatenate(out)


def save_montage(volumes: np.ndarray, path: str | Path, titles: Sequence[str] | None = None) -> Path:
    """PNG of each volume's axial, coronal and sagittal mid-slices (one row per volume).
    Axial shows anterior up, coronal and sagittal show superior up (RAS arrays, CONVENTIONS.md)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(volumes)
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.6 * n), squeeze=False)
    for i, vol in enumerate(volumes):
        v = vol[0]
        x, y, z = (s // 2 for s in v.shape)
        views = (("axial", v[:, :, z].T), ("coronal", v[:, y, :].T), ("sagittal", v[x, :, :].T))
        for j, (name, img) in enumerate(views):
            ax = axes[i, j]
            ax.imshow(img, cmap="gray", vmin=0, vmax=1, origin="lower", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name)
        if titles is not None:
            axes[i, 0].set_ylabel(titles[i], fontsize=8)
    fig.tight_layout()
    path = Path(path)
    atomic_png(path, fig, dpi=100)
    plt.close(fig)
    return path


def population_affine(profile, cache_dir) -> np.ndarray:
    """The affine of the synthetic population at the profile's shape (of its first test subject)."""
    from datasets.splits import make_splits
    from datasets.synthetic import SyntheticPopulation

    d = profile.data
    pop = SyntheticPopulation(tuple(profile.image_shape), seed=d.seed, cache_dir=cache_dir)
    if getattr(pop, "affine", None) is not None:
        return np.asarray(pop.affine, dtype=np.float64)
    first = make_splits(d.pretrain_pool, d.train_pool, d.test_set, d.seed).test[0]
    return np.asarray(pop.subjects([first])[0].affine, dtype=np.float64)
