"""The profile's ``speed`` section: options that compute the same numbers in less time.

Each is on by default where it was measured to help and can be switched off to compare
(``python run_benchmark.py bench --compare-off``). None changes what is computed; they change
memory layout, kernel fusion or how often an identical value is recomputed, so results agree with
the options off up to floating-point summation order (``docs/SPEED.md``):

- ``channels_last_convs``: 3D convolutions in ``channels_last_3d``, normalisations contiguous
  (``core.speed.channels_last_convs``): oneDNN's fast path for volumes with few channels, in every
  method; the frozen base autoencoder entirely in channels_last (``channels_last_inference``:
  decoding a batch of samples 1.5x);
- ``fused_activations``: MONAI's ``Swish(alpha=1)`` as ``nn.SiLU`` (``core.speed.fused_swish``);
- ``reuse_condition_features``: at sampling and in the control probe, a condition encoder without a
  time input runs once per batch instead of at every DDIM step or probe draw
  (``methods.base.Method.condition_features``);
- ``reuse_frozen_prediction``: the control probe computes the frozen model's prediction for one
  noisy latent once, not once per prediction that needs it (``BaseLDM.reusing_predictions``);
- ``fused_optimizer``: method training's AdamW runs PyTorch's fused kernel, one pass over all
  parameters per step instead of one loop per tensor (read through ``TrainSettings``).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from benchmark.profile_schema import Speed
from core.speed import channels_last_convs, channels_last_inference, fused_swish
from methods.base import BaseMethod, Method


@dataclass(frozen=True)
class SpeedOptions(Speed):
    """The options (their names and meanings: :class:`benchmark.profile_schema.Speed`; their values: the
    profile, checked when it is loaded) and how they set up a method and the base model."""

    @classmethod
    def from_profile(cls, profile) -> "SpeedOptions":
        return cls(**profile["speed"])

    @classmethod
    def off(cls) -> "SpeedOptions":
        """Every option off: plain PyTorch, to compare with."""
        return cls(**{f.name: False for f in fields(cls)})

    def apply(self, method: BaseMethod) -> BaseMethod:
        """Set ``method`` up with these options (once, right after it is built); returns it."""
        if self.fused_activations:
            fused_swish(method)
        if self.channels_last_convs:
            channels_last_convs(method)
        if isinstance(method, Method):
            method.reuse_condition_features = self.reuse_condition_features
        return method

    def apply_base(self, base) -> None:
        """The frozen base model's autoencoder (decoding every sample, encoding latents) in the layout
        these options say; reversible, so one process can time both."""
        autoencoder = getattr(base, "autoencoder", None)
        if isinstance(autoencoder, torch.nn.Module):
            channels_last_inference(autoencoder, self.channels_last_convs)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}
