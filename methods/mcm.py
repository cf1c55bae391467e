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
    ``head_norm: instance`` (default) does the same, ``none`` gives SPADE's plain convolutions
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
    MCM's published U-Net has 32 base channels, multipliers (1, 1, 2, 4), two residual blocks per
    level and attention at resolution 16 of a 64x64 latent. A 20x28x20 latent (paper) takes only
    three resolution levels (5x7x5 does not halve again), so the ``paper`` profile uses
    32 x (1, 2, 4) = (32, 64, 128), two residual blocks, attention at the last two levels (the
    pattern of BrainLDM's UNet), ``hidden`` 64 and ``head_channels`` 128 as in the VCM authors'
    heads: 11.4518M parameters for the LV task, Table 5's MCM figure (11.45M) to the last digit.
    (Attention at the last level only, MCM's "16 of 64", would give 11.37M; (1, 1, 2) 3.35M.)
    ``mcm_l`` widens the same network to VCM's time-U-Net widths (64, 128, 256): 44.92M at
    ``paper`` against VCM's 45.88M.

Initialisation
    As for VCM (see ``methods.vcm``): the gamma/beta convolutions keep PyTorch's default
    initialisation (small near-constant fields at the start, the U-Net's output convolution being
    zero-initialised by MONAI); ``zero_init_heads: true`` zeroes them so that the method starts
    exactly as the frozen model, at the price of a very slow start.

Profile keys (``methods.mcm`` / ``methods.mcm_l``): ``channels``, ``attention_levels``,
``num_res_blocks``, ``norm_num_groups``, ``hidden``, ``head_channels``; optional ``l1_weight``
(1.0), ``l1_mode`` (``paper``), ``head_norm`` (``instance``), ``zero_init_heads`` (false),
``condition_resize`` (``area``). Attention blocks have one head
(head width = the level's width), as BrainLDM's and VCM's.
"""
from __future__ import annotations

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


class MCMNet(nn.Module):
    """MCM's modulation network: time-conditioned U-Net + SPADE-style gamma/beta heads."""

    def __init__(self, in_channels: int, latent_channels: int, channels, attention_levels, num_res_blocks: int,
                 norm_num_groups: int, hidden: int, head_channels: int, zero_init_heads: bool, method: str,
                 head_norm: str = "instance"):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        attention_levels = tuple(bool(a) for a in attention_levels)
        if len(attention_levels) != len(channels):
            raise MethodError(
                f"methods.{method}.attention_levels {list(attention_levels)} must have one entry per "
                f"level of channels {list(channels)}"
            )
        if any(c % norm_num_groups for c in channels):
            raise MethodError(
                f"methods.{method}: widths {list(channels)} must be multiples of norm_num_groups "
                f"{norm_num_groups}; fix them in the profile"
            )
        self.unet = DiffusionModelUNet(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=hidden,
            channels=channels,
            attention_levels=attention_levels,
            num_res_blocks=num_res_blocks,
            num_head_channels=channels,   # one head wherever there is attention (the mid block always has it)
            norm_num_groups=norm_num_groups,
            norm_eps=1e-6,
            resblock_updown=True,
            with_conditioning=False,      # time only: MCM does not see the base model's scalars
            upcast_attention=True,
        )
        self.heads = ModulationHeads(hidden, head_channels, latent_channels, norm=head_norm,
                                     zero_init=zero_init_heads)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(self.unet(x, timesteps=t))


class MCMMethod(Method):
    """Shared by ``mcm`` and ``mcm_l``; they differ only in their profile section."""

    def __init__(self, base: FrozenLDM, condition_channels: Mapping[str, int], config: Mapping[str, Any]):
        super().__init__(base, condition_channels, config)


        if not self.condition_channels:
            raise MethodError(f"method '{self.name}' needs at least one condition modality")
        latent_c = int(base.latent_shape[0])
        self.l1_weight = float(self.setting("l1_weight"))
        self.l1_mode = check_choice(self.setting("l1_mode"), L1_MODES, f"methods.{self.name}.l1_mode")
        self.resize = str(self.setting("condition_resize"))
        self.net = MCMNet(
            in_channels=2 * latent_c + sum(self.condition_channels.values()),
            latent_channels=latent_c,
            channels=self.setting("channels"),
            attention_levels=self.setting("attention_levels"),
            num_res_blocks=int(self.setting("num_res_blocks")),
            norm_num_groups=int(self.setting("norm_num_groups")),
            hidden=int(self.setting("hidden")),
            head_channels=int(self.setting("head_channels")),
            zero_init_heads=bool(self.setting("zero_init_heads")),
            method=self.name,
            head_norm=self.setting("head_norm"),
        )

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
