"""Where a grid's subjects come from: the embedded synthetic population, or a user's manifest."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from datasets.manifest import load_manifest
from datasets.manifest_geometry import Grid
from datasets.splits import Splits, make_splits
from datasets.subject import DataError, Subject
from datasets.synthetic import SyntheticPopulation


class DataSource:
    """Training pool, nested training subsets and test set for one profile."""

    def __init__(self, profile, cache_dir: Path, manifest: str | Path | None = None):
        self.profile = profile
        shape = tuple(profile.image_shape)
        d = profile.data
        if manifest is None:
            self.population = SyntheticPopulation(shape, seed=d.seed, cache_dir=cache_dir)
            self.splits: Splits = make_splits(d.pretrain_pool, d.train_pool, d.test_set, d.seed)
            self._real: list[Subject] | None = None
            self.identity = f"synthetic(seed={d.seed})"
        else:
            grid = Grid.from_settings(shape, d.voxel_mm, d.field_of_view_mm, d.field_of_view_centre_mm)
            self._real = load_manifest(manifest, grid)
            n = len(self._real)
            n_test = min(d.test_set, n // 5) if n < d.train_pool + d.test_set else d.test_set
            if n_test < 1 or n - n_test < 1:
                raise DataError(
                    f"manifest {manifest} lists {n} subjects; at least 2 are needed (training and test)"
                )
            # A fixed permutation: the first subjects form the test set, the rest the pool.
            order = np.random.default_rng(d.seed).permutation(n)
            test = tuple(int(i) for i in order[:n_test])
            pool = tuple(int(i) for i in order[n_test:][: d.train_pool])
            self.splits = Splits(pretrain=(), train_pool=pool, test=test)
            self.identity = f"manifest({Path(manifest).resolve()})"

    def subjects(self, indices) -> list[Subject]:
        if self._real is not None:
            return [self._real[i] for i in indices]
        return self.population.subjects(list(indices))

    def train_subjects(self, size: int) -> list[Subject]:
        return self.subjects(self.splits.training_subset(size))

    def test_subjects(self, n: int | None = None) -> list[Subject]:
        indices = self.splits.test if n is None else self.splits.test[:n]
        return self.subjects(indices)
