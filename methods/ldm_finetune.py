"""Fine-tuned LDM (VCM supplementary B.3): the pretrained UNet itself, trained on the N pairs.

A trainable deep copy of the frozen BrainLDM UNet whose first convolution is widened for the
condition channels: its input is BrainLDM's own (latent + the four scalars broadcast over
space) followed by the conditions brought to the latent grid. The copy keeps the scalars as
cross-attention context. The new input weights start at zero, so at step 0 the method
predicts exactly what the frozen model does; then the whole UNet is trained.

Conditions reach the latent grid without parameters, by ``condition_downsample`` (``area``:
each latent voxel gets the mean of its compression^3 footprint — a mask becomes the fraction it
covers, an image its mean intensity). The paper does not say how; why not pixel-unshuffle:
``docs/METHODS.md``, "Fine-tuned and scratch LDM".
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from methods._blocks import to_latent_grid, unet_context, widen_input_conv
from methods.base import Conditions, FrozenLDM, Method
from methods.registry import MethodError, register


def conditions_on_latent_grid(conditions: Conditions, latent_grid, mode: str, like: torch.Tensor) -> torch.Tensor:
    """All modalities, concatenated in task order, resampled to the latent grid."""
    return to_latent_grid(conditions.stacked().to(dtype=like.dtype), latent_grid, mode)


@dataclass(frozen=True)
class LDMFinetuneSettings:
    condition_downsample: str   # how conditions reach the latent grid (methods._blocks.to_latent_grid)


@register("ldm_finetune")
class LDMFinetune(Method):
    Settings = LDMFinetuneSettings

    def __init__(self, base: FrozenLDM, condition_channels: Mapping[str, int], config: Mapping[str, Any]):
        super().__init__(base, condition_channels, config)
        self.downsample = self.settings.condition_downsample
        to_latent_grid(torch.zeros(1, 1, 2, 2, 2), (1, 1, 1), self.downsample)  # fail early on a bad mode
        extra = sum(self.condition_channels.values())
        self.unet = copy.deepcopy(base.diffusion)
        conv_in = getattr(self.unet.conv_in, "conv", self.unet.conv_in)
        if not isinstance(conv_in, torch.nn.Conv3d):
            raise MethodError("ldm_finetune expects the UNet's conv_in to be a 3D convolution")
        wide = widen_input_conv(conv_in, extra)
        if hasattr(self.unet.conv_in, "conv"):
            self.unet.conv_in.conv = wide
        else:
            self.unet.conv_in = wide
        self.unet.in_channels = wide.in_channels
        for p in self.unet.parameters():
            p.requires_grad_(True)
        self.unet.train()

    def predict_noise(self, z_t, t, conditions, scalars):
        cond = conditions_on_latent_grid(conditions, z_t.shape[2:], self.downsample, z_t)
        x = torch.cat([self.base.unet_input(z_t, scalars), cond], dim=1)
        return self.unet(x, timesteps=t, context=unet_context(self.base, scalars))
