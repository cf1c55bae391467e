"""Building blocks shared by the lightweight baselines (T2I-Adapter, ControlNet-LITE/-MLP, MCM).

Nothing here registers a method. What lives here:

* :func:`pixel_unshuffle_3d` - the volumetric pixel-unshuffle of T2I-Adapter (VCM suppl. B.3).
* :func:`unet_layout` - the encoder layout of the frozen MONAI ``DiffusionModelUNet`` read from its
  config: channels and number of the tensors its ``down_block_additional_residuals`` expects.
* :func:`add_to_level_outputs` - a context manager that adds one feature map to the output of each
  encoder level of the frozen UNet *inside* its forward pass (T2I-Adapter's injection).
* :class:`LiteControlNet3D` - the ControlNet-LITE / ControlNet-MLP network as the VCM authors ported
  Yarish's ControlNetLite to 3D (``Ahn-Ssu/VCM``, ``models/ControlNetLITE.py``).
* :func:`condition_input` - the task's condition modalities concatenated along channels.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from methods._blocks import hint_encoder, zero_module
from methods.base import Conditions
from methods.registry import MethodError


def pixel_unshuffle_3d(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, C, X, Y, Z) -> (B, C*f^3, X/f, Y/f, Z/f), the 3D analogue of ``torch.nn.PixelUnshuffle``.

    Channel ``c*f^3 + i*f^2 + j*f + k`` holds voxel ``(i, j, k)`` of each f-cube of channel ``c``
    (the same channel-major order as the 2D op).
    """
    b, c, *spatial = x.shape
    if len(spatial) != 3:
        raise ValueError(f"pixel_unshuffle_3d expects a (B, C, X, Y, Z) tensor, got shape {tuple(x.shape)}")
    if any(s % factor for s in spatial):
        raise ValueError(
            f"volume of shape {tuple(spatial)} cannot be pixel-unshuffled by {factor}; "
            f"every side must be a multiple of {factor}"
        )
    gx, gy, gz = (s // factor for s in spatial)
    x = x.reshape(b, c, gx, factor, gy, factor, gz, factor)
    x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, c * factor**3, gx, gy, gz)


@dataclass(frozen=True)
class UNetLayout:
    """Encoder layout of a MONAI ``DiffusionModelUNet``.

    ``level_channels[i]`` and ``res_blocks[i]`` describe encoder level ``i``; ``residual_channels``
    lists, in order, the channels of every tensor the UNet keeps for its skip connections (and so of
    every entry of ``down_block_additional_residuals``): the output of ``conv_in``, then per level the
    output of each resnet (after its attention, if any) and, except at the last level, of its
    downsampler. ``mid_channels`` is the width of the middle block.
    """

    level_channels: tuple[int, ...]
    res_blocks: tuple[int, ...]
    residual_channels: tuple[int, ...]
    mid_channels: int


def unet_layout(config: Mapping) -> UNetLayout:
    channels = tuple(int(c) for c in config["channels"])
    nrb = config["num_res_blocks"]
    res_blocks = tuple(int(n) for n in nrb) if isinstance(nrb, Sequence) else (int(nrb),) * len(channels)
    residual_channels = [channels[0]]
    for i, (c, n) in enumerate(zip(channels, res_blocks)):
        residual_channels += [c] * n
        if i < len(channels) - 1:
            residual_channels.append(c)   # the downsampler's output
    return UNetLayout(channels, res_blocks, tuple(residual_channels), channels[-1])


def condition_input(conditions: Conditions, condition_channels: Mapping[str, int]) -> torch.Tensor:
    """The modalities concatenated along channels in task order, checked against the method's setup."""
    names = list(condition_channels)
    missing = [n for n in names if n not in conditions.tensors]
    if missing:
        raise MethodError(
            f"conditions {missing} were expected (the method was built for {names}) but the batch has "
            f"{conditions.names}; build the method with the task's condition channels"
        )
    return torch.cat([conditions.tensors[n] for n in names], dim=1)


def _level_output_module(block: nn.Module) -> nn.Module:
    """The sub-module of a MONAI down block whose output is the level's last feature map
    before the downsampler: its last attention if it has attentions, else its last resnet."""
    attentions = getattr(block, "attentions", None)
    if attentions is not None and len(attentions) > 0:
        return attentions[-1]
    resnets = getattr(block, "resnets", None)
    if resnets is None or len(resnets) == 0:
        raise MethodError(
            f"the frozen UNet's down block {type(block).__name__} has no resnets; T2I-Adapter needs "
            "MONAI's DiffusionModelUNet block layout"
        )
    return resnets[-1]


