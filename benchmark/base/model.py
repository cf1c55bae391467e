"""The frozen base model every method controls: BrainLDM's architecture (AutoencoderKL +
DiffusionModelUNet conditioned on four scalars), built from a profile.

``BaseLDM`` implements ``methods.base.FrozenLDM``. Pretraining, caching and BrainLDM loading
live in ``benchmark.base.pretrain``.
"""
from __future__ import annotations

import contextlib
from typing import Any, Mapping, Sequence

import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from torch import nn

NUM_SCALARS = 4  # sex, age, ventricular volume, brain volume


def autoencoder_config(profile) -> dict[str, Any]:
    ae = profile.autoencoder
    levels = len(ae.channels)
    return dict(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        channels=tuple(ae.channels),
        latent_channels=ae.latent_channels,
        num_res_blocks=ae.num_res_blocks,
        norm_num_groups=ae.norm_num_groups,
        norm_eps=1e-6,
        attention_levels=(False,) * levels,  # BrainLDM's autoencoder has no attention
        with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
    )


def diffusion_config(profile) -> dict[str, Any]:
    d = profile.diffusion
    latent_channels = profile.autoencoder.latent_channels
    return dict(
        spatial_dims=3,
        in_channels=latent_channels + NUM_SCALARS,  # latent + scalars broadcast over space
        out_channels=latent_channels,
        channels=tuple(d.channels),
        attention_levels=tuple(d.attention_levels),
        num_head_channels=tuple(d.num_head_channels),
        num_res_blocks=d.num_res_blocks,
        norm_num_groups=d.norm_num_groups,
        norm_eps=1e-6,
        resblock_updown=d.resblock_updown,
        with_conditioning=True,
        transformer_num_layers=1,
        cross_attention_dim=NUM_SCALARS,  # the same scalars as cross-attention context
        upcast_attention=True,
    )


def scheduler_config(profile) -> dict[str, Any]:
    s = profile.scheduler
    return dict(
        num_train_timesteps=s.num_train_timesteps,
        schedule=s.schedule,
        beta_start=s.beta_start,
        beta_end=s.beta_end,
        clip_sample=False,  # latents are not bounded to [-1, 1]
    )


class BaseLDM(nn.Module):
    """Autoencoder + diffusion UNet + schedulers behind the ``FrozenLDM`` interface."""

    num_scalars = NUM_SCALARS
    _memo: dict | None = None  # open inside reusing_predictions()

    def __init__(
        self,
        image_shape: Sequence[int],
        ae_config: Mapping[str, Any],
        unet_config: Mapping[str, Any],
        sched_config: Mapping[str, Any],
        scale_factor: float = 1.0,
    ):
        super().__init__()
        self.image_shape = tuple(int(s) for s in image_shape)
        self.ae_config = dict(ae_config)
        self.diffusion_config = dict(unet_config)
        self.sched_config = dict(sched_config)
        self.autoencoder = AutoencoderKL(**self.ae_config)
        self.diffusion = DiffusionModelUNet(**self.diffusion_config)
        self.register_buffer("_scale_factor", torch.tensor(float(scale_factor)))
        self.train_scheduler = DDPMScheduler(**self.sched_config)
        self.compression = 2 ** (len(self.ae_config["channels"]) - 1)
        bad = [s for s in self.image_shape if s % self.compression]
        if bad:
            raise ValueError(
                f"image shape {self.image_shape} is not divisible by the autoencoder's compression "
                f"{self.compression}; choose a shape whose sides are multiples of {self.compression}"
            )
        self.latent_shape = (self.ae_config["latent_channels"],) + tuple(
            s // self.compression for s in self.image_shape
        )

    @classmethod
    def from_profile(cls, profile, scale_factor: float = 1.0) -> "BaseLDM":
        """A randomly initialised model of the profile's architecture (pretrain or load next)."""
        return cls(
            profile.image_shape,
            autoencoder_config(profile),
            diffusion_config(profile),
            scheduler_config(profile),
            scale_factor,
        )

    # ---- the FrozenLDM interface -------------------------------------------------------
    @property
    def scale_factor(self) -> float:
        return float(self._scale_factor)

    @scale_factor.setter
    def scale_factor(self, value: float) -> None:
        self._scale_factor.fill_(float(value))

    def encode(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, sigma = self.autoencoder.encode(image)
        return mu * self.scale_factor, sigma * self.scale_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(z / self.scale_factor)

    def unet_input(self, z_t: torch.Tensor, scalars: torch.Tensor) -> torch.Tensor:
        spatial = scalars.view(scalars.shape[0], -1, 1, 1, 1).expand(-1, -1, *z_t.shape[2:])
        return torch.cat([z_t, spatial.to(z_t.dtype)], dim=1)

    @staticmethod
    def context(scalars: torch.Tensor) -> torch.Tensor:
        """Cross-attention context: the scalars as one token of width 4."""
        return scalars.view(scalars.shape[0], 1, -1)

    def unet(
        self,
        z_t: torch.Tensor,
        t: torch.Tensor,
        scalars: torch.Tensor,
        down_residuals: Sequence[torch.Tensor] | None = None,
        mid_residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        plain = down_residuals is None and mid_residual is None
        if plain and self._memo is not None and not torch.is_grad_enabled() and not self._steered():
            inputs = (z_t, t, scalars)
            identity = tuple((id(x), x._version) for x in inputs)
            hit = self._memo.get(identity)
            if hit is not None and all(a is b for a, b in zip(hit[0], inputs)):
                return hit[1]
            out = self._predict(z_t, t, scalars, None, None)
            self._memo.clear()  # one entry: the probe asks for one input several times in a row
            self._memo[identity] = (inputs, out)
            return out
        return self._predict(z_t, t, scalars, down_residuals, mid_residual)

    def _predict(self, z_t, t, scalars, down_residuals, mid_residual) -> torch.Tensor:
        return self.diffusion(
            self.unet_input(z_t, scalars),
            timesteps=t,
            context=self.context(scalars),
            down_block_additional_residuals=tuple(down_residuals) if down_residuals is not None else None,
            mid_block_additional_residual=mid_residual,
        )

    @contextlib.contextmanager
    def reusing_predictions(self, enabled: bool = True):
        """Within this block, a plain noise prediction (no residuals, no hook steering the network, no
        gradients) for the very same input tensors is computed once: the control probe asks the frozen
        model, then a method that calls it on the same noisy latent (VCM, MCM) twice more."""
        outer = self._memo
        self._memo = {} if enabled else None
        try:
            yield
        finally:
            self._memo = outer

    def _steered(self) -> bool:
        """Whether a method has hooked into the network (T2I-Adapter adds its features that way)."""
        return any(m._forward_hooks or m._forward_pre_hooks for m in self.diffusion.modules())

    def inference_scheduler(self, num_steps: int) -> DDIMScheduler:
        scheduler = DDIMScheduler(**self.sched_config)
        scheduler.set_timesteps(num_steps)
        return scheduler

    def num_parameters(self) -> dict[str, int]:
        return {
            "autoencoder": sum(p.numel() for p in self.autoencoder.parameters()),
            "diffusion": sum(p.numel() for p in self.diffusion.parameters()),
        }

    def freeze(self) -> "BaseLDM":
        """Eval mode and no gradients for every parameter: methods train around it."""
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self
