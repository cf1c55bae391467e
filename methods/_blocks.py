"""Shared building blocks of the built-in methods (this module registers nothing).

Everything here works on 3D volumes ``(B, C, X, Y, Z)`` and is meant to be reused by
method modules (VCM, ControlNet and its LITE/MLP variants, T2I-Adapter, MCM-L, the LDM
baselines):

- :func:`downsampling_levels` — how many stride-2 stages take the image grid to the latent grid.
- :func:`to_latent_grid` — bring image-resolution conditions to the latent grid without
  parameters (area, i.e. average over each latent voxel's footprint; or trilinear / nearest).
- :func:`presence_gate` — the ``(B,)`` present flags of a modality as a ``(B,1,1,1,1)`` gate,
  so that a dropped modality contributes exactly nothing.
- :func:`zero_module` — zero every parameter of a module ("zero convolution").
- :func:`group_count` — a GroupNorm group count that divides the channel count;
  :func:`num_parameters` — a module's parameter count.
- :class:`ResBlock3d` — the residual block of MONAI's DiffusionModelUNet (GroupNorm, SiLU,
  conv, optional time projection, GroupNorm, SiLU, zero-initialised conv, skip), with the
  time embedding optional and an optional 2x average-pool downsampling.
- :class:`ConditionEncoder` — VCM's asymmetric image-resolution encoder: one stride-2 level
  per multiplier, each ``num_res_blocks`` residual blocks plus a downsampling residual block.
- :func:`hint_encoder` — ControlNet's input-hint CNN (MONAI ``ControlNetConditioningEmbedding``)
  with its stride-2 stage count checked against the autoencoder's compression.
- :func:`copy_matching_weights` — initialise a trainable copy from a frozen model: every
  tensor whose name and shape match is copied; returns what was copied and what was not.
- :func:`widen_input_conv` — widen a ``Conv3d`` for extra input channels, the new weights zero.
- :func:`precomputed_child` — stand a known output in for a submodule for one call (a condition
  encoder computed once per sampling batch).
- :func:`unet_kwargs` — the frozen UNet's kwargs, optionally without its cross-attention,
  filtered to what a MONAI constructor accepts; :func:`unet_context` — its context input.
"""
from __future__ import annotations

import contextlib
import inspect
import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import MethodError


# ---- configuration ---------------------------------------------------------------------


def downsampling_levels(compression: int, method: str = "") -> int:
    """log2 of the autoencoder's compression: stride-2 stages from image to latent grid."""
    levels = int(round(math.log2(compression))) if compression > 0 else -1
    if compression < 1 or 2**levels != compression:
        raise MethodError(
            f"method '{method}' needs the autoencoder's compression to be a power of two, got {compression}"
        )
    return levels


def unet_kwargs(diffusion_config: Mapping[str, Any], target: Callable, cross_attention: bool = True,
                drop: Iterable[str] = ()) -> dict[str, Any]:
    """The frozen UNet's constructor kwargs for ``target`` (a MONAI class), keeping only the
    arguments ``target`` accepts. ``cross_attention=False`` turns the scalar cross-attention
    off (``with_conditioning=False``): MONAI then builds plain self-attention blocks at the
    attention levels instead of transformer blocks with cross-attention."""
    kwargs = dict(diffusion_config)
    for key in drop:
        kwargs.pop(key, None)
    if not cross_attention:
        kwargs["with_conditioning"] = False
        kwargs["cross_attention_dim"] = None
    accepted = inspect.signature(target).parameters
    return {k: v for k, v in kwargs.items() if k in accepted}


def unet_context(base: Any, scalars: torch.Tensor) -> torch.Tensor:
    """The frozen UNet's cross-attention context: ``base.context(scalars)`` where the base
    model has it (BrainLDM: the four scalars as one token of width 4)."""
    context = getattr(base, "context", None)
    return context(scalars) if context is not None else scalars.view(scalars.shape[0], 1, -1)


# ---- parameter-free helpers ------------------------------------------------------------


def to_latent_grid(x: torch.Tensor, size: Sequence[int], mode: str = "area") -> torch.Tensor:
    """Resample image-resolution conditions ``(B, C, X, Y, Z)`` to the latent grid ``size``.

    ``area`` averages each latent voxel's footprint (a mask becomes the fraction of the
    voxel it covers, an image its mean intensity); ``trilinear`` and ``nearest`` interpolate.
    """
    size = tuple(int(s) for s in size)
    if tuple(x.shape[2:]) == size:
        return x
    if mode == "area":
        return F.adaptive_avg_pool3d(x, size)
    if mode == "trilinear":
        return F.interpolate(x, size=size, mode="trilinear", align_corners=False)
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    raise MethodError(f"unknown condition downsampling '{mode}'; use one of: area, trilinear, nearest")


