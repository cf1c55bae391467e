"""The profile's typed schema: one dataclass per section, a type and a one-line meaning per key.

The schema only checks: values live in ``benchmark/profiles/base.yaml`` (every default, once) and the
profiles that extend it, and are read through :class:`benchmark.profiles.Profile`. Every field is
required unless marked optional (a key some profiles lack, which the code then treats as "none").
The ``methods`` section stays a free mapping per method (a method's settings are its own).
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping


class ProfileError(ValueError):
    """A profile name, file, key, value or override the suite cannot use."""


def key(doc: str, optional: bool = False):
    """A profile key: its meaning, and whether a profile may leave it out. No default: the values live
    in base.yaml, once."""
    return field(metadata={"doc": doc, "optional": optional})


@dataclass(frozen=True)
class Data:
    seed: int = key("seed of the synthetic population and of the splits")
    pretrain_pool: int = key("subjects the base model learns from (the stand-in for UK Biobank)")
    train_pool: int = key("benchmark training pool; the sizes are nested prefixes of it")
    test_set: int = key("test subjects")
    validation_set: int = key("validation subjects: every choice (tuning, plateaus, the probe) is made on these")
    sizes: list[int] = key("training-set sizes N of the grid")
    voxel_mm: list[float] = key("voxel size (X, Y, Z) real data is resampled to")
    field_of_view_mm: list[float] = key("box in mm (X, Y, Z): image_shape x voxel_mm")
    field_of_view_centre_mm: list[float] = key("MNI mm at the box's centre; scans must be in MNI space")


@dataclass(frozen=True)
class Autoencoder:
    channels: list[int] = key("widths per level; len - 1 downsamplings")
    num_res_blocks: int = key("residual blocks per level")
    latent_channels: int = key("channels of the latent grid")
    norm_num_groups: int = key("GroupNorm groups")
    crop: list[int] = key("random training crop (X, Y, Z); absent: whole volumes", optional=True)
    steps: int = key("pretraining steps (0: none)")
    batch_size: int = key("volumes per step")
    lr: float = key("peak learning rate")
    kl_weight: float = key("weight of the KL term beside L1 reconstruction")
    warmup_steps: int = key("linear warm-up steps before the cosine decay", optional=True)
    checkpoint_every: int = key("steps between resumable checkpoints", optional=True)


@dataclass(frozen=True)
class DecoderFinetune:
    steps: int = key("steps of the decoder alone on latents of the frozen encoder (0: none)")
    batch_size: int = key("volumes per step")
    lr: float = key("peak learning rate")
    warmup_steps: int = key("linear warm-up steps")
    checkpoint_every: int = key("steps between resumable checkpoints")


@dataclass(frozen=True)
class Diffusion:
    channels: list[int] = key("UNet widths per level")
    attention_levels: list[bool] = key("self-attention at each level")
    num_head_channels: list[int] = key("attention head width per level (0: no attention)")
    num_res_blocks: int = key("residual blocks per level")
    norm_num_groups: int = key("GroupNorm groups")
    resblock_updown: bool = key("residual blocks for down- and upsampling")
    steps: int = key("pretraining steps (0: none)")
    batch_size: int = key("latents per step")
    lr: float = key("peak learning rate")
    warmup_steps: int = key("linear warm-up steps before the cosine decay", optional=True)
    checkpoint_every: int = key("steps between resumable checkpoints", optional=True)
    ema_decay: float = key("EMA decay of the final weights (0: the last step's)", optional=True)
    scale_factor: float = key("latent scale factor of loaded weights (BrainLDM's)", optional=True)


@dataclass(frozen=True)
class DiffusionFinetune:
    steps: int = key("steps of training on with offset noise (0: none)")
    batch_size: int = key("latents per step")
    lr: float = key("peak learning rate")
    lr_floor: float = key("cosine decay down to lr x lr_floor (1: constant)")
    offset_noise: float = key("weight of one Gaussian constant per volume and channel added to the noise")
    warmup_steps: int = key("linear warm-up steps")
    checkpoint_every: int = key("steps between resumable checkpoints")
    ema_decay: float = key("EMA decay of the final weights (0: the last step's)")


@dataclass(frozen=True)
class Scheduler:
    num_train_timesteps: int = key("DDPM timesteps")
    schedule: str = key("beta schedule (MONAI's name)")
    beta_start: float = key("first beta")
    beta_end: float = key("last beta")


@dataclass(frozen=True)
class Training:
    budget: str = key("steps: the same steps at every N; epochs: steps = epochs x ceil(N / batch_size)")
    steps: int = key("optimiser steps per run (budget steps)")
    epochs: int = key("epochs per run (budget epochs)")
    recipe: str = key("tuned (benchmark/recipes/), profile (these settings) or paper (profiles.paper_recipe)")
    batch_size: int = key("examples per optimiser step")
    micro_batch_size: int = key("examples per forward pass; below batch_size the gradient accumulates")
    mixed_precision: str = key("fp32 or bf16 (autocast on CUDA only)")
    lr: float = key("peak learning rate")
    lr_by_method: dict[str, float] = key("lr of a named method instead of lr", optional=True)
    weight_decay: float = key("AdamW weight decay")
    warmup_steps: int = key("linear warm-up steps (schedule linear)")
    schedule: str = key("authors (warm-up over warmup_fraction, cosine to lr x lr_floor) or linear")
    warmup_fraction: float = key("fraction of the run spent warming up (schedule authors)")
    lr_floor: float = key("start and end of the authors' schedule, as a fraction of lr")
    flip_probability: float = key("probability of a left-right flip of each example")
    checkpoint_every: int = key("steps between checkpoints; the control probe runs at each")


@dataclass(frozen=True)
class Tuning:
    size: int = key("N the recipe is tuned at; the recipe is used at every size")
    learning_rates: list[float] = key("the learning rates tried for every method")
    validation_subjects: int = key("validation subjects whose Control Δ selects")
    max_noise_mse_ratio: float = key("a trial whose noise MSE / frozen is above this is never selected")
    seed: int = key("seed of the tuning runs")


@dataclass(frozen=True)
class Probe:
    enabled: bool = key("run the control probe before training and at every checkpoint")
    subjects: int = key("first validation subjects probed, each also with another's condition")
    bands: int = key("equal timestep bands")
    draws: int = key("fixed (noise, timestep) draws per subject and band")


@dataclass(frozen=True)
class Sampling:
    ddim_steps: int = key("DDIM steps per sample")
    n_test: int = key("test subjects sampled per run")
    batch_size: int = key("volumes sampled together")


@dataclass(frozen=True)
class Judge:
    steps: int = key("training steps of the Dice judge")


@dataclass(frozen=True)
class InDomain:
    steps_2d: int = key("training steps of the in-domain 2D feature extractor")
    steps_3d: int = key("training steps of the in-domain 3D feature extractor")


@dataclass(frozen=True)
class Metrics:
    reference_volumes: int = key("real training volumes that train the judge and the in-domain extractors")
    frd: bool = key("compute the Fréchet Radiomics Distance")
    judge: Judge = key("the Dice judge (metrics.judge.JudgeConfig)")
    in_domain: InDomain = key("fallback feature extractors (metrics.extractors.InDomainConfig)")


@dataclass(frozen=True)
class Speed:
    channels_last_convs: bool = key("3D convs with few channels in channels_last_3d")
    fused_activations: bool = key("MONAI Swish(alpha=1) as one fused nn.SiLU")
    reuse_condition_features: bool = key("a time-independent condition encoder runs once per batch")
    reuse_frozen_prediction: bool = key("probe: the frozen prediction of one noisy latent computed once")
    fused_optimizer: bool = key("method training: AdamW's fused kernel, one pass over the parameters per step")


@dataclass(frozen=True)
class ProfileSchema:
    name: str = key("the profile's name (set by the loader from its file name)")
    description: str = key("one line on what the profile is for")
    image_shape: list[int] = key("volume shape (X, Y, Z) in RAS; axial slices index Z")
    base_weights: str = key("shipped, pretrain or brainldm: where the frozen base model comes from")
    data: Data = key("the synthetic population and its splits")
    autoencoder: Autoencoder = key("BrainLDM's AutoencoderKL and its pretraining")
    decoder_finetune: DecoderFinetune = key("pretraining stage 4: the decoder alone", optional=True)
    diffusion: Diffusion = key("BrainLDM's DiffusionModelUNet and its pretraining")
    diffusion_finetune: DiffusionFinetune = key("pretraining stage 5: offset noise", optional=True)
    scheduler: Scheduler = key("the DDPM noise schedule")
    training: Training = key("method training")
    tuning: Tuning = key("python run_benchmark.py tune: one search space for every method")
    probe: Probe = key("the control probe (benchmark.engine.probe)")
    sampling: Sampling = key("DDIM sampling of the test subjects")
    metrics: Metrics = key("what the metrics train and compute")
    methods: dict[str, dict] = key("each method's own settings, by method name")
    speed: Speed = key("the same numbers in less time (not in the config hash)")


_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def type_name(hint: Any) -> str:
    """``hint`` in words, for an error message."""
    if hint in _NAMES:
        return _NAMES[hint]
    args = typing.get_args(hint)
    if typing.get_origin(hint) is list:
        return f"a list of {_plural(args[0])}"
    return f"a mapping of names to {_plural(args[1])}" if args else "a mapping"


def _plural(hint: Any) -> str:
    return "booleans" if hint is bool else f"{type_name(hint).split(' ', 1)[1]}s"


def fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` has the type ``hint`` (an integer is a number; a boolean is not)."""
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is dict:
        return isinstance(value, dict)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        return isinstance(value, list) and all(fits(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) and fits(v, args[1]) for k, v in value.items())
    raise TypeError(f"the profile schema uses type {hint!r}, which fits() does not check")


