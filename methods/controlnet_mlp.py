"""ControlNet-MLP: ControlNet-LITE with every per-level 3x3x3 convolution replaced by a 1x1x1
projection (a per-voxel MLP), as in Yarish's ControlNetLite and the VCM authors' 3D port
(``Ahn-Ssu/VCM`` ``models/ControlNetLITE.py``, ``mode='mlp'``).

Everything else is ControlNet-LITE's (see :mod:`methods.controlnet_lite`): ControlNet's 3D
input-hint CNN encoder brings the condition to the latent grid; 1x1x1 projections + SiLU per
resnet of each encoder level of the frozen UNet, 2x2x2 average pooling between levels, a 1x1x1
middle block; zero 1x1x1 convolutions feed MONAI's additional-residual inputs, so the controlled
model starts equal to the frozen one. Multimodal: channel concatenation into the hint encoder.

Settings: ControlNet-LITE's :class:`methods.controlnet_lite.LiteSettings` (``methods.controlnet_mlp``).
"""
from __future__ import annotations

from methods.controlnet_lite import LiteControlNetMethod
from methods.registry import register


@register("controlnet_mlp")
class ControlNetMLP(LiteControlNetMethod):
    kernel_size = 1