@contextlib.contextmanager
def add_to_level_outputs(unet: nn.Module, features: Sequence[torch.Tensor]) -> Iterator[None]:
    """While active, the frozen UNet adds ``features[i]`` to the output of encoder level ``i``
    (after the level's resnets/attentions, before its downsampler), as T2I-Adapter adds its
    features to the encoder's intermediate features. Hooks are removed on exit, always."""
    blocks = list(unet.down_blocks)
    if len(features) != len(blocks):
        raise MethodError(
            f"{len(features)} adapter features for a UNet with {len(blocks)} encoder levels"
        )
    handles = []
    try:
        for block, feat in zip(blocks, features):
            def hook(_module, _inputs, output, feat=feat):
                return output + feat
            handles.append(_level_output_module(block).register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


class LiteControlNet3D(nn.Module):
    """ControlNet-LITE (``kernel_size=3``) or ControlNet-MLP (``kernel_size=1``) in 3D.

    Follows ``Ahn-Ssu/VCM`` ``models/ControlNetLITE.py`` (class ``ControlNetLITE``, ``mode='lite'`` /
    ``'mlp'``), the VCM authors' 3D port of Yarish's ControlNetLite:

    * ControlNet's input-hint CNN encoder (conv + SiLU pairs, stride-2 convolutions down to the
      latent grid, zero-initialised output convolution to the UNet's first width); here MONAI's
      ``ControlNetConditioningEmbedding`` through :func:`methods._blocks.hint_encoder` (the same
      network as the authors' copy of it).
    * Instead of a trainable copy of the UNet encoder, per encoder level ``res_blocks[i]``
      convolutions (``k x k x k``; ``k=3`` LITE, ``k=1`` MLP), each followed by SiLU, with 2x2x2
      average pooling between levels, and one more convolution + SiLU as the middle block. There is
      no normalisation, attention or time conditioning in these blocks, and - as in the authors'
      port, where ``h = self.conv_in(x)`` is commented out - the noisy latent does not enter: the
      residuals are a function of the condition alone.
    * One zero-initialised 1x1x1 convolution per skip tensor of the frozen UNet (and one for the
      middle block), so the controlled model equals the frozen one at initialisation.
    * The time-embedding MLP (``Linear(c0, 4c0)``, SiLU, ``Linear(4c0, 4c0)``) that the authors'
      class builds is kept: its output is not used by the blocks (so it never receives a gradient)
      but it is part of the module and of Table 5's parameter count.
    """

    def __init__(
        self,
        layout: UNetLayout,
        condition_channels: int,
        hint_channels: Sequence[int],
        compression: int,
        kernel_size: int,
        method: str = "controlnet_lite",
    ):
        super().__init__()
        c0 = layout.level_channels[0]
        self.layout = layout
        self.time_embed = nn.Sequential(nn.Linear(c0, 4 * c0), nn.SiLU(), nn.Linear(4 * c0, 4 * c0))
        self.hint_encoder = hint_encoder(condition_channels, c0, hint_channels, compression, method)
        pad = kernel_size // 2
        self.levels = nn.ModuleList()
        prev = c0
        for c, n in zip(layout.level_channels, layout.res_blocks):
            convs = nn.ModuleList()
            for j in range(n):
                convs.append(nn.Conv3d(prev if j == 0 else c, c, kernel_size, padding=pad))
            self.levels.append(convs)
            prev = c
        self.mid = nn.Conv3d(layout.mid_channels, layout.mid_channels, kernel_size, padding=pad)
        self.zero_convs = nn.ModuleList(zero_module(nn.Conv3d(c, c, 1)) for c in layout.residual_channels)
        self.zero_mid = zero_module(nn.Conv3d(layout.mid_channels, layout.mid_channels, 1))

    def forward(self, condition: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        h = self.hint_encoder(condition)
        states = [h]
        last = len(self.levels) - 1
        for i, convs in enumerate(self.levels):
            for conv in convs:
                h = F.silu(conv(h))
                states.append(h)
            if i < last:
                h = F.avg_pool3d(h, kernel_size=2, stride=2)
                states.append(h)
        h = F.silu(self.mid(h))
        down = [zc(s) for zc, s in zip(self.zero_convs, states)]
        return down, self.zero_mid(h)
