"""VCM: the Volumetric Conditioning Module (Ahn et al., WACV 2025; supplementary B.2).

A small time-conditioned *asymmetric* U-Net beside the frozen model. Its encoder is deeper
than its decoder: at the paper, base channels 16 with multipliers (1, 2, 3, 4, 8, 16), i.e.
``encoder_channels: [16, 32, 48]`` and ``unet_channels: [64, 128, 256]`` in the profile:

- the first levels (``encoder_channels``, one per stride-2 stage, i.e. log2 of the
  autoencoder's compression: three at compression 8, two at compression 4) encode the
  condition from image resolution down to the latent grid
  (:class:`methods._blocks.ConditionEncoder`: residual blocks without time embedding and a
  residual downsampling block per level, as the authors' ``DiffusionLikeEncoder``);
- the last levels (``unet_channels``) form a time-conditioned MONAI ``DiffusionModelUNet``
  (two-layer MLP time embedding, one linear time projection in every residual block,
  ``num_res_blocks`` residual blocks per level, self-attention where ``attention_levels``
  says and in the middle block) whose decoder uses only those widths. Its input is the noisy
  latent, the frozen model's noise prediction and the encoded condition, concatenated; its
  output has ``unet_channels[0]`` channels (the authors' ``out_channels=64``); no scalars,
  no cross-attention (as the authors' configuration);
- split final layers (SPADE-style, as the authors' code: a shared conv3 + LeakyReLU to
  ``head_hidden`` channels, then one conv3 each) give gamma_t and beta_t at latent shape.

The prediction is ``eps * (1 + gamma_t) + beta_t``; the loss adds
``lambda * (|gamma_t|_1 + |beta_t|_1)`` with ``1 / lambda`` the element count of the latent
batch (paper: 16 x 3 x 20 x 28 x 20), times ``l1_weight`` (1 in the paper).

Multimodal: one condition encoder per modality ("separate asymmetric parts of the encoder
for each condition while keeping the number of parameters", B.2), each with the widths
divided by the number of modalities, so that the encoded conditions concatenated have the
single-condition width and the total stays that of the single-condition VCM; a dropped
modality's encoding is multiplied by its present flag (zero). The authors' code has no
multimodal VCM. ``split_encoder_width: false`` gives every modality a full-width encoder
instead. Parameter counts of both against Table 5: ``docs/METHODS.md``, "VCM".

Heads and penalty (``methods._modulation``): ``head_norm`` ``instance`` (the authors' code: a
parameter-free InstanceNorm after each of the gamma/beta convolutions) or ``none``; ``l1_mode``
``paper`` (1 / lambda = B C x y z) or ``script`` (the authors' script: B z x y z); ``l1_weight``
scales either.

Initialisation: as the authors' code, the gamma/beta convolutions keep PyTorch's default
initialisation. ``zero_init_heads: true`` zeroes them, so that VCM starts exactly as the frozen
model; but then every path to the frozen prediction starts at zero (output convolution, heads), the
gradient reaches the U-Net only after the heads have grown, and training barely moves off the
identity in short budgets (``docs/METHODS.md``, "VCM").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from methods._blocks import ConditionEncoder, downsampling_levels, presence_gate
from methods._modulation import L1_MODES, ModulationHeads, check_choice, l1_penalty
from methods.base import Conditions, FrozenLDM, Method
from methods.registry import MethodError, register


@dataclass(frozen=True)
class VCMSettings:
    encoder_channels: list[int]    # condition-encoder width per stride-2 stage (log2 of the compression)
    unet_channels: list[int]       # time-U-Net width per level; its output has the first width
    num_res_blocks: int            # residual blocks per level, in the encoder and the U-Net
    attention_levels: list[bool]   # self-attention at each U-Net level (the middle block always has it)
    encoder_norm_groups: int       # GroupNorm groups of the condition encoder
    unet_norm_groups: int          # GroupNorm groups of the U-Net (divides every width)
    head_hidden: int               # width of the heads' shared convolution
    zero_init_heads: bool          # zero the gamma/beta convolutions: start exactly as the frozen model
    split_encoder_width: bool      # multimodal: divide the encoder widths by the number of modalities
    l1_weight: float               # scales the L1 penalty on gamma and beta (the paper: 1; 0: none)
    l1_mode: str                   # lambda: paper (1/lambda = B C x y z) or script (B z x y z)
    head_norm: str                 # instance (the authors' code) or none (SPADE's plain convolutions)


@register("vcm")
class VCM(Method):
    Settings = VCMSettings

    def __init__(self, base: FrozenLDM, condition_channels: Mapping[str, int], config: Mapping[str, Any]):
        super().__init__(base, condition_channels, config)
        s = self.settings
        unet_channels = tuple(s.unet_channels)
        self.l1_weight = s.l1_weight
        self.l1_mode = check_choice(s.l1_mode, L1_MODES, "methods.vcm.l1_mode")

        levels = downsampling_levels(base.compression, "vcm")
        if len(s.encoder_channels) != levels:
            raise MethodError(
                f"methods.vcm.encoder_channels {s.encoder_channels} has {len(s.encoder_channels)} levels, but the "
                f"autoencoder compresses by {base.compression}: give {levels} widths (one per stride-2 stage)"
            )
        if len(s.attention_levels) != len(unet_channels):
            raise MethodError(
                f"methods.vcm.attention_levels {s.attention_levels} must have one entry per U-Net level "
                f"{list(unet_channels)}"
            )
        if not self.condition_channels:
            raise MethodError("VCM needs at least one condition modality")

        # One encoder per modality; the widths are split so that the total stays as for one.
        n_mod = len(self.condition_channels) if s.split_encoder_width else 1
        widths = [c // n_mod for c in s.encoder_channels]
        if min(widths) < 1:
            raise MethodError(
                f"methods.vcm.encoder_channels {s.encoder_channels} are too narrow to split over {n_mod} modalities; "
                "widen them"
            )
        self.encoders = nn.ModuleDict({
            name: ConditionEncoder(ch, widths, s.num_res_blocks, s.encoder_norm_groups)
            for name, ch in self.condition_channels.items()
        })
        encoded = sum(e.out_channels for e in self.encoders.values())

        latent_c = base.latent_shape[0]
        bad = [c for c in unet_channels if c % s.unet_norm_groups]
        if bad:
            raise MethodError(
                f"methods.vcm: U-Net widths {unet_channels} must be multiples of unet_norm_groups {s.unet_norm_groups}"
            )
        self.time_unet = DiffusionModelUNet(
            spatial_dims=3,
            in_channels=2 * latent_c + encoded,        # z_t, the frozen model's eps, the encoded condition
            out_channels=unet_channels[0],
            channels=unet_channels,
            attention_levels=tuple(s.attention_levels),
            num_head_channels=tuple(unet_channels),  # one head where there is attention (the mid block always has it)
            num_res_blocks=s.num_res_blocks,
            norm_num_groups=s.unet_norm_groups,
            norm_eps=1e-6,
            resblock_updown=True,
            with_conditioning=False,                 # time only, no cross-attention
        )
        self.heads = ModulationHeads(unet_channels[0], s.head_hidden, latent_c,
                                     norm=s.head_norm, zero_init=s.zero_init_heads)

    # ---- forward ------------------------------------------------------------------------
    def encode_conditions(self, conditions: Conditions, like: torch.Tensor) -> torch.Tensor:
        parts = []
        for name, encoder in self.encoders.items():
            if name not in conditions.tensors:
                raise MethodError(f"VCM was built for condition '{name}' but the batch has {conditions.names}")
            x = conditions.tensors[name].to(dtype=like.dtype)
            h = encoder(x)
            parts.append(h * presence_gate(conditions.present[name], h))
        return torch.cat(parts, dim=1)

    def modulation(self, z_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
                   conditions: Conditions) -> tuple[torch.Tensor, torch.Tensor]:
        """(gamma_t, beta_t), each at latent shape."""
        cond = self.condition_features("encoded", conditions, lambda: self.encode_conditions(conditions, z_t))
        if cond.shape[2:] != z_t.shape[2:]:
            raise MethodError(
                f"VCM's condition encoder gave a grid {tuple(cond.shape[2:])} but the latent grid is "
                f"{tuple(z_t.shape[2:])}; the image shape must be the latent shape times the compression"
            )
        return self.heads(self.time_unet(torch.cat([z_t, eps, cond], dim=1), timesteps=t))

    def _forward(self, z_t, t, conditions, scalars):
        with torch.no_grad():
            eps = self.base.unet(z_t, t, scalars)
        gamma, beta = self.modulation(z_t, eps, t, conditions)
        return eps * (1 + gamma) + beta, gamma, beta

    def predict_noise(self, z_t, t, conditions, scalars):
        return self._forward(z_t, t, conditions, scalars)[0]

    def training_loss(self, z_t, t, conditions, scalars, noise):
        pred, gamma, beta = self._forward(z_t, t, conditions, scalars)
        return F.mse_loss(pred.float(), noise.float()) + l1_penalty(gamma, beta, self.l1_weight, self.l1_mode)
