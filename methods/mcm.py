"""MCM, the multimodal conditioning module (Ham et al., "Modulating pretrained diffusion models for
multimodal image synthesis", SIGGRAPH 2023), in 3D: ``mcm`` at MCM's own size and ``mcm_l`` at
VCM's complexity (VCM suppl. B.3: "MCM-L, which has the same complexity as our VCM but utilizes
the MCM architecture").

Network
    A small time-conditioned U-Net (MONAI ``DiffusionModelUNet``: residual blocks with time
    embedding, GroupNorm, SiLU; self-attention at the configured levels) whose input is the
    noisy latent ``z_t``, the frozen model's prediction ``eps`` and the new conditions resized
    to the latent grid (averaged over each latent voxel's footprint,
    :func:`methods._blocks.to_latent_grid` ``area``), concatenated along channels. Its
    ``hidden``-channel output goes through SPADE-style heads - a shared 3x3x3 convolution to
    ``head_channels`` with LeakyReLU, then one 3x3x3 convolution each for ``gamma_t`` and
    ``beta_t`` at latent shape - and the prediction is ``eps * (1 + gamma_t) + beta_t``. The
    frozen model runs under ``no_grad``: MCM needs no gradient through it.

    MCM's code is not public; the VCM authors' ``models/vcm.py`` (``Ahn-Ssu/VCM``) builds VCM as
    this same network (``time_unet`` + ``mlp_shared`` / ``mlp_gamma`` / ``mlp_beta``, the heads
    marked "following the original works") with VCM's own condition encoder in front, so MCM-L is
    that network with the condition resized to the latent grid instead of encoded from image
    resolution. Their ``mlp_gamma`` / ``mlp_beta`` are MONAI ``Convolution`` blocks with
    ``act=None`` and the default ``norm``, i.e. followed by a parameter-free InstanceNorm:
    ``head_norm: instance`` does the same, ``none`` gives SPADE's plain convolutions
    (``methods._modulation``).

Loss
    MSE on the modulated prediction plus ``l1_weight * lambda (||gamma||_1 + ||beta||_1)`` with
    ``lambda^-1 = B C D H W`` of the latent batch (``l1_mode: paper``) or the authors' script's
    ``B z x y z`` (``l1_mode: script``; the objective their training script calls ``MCM_loss``).

Multimodal
    The modalities are concatenated along channels into the one module (MCM conditions one
    module on all its modalities together), a dropped modality arriving as zeros (the engine
    applies the drop).

Sizes
    The ``paper`` profile fits MCM's published U-Net to a 20x28x20 latent (three levels);
    ``mcm_l`` widens it to VCM's time-U-Net widths. How, and the parameter counts against
    Table 5: ``docs/METHODS.md``, "MCM and MCM-L".

Initialisation
    As for VCM (see ``methods.vcm``): the gamma/beta convolutions keep PyTorch's default
    initialisation (small near-constant fields at the start, the U-Net's output convolution being
    zero-initialised by MONAI); ``zero_init_heads: true`` zeroes them so that the method starts
    exactly as the frozen model, at the price of a very slow start.

Settings: :class:`MCMSettings` (``methods.mcm`` / ``methods.mcm_l``). Attention blocks have one
head (head width = the level's width), as BrainLDM's and VCM's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from methods._blocks import to_latent_grid
from methods._modulation import L1_MODES, ModulationHeads, check_choice, l1_penalty
from methods._light_blocks import condition_input
from methods.base import Conditions, FrozenLDM, Method
from methods.registry import MethodError, register


@dataclass(frozen=True)
class MCMSettings:
    l1_weight: float               # scales the L1 penalty on gamma and beta (the paper: 1; 0: none)
    l1_mode: str                   # lambda: paper (1/lambda = B C x y z) or script (B z x y z)
    condition_resize: str          # how conditions reach the latent grid (methods._blocks.to_latent_grid)
    channels: list[int]            # U-Net width per level
    attention_levels: list[bool]   # self-attention at each level (the middle block always has it)
    num_res_blocks: int            # residual blocks per level
    norm_num_groups: int           # GroupNorm groups (divides every width)
    hidden: int                    # channels of the U-Net's output, into the heads
    head_channels: int             # width of the heads' shared convolution
    zero_init_heads: bool          # zero the gamma/beta convolutions: start exactly as the frozen model
    head_norm: str                 # instance (the VCM authors' heads) or none (SPADE's plain convolutions)


class MCMNet(nn.Module):
    """MCM's modulation network: time-conditioned U-Net + SPADE-style gamma/beta heads."""

    def __init__(self, in_channels: int, latent_channels: int, s: MCMSettings, method: str):
        super().__init__()
        channels = tuple(s.channels)
        if len(s.attention_levels) != len(channels):
            raise MethodError(
                f"methods.{method}.attention_levels {s.attention_levels} must have one entry per "
                f"level of channels {list(channels)}"
            )
        if any(c % s.norm_num_groups for c in channels):
            raise MethodError(
                f"methods.{method}: widths {list(channels)} must be multiples of norm_num_groups "
                f"{s.norm_num_groups}; fix them in the profile"
            )
        self.unet = DiffusionModelUNet(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=s.hidden,
            channels=channels,
            attention_levels=tuple(s.attention_levels),
            num_res_blocks=s.num_res_blocks,
            num_head_channels=channels,   # one head wherever there is attention (the mid block always has it)
            norm_num_groups=s.norm_num_groups,
            norm_eps=1e-6,
            resblock_updown=True,
            with_conditioning=False,      # time only: MCM does not see the base model's scalars
            upcast_attention=True,
        )
        self.heads = ModulationHeads(s.hidden, s.head_channels, latent_channels, norm=s.head_norm,
                                     zero_init=s.zero_init_heads)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(self.unet(x, timesteps=t))