def section_at(parts: list[str]) -> type | None:
    """The dataclass of the section at ``parts`` (``[]``: the top level); None for a free mapping
    (``methods``) or a path that is not a section."""
    cls = ProfileSchema
    for part in parts:
        hint = typing.get_type_hints(cls).get(part)
        if not dataclasses.is_dataclass(hint):
            return None
        cls = hint
    return cls


def keys_at(parts: list[str]) -> set[str]:
    """The keys the schema allows in the section at ``parts``; empty outside the schema."""
    cls = section_at(parts)
    return {f.name for f in dataclasses.fields(cls)} if cls is not None else set()


def field_type(parts: list[str]) -> Any:
    """The declared type of the key at ``parts``; None outside the schema (a method's settings)."""
    cls = section_at(parts[:-1])
    return typing.get_type_hints(cls).get(parts[-1]) if cls is not None else None


def closest(word: str, choices, prefix: str = "", noun: str = "keys") -> str:
    """``; did you mean 'x'?`` for the closest of ``choices``, else the list of them."""
    match = difflib.get_close_matches(word, sorted(choices), n=1)
    return f"; did you mean '{prefix}{match[0]}'?" if match else f"; the {noun} there are: {', '.join(sorted(choices))}"


def check(data: Mapping, where: str, partial: bool = False) -> None:
    """Check every key and value of profile ``data`` against the schema (``where`` starts each error).
    ``partial``: one file of a chain, whose missing keys come from its parent and whose null values
    remove the parent's."""
    _check_section(data, ProfileSchema, [], where, partial)


def _check_section(data: Mapping, cls: type, path: list[str], where: str, partial: bool) -> None:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    prefix = "".join(f"{p}." for p in path)
    section = f"section '{'.'.join(path)}'" if path else "the top level"
    for name, value in data.items():
        if name not in fields:
            raise ProfileError(f"{where}: unknown key '{prefix}{name}' in {section}{closest(name, fields, prefix)}")
        if value is None and partial:
            continue  # a child's null removes its parent's key
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, Mapping):
                raise ProfileError(f"{where}: '{prefix}{name}' is a section and expects a mapping, got {value!r}")
            _check_section(value, hint, path + [name], where, partial)
        elif not fits(value, hint):
            raise ProfileError(f"{where}: '{prefix}{name}' expects {type_name(hint)}, got {value!r}")
    if not partial:
        missing = [n for n, f in fields.items() if n not in data and not f.metadata["optional"]]
        if missing:
            raise ProfileError(f"{where}: key '{prefix}{missing[0]}' is missing; set it in base.yaml or in the profile")
