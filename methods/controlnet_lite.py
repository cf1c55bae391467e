"""ControlNet-LITE: ControlNet with the trainable encoder copy replaced by a reduced stack of 3D
convolutions (Yarish, "ControlNetLite - smaller and faster ControlNet?", 2023), as the VCM
authors ported it to 3D (VCM suppl. B.3; ``Ahn-Ssu/VCM`` ``models/ControlNetLITE.py``, ``mode='lite'``).

Structure (see :class:`methods._light_blocks.LiteControlNet3D`): ControlNet's input-hint CNN
encoder takes the image-resolution condition down to the latent grid (stride-2 3x3x3 convolutions,
``hint_channels`` wide, zero-initialised output conv); per encoder level of the frozen UNet, as many
3x3x3 convolutions + SiLU as the UNet has resnets there, 2x2x2 average pooling between levels and
one conv + SiLU as middle block; zero 1x1x1 convolutions turn every intermediate map into the
residual that MONAI's ``DiffusionModelUNet`` adds to the matching skip connection
(``down_block_additional_residuals``) and to its middle block (``mid_block_additional_residual``),
exactly as ControlNet's outputs are added. Zero convolutions make the controlled model equal to the
frozen one at the start of training.

Multimodal: the modalities are concatenated along channels into the single hint encoder (the
authors' class takes one ``conditioning_embedding_in_channels`` input); a dropped modality arrives
as zeros.

Settings: :class:`LiteSettings` (``methods.controlnet_lite``; paper: ``hint_channels`` 16, 32, 96, 256).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch

from methods._light_blocks import LiteControlNet3D, condition_input, unet_layout
from methods.base import Conditions, FrozenLDM, Method
from methods.registry import register


@dataclass(frozen=True)
class LiteSettings:
    hint_channels: list[int]   # input-hint encoder widths: one more than the autoencoder's stride-2 stages


class LiteControlNetMethod(Method):
    """Shared by ControlNet-LITE and ControlNet-MLP; ``kernel_size`` picks the variant."""

    Settings = LiteSettings
    kernel_size: ClassVar[int] = 3

    def __init__(self, base: FrozenLDM, condition_channels: Mapping[str, int], config: Mapping[str, Any]):
        super().__init__(base, condition_channels, config)
        self.net = LiteControlNet3D(
            unet_layout(base.diffusion_config),
            condition_channels=sum(self.condition_channels.values()),
            hint_channels=self.settings.hint_channels,
            compression=base.compression,
            kernel_size=self.kernel_size,
            method=self.name,
        )

    def predict_noise(
        self, z_t: torch.Tensor, t: torch.Tensor, conditions: Conditions, scalars: torch.Tensor
    ) -> torch.Tensor:
        down, mid = self.condition_features(  # the residuals depend on the condition alone
            "residuals", conditions, lambda: self.net(condition_input(conditions, self.condition_channels).to(z_t.dtype)))
        # Gradients flow through the frozen UNet (its parameters do not require grad) to the residuals.
        return self.base.unet(z_t, t, scalars, down_residuals=down, mid_residual=mid)


@register("controlnet_lite")
class ControlNetLite(LiteControlNetMethod):
    kernel_size = 3
