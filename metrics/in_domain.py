"""In-domain extractors: small convolutional autoencoders the suite trains on real training volumes
(when the pretrained extractors' weights are absent), and their cache.

Training (:func:`train_autoencoder`, on :mod:`core.loop`): MSE reconstruction, Adam with a one-cycle
schedule, random left-right flips, a fixed seed; then per-feature standardisation statistics over
training samples. The weights are cached under ``cache_dir/metrics/`` by a hash of (kind, data shape,
data id, config): :func:`in_domain_cache_key`. The extractor object around them:
:func:`metrics.extractors.train_in_domain`.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from core.files import atomic_torch_save, file_lock, read_state_dict
from core.loop import LoopSettings, TrainingLoop

from .common import ORIENTATIONS, DeferredVolumes, WeightsError, as_volumes, central_slice_indices, default_device, \
    extract_slices, sha256_bytes, trained_weights_path, weights_remedy
from .extractor_nets import InDomainAutoEncoder


# The extractors' networks and optimiser are fixed, not profile keys: a new profile key would change
# every resolved profile and so the config hash of every finished record. They are in the cache key.
IN_DOMAIN_CHANNELS_2D = (16, 32, 64, 64)
IN_DOMAIN_CHANNELS_3D = (8, 16, 32, 64)
IN_DOMAIN_BATCH_2D = 32
IN_DOMAIN_BATCH_3D = 4
IN_DOMAIN_LR = 2e-3
IN_DOMAIN_SLICE_FRACTION = 0.8  # 2D training slices come from this central part of each axis
IN_DOMAIN_SEED = 0


@dataclass(frozen=True)
class InDomainConfig:
    """How the in-domain extractors are trained (part of their cache key). ``steps_2d`` and ``steps_3d``
    are the profile's ``metrics.in_domain``; the rest are the fixed constants above (tests shrink them)."""

    steps_2d: int
    steps_3d: int
    channels_2d: tuple[int, int, int, int] = IN_DOMAIN_CHANNELS_2D
    channels_3d: tuple[int, int, int, int] = IN_DOMAIN_CHANNELS_3D
    batch_2d: int = IN_DOMAIN_BATCH_2D
    batch_3d: int = IN_DOMAIN_BATCH_3D
    lr: float = IN_DOMAIN_LR
    slice_central_fraction: float = IN_DOMAIN_SLICE_FRACTION
    seed: int = IN_DOMAIN_SEED


IN_DOMAIN_VERSION = 2


def _pad_to_multiple(x: torch.Tensor, m: int = 8) -> torch.Tensor:
    pads = []
    for s in reversed(x.shape[2:]):
        pads += [0, (-s) % m]
    return F.pad(x, pads) if any(pads) else x


def in_domain_cache_key(kind: str, train_shape: Sequence[int], data_id: str, config: InDomainConfig) -> str:
    payload = json.dumps(
        {"kind": kind, "shape": list(train_shape), "data": data_id, "config": asdict(config), "v": IN_DOMAIN_VERSION},
        sort_keys=True,
    )
    return sha256_bytes(payload.encode(), 16)



