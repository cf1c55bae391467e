"""What a run is (:class:`RunSpec`, of a :class:`RunKind`) and what the runs of one grid share
(:class:`RunContext`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from pathlib import Path

import torch

from benchmark.engine.latents import LatentCache
from benchmark.run.data_source import DataSource
from datasets.tasks import Task, get_task

RUN_CODE_VERSION = "1"  # bump when a change invalidates finished runs

# The ``method`` of the runs that train no registered method: the reference rows of the task tables
# and of Table 6. They name the runs' records and folders.
REFERENCE = "reference"         # real test volumes against real training volumes
REFERENCE_OTHER = "reference_other"  # real test volumes against another test subject's condition (Dice)
# The suite's own frozen base model alone. The stored name is historical (the base model once was
# BrainLDM) but stays: it names every results folder's record files (lv__brainldm__n0__s0.json) and the
# committed study's records. Tables and figures call it "base model, unconditioned" (benchmark.report.labels).
BASE_UNCONDITIONED = "brainldm"
AUTOENCODER = "autoencoder"     # test volumes through the base autoencoder: the ceiling of a latent generator
SPHERE_SUFFIX = "+sphere"        # a method sampled with sphere masks (out of distribution)


class RunKind(Enum):
    """What a run does (``benchmark.run.runner.execute_run`` dispatches on it)."""

    METHOD = "method"                        # train (fit) a registered method, generate, score
    REFERENCE = "reference"                  # real test volumes scored against real training volumes
    REFERENCE_OTHER = "reference_other"      # real test volumes, Dice against another subject's condition
    BASE_UNCONDITIONED = "base_unconditioned"  # the frozen base model sampled without spatial condition
    SPHERE_VALIDATION = "sphere_validation"  # a trained method sampled with sphere masks (Table 6)
    AUTOENCODER = "autoencoder"              # test volumes encoded and decoded: what a latent generator can reach


_PSEUDO = {REFERENCE: RunKind.REFERENCE, REFERENCE_OTHER: RunKind.REFERENCE_OTHER,
           BASE_UNCONDITIONED: RunKind.BASE_UNCONDITIONED, AUTOENCODER: RunKind.AUTOENCODER}


@dataclass(frozen=True)
class RunSpec:
    """One run. ``method`` names its record and folder: a registered method, a reference row
    (``reference``, ``reference_other``, ``brainldm``) or ``<method>+sphere``; ``kind`` says what the
    run does. The config hash covers (task, method, size, seed) only: the kind follows from them."""

    task: str
    method: str
    size: int
    seed: int
    kind: RunKind = field(default=RunKind.METHOD)

    def __post_init__(self) -> None:
        if not isinstance(self.kind, RunKind):
            raise ValueError(f"run {self.name}: kind must be a RunKind, got {self.kind!r}")
        expected = _PSEUDO.get(self.method, RunKind.SPHERE_VALIDATION if self.method.endswith(SPHERE_SUFFIX)
                               else RunKind.METHOD)
        if self.kind is not expected:
            raise ValueError(f"run {self.name}: method '{self.method}' is a {expected.value} run, not "
                             f"{self.kind.value}; build it with RunSpec.of(task, method, size, seed)")

    @classmethod
    def of(cls, task: str, method: str, size: int, seed: int) -> "RunSpec":
        """The run named by (task, method, size, seed), with its kind."""
        kind = _PSEUDO.get(method, RunKind.SPHERE_VALIDATION if method.endswith(SPHERE_SUFFIX) else RunKind.METHOD)
        return cls(task, method, size, seed, kind)

    @classmethod
    def sphere(cls, task: str, method: str, size: int, seed: int) -> "RunSpec":
        """Method ``method``'s run of ``size`` sampled with sphere masks (Table 6)."""
        return cls(task, method + SPHERE_SUFFIX, size, seed, RunKind.SPHERE_VALIDATION)

    def trained(self) -> "RunSpec":
        """The run whose method this run uses: itself, or for sphere validation the method's own run
        (its checkpoint is reused)."""
        if self.kind is RunKind.SPHERE_VALIDATION:
            return RunSpec(self.task, self.method.removesuffix(SPHERE_SUFFIX), self.size, self.seed)
        return self

    def identity(self) -> dict:
        """What names the run (and enters its config hash)."""
        return {"task": self.task, "method": self.method, "size": self.size, "seed": self.seed}

    @property
    def name(self) -> str:
        safe_method = self.method.replace("+", "_")
        return f"{self.task}__{safe_method}__n{self.size}__s{self.seed}"


