"""What VCM and MCM share: SPADE-style gamma/beta heads and the L1 penalty on them.

Heads: a shared 3x3x3 convolution with LeakyReLU, then one 3x3x3 convolution each for gamma_t and
beta_t at latent shape. ``head_norm``:

* ``instance`` (the VCM authors' code, ``Ahn-Ssu/VCM`` ``model/vcm.py``): their gamma/beta layers are
  MONAI ``Convolution`` blocks with ``act=None`` and the default ``norm``, i.e. each convolution is
  followed by a parameter-free InstanceNorm (eps 1e-5). It removes the per-sample, per-channel mean
  and divides by the spatial std: below a std of ~3e-3 (sqrt(eps)) it acts as a gain of ~300 on the
  spatial variation, above it it caps the modulation at unit std.
* ``none``: plain convolutions, as SPADE's heads (the parameter count is the same).

L1 penalty ``lambda (||gamma||_1 + ||beta||_1)`` (VCM B.2, MCM's objective), ``l1_mode``:

* ``paper``: ``1 / lambda = B C x y z``, the element count of the latent batch;
* ``script``: the authors' training script (``acceler-VCM-newSemantics.py``) unpacks the latent
  shape as ``(B, c, h, w, c)``, so the last axis stands in for the channels: ``1 / lambda = B z x y z``
  (3/20 of the paper's value at BrainLDM's 3 x 20 x 28 x 20 latent, 3/12 at the ``cpu`` profile's).

``l1_weight`` multiplies either (0: no penalty).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from methods._blocks import zero_module
from methods.registry import MethodError

HEAD_NORMS = ("instance", "none")
L1_MODES = ("paper", "script")


def check_choice(value: str, choices: tuple[str, ...], key: str) -> str:
    value = str(value)
    if value not in choices:
        raise MethodError(f"{key} must be one of {', '.join(choices)}, got {value!r}; fix it in the profile")
    return value


class ModulationHeads(nn.Module):
    """hidden features (B, in_channels, x, y, z) -> (gamma_t, beta_t), each (B, latent_channels, x, y, z)."""

    def __init__(self, in_channels: int, hidden: int, latent_channels: int, norm: str = "instance",
                 zero_init: bool = False):
        super().__init__()
        self.norm_kind = check_choice(norm, HEAD_NORMS, "head_norm")
        self.head_shared = nn.Conv3d(in_channels, hidden, 3, padding=1)
        self.head_gamma = nn.Conv3d(hidden, latent_channels, 3, padding=1)
        self.head_beta = nn.Conv3d(hidden, latent_channels, 3, padding=1)
        # InstanceNorm3d defaults: no affine parameters, no running statistics (as MONAI's Convolution).
        self.norm = nn.InstanceNorm3d(latent_channels) if self.norm_kind == "instance" else nn.Identity()
        if zero_init:
            zero_module(self.head_gamma)
            zero_module(self.head_beta)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.leaky_relu(self.head_shared(h), 0.01)
        return self.norm(self.head_gamma(h)), self.norm(self.head_beta(h))


def l1_penalty(gamma: torch.Tensor, beta: torch.Tensor, weight: float, mode: str = "paper") -> torch.Tensor:
    """``weight * lambda * (||gamma||_1 + ||beta||_1)`` with lambda by ``mode`` (see the module docstring)."""
    b, c, x, y, z = gamma.shape
    count = b * c * x * y * z if mode == "paper" else b * z * x * y * z
    return (weight / count) * (gamma.abs().sum() + beta.abs().sum())
