"""T2I-Adapter (Mou et al., AAAI 2024) in 3D, as the VCM authors ported it
(VCM suppl. B.3; ``Ahn-Ssu/VCM`` ``models/adapters.py``, class ``Adapter_XL``, itself a 3D port of
``TencentARC/T2I-Adapter`` ``Adapter/models/adapters.py``).

Network
    The image-resolution condition is pixel-unshuffled in 3D by the autoencoder's compression
    factor ``r`` (:func:`methods._light_blocks.pixel_unshuffle_3d`: ``C`` channels at
    ``X x Y x Z`` become ``C r^3`` channels on the latent grid), then ``conv_in`` (3x3x3) to the
    frozen UNet's first width and, per encoder level ``i`` of the frozen UNet, ``num_res_blocks``
    residual blocks of width ``channels[i]`` (the UNet's). A residual block is the port's
    ``ResnetBlock`` with its defaults (``sk=False``, ``ksize=3``, ``use_conv=True``): an optional
    stride-2 3x3x3 convolution (first block of every level after the first), ``in_conv`` 3x3x3,
    then ``x + conv(ReLU(conv(x)))``. The output of each level's last block is that level's
    feature map. No normalisation, no time input, no zero initialisation (as in the original).

Injection (how T2I-Adapter's per-level features map onto MONAI's UNet)
    T2I-Adapter adds feature ``F_i`` to the encoder's hidden state at the end of level ``i``
    (after the level's resnets/attention, before its downsampler), so ``F_i`` both reaches the
    skip connection of that position *and* flows on through the downsampler into every deeper
    level and the middle block. MONAI's ``down_block_additional_residuals`` instead adds tensors to
    the stored skip connections only, after the whole encoder has run: adding ``F_i`` there would
    touch one skip tensor and nothing downstream, which is **not** equivalent. We therefore add the
    features inside the frozen UNet's forward pass with forward hooks on the last resnet/attention
    of each level (:func:`methods._light_blocks.add_to_level_outputs`), which reproduces the
    original injection exactly; the frozen UNet and its forward code are unchanged otherwise.
    Gradients flow through the frozen UNet (its parameters do not require grad) to the adapter.

Multimodal
    ``multimodal: concat``: the modalities are concatenated along channels before the
    pixel-unshuffle into one adapter (the port's single ``cin`` input), a dropped modality arriving
    as zeros. ``multimodal: compose``: T2I-Adapter's own composition of conditions, one adapter per
    modality and the features summed, each adapter's features multiplied by its modality's
    presence flag (a dropped modality contributes nothing); this doubles the parameters.

Settings: :class:`T2IAdapterSettings` (``methods.t2i_adapter``). The widths are the frozen UNet's.
Why ``num_res_blocks`` is 6 at ``paper`` (the port's 3 gives half of Table 5) and 4 in the smaller
profiles: ``docs/METHODS.md``, "T2I-Adapter".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from methods._blocks import presence_gate
from methods._light_blocks import add_to_level_outputs, condition_input, pixel_unshuffle_3d, unet_layout
from methods.base import Conditions, FrozenLDM, Method
from methods.registry import MethodError, register


class AdapterResBlock(nn.Module):
    """The port's ``ResnetBlock(in_c, out_c, down, ksize=3, sk=False, use_conv=True)``."""

    def __init__(self, in_channels: int, out_channels: int, down: bool):
        super().__init__()
        self.down = nn.Conv3d(in_channels, in_channels, 3, stride=2, padding=1) if down else None
        self.in_conv = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.block1 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down is not None:
            x = self.down(x)
        x = self.in_conv(x)
        return x + self.block2(self.act(self.block1(x)))


class Adapter3D(nn.Module):
    """Pixel-unshuffled condition -> one feature map per encoder level of the frozen UNet."""

    def __init__(self, in_channels: int, level_channels: Sequence[int], num_res_blocks: int):
        super().__init__()
        self.conv_in = nn.Conv3d(in_channels, level_channels[0], 3, padding=1)
        self.levels = nn.ModuleList()
        for i, c in enumerate(level_channels):
            blocks = [
                AdapterResBlock(level_channels[i - 1] if (i > 0 and j == 0) else c, c, down=(i > 0 and j == 0))
                for j in range(num_res_blocks)
            ]
            self.levels.append(nn.Sequential(*blocks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.conv_in(x)
        features = []
        for level in self.levels:
            x = level(x)
            features.append(x)
        return features


@dataclass(frozen=True)
class T2IAdapterSettings:
    num_res_blocks: int   # residual blocks per level of the adapter
    multimodal: str       # concat (one adapter on all modalities) or compose (one per modality, summed)


@register("t2i_adapter")
class T2IAdapter(Method):
    Settings = T2IAdapterSettings

    def __init__(self, base: FrozenLDM, condition_channels: Mapping[str, int], config: Mapping[str, Any]):
        super().__init__(base, condition_channels, config)
        layout = unet_layout(base.diffusion_config)
        self.factor = int(base.compression)
        nrb = self.settings.num_res_blocks
        if nrb < 1:
            raise MethodError(f"t2i_adapter.num_res_blocks must be at least 1, got {nrb}")
        self.mode = self.settings.multimodal
        if self.mode not in ("concat", "compose"):
            raise MethodError(
                f"t2i_adapter.multimodal must be 'concat' or 'compose', got '{self.mode}'"
            )
        r3 = self.factor**3
        if self.mode == "compose" and len(self.condition_channels) > 1:
            self.adapters = nn.ModuleDict(
                {n: Adapter3D(c * r3, layout.level_channels, nrb) for n, c in self.condition_channels.items()}
            )
        else:
            total = sum(self.condition_channels.values())
            self.adapters = nn.ModuleDict({"all": Adapter3D(total * r3, layout.level_channels, nrb)})

    def features(self, conditions: Conditions, dtype: torch.dtype) -> list[torch.Tensor]:
        if "all" in self.adapters:
            x = condition_input(conditions, self.condition_channels).to(dtype)
            return self.adapters["all"](pixel_unshuffle_3d(x, self.factor))
        condition_input(conditions, self.condition_channels)  # checks that every modality is there
        summed: list[torch.Tensor] | None = None
        for name, adapter in self.adapters.items():
            x = conditions.tensors[name].to(dtype)
            feats = adapter(pixel_unshuffle_3d(x, self.factor))
            feats = [f * presence_gate(conditions.present[name], f) for f in feats]
            summed = feats if summed is None else [a + b for a, b in zip(summed, feats)]
        assert summed is not None
        return summed

    def predict_noise(
        self, z_t: torch.Tensor, t: torch.Tensor, conditions: Conditions, scalars: torch.Tensor
    ) -> torch.Tensor:
        feats = self.condition_features("features", conditions, lambda: self.features(conditions, z_t.dtype))
        with add_to_level_outputs(self.base.diffusion, feats):
            return self.base.unet(z_t, t, scalars)
