"""LIIF-3D: Local Implicit Image Function (Chen et al., CVPR 2021) ported to 3D (VCM supp. B.3).

A 3D convolutional encoder turns the low-resolution volume into a feature grid; an MLP decodes the
value at any continuous position from the features of the nearest grid cell, the position
relative to that cell and the size of the queried voxel. As in LIIF (``yinboc/liif``,
``models/liif.py``), with every 2D operation replaced by its 3D counterpart:

- **encoder**: EDSR-baseline without upsampling, in 3D: a 3x3x3 head conv, ``encoder_blocks``
  residual blocks (conv-ReLU-conv, residual scale ``res_scale``), a 3x3x3 conv and a global skip;
  ``encoder_channels`` wide (LIIF: 64 channels, 16 blocks);
- **feature unfolding**: the decoder sees the 3x3x3 neighbourhood of the cell's feature vector
  (27 x C values, zero outside the volume, as ``F.unfold(feat, 3, padding=1)``);
- **local ensemble**: the value at a query is the area-weighted mean of the predictions from the
  2^3 = 8 surrounding cells, each weighted by the volume of the box spanned by the query and the
  diagonally opposite cell (LIIF's swapped areas);
- **cell decoding**: the decoder also gets the queried voxel's size in feature-cell units;
- **decoder**: an MLP with ``mlp_hidden`` ReLU layers (LIIF: 4 x 256) and one output.

Geometry of the ``srK`` tasks: the low-resolution volume holds axial slices 0, K, 2K, ... of the
full grid, so feature cell (i, j, l) sits at full-grid position (i, j, l K) and has size (1, 1, K)
in full-grid voxels; positions and sizes are measured in feature cells and doubled (a cell spans 2
units, as in LIIF's [-1, 1] coordinates). Queries beyond the last kept slice use the last cell
(LIIF clamps coordinates to the grid likewise). Along X and Y nothing was subsampled: every query
sits on a cell centre, where LIIF's ensemble gives the far neighbour a weight of 1e-9; those
neighbours are skipped (the result is the same to 1e-9 relative) so that only the 2 neighbours
along Z are evaluated where Z is off-grid. One deliberate difference, on the border: a query exactly on
the last cell of an axis (the last X or Y voxel, the last kept slice) has both neighbours of that
axis clamped to that cell, so every LIIF area is 0 (1e-9) and LIIF would average all neighbours
uniformly, smearing the last X-Y rows along Z (2D LIIF never meets this: its queries never sit on
cell centres). The port keeps LIIF's limit from inside instead. ``local_ensemble: false`` uses the nearest cell only.

Training (LIIF's protocol, patch-based as B.3): each step draws one scale s ~ U(scale_min,
scale_max) (B.3: x1-x4) and, per example, a training volume, a random left-right flip and a
random crop; the low-resolution patch holds ``patch_size[2]`` slices at positions z0, z0 + s, ...
(linear interpolation between slices where s is not an integer; exactly the kept slices where it
is), ``patch_size[:2]`` in X and Y; ``queries`` random voxels of the full-resolution block behind
it (``ceil(patch_size[2] * s)`` slices: every kept slice and the slices after it, as in the task)
are the targets. Values are scaled to [-1, 1]; L1 loss; Adam; the learning rate halves at
``lr_milestones`` (fractions of the steps; LIIF: epochs 200, 400, 600, 800 of 1000). Checkpoints
every ``engine.settings.checkpoint_every`` steps in the run folder; an interrupted run resumes.

Inference at xK: the kept slices of the condition (``condition[..., ::K]``) are encoded once and
every voxel of the full grid is queried, ``query_chunk`` at a time.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.loop import LoopSettings, TrainingLoop
from methods._sr import SUPER_RESOLUTION, kept_slices, low_res_condition, module_device, sr_factor
from methods.base import Conditions, DirectMethod, FrozenLDM
from methods.registry import MethodError, register

_AREA_EPS = 1e-9  # LIIF adds this to every ensemble area


class _ResBlock3d(nn.Module):
    def __init__(self, channels: int, res_scale: float):
        super().__init__()
        self.conv1 = nn.Conv3d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv3d(channels, channels, 3, padding=1)
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x))) * self.res_scale


class EDSR3d(nn.Module):
    """EDSR-baseline in 3D without the upsampling tail (LIIF's encoder, ``no_upsampling=True``)."""

    def __init__(self, channels: int, num_blocks: int, res_scale: float = 1.0, in_channels: int = 1):
        super().__init__()
        self.head = nn.Conv3d(in_channels, channels, 3, padding=1)
        self.body = nn.Sequential(*[_ResBlock3d(channels, res_scale) for _ in range(num_blocks)],
                                  nn.Conv3d(channels, channels, 3, padding=1))
        self.out_dim = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)
        return self.body(h) + h