def numbers_of(profile) -> dict:
    """The profile's settings that decide a run's numbers: all but the ``speed`` section, which changes only
    how fast the same numbers come (``docs/SPEED.md``). What a run's config hash is made from."""
    return {k: v for k, v in profile.to_dict().items() if k != "speed"}


class RunContext:
    """What the runs of one grid share: profile, data, base model, scorer, folders."""

    def __init__(self, profile, out_dir: Path, cache_dir: Path, weights_dir: Path | None = None,
                 manifest: Path | None = None, device: str | None = None, progress: bool = True):
        self.profile = profile
        self.out_dir = Path(out_dir)
        self.cache_dir = Path(cache_dir)
        self.weights_dir = Path(weights_dir) if weights_dir else None
        self.manifest = manifest
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.progress = progress
        self._scorers: dict[str, object] = {}

    @cached_property
    def data(self) -> DataSource:
        return DataSource(self.profile, self.cache_dir, self.manifest)

    @cached_property
    def base(self):
        from benchmark.base.cache import load_base_model

        from benchmark.engine.speed import SpeedOptions

        base = load_base_model(self.profile, self.cache_dir, weights_dir=self.weights_dir,
                               device=self.device, progress=self.progress)
        SpeedOptions.from_profile(self.profile).apply_base(base)
        return base

    @cached_property
    def expected_base_sha256(self) -> str | None:
        """The sha256 of the base model file the runs use (None while the suite has yet to pretrain it)."""
        if "base" in vars(self):
            return getattr(self.base, "origin", {}).get("sha256")
        from benchmark.base.cache import base_model_sha256

        return base_model_sha256(self.profile, self.cache_dir, self.weights_dir)

    @cached_property
    def base_hash(self) -> str:
        state = self.base.state_dict()
        digest = hashlib.sha256()
        for key in sorted(state):
            digest.update(key.encode())
            digest.update(state[key].detach().cpu().numpy().tobytes())
        return digest.hexdigest()[:12]

    @cached_property
    def latents(self) -> LatentCache:
        path = self.cache_dir / "latents" / f"{self.base_hash}_{hashlib.sha256(self.data.identity.encode()).hexdigest()[:8]}.pt"
        return LatentCache(self.base, path, device=self.device)

    def test_subjects(self):
        return self.data.test_subjects(self.profile.sampling.n_test)

    def task(self, name) -> Task:
        """Task ``name`` as this data's runs see it (a slice spacing in mm becomes its factor here)."""
        return get_task(name).at_voxel(self.data.axial_voxel_mm)

    @cached_property
    def shared_scoring(self):
        """The extractors, LPIPS and training reference that every task's scorer shares."""
        from benchmark.run.scoring import SharedScoring

        return SharedScoring(self)

    def scorer(self, task: Task):
        from benchmark.run.scoring import Scorer

        if task.name not in self._scorers:
            self._scorers[task.name] = Scorer(self, task)
        return self._scorers[task.name]

    def run_dir(self, spec: RunSpec) -> Path:
        return self.out_dir / "runs" / spec.name

    def record_path(self, spec: RunSpec) -> Path:
        return self.out_dir / "records" / f"{spec.name}.json"

    def recipe(self, spec: RunSpec) -> dict | None:
        """The tuned recipe this run uses (path, sha256, the settings chosen for its method), or None."""
        from benchmark.engine.recipes import load_recipe

        recipe = load_recipe(self.profile, spec.task)
        return recipe.describe(spec.trained().method) if recipe is not None else None

    def config_hash(self, spec: RunSpec) -> str:
        """What makes the run's numbers: the profile (less its ``speed`` section, which changes only how
        fast the same numbers come), the run, the code version, the data and the weights."""
        identity = {"profile": numbers_of(self.profile), "spec": spec.identity(), "code": RUN_CODE_VERSION,
                    "data": self.data.identity, "weights": str(self.weights_dir)}
        recipe = self.recipe(spec)
        if recipe is not None:  # what the recipe chose for this method: retuning another method keeps this run
            identity["recipe"] = recipe["chosen"]
        blob = json.dumps(
            identity,
            sort_keys=True, default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