def presence_gate(present: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The ``(B,)`` present flags as a ``(B, 1, 1, 1, 1)`` gate in ``like``'s dtype and device."""
    return present.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.dim() - 1)))


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` in place and return it (a "zero convolution")."""
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module


def group_count(channels: int, preferred: int) -> int:
    """The largest group count <= ``preferred`` that divides ``channels`` (GroupNorm needs it)."""
    return math.gcd(int(channels), int(preferred)) or 1


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- residual blocks and the asymmetric condition encoder --------------------------------


class ResBlock3d(nn.Module):
    """MONAI DiffusionModelUNet's residual block, with the time embedding optional.

    ``x -> GN -> SiLU -> [avgpool 2] -> conv3 -> (+ Linear(temb)) -> GN -> SiLU -> conv3(zero)``
    plus a skip (identity, or a 1x1 conv when the width changes; pooled alike when ``down``).
    The second convolution starts at zero, so a fresh block is its skip path. With
    ``temb_channels=None`` the block has no time projection (VCM's condition encoder).
    """

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int = 32,
                 temb_channels: int | None = None, down: bool = False, norm_eps: float = 1e-6):
        super().__init__()
        self.down = down
        self.norm1 = nn.GroupNorm(group_count(in_channels, norm_groups), in_channels, eps=norm_eps)
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = nn.GroupNorm(group_count(out_channels, norm_groups), out_channels, eps=norm_eps)
        self.conv2 = zero_module(nn.Conv3d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv3d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = F.silu(self.norm1(x))
        if self.down:
            x = F.avg_pool3d(x, 2)
            h = F.avg_pool3d(h, 2)
        h = self.conv1(h)
        if self.time_emb_proj is not None:
            if temb is None:
                raise ValueError("this residual block is time-conditioned: pass the time embedding")
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class ConditionEncoder(nn.Module):
    """VCM's asymmetric encoder part: a condition at image resolution -> the latent grid.

    ``conv3(in -> widths[0])``, then per width ``w``: ``num_res_blocks`` residual blocks to
    ``w`` and one residual block that halves the grid (average pooling, MONAI's
    ``resblock_updown``). ``len(widths)`` stride-2 stages, so ``len(widths)`` must equal
    log2 of the autoencoder's compression. No time embedding (the VCM authors removed it
    from this part). Output: ``(B, widths[-1], X / 2**L, Y / 2**L, Z / 2**L)``.
    """

    def __init__(self, in_channels: int, widths: Sequence[int], num_res_blocks: int = 2,
                 norm_groups: int = 16):
        super().__init__()
        widths = [int(w) for w in widths]
        if not widths or min(widths) < 1:
            raise MethodError(f"a condition encoder needs positive widths, got {widths}")
        self.out_channels = widths[-1]
        self.conv_in = nn.Conv3d(in_channels, widths[0], 3, padding=1)
        blocks: list[nn.Module] = []
        prev = widths[0]
        for w in widths:
            for _ in range(num_res_blocks):
                blocks.append(ResBlock3d(prev, w, norm_groups))
                prev = w
            blocks.append(ResBlock3d(w, w, norm_groups, down=True))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.blocks:
            h = block(h)
        return h


def hint_encoder(in_channels: int, out_channels: int, widths: Sequence[int], compression: int,
                 method: str = "controlnet") -> nn.Module:
    """ControlNet's input-hint CNN in 3D (MONAI ``ControlNetConditioningEmbedding``): conv3 +
    SiLU, then per stage a conv3 and a stride-2 conv3 (each + SiLU), then a zero-initialised
    conv3 to ``out_channels``. ``len(widths) - 1`` stride-2 stages must equal log2 of the
    compression, so that the hint lands exactly on the latent grid."""
    from monai.networks.nets.controlnet import ControlNetConditioningEmbedding

    widths = [int(w) for w in widths]
    need = downsampling_levels(compression, method)
    if len(widths) - 1 != need:
        raise MethodError(
            f"method '{method}': the input-hint encoder's widths {widths} give {len(widths) - 1} stride-2 "
            f"stages, but the autoencoder compresses by {compression} ({need} stages); give {need + 1} widths"
        )
    return ControlNetConditioningEmbedding(spatial_dims=3, in_channels=in_channels,
                                           out_channels=out_channels, channels=widths)


# ---- weight surgery --------------------------------------------------------------------


def copy_matching_weights(target: nn.Module, source: nn.Module) -> tuple[list[str], list[str]]:
    """Copy every parameter and buffer of ``source`` into ``target`` where the name and shape
    match (MONAI's ``copy_weights_to_controlnet`` does ``load_state_dict(strict=False)``).
    Returns ``(copied, fresh)``: the names copied, and the names of ``target`` left as built."""
    src = source.state_dict()
    copied, fresh = [], []
    with torch.no_grad():
        for name, tensor in target.state_dict(keep_vars=True).items():
            other = src.get(name)
            if other is not None and tuple(other.shape) == tuple(tensor.shape):
                tensor.copy_(other)
                copied.append(name)
            else:
                fresh.append(name)
    return copied, fresh


def widen_input_conv(conv: nn.Conv3d, extra: int) -> nn.Conv3d:
    """A copy of ``conv`` with ``extra`` more input channels appended; the old weights are
    kept and the new ones are zero, so at first it computes exactly what ``conv`` did."""
    if not isinstance(conv, nn.Conv3d):
        raise TypeError(f"expected a Conv3d, got {type(conv).__name__}")
    w = conv.weight
    wide = nn.Conv3d(conv.in_channels + extra, conv.out_channels, conv.kernel_size, stride=conv.stride,
                     padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                     bias=conv.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        wide.weight.zero_()
        wide.weight[:, : conv.in_channels].copy_(w)
        if conv.bias is not None:
            wide.bias.copy_(conv.bias)
    return wide


class _Precomputed(nn.Module):
    def __init__(self, value: Any):
        super().__init__()
        self.value = value

    def forward(self, *_args, **_kwargs) -> Any:
        return self.value


@contextlib.contextmanager
def precomputed_child(parent: nn.Module, name: str, value: Any):
    """Within the block, ``parent.<name>`` returns ``value`` instead of computing it: for a library
    network (MONAI's ControlNet) whose forward computes a condition embedding that the caller already
    has. The child is put back afterwards, whatever happens."""
    child = getattr(parent, name)
    setattr(parent, name, _Precomputed(value))
    try:
        yield
    finally:
        setattr(parent, name, child)