def _mlp(in_dim: int, hidden: Sequence[int], out_dim: int = 1) -> nn.Sequential:
    layers: list[nn.Module] = []
    last = in_dim
    for width in hidden:
        layers += [nn.Linear(last, int(width)), nn.ReLU()]
        last = int(width)
    layers.append(nn.Linear(last, out_dim))
    return nn.Sequential(*layers)


def resample_slices(volume: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Slices of ``volume`` (..., Z) at continuous Z ``positions`` (linear; exact at integers)."""
    z = volume.shape[-1]
    lo = positions.floor().long().clamp(0, z - 1)
    hi = (lo + 1).clamp(max=z - 1)
    w = (positions - lo.to(positions.dtype)).clamp(0, 1)
    return volume[..., lo] * (1 - w) + volume[..., hi] * w


@dataclass(frozen=True)
class LIIF3DSettings:
    feat_unfold: bool          # the decoder sees the 3x3x3 neighbourhood of the cell's features
    local_ensemble: bool       # area-weighted mean over the 8 surrounding cells (false: nearest cell)
    cell_decode: bool          # the decoder also gets the queried voxel's size
    res_scale: float           # residual scale of the encoder's blocks
    encoder_channels: int      # encoder width (LIIF: 64)
    encoder_blocks: int        # encoder residual blocks (LIIF: 16)
    mlp_hidden: list[int]      # decoder MLP widths (LIIF: 4 x 256)
    steps: int                 # training steps
    batch_size: int            # patches per step
    lr: float                  # Adam learning rate, halved at each milestone
    lr_milestones: list[float]  # fractions of the steps where the learning rate halves
    patch_size: list[int]      # low-resolution patch (X, Y, slices)
    queries: int               # full-resolution voxels queried per patch
    scale_min: float           # smallest training scale s (at least 1)
    scale_max: float           # largest training scale s (B.3: 4)
    query_chunk: int           # voxels queried at a time at inference (memory)


@register("liif3d")
class LIIF3D(DirectMethod):
    family = SUPER_RESOLUTION
    Settings = LIIF3DSettings

    def __init__(self, base: FrozenLDM, condition_channels: Mapping[str, int], config: Mapping[str, Any]):
        super().__init__(base, condition_channels, config)
        s = self.settings
        self.feat_unfold = s.feat_unfold
        self.local_ensemble = s.local_ensemble
        self.cell_decode = s.cell_decode
        self.encoder = EDSR3d(s.encoder_channels, s.encoder_blocks, s.res_scale)
        in_dim = s.encoder_channels * (27 if self.feat_unfold else 1) + 3 + (3 if self.cell_decode else 0)
        self.imnet = _mlp(in_dim, s.mlp_hidden, 1)
        self.factor: int | None = None

    # ---- the implicit function -------------------------------------------------------------
    def features(self, low_res: torch.Tensor) -> torch.Tensor:
        """Encoder features of a low-resolution volume (B, 1, X, Y, Zl) in [0, 1]."""
        return self.encoder((low_res - 0.5) / 0.5)

    def query(self, feat: torch.Tensor, spacing: float, coords: torch.Tensor) -> torch.Tensor:
        """Values at full-grid positions ``coords`` (B, Q, 3) in voxels, from features ``feat``
        (B, C, X, Y, Zl) whose cell (i, j, l) sits at (i, j, l * spacing); returns (B, Q) in [-1, 1] scale.

        The decoder's first layer is linear in the unfolded 27 x C features, so it is applied once
        per feature cell as a 3x3x3 convolution (the same weights, zero padding as the unfold) and
        the result is gathered per query: the same numbers as unfolding per query, fewer operations.
        """
        b, c, *grid = feat.shape
        steps = torch.tensor([1.0, 1.0, float(spacing)], device=coords.device, dtype=coords.dtype)
        u = coords / steps                                       # positions in cell units
        sizes = torch.tensor(grid, device=coords.device)
        floor = torch.minimum(u.floor().long(), sizes - 1).clamp(min=0)
        choices = []                                             # per axis: candidate cell indices
        for a in range(3):
            if not self.local_ensemble:
                choices.append([torch.minimum((u[..., a] + 0.5).floor().long(), sizes[a] - 1).clamp(min=0)])
            elif bool((u[..., a] == floor[..., a].to(u.dtype)).all()):
                choices.append([floor[..., a]])                  # on the grid: the far neighbour weighs 1e-9
            else:
                choices.append([floor[..., a], torch.minimum(floor[..., a] + 1, sizes[a] - 1)])

        first, rest = self.imnet[0], self.imnet[1:]
        hidden = first.out_features
        k = 3 if self.feat_unfold else 1
        n_feat = c * k ** 3
        kernel = first.weight[:, :n_feat].reshape(hidden, c, k, k, k)
        w_rel = first.weight[:, n_feat:n_feat + 3]
        w_cell = first.weight[:, n_feat + 3:]
        h_grid = F.conv3d(feat, kernel, padding=k // 2).reshape(b, hidden, -1)   # (B, H, cells)
        cell = torch.tensor([2.0, 2.0, 2.0 / float(spacing)], device=coords.device, dtype=coords.dtype)
        constant = first.bias + (cell @ w_cell.t() if self.cell_decode else 0)

        # Only axes with two candidates enter the areas: on a skipped axis the opposite neighbour's
        # extent is the same full cell for every prediction, a factor that cancels.
        paired = [a for a in range(3) if len(choices[a]) == 2]
        preds, areas, keys = [], [], []
        q = coords.shape[1]
        for ix, cx in enumerate(choices[0]):
            for iy, cy in enumerate(choices[1]):
                for iz, cz in enumerate(choices[2]):
                    flat = (cx * grid[1] + cy) * grid[2] + cz                     # (B, Q)
                    h = torch.gather(h_grid, 2, flat.unsqueeze(1).expand(b, hidden, q)).transpose(1, 2)
                    cells = torch.stack([cx, cy, cz], dim=-1).to(coords.dtype)
                    rel = (u - cells) * 2.0                      # a cell spans 2 units (LIIF)
                    preds.append(rest(h + rel @ w_rel.t() + constant).squeeze(-1))
                    areas.append(rel[..., paired].prod(dim=-1).abs() + _AREA_EPS)
                    keys.append((ix, iy, iz))
        if len(preds) == 1:
            return preds[0]
        # Each prediction is weighted by the area of its diagonally opposite neighbour.
        counts = [len(ch) for ch in choices]
        lookup = {key: i for i, key in enumerate(keys)}
        total = torch.stack(areas).sum(dim=0)
        out = 0
        for key, pred in zip(keys, preds):
            opposite = tuple((n - 1) - i for i, n in zip(key, counts))
            out = out + pred * (areas[lookup[opposite]] / total)
        return out

    # ---- training ----------------------------------------------------------------------------
    def fit(self, train_subjects, task, engine) -> dict[str, Any]:
        self.factor = sr_factor(task)
        run_dir, seed, progress = engine.run_dir, engine.seed, engine.progress
        settings = self.settings
        steps, batch, lr, patch = settings.steps, settings.batch_size, settings.lr, settings.patch_size
        n_queries, s_min, s_max = settings.queries, settings.scale_min, settings.scale_max
        milestones = [int(round(f * steps)) for f in settings.lr_milestones]
        every = int(getattr(engine.settings, "checkpoint_every", 0) or 0) or None  # None: at the end only
        if not train_subjects:
            raise MethodError("liif3d needs at least one training volume")
        if len(patch) != 3 or min(patch) < 1 or not 1.0 <= s_min <= s_max:
            raise MethodError(f"methods.liif3d: patch_size {patch} needs three positive sizes and "
                              f"1 <= scale_min <= scale_max (got {s_min}, {s_max})")
        device = module_device(self)
        images = [torch.from_numpy(np.asarray(s.image, dtype=np.float32)) for s in train_subjects]  # no copies
        n = len(images)
        X, Y, Z = images[0].shape[1:]
        px, py = min(patch[0], X), min(patch[1], Y)

        optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        rng = np.random.default_rng([int(seed), 0x11F3D])
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)

        def make_batch():
            s = float(rng.uniform(s_min, s_max))
            pl = max(1, min(patch[2], int(Z // s)))             # low-res slices that fit with their blocks
            depth = min(Z, int(math.ceil(pl * s)))              # full-res slices behind them
            lows, coords, targets = [], [], []
            for _ in range(batch):
                i = int(rng.integers(n))
                vol = images[i][0]
                if rng.random() < 0.5:
                    vol = vol.flip(0)                            # left-right flip (X)
                x0, y0 = int(rng.integers(X - px + 1)), int(rng.integers(Y - py + 1))
                z0 = int(rng.integers(Z - depth + 1))
                block = vol[x0:x0 + px, y0:y0 + py, z0:z0 + depth]
                lows.append(resample_slices(block, torch.arange(pl, dtype=torch.float32) * s))
                k = min(n_queries, block.numel())
                pick = torch.from_numpy(rng.choice(block.numel(), size=k, replace=False))
                xyz = torch.stack(torch.unravel_index(pick, block.shape), dim=-1).float()
                coords.append(xyz)
                targets.append(block.reshape(-1)[pick])
            return (torch.stack(lows).unsqueeze(1).to(device), s, torch.stack(coords).to(device),
                    torch.stack(targets).to(device))

        def step_fn(step: int) -> tuple[torch.Tensor, dict]:
            low, s, coords, target = make_batch()
            pred = self.query(self.features(low), s, coords)
            return F.l1_loss(pred, (target - 0.5) / 0.5), {}

        loop = TrainingLoop(
            self, optimizer, step_fn,
            LoopSettings(steps, checkpoint_every=every, checkpoint_at_end=True, desc="train liif3d", progress=progress),
            checkpoint_path=run_dir / "checkpoint.pt",
            schedule=torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.5), rngs=[rng],
            on_diverged=lambda n, v: MethodError(f"liif3d diverged: the loss became {v} at step {n}; "
                                                 "lower methods.liif3d.lr in the profile"))
        wall = time.perf_counter()
        r = loop.run()
        return {"steps": steps, "losses": r.losses, "batch_size": batch, "resumed_from": r.resumed_from,
                "seconds_per_step": r.seconds_per_step, "wall_seconds": time.perf_counter() - wall}

    # ---- inference ---------------------------------------------------------------------------
    @torch.no_grad()
    def super_resolve(self, low_res: torch.Tensor, factor: int, shape: Sequence[int]) -> torch.Tensor:
        """Full-grid volumes (B, 1, *shape) in [0, 1] from low-resolution ones (B, 1, X, Y, Zl)."""
        chunk = self.settings.query_chunk
        X, Y, Z = (int(s) for s in shape)
        grid = torch.stack(torch.meshgrid(torch.arange(X), torch.arange(Y), torch.arange(Z), indexing="ij"),
                           dim=-1).reshape(-1, 3).float().to(low_res.device)
        out = []
        for volume in low_res:                                   # one subject at a time bounds memory
            feat = self.features(volume.unsqueeze(0))
            values = [self.query(feat, float(factor), grid[i:i + chunk].unsqueeze(0))
                      for i in range(0, grid.shape[0], chunk)]
            out.append(torch.cat(values, dim=1).reshape(1, X, Y, Z))
        return (torch.stack(out) * 0.5 + 0.5).clamp(0, 1)

    def generate(self, conditions: Conditions, scalars: torch.Tensor, subjects: Sequence[Any],
                 engine: Any = None) -> torch.Tensor:
        if self.factor is None:
            raise MethodError("liif3d: call fit(...) with a super-resolution task before generate (it sets the factor K)")
        self.eval()
        condition = low_res_condition(conditions, self.name).float().to(module_device(self))
        return self.super_resolve(kept_slices(condition, self.factor), self.factor, condition.shape[2:])
