"""3D MS-SSIM with MONAI's ``MultiScaleSSIMMetric``: diversity (pairs of generated volumes) and
fidelity (generated vs ground truth), data range 1, Gaussian kernel, sigma 1.5.

The standard setting (5 scales, 11-voxel kernel) needs volumes of at least 176 voxels per side, so
the number of scales and the kernel size are chosen from the volume shape (:func:`msssim_params`):
the most scales (at most 5) for which an odd kernel of at least 7 voxels (at most 11) fits at the
coarsest scale, with the largest such kernel. "Fits" means MONAI's own check
(``min_side // (scales-1)**2 > kernel-1``) and ``min_side // 2**(scales-1) >= kernel``. The scale
weights are Wang et al.'s (0.0448, 0.2856, 0.3001, 0.2363, 0.1333), truncated to the number of scales
and renormalised to sum 1. Examples: 32x48x32 -> 3 scales, kernel 7; 40x56x40 -> 3 scales, kernel 9;
80x112x80 -> 4 scales, kernel 7; 160x224x160 -> 5 scales, kernel 9.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from .common import MetricError, as_volumes, pick_pairs

WANG_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
DEFAULT_MAX_PAIRS = 100
SIGMA = 1.5


def msssim_params(shape: Sequence[int], min_kernel: int = 7, max_kernel: int = 11) -> dict[str, Any]:
    """Scales, kernel size, sigma and weights valid for spatial ``shape``."""
    side = int(min(shape))
    for scales in range(len(WANG_WEIGHTS), 0, -1):
        div_monai = max(1, scales - 1) ** 2
        div_pyr = 2 ** (scales - 1)
        kmax = min(max_kernel, side // div_pyr, side // div_monai)  # side//div_monai > k-1  <=> k <= side//div_monai
        if kmax % 2 == 0:
            kmax -= 1
        if kmax >= min_kernel:
            w = WANG_WEIGHTS[:scales]
            s = sum(w)
            return {
                "scales": scales,
                "kernel_size": kmax,
                "kernel_sigma": SIGMA,
                "weights": tuple(round(x / s, 6) for x in w),
            }
    raise MetricError(
        f"volumes of shape {tuple(shape)} are too small for MS-SSIM with a kernel of at least {min_kernel} voxels; "
        f"use volumes with every side >= {min_kernel}"
    )


def _metric(params: dict[str, Any]):
    from monai.metrics import MultiScaleSSIMMetric

    return MultiScaleSSIMMetric(
        spatial_dims=3,
        data_range=1.0,
        kernel_type="gaussian",
        kernel_size=params["kernel_size"],
        kernel_sigma=params["kernel_sigma"],
        weights=params["weights"],
        reduction="none",
    )


@torch.no_grad()
def msssim_pairs(a: torch.Tensor, b: torch.Tensor, params: dict[str, Any] | None = None, batch: int = 8) -> torch.Tensor:
    """MS-SSIM of each pair (a[i], b[i]) of (N, 1, X, Y, Z) volumes, (N,)."""
    params = params or msssim_params(a.shape[2:])
    m = _metric(params)
    vals = [m(a[i : i + batch], b[i : i + batch]).reshape(-1) for i in range(0, a.shape[0], batch)]
    return torch.cat(vals).float()


def _protocol(params, **extra) -> dict[str, Any]:
    return {
        "implementation": "monai.metrics.MultiScaleSSIMMetric, 3D, data_range 1, gaussian kernel",
        **params,
        "rule": "most scales (<=5) whose coarsest level fits an odd kernel of 7..11 voxels; Wang et al. weights renormalised",
        **extra,
    }


def msssim_diversity(samples: Any, max_pairs: int = DEFAULT_MAX_PAIRS, seed: int = 0) -> dict[str, Any]:
    """``{"MS-SSIM diversity": float, "protocol"}``: mean MS-SSIM over pairs of generated volumes
    (all pairs if at most ``max_pairs``, else a seeded random subset). Lower = more diverse."""
    x = as_volumes(samples, "generated volumes")
    params = msssim_params(x.shape[2:])
    pairs = pick_pairs(x.shape[0], max_pairs, seed)
    i = torch.tensor([p[0] for p in pairs])
    j = torch.tensor([p[1] for p in pairs])
    v = msssim_pairs(x[i], x[j], params)
    return {
        "MS-SSIM diversity": float(v.mean()),
        "protocol": _protocol(params, n_generated_volumes=int(x.shape[0]), n_pairs=len(pairs),
                              pairs=f"all pairs if at most {max_pairs}, else {max_pairs} drawn with seed {seed}"),
    }


def msssim_fidelity(fake: Any, real: Any) -> dict[str, Any]:
    """``{"MS-SSIM fidelity": float, "protocol"}``: mean MS-SSIM of each generated volume with its
    ground truth. Higher = closer."""
    f = as_volumes(fake, "generated volumes")
    r = as_volumes(real, "ground-truth volumes")
    if f.shape != r.shape:
        raise MetricError(f"MS-SSIM fidelity pairs volumes one to one; got {tuple(f.shape)} and {tuple(r.shape)}")
    params = msssim_params(f.shape[2:])
    v = msssim_pairs(f, r, params)
    return {
        "MS-SSIM fidelity": float(v.mean()),
        "MS-SSIM fidelity per volume": [float(x) for x in v.reshape(-1)],
        "protocol": _protocol(params, n_generated_volumes=int(f.shape[0]), n_real_volumes=int(r.shape[0])),
    }
