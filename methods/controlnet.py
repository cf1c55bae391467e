"""ControlNet (Zhang & Agrawala 2023) in 3D, as ported by the VCM authors (supplementary B.3).

MONAI's ``ControlNet`` built from the frozen UNet's configuration: a trainable copy of the
UNet's encoder and middle block, initialised from the frozen weights; the input-hint CNN
encoder (MONAI ``ControlNetConditioningEmbedding``, widths ``hint_channels``, one stride-2
stage per halving from the image to the latent grid, zero-initialised output conv) whose
output is added after the copy's first convolution; a zero-initialised 1x1 convolution on
every skip feature and on the middle block. Its residuals go into the frozen UNet through
``down_residuals`` / ``mid_residual``. The copy sees the same input as the frozen UNet
(``base.unet_input(z_t, scalars)``: latent + scalars broadcast over space). Conditions of
every modality are concatenated along channels (a dropped modality is zero) into the hint.

``cross_attention``: whether the copy keeps the UNet's cross-attention on the scalars. The VCM
authors' port left it out (``false``): MONAI's ControlNet with ``with_conditioning=False`` (plain
self-attention blocks at the UNet's attention levels) is what Table 5 counts (the evidence:
``docs/METHODS.md``, "ControlNet"). Without it, the self-attention blocks have no counterpart in
the frozen UNet and start from MONAI's initialisation; everything else (input conv, time
embedding, residual blocks, group norms) is copied. With ``cross_attention: true`` the copy is
complete and gets the scalars as context too.

At initialisation every residual is zero, so the method predicts exactly what the frozen
model does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from monai.networks.nets import ControlNet as MonaiControlNet

from methods._blocks import copy_matching_weights, downsampling_levels, precomputed_child, unet_context, unet_kwargs
from methods.base import Conditions, FrozenLDM, Method
from methods.registry import MethodError, register


@dataclass(frozen=True)
class ControlNetSettings:
    hint_channels: list[int]   # input-hint encoder widths: one more than the autoencoder's stride-2 stages
    cross_attention: bool      # the copy keeps the UNet's cross-attention on the scalars (the authors': false)


@register("controlnet")
class ControlNet(Method):
    Settings = ControlNetSettings

    def __init__(self, base: FrozenLDM, condition_channels: Mapping[str, int], config: Mapping[str, Any]):
        super().__init__(base, condition_channels, config)
        hint = self.settings.hint_channels
        self.cross_attention = self.settings.cross_attention
        need = downsampling_levels(base.compression, "controlnet")
        if len(hint) - 1 != need:
            raise MethodError(
                f"methods.controlnet.hint_channels {hint} give {len(hint) - 1} stride-2 stages, but the "
                f"autoencoder compresses by {base.compression} ({need} stages); give {need + 1} widths"
            )
        kwargs = unet_kwargs(base.diffusion_config, MonaiControlNet, self.cross_attention, drop=("out_channels",))
        self.net = MonaiControlNet(
            **kwargs,
            conditioning_embedding_in_channels=sum(self.condition_channels.values()),
            conditioning_embedding_num_channels=tuple(hint),
        )
        # The trainable copy starts from the frozen UNet (MONAI's copy_weights_to_controlnet).
        copied, fresh = copy_matching_weights(self.net, base.diffusion)
        self.copied_from_base = copied
        # Left as built: the zero convolutions, the hint encoder, and (without cross-attention)
        # the self-attention blocks, which the frozen UNet does not have.
        self.fresh_parameters = [n for n in fresh if not n.startswith("controlnet_")]

    def residuals(self, z_t: torch.Tensor, t: torch.Tensor, conditions: Conditions, scalars: torch.Tensor):
        hint = conditions.stacked().to(dtype=z_t.dtype)
        context = unet_context(self.base, scalars) if self.cross_attention else None
        x = self.base.unet_input(z_t, scalars)
        if self._feature_cache is None or torch.is_grad_enabled():
            return self.net(x, timesteps=t, controlnet_cond=hint, context=context)
        # Sampling or probe: the input-hint CNN depends on the condition alone; run it once per batch.
        embedded = self.condition_features("hint", conditions, lambda: self.net.controlnet_cond_embedding(hint))
        with precomputed_child(self.net, "controlnet_cond_embedding", embedded):
            return self.net(x, timesteps=t, controlnet_cond=hint, context=context)

    def predict_noise(self, z_t, t, conditions, scalars):
        down, mid = self.residuals(z_t, t, conditions, scalars)
        # Gradients flow through the frozen UNet to the residuals; its own weights need none.
        return self.base.unet(z_t, t, scalars, down_residuals=down, mid_residual=mid)
