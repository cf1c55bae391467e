"""LDM trained from scratch (VCM supplementary B.3, after Dorjsembe et al., JBHI 2024).

BrainLDM's UNet architecture, randomly initialised and trained on the N pairs only, with
the conditions put directly into its input: the latent, the four scalars broadcast over
space (as BrainLDM does) and the conditions brought to the latent grid, concatenated.

``cross_attention``: Dorjsembe et al.'s conditional DDPM has no cross-attention (``false``),
its conditions enter by concatenation only, and the VCM authors' scratch LDM follows it — MONAI's
UNet with ``with_conditioning=False`` (plain self-attention blocks at the attention levels) is
exactly what Table 5 counts (``docs/METHODS.md``, "Fine-tuned and scratch LDM"). With
``cross_attention: true`` the scalars also go in as cross-attention context.

Conditions reach the latent grid by ``condition_downsample`` (see ``methods.ldm_finetune``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from monai.networks.nets import DiffusionModelUNet

from methods._blocks import to_latent_grid, unet_context, unet_kwargs
from methods.base import FrozenLDM, Method
from methods.ldm_finetune import conditions_on_latent_grid
from methods.registry import register


@dataclass(frozen=True)
class LDMScratchSettings:
    condition_downsample: str   # how conditions reach the latent grid (methods._blocks.to_latent_grid)
    cross_attention: bool       # the scalars also as cross-attention context (Dorjsembe et al.: false)


@register("ldm_scratch")
class LDMScratch(Method):
    Settings = LDMScratchSettings

    def __init__(self, base: FrozenLDM, condition_channels: Mapping[str, int], config: Mapping[str, Any]):
        super().__init__(base, condition_channels, config)
        self.downsample = self.settings.condition_downsample
        to_latent_grid(torch.zeros(1, 1, 2, 2, 2), (1, 1, 1), self.downsample)  # fail early on a bad mode
        self.cross_attention = self.settings.cross_attention
        kwargs = unet_kwargs(base.diffusion_config, DiffusionModelUNet, self.cross_attention)
        kwargs["in_channels"] = int(kwargs["in_channels"]) + sum(self.condition_channels.values())
        self.unet = DiffusionModelUNet(**kwargs)

    def predict_noise(self, z_t, t, conditions, scalars):
        cond = conditions_on_latent_grid(conditions, z_t.shape[2:], self.downsample, z_t)
        x = torch.cat([self.base.unet_input(z_t, scalars), cond], dim=1)
        context = unet_context(self.base, scalars) if self.cross_attention else None
        return self.unet(x, timesteps=t, context=context)
