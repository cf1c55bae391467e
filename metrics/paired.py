"""Paired fidelity for super-resolution (and any task with a ground truth): PSNR and SSIM via MONAI.

PSNR: ``monai.metrics.PSNRMetric(max_val=1.0)`` per volume (MSE over the whole volume), then the mean
over volumes. SSIM: ``monai.metrics.SSIMMetric(spatial_dims=3, data_range=1.0)`` with MONAI's
defaults (Gaussian kernel 11, sigma 1.5, k1 0.01, k2 0.03; the kernel shrinks to the largest odd
size that fits when a side is smaller than 11), per volume, then the mean. Images are in [0, 1].
"""
from __future__ import annotations

from typing import Any

import torch

from .common import MetricError, as_volumes


def _pair(fake: Any, real: Any) -> tuple[torch.Tensor, torch.Tensor]:
    f = as_volumes(fake, "generated volumes")
    r = as_volumes(real, "ground-truth volumes")
    if f.shape != r.shape:
        raise MetricError(f"paired metrics need volumes of equal shape; got {tuple(f.shape)} and {tuple(r.shape)}")
    return f, r


@torch.no_grad()
def psnr(fake: Any, real: Any) -> dict[str, Any]:
    """``{"PSNR": mean dB, "PSNR per volume": [...], "protocol"}``. Identical volumes give +inf."""
    from monai.metrics import PSNRMetric

    f, r = _pair(fake, real)
    per = PSNRMetric(max_val=1.0, reduction="none")(f, r).reshape(-1).double()
    return {
        "PSNR": float(per.mean()),
        "PSNR per volume": per.tolist(),
        "protocol": {"implementation": "monai.metrics.PSNRMetric(max_val=1.0), per volume, mean over volumes",
                     "n_volumes": int(f.shape[0])},
    }


@torch.no_grad()
def ssim(fake: Any, real: Any, kernel_size: int = 11, kernel_sigma: float = 1.5) -> dict[str, Any]:
    """``{"SSIM": mean, "SSIM per volume": [...], "protocol"}`` (3D SSIM)."""
    from monai.metrics import SSIMMetric

    f, r = _pair(fake, real)
    k = min(kernel_size, *f.shape[2:])
    if k % 2 == 0:
        k -= 1
    per = SSIMMetric(spatial_dims=3, data_range=1.0, win_size=k, kernel_sigma=kernel_sigma, reduction="none")(f, r)
    per = per.reshape(-1).double()
    return {
        "SSIM": float(per.mean()),
        "SSIM per volume": per.tolist(),
        "protocol": {
            "implementation": f"monai.metrics.SSIMMetric(spatial_dims=3, data_range=1.0, win_size={k}, "
            f"kernel_sigma={kernel_sigma}), per volume, mean over volumes",
            "n_volumes": int(f.shape[0]),
        },
    }
