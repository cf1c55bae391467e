"""What a run is (:class:`RunSpec`) and what the runs of one grid share (:class:`RunContext`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import torch

from benchmark.engine.latents import LatentCache
from benchmark.run.data_source import DataSource
from datasets.tasks import Task

CODE_VERSION = "1"  # bump when a change invalidates finished runs

# Pseudo-methods: the reference rows of the task tables and of Table 6; not in the method registry.
REFERENCE = "reference"         # real test volumes against real training volumes
REFERENCE_OTHER = "reference_other"  # real test volumes against another test subject's condition (Dice)
BASE_UNCONDITIONED = "brainldm"  # the frozen base model alone
SPHERE_SUFFIX = "+sphere"        # a method sampled with sphere masks (out of distribution)


@dataclass(frozen=True)
class RunSpec:
    task: str
    method: str
    size: int
    seed: int

    @property
    def name(self) -> str:
        safe_method = self.method.replace("+", "_")
        return f"{self.task}__{safe_method}__n{self.size}__s{self.seed}"


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

        return load_base_model(self.profile, self.cache_dir, weights_dir=self.weights_dir,
                               device=self.device, progress=self.progress)

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

    def scorer(self, task: Task):
        from benchmark.run.scoring import Scorer

        if task.name not in self._scorers:
            self._scorers[task.name] = Scorer(self, task)
        return self._scorers[task.name]

    def run_dir(self, spec: RunSpec) -> Path:
        return self.out_dir / "runs" / spec.name

    def record_path(self, spec: RunSpec) -> Path:
        return self.out_dir / "records" / f"{spec.name}.json"

    def config_hash(self, spec: RunSpec) -> str:
        blob = json.dumps(
            {"profile": self.profile.to_dict(), "spec": asdict(spec), "code": CODE_VERSION,
             "data": self.data.identity, "weights": str(self.weights_dir)},
            sort_keys=True, default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
