"""What every method sees and implements.

A method steers a frozen, pretrained latent diffusion model (``FrozenLDM``) with spatial
conditions. It owns only its trainable parts; the base model is held by reference and is
never registered as a submodule, so ``method.state_dict()`` holds the method alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class FrozenLDM(Protocol):
    """The interface of the frozen base model (implemented in ``benchmark.base.model``)."""

    image_shape: tuple[int, int, int]          # (X, Y, Z) of image volumes
    latent_shape: tuple[int, int, int, int]    # (C, x, y, z) of latents
    compression: int                           # image size / latent size, per axis
    scale_factor: float                        # latents are multiplied by this before diffusion
    num_scalars: int                           # 4: sex, age, ventricular volume, brain volume
    diffusion: nn.Module                       # the frozen monai DiffusionModelUNet
    diffusion_config: dict                     # kwargs that rebuild it (monai DiffusionModelUNet)
    train_scheduler: Any                       # monai DDPMScheduler

    def encode(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image (B,1,X,Y,Z) in [0,1] -> (mu, sigma) of the scaled latent, each (B,C,x,y,z)."""

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> image (B,1,X,Y,Z)."""

    def unet_input(self, z_t: torch.Tensor, scalars: torch.Tensor) -> torch.Tensor:
        """BrainLDM's input: the latent with the scalars broadcast over space, concatenated."""

    def unet(
        self,
        z_t: torch.Tensor,
        t: torch.Tensor,
        scalars: torch.Tensor,
        down_residuals: Sequence[torch.Tensor] | None = None,
        mid_residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Noise prediction of the frozen model (scalars also as cross-attention context)."""

    def inference_scheduler(self, num_steps: int) -> Any:
        """A monai DDIMScheduler set to ``num_steps``."""


@dataclass
class Conditions:
    """A batch of spatial conditions at image resolution.

    ``tensors[name]`` is (B, C, X, Y, Z), zero where the modality was dropped;
    ``present[name]`` is (B,) with 1.0 where the modality is given, 0.0 where dropped.
    Names and order follow the task (``datasets.tasks``).
    """

    tensors: dict[str, torch.Tensor]
    present: dict[str, torch.Tensor]

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def select(self, index) -> "Conditions":
        """The conditions of some examples of the batch (``index`` as in tensor indexing)."""
        return Conditions({k: v[index] for k, v in self.tensors.items()},
                          {k: v[index] for k, v in self.present.items()})

    def stacked(self) -> torch.Tensor:
        """All modalities concatenated along channels, in task order."""
        return torch.cat([self.tensors[n] for n in self.tensors], dim=1)

    def to(self, device: torch.device | str) -> "Conditions":
        return Conditions(
            {k: v.to(device) for k, v in self.tensors.items()},
            {k: v.to(device) for k, v in self.present.items()},
        )


class Method(nn.Module):
    """Base class of a spatial-control method. Subclass it and register it with
    ``methods.registry.register``.

    ``condition_channels`` maps each condition modality of the task to its channel count;
    ``config`` is this method's section of the profile (``profile.methods.<name>``), where
    every width and size lives.
    """

    name: ClassVar[str] = ""
    tasks: ClassVar[tuple[str, ...]] = ()

    def __init__(self, base: FrozenLDM, condition_channels: Mapping[str, int], config: Mapping[str, Any]):
        super().__init__()
        # A list keeps the frozen model out of this module's parameters and state_dict.
        self._base_ref = [base]
        self.condition_channels = dict(condition_channels)
        self.config = dict(config)

    @property
    def base(self) -> FrozenLDM:
        return self._base_ref[0]

    def prepare(self, train_subjects: Sequence[Any]) -> None:
        """Optional hook, called once before training with the training subjects."""

    def predict_noise(
        self, z_t: torch.Tensor, t: torch.Tensor, conditions: Conditions, scalars: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError(f"method '{self.name}' must implement predict_noise")

    def training_loss(
        self,
        z_t: torch.Tensor,
        t: torch.Tensor,
        conditions: Conditions,
        scalars: torch.Tensor,
        noise: torch.Tensor,
    ) -> torch.Tensor:
        """Default objective: MSE between predicted and true noise."""
        return F.mse_loss(self.predict_noise(z_t, t, conditions, scalars), noise)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())


class DirectMethod(Method):
    """Base class of a method that produces volumes itself instead of steering the frozen
    model's sampler (super-resolution baselines such as LIIF-3D, InverseSR, interpolation).

    The runner calls, once per run::

        info = method.fit(train_subjects, task, settings, run_dir, seed, progress)
        volume_batch = method.generate(conditions, scalars, subjects)   # per test batch

    ``fit`` trains whatever the method trains (nothing for an optimisation-at-test-time or
    interpolation method), checkpointing in ``run_dir`` and resuming from it when training is
    long; it also records what ``generate`` needs to know about the task (e.g. the SR factor).
    ``settings`` is the suite's method-training section (``benchmark.engine.training.TrainSettings``:
    steps, batch_size, lr, checkpoint_every, ...); a direct method takes its own sizes from
    ``self.config`` (``profile.methods.<name>``) and may use ``settings.checkpoint_every``.
    ``fit`` returns a dict for the run record, with any of: ``steps``, ``losses`` (per step),
    ``seconds_per_step``, ``batch_size``, ``wall_seconds``, ``peak_memory`` (dict), ``resumed_from``.

    ``generate`` gets the test batch's conditions (``Conditions``, at image resolution), its
    scalars (B, 4) and the ``Subject`` objects, and returns (B, 1, X, Y, Z) in [0, 1]. It sets
    its own grad mode (an optimisation method needs gradients). It may leave a summary of what it
    did for the record in ``self.generate_info`` (a dict; the runner stores it).

    ``uses_base_model`` says whether the method runs the frozen base model (its parameters are
    then part of the method's cost); when it is False the runner builds the method with
    ``base=None`` and never loads (or pretrains) the base model for it.
    """

    uses_base_model: ClassVar[bool] = False

    def __init__(self, base: FrozenLDM, condition_channels: Mapping[str, int], config: Mapping[str, Any]):
        super().__init__(base, condition_channels, config)
        self.generate_info: dict[str, Any] = {}

    def predict_noise(self, z_t, t, conditions, scalars):  # noqa: D102  (not a diffusion controller)
        raise NotImplementedError(
            f"method '{self.name}' generates volumes directly (DirectMethod); it has no noise prediction"
        )

    def fit(self, train_subjects: Sequence[Any], task: Any, settings: Any, run_dir: Any, seed: int,
            progress: bool = True) -> dict[str, Any]:
        """Train if the method trains; the default trains nothing."""
        return {}

    def generate(self, conditions: Conditions, scalars: torch.Tensor, subjects: Sequence[Any]) -> torch.Tensor:
        raise NotImplementedError(f"method '{self.name}' must implement generate")