class MCMMethod(Method):
    """Shared by ``mcm`` and ``mcm_l``; they differ only in their profile section."""

    Settings = MCMSettings

    def __init__(self, base: FrozenLDM, condition_channels: Mapping[str, int], config: Mapping[str, Any]):
        super().__init__(base, condition_channels, config)
        if not self.condition_channels:
            raise MethodError(f"method '{self.name}' needs at least one condition modality")
        latent_c = int(base.latent_shape[0])
        self.l1_weight = self.settings.l1_weight
        self.l1_mode = check_choice(self.settings.l1_mode, L1_MODES, f"methods.{self.name}.l1_mode")
        self.resize = self.settings.condition_resize
        self.net = MCMNet(2 * latent_c + sum(self.condition_channels.values()), latent_c, self.settings, self.name)

    def _forward(self, z_t, t, conditions, scalars):
        with torch.no_grad():
            eps = self.base.unet(z_t, t, scalars)
        y = condition_input(conditions, self.condition_channels).to(z_t.dtype)
        y = to_latent_grid(y, z_t.shape[2:], self.resize)
        gamma, beta = self.net(torch.cat([z_t, eps, y], dim=1), t)
        return eps * (1 + gamma) + beta, gamma, beta

    def predict_noise(
        self, z_t: torch.Tensor, t: torch.Tensor, conditions: Conditions, scalars: torch.Tensor
    ) -> torch.Tensor:
        return self._forward(z_t, t, conditions, scalars)[0]

    def training_loss(self, z_t, t, conditions, scalars, noise):
        pred, gamma, beta = self._forward(z_t, t, conditions, scalars)
        return F.mse_loss(pred.float(), noise.float()) + l1_penalty(gamma, beta, self.l1_weight, self.l1_mode)


@register("mcm")
class MCM(MCMMethod):
    """MCM at its own size (Table 5: 11.45M)."""


@register("mcm_l")
class MCML(MCMMethod):
    """MCM-L: MCM's architecture at VCM's complexity (Table 5's VCM: 45.88M)."""
