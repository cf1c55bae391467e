"""What every method sees and implements: one interface, ``fit`` then ``generate``.

The runner calls, once per run::

    info = method.fit(train_subjects, task, engine)
    volumes = method.generate(conditions, scalars, subjects, engine)   # per test batch

Most methods steer a frozen, pretrained latent diffusion model (``FrozenLDM``) with spatial
conditions (:class:`Method`): they define ``predict_noise`` and inherit ``fit``/``generate``, which
hand them to the suite's training loop and DDIM sampler (the ``engine``, passed in by the runner:
methods never import the benchmark). Others make volumes themselves (:class:`DirectMethod`, the
super-resolution baselines) and define ``fit``/``generate``. A method owns only its trainable parts;
the base model is held by reference and is never registered as a submodule, so
``method.state_dict()`` holds the method alone.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class MethodError(ValueError):
    """An unknown method, a method asked for a task it does not support, a missing or bad setting, or a
    broken plugin."""


def _describe(value: Any) -> str:
    if not isinstance(value, torch.Tensor):
        return f"a {type(value).__name__}, not a tensor"
    return f"shape {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"


def check_noise_prediction(name: str, eps: Any, z_t: torch.Tensor) -> None:
    """``predict_noise``'s contract, checked by the engine at its first call: a floating tensor of the
    noisy latent's shape and dtype. Without it PyTorch broadcasts a wrong shape silently through the loss
    and the sampler. Under autocast (bf16 training on CUDA) a lower-precision prediction is what
    autocast makes of a correct method, so there only the shape and a floating dtype are required."""
    if not isinstance(eps, torch.Tensor) or eps.shape != z_t.shape:
        fix = "return one noise value per latent voxel and channel"
    elif not eps.is_floating_point() or (eps.dtype != z_t.dtype and not torch.is_autocast_enabled(z_t.device.type)):
        fix = "return it in the latent's dtype"
    else:
        return
    raise MethodError(f"method '{name}' predict_noise returned {_describe(eps)}; the engine expects the noisy "
                      f"latent's {_describe(z_t)}: {fix}")


def check_generated(name: str, volumes: Any, shape: Sequence[int], finite: bool = True) -> None:
    """``generate``'s contract, checked by the runner on every batch: a floating tensor of ``shape``
    (batch, 1, X, Y, Z), with finite values when ``finite``."""
    shape = tuple(shape)
    if not (isinstance(volumes, torch.Tensor) and volumes.is_floating_point() and tuple(volumes.shape) == shape):
        raise MethodError(f"method '{name}' generate returned {_describe(volumes)}; the runner expects floats of "
                          f"shape {shape}: return one (1, X, Y, Z) volume per subject of the batch at the "
                          "profile's image shape")
    if finite and not bool(torch.isfinite(volumes).all()):
        bad = int((~torch.isfinite(volumes)).sum())
        raise MethodError(f"method '{name}' generate returned {bad} non-finite values (NaN or inf); return finite "
                          "values in [0, 1]")


@dataclass(frozen=True)
class NoSettings:
    """The settings of a method that takes none."""


_TYPE_NAMES = {bool: ("true or false", "booleans"), int: ("an integer", "integers"), float: ("a number", "numbers"),
               str: ("a string", "strings")}


def _type_name(hint: Any, plural: bool = False) -> str:
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(typing.get_args(hint)[0], plural=True)}"
    return _TYPE_NAMES[hint][plural] if hint in _TYPE_NAMES else getattr(hint, "__name__", str(hint))


def _convert(value: Any, hint: Any) -> Any:
    """``value`` as a field of type ``hint``, or TypeError. A boolean is not a number; an integer for a
    float becomes ``float(x)``, as the methods cast it (YAML reads ``1`` as an integer)."""
    if typing.get_origin(hint) is list:
        if not isinstance(value, (list, tuple)):
            raise TypeError(hint)
        return [_convert(v, typing.get_args(hint)[0]) for v in value]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (isinstance(value, bool) and hint is not bool):
        raise TypeError(hint)
    return value


def build_settings(settings_class: type, section: Mapping[str, Any], method: str) -> Any:
    """The dataclass ``settings_class`` of method ``method`` built from its profile section
    (``methods.<method>``): every key a field, every field without a default given, every value of the
    field's type; a MethodError names the first that is not."""
    fields = {f.name: f for f in dataclasses.fields(settings_class)}
    where = f"the profile's methods.{method} section"
    for key in section:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"it takes: {', '.join(fields) or 'none'}"
            raise MethodError(f"method '{method}' has no setting '{key}' ({hint}); fix the key in {where}")
    types = typing.get_type_hints(settings_class)
    values = {}
    for name, field in fields.items():
        if name in section:
            try:
                values[name] = _convert(section[name], types[name])
            except TypeError:
                raise MethodError(f"method '{method}' setting '{name}' expects {_type_name(types[name])}, got "
                                  f"{section[name]!r}; fix it in {where}") from None
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise MethodError(f"method '{method}' needs the setting 'methods.{method}.{name}' in the profile; "
                              f"add it to {where}")
    return settings_class(**values)


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


