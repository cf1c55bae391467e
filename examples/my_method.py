"""A complete user-defined method, in its own file, outside the suite.

    python run_benchmark.py --profile smoke --plugin examples/my_method.py --methods residual_shift --sizes 10

It adds to the frozen model's noise prediction a shift computed from the condition brought
down to the latent grid by average pooling. The last convolution starts at zero, so before
training the method is exactly the frozen model. Its one setting, ``width``, is a field of its
``Settings`` dataclass with a default, so no profile needs a section for it;
``--override methods.residual_shift.width=32`` changes it.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import Method
from methods.registry import register


@register("residual_shift")
class ResidualShift(Method):
    @dataclass
    class Settings:  # the settings it takes (profile section methods.residual_shift), with defaults
        width: int = 16  # hidden channels

    def __init__(self, base, condition_channels, config):
        super().__init__(base, condition_channels, config)
        width, latent_channels = self.settings.width, base.latent_shape[0]
        self.net = nn.Sequential(
            nn.Conv3d(sum(condition_channels.values()) + latent_channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv3d(width, latent_channels, 3, padding=1),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def predict_noise(self, z_t, t, conditions, scalars):
        with torch.no_grad():  # the base model stays frozen; no gradient needed through it
            eps = self.base.unet(z_t, t, scalars)
        condition = F.avg_pool3d(conditions.stacked(), self.base.compression)
        return eps + self.net(torch.cat([condition, eps], dim=1))