def train_autoencoder(kind: str, vols: torch.Tensor, cfg: InDomainConfig,
                      device: torch.device) -> tuple[InDomainAutoEncoder, list[float]]:
    """The in-domain autoencoder ``kind`` ('2d': slices, '3d': volumes) trained on ``vols``, with its
    standardisation set; and the loss of every step."""
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    n = vols.shape[0]
    if kind == "2d":
        net = InDomainAutoEncoder(2, cfg.channels_2d).to(device)
        steps, bs = cfg.steps_2d, cfg.batch_2d
        orients = list(ORIENTATIONS)
        ranges = {
            o: central_slice_indices(vols.shape[2 + ax], vols.shape[2 + ax], cfg.slice_central_fraction)
            for o, ax in ORIENTATIONS.items()
        }

        def batch(step: int) -> tuple[torch.Tensor, bool]:
            # orientations in turn; random volumes and random slices of the central part of the axis
            o = orients[step % len(orients)]
            vi = torch.randint(0, n, (bs,), generator=g).tolist()
            si = torch.randint(0, len(ranges[o]), (bs,), generator=g).tolist()
            ax = ORIENTATIONS[o]
            xb = torch.stack([vols[v].select(1 + ax, ranges[o][s]) for v, s in zip(vi, si)])
            return xb, o != "sagittal"  # axial (X, Y) and coronal (X, Z) slices have X first

        # standardisation: every central slice of each orientation of up to 32 training volumes
        sub = vols[torch.randperm(n, generator=g)[:32]]
        std_pools = [extract_slices(sub, o, ranges[o]) for o in orients]
    else:
        net = InDomainAutoEncoder(3, cfg.channels_3d).to(device)
        steps, bs = cfg.steps_3d, cfg.batch_3d

        def batch(step: int) -> tuple[torch.Tensor, bool]:
            return vols[torch.randint(0, n, (min(bs, n),), generator=g)], True

        std_pools = [vols[torch.randperm(n, generator=g)[:64]]]
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.1)

    def step_fn(step: int) -> tuple[torch.Tensor, dict]:
        xb, flippable = batch(step)
        if flippable and float(torch.rand((), generator=g)) < 0.5:  # left-right flip (flips X)
            xb = xb.flip(2)
        xb = _pad_to_multiple(xb).to(device)
        return F.mse_loss(net(xb), xb), {}

    losses = TrainingLoop(net, opt, step_fn, LoopSettings(steps, check_finite=False, progress=False),
                          schedule=sched, rngs=[g]).run().losses
    net.eval()
    net.set_standardisation([p.to(device) for p in std_pools], batch=64 if kind == "2d" else 4)
    return net.cpu(), losses


def in_domain_network(kind: str, vols: torch.Tensor | DeferredVolumes, cache_dir: str | Path, data_id: str,
                      cfg: InDomainConfig, device: torch.device | str | None = None,
                      shipped_dirs: Sequence[str | Path] = ()) -> tuple[InDomainAutoEncoder, Path]:
    """The trained autoencoder ``kind`` for ``vols`` and its weights file: shipped, else cached, else
    trained here and cached (atomically). A file that exists but cannot be loaded raises
    :class:`WeightsError` naming it (delete it to retrain)."""
    key = in_domain_cache_key(kind, tuple(vols.shape), data_id, cfg)
    path = trained_weights_path(f"in-domain-{kind}-{key}.pt", cache_dir, shipped_dirs)  # shipped, else the cache
    if not path.exists():
        with file_lock(path.with_suffix(".lock")):  # concurrent jobs: one trains, the others wait and load
            if not path.exists():
                _train_and_save(kind, vols, data_id, cfg, device, path)
    todo = weights_remedy(path, cache_dir)
    state = read_state_dict(path, "an in-domain extractor", todo=todo, keys=("state_dict",),
                            error=WeightsError)
    try:
        net = InDomainAutoEncoder(2 if kind == "2d" else 3, cfg.channels_2d if kind == "2d" else cfg.channels_3d)
        net.load_state_dict(state, strict=True)
    except Exception as e:  # noqa: BLE001
        raise WeightsError(f"in-domain extractor weights {path} could not be loaded ({type(e).__name__}); "
                           f"{todo}") from e
    return net, path


def _train_and_save(kind: str, vols: torch.Tensor | DeferredVolumes, data_id: str, cfg: InDomainConfig,
                    device: torch.device | str | None, path: Path) -> None:
    if isinstance(vols, DeferredVolumes):
        vols = as_volumes(vols.load(), "in-domain training volumes")
    dev = torch.device(device) if device is not None else default_device()
    t0 = time.perf_counter()
    net, losses = train_autoencoder(kind, vols, cfg, dev)
    meta = {
        "kind": kind,
        "data_id": data_id,
        "train_shape": list(vols.shape),
        "config": asdict(cfg),
        "final_loss": float(np.mean(losses[-10:])),
        "train_seconds": time.perf_counter() - t0,
    }
    atomic_torch_save({"state_dict": net.state_dict(), "meta": json.dumps(meta)}, path)