class Engine(Protocol):
    """What the runner passes to ``fit`` and ``generate`` (``benchmark.run.session.RunSession``)."""

    settings: Any      # method training (benchmark.engine.training.TrainSettings: steps, batch_size, lr, checkpoint_every, ...)
    run_dir: Path      # the run's folder: checkpoints, resumed from when present
    seed: int
    progress: bool
    device: str

    def train(self, method: "Method", train_subjects: Sequence[Any], task: Any) -> dict[str, Any]:
        """The suite's training loop on ``method.training_loss`` (resumable); returns the fit info."""

    def sample(self, predict_noise: Callable[..., torch.Tensor], conditions: Conditions, scalars: torch.Tensor,
               subjects: Sequence[Any]) -> torch.Tensor:
        """DDIM-sample one batch from ``predict_noise``, each subject from its fixed initial noise."""


class BaseMethod(nn.Module):
    """What every method is. Subclass :class:`Method` (steering the frozen model) or
    :class:`DirectMethod` (making volumes itself) and register it with ``methods.registry.register``.

    ``condition_channels`` maps each condition modality of the task to its channel count;
    ``config`` is this method's section of the profile (``profile.methods.<name>``). ``Settings`` is
    the dataclass of the settings the method takes, one typed field per key of that section; the
    method reads them built from it as ``self.settings`` (:func:`build_settings`). A built-in method's
    fields have no defaults (their values live in the profiles); a plugin's may have them, so that it
    runs without a section, and ``--override methods.<name>.<key>=value`` still reaches them.
    ``family`` is the kind of method (``datasets.tasks``: a task takes some families); ``tasks`` (set
    by ``register``) narrows it to named tasks, or is None.

    ``fit(train_subjects, task, engine)`` trains whatever the method trains, checkpointing in
    ``engine.run_dir`` and resuming from it, and returns a dict for the run record with any of:
    ``steps``, ``losses`` (per step), ``seconds_per_step``, ``batch_size``, ``wall_seconds``,
    ``peak_memory`` (dict), ``resumed_from``. It also keeps what ``generate`` needs to know about the
    task (e.g. the super-resolution factor). ``generate(conditions, scalars, subjects, engine)`` gets
    a test batch's conditions (``Conditions`` at image resolution), scalars (B, 4) and ``Subject``
    objects and returns (B, 1, X, Y, Z) in [0, 1]; it may leave a summary for the record in
    ``self.generate_info``. ``uses_base_model`` says whether the method runs the frozen base model
    (its parameters are then part of the method's cost); when False the runner builds the method
    with ``base=None`` and never loads the base model for it.
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = "generation"
    tasks: ClassVar[tuple[str, ...] | None] = None
    uses_base_model: ClassVar[bool] = True
    Settings: ClassVar[type] = NoSettings  # a dataclass: the settings the method takes

    def __init__(self, base: FrozenLDM, condition_channels: Mapping[str, int], config: Mapping[str, Any]):
        super().__init__()
        # A list keeps the frozen model out of this module's parameters and state_dict.
        self._base_ref = [base]
        self.condition_channels = dict(condition_channels)
        self.settings = build_settings(self.Settings, config, self.name or type(self).__name__)
        self.generate_info: dict[str, Any] = {}

    @property
    def base(self) -> FrozenLDM:
        return self._base_ref[0]

    @classmethod
    def supports(cls, task: Any) -> bool:
        """Whether the method takes ``task`` (a ``datasets.tasks.Task``): the task takes its family and,
        when the method names its tasks, it is one of them."""
        return task.takes(cls.family) and (cls.tasks is None or task.name in cls.tasks)

    def fit(self, train_subjects: Sequence[Any], task: Any, engine: Engine) -> dict[str, Any]:
        raise NotImplementedError(f"method '{self.name}' must implement fit")

    def generate(self, conditions: Conditions, scalars: torch.Tensor, subjects: Sequence[Any],
                 engine: Engine | None = None) -> torch.Tensor:
        raise NotImplementedError(f"method '{self.name}' must implement generate")

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())


class Method(BaseMethod):
    """A method that steers the frozen model's sampler: define ``predict_noise`` (and, optionally,
    ``training_loss`` and ``prepare``); ``fit`` and ``generate`` hand it to the suite's engine.

    A part of ``predict_noise`` that depends on the conditions alone (no timestep, no latent: VCM's
    condition encoder, ControlNet's input-hint CNN, T2I-Adapter's features) may be wrapped in
    :meth:`condition_features`. While the engine holds :meth:`reusing_condition_features` open
    (sampling and the control probe, where the parameters are frozen and the same conditions come at
    every DDIM step and draw), it is computed once per conditions object instead of at every call.
    ``reuse_condition_features`` (the profile's ``speed.reuse_condition_features``) switches this off.
    """

    reuse_condition_features: bool = True
    _feature_cache: dict | None = None

    def prepare(self, train_subjects: Sequence[Any]) -> None:
        """Optional hook, called once before training with the training subjects."""

    @contextlib.contextmanager
    def reusing_condition_features(self):
        """Within this block (no gradients, parameters unchanged), :meth:`condition_features` computes
        each feature once per conditions object."""
        outer = self._feature_cache
        self._feature_cache = {} if self.reuse_condition_features else None
        try:
            yield
        finally:
            self._feature_cache = outer

    def condition_features(self, key: str, conditions: Conditions, compute: Callable[[], Any]) -> Any:
        """``compute()``, a function of ``conditions`` alone, or its value from an earlier call with the
        same conditions object (same tensors, unmodified) inside :meth:`reusing_condition_features`."""
        cache = self._feature_cache
        if cache is None or torch.is_grad_enabled():
            return compute()
        identity = tuple((id(t), t._version) for t in (*conditions.tensors.values(), *conditions.present.values()))
        hit = cache.get((key, id(conditions)))
        if hit is not None and hit[0] is conditions and hit[1] == identity:
            return hit[2]
        value = compute()
        cache[(key, id(conditions))] = (conditions, identity, value)  # holding it keeps its id unique
        return value

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

    def fit(self, train_subjects: Sequence[Any], task: Any, engine: Engine) -> dict[str, Any]:
        """The suite's training loop on ``training_loss``."""
        return engine.train(self, train_subjects, task)

    def generate(self, conditions: Conditions, scalars: torch.Tensor, subjects: Sequence[Any],
                 engine: Engine | None = None) -> torch.Tensor:
        """The suite's DDIM sampler on ``predict_noise``."""
        if engine is None:
            raise ValueError(f"method '{self.name}' samples through the suite's engine; pass engine=")
        with self.reusing_condition_features():
            return engine.sample(self.predict_noise, conditions, scalars, subjects)


class DirectMethod(BaseMethod):
    """A method that makes volumes itself instead of steering the frozen model's sampler
    (super-resolution baselines such as LIIF-3D, InverseSR, interpolation): define ``generate`` and,
    if it trains, ``fit`` (the default trains nothing). It takes its own sizes from ``self.settings``
    and may use ``engine.settings.checkpoint_every``, ``engine.run_dir``, ``engine.seed`` and
    ``engine.progress``; a super-resolution method sets ``family = "super_resolution"``.
    """

    uses_base_model: ClassVar[bool] = False

    def fit(self, train_subjects: Sequence[Any], task: Any, engine: Engine) -> dict[str, Any]:
        """Train if the method trains; the default trains nothing."""
        return {}
