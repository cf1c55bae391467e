"""Where a grid's subjects come from: the embedded synthetic population, or a user's manifest."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from datasets.anatomy import output_geometry
from datasets.manifest import load_manifest, read_split_column
from datasets.manifest_geometry import Grid
from datasets.splits import VALIDATION_START, Splits, make_splits
from datasets.subject import DataError, Subject
from datasets.synthetic import GENERATOR_VERSION, SyntheticPopulation


def manifest_splits(manifest, subjects: list[Subject], d) -> tuple[Splits, str]:
    """The splits of a manifest's subjects and the rule that made them.

    With a ``split`` column (``train`` / ``validation`` / ``test``), the rows say: the training pool is
    the ``train`` rows in a seeded order (at most ``data.train_pool``). Without it, a seeded
    permutation of the rows: the first ``data.test_set`` (a fifth of the rows if there are too few)
    are the test set, the next ``data.train_pool`` the training pool, and the validation set is taken
    from the rows left over, at the end (up to ``data.validation_set``), so the test set and the pool
    are the ones a manifest got before there was a validation split. A manifest with no rows left
    has no validation subjects: see :meth:`DataSource.held_out_subjects`."""
    n = len(subjects)
    rng = np.random.default_rng(d.seed)
    column = read_split_column(manifest)
    if column is not None:
        index = {s.id: i for i, s in enumerate(subjects)}
        by_split = {name: [index[sid] for sid, split in column.items() if split == name]
                    for name in ("train", "validation", "test")}
        if not by_split["train"] or not by_split["test"]:
            raise DataError(f"manifest {manifest}: its split column names {len(by_split['train'])} train and "
                            f"{len(by_split['test'])} test rows; at least one of each is needed")
        pool = [by_split["train"][i] for i in rng.permutation(len(by_split["train"]))][: d.train_pool]
        splits = Splits(pretrain=(), train_pool=tuple(pool), test=tuple(by_split["test"]),
                        validation=tuple(by_split["validation"]))
        return splits, f"manifest split column: {len(pool)} train, {len(by_split['validation'])} validation, " \
                       f"{len(by_split['test'])} test"
    n_test = min(d.test_set, n // 5) if n < d.train_pool + d.test_set else d.test_set
    n_val = min(d.validation_set, max(0, n - n_test - d.train_pool))  # only rows the pool leaves unused
    if n_test < 1 or n - n_test - n_val < 1:
        # below data.train_pool + data.test_set rows a fifth are for testing, which needs 5 rows (1 test, 4 training)
        needed = min(5, d.train_pool + d.test_set)
        raise DataError(f"manifest {manifest} lists {n} subjects; at least {needed} are needed (one test subject "
                        "for every four training subjects), or give a split column (train / validation / test)")
    order = rng.permutation(n)
    test = tuple(int(i) for i in order[:n_test])
    validation = tuple(int(i) for i in order[n - n_val:]) if n_val else ()
    pool = tuple(int(i) for i in order[n_test : n - n_val][: d.train_pool])
    return (Splits(pretrain=(), train_pool=pool, test=test, validation=validation),
            f"seeded permutation of the rows (seed {d.seed}): {n_test} test, {len(pool)} train, "
            f"{n_val} validation from the end")


def axial_voxel_mm(profile, manifest=None) -> float:
    """The voxel size along Z (the axial slices) of a grid's volumes, in mm: the synthetic population's at
    the profile's ``image_shape``, or the one a manifest's volumes are resampled to (``data.voxel_mm``)."""
    if manifest is None:
        return output_geometry(tuple(profile.image_shape))[0]
    return float(profile.data.voxel_mm[2])


class DataSource:
    """Training pool, nested training subsets and test set for one profile."""

    def __init__(self, profile, cache_dir: Path, manifest: str | Path | None = None):
        self.profile = profile
        shape = tuple(profile.image_shape)
        d = profile.data
        if manifest is None:
            self.population = SyntheticPopulation(shape, seed=d.seed, cache_dir=cache_dir)
            self.splits: Splits = make_splits(d.pretrain_pool, d.train_pool, d.test_set, d.seed, d.validation_set)
            self._real: list[Subject] | None = None
            # the generator version is part of it: a changed population is new data (new caches, judges)
            self.identity = f"synthetic(seed={d.seed}, {GENERATOR_VERSION})"
            self.split_rule = (f"synthetic indices: test 0-{d.test_set - 1}, training pool next {d.train_pool} "
                               f"(seeded order), pretraining pool next {d.pretrain_pool}, validation "
                               f"{VALIDATION_START}-{VALIDATION_START + d.validation_set - 1}")
        else:
            grid = Grid.from_settings(shape, d.voxel_mm, d.field_of_view_mm, d.field_of_view_centre_mm)
            self._real = load_manifest(manifest, grid)
            self.splits, self.split_rule = manifest_splits(manifest, self._real, d)
            self.identity = f"manifest({Path(manifest).resolve()})"
        self.manifest = manifest

    @property
    def axial_voxel_mm(self) -> float:
        return axial_voxel_mm(self.profile, self.manifest)

    def check_grid(self, sizes, n_test: int) -> None:
        """Raise DataError before any run starts when a training-set size exceeds the training pool or
        ``n_test`` (sampling.n_test) the test set, with the fix that applies to this data."""
        pool = len(self.splits.train_pool)
        too_big = [s for s in sizes if s > pool]
        if too_big:
            fix = (f"list more subjects in the manifest {self.manifest}, or ask for --sizes up to {pool}"
                   if self.manifest is not None else
                   f"ask for --sizes up to {pool}, or enlarge data.train_pool in the profile")
            raise DataError(f"training-set size {max(too_big)} is larger than the training pool of {pool} "
                            f"subjects ({self.split_rule}); {fix}")
        # a manifest's test set may be smaller than the profile's (a fifth of a small manifest): all of it is
        # sampled then; asking for more than the profile's (or a split column's) test set is an error
        limit = max(int(self.profile.data.test_set), len(self.splits.test))
        if n_test > limit:
            raise DataError(f"sampling.n_test is {n_test}, but the test set has {limit} subjects; "
                            f"ask for at most {limit} (--override sampling.n_test={limit})")

    def subjects(self, indices) -> list[Subject]:
        if self._real is not None:
            return [self._real[i] for i in indices]
        return self.population.subjects(list(indices))

    def train_subjects(self, size: int) -> list[Subject]:
        return self.subjects(self.splits.training_subset(size))

    def test_subjects(self, n: int | None = None) -> list[Subject]:
        indices = self.splits.test if n is None else self.splits.test[:n]
        return self.subjects(indices)

    def held_out_subjects(self, n: int) -> tuple[list[Subject], str]:
        """Up to ``n`` subjects that no run trains or is scored on, for the control probe and the real
        set of the Fréchet distances: the validation subjects; where there are fewer than 2 (a small
        manifest without a split column) the last subjects of the training pool, never test subjects.
        Returns the subjects and which split they are from."""
        if len(self.splits.validation) >= 2:
            return self.validation_subjects(min(n, len(self.splits.validation))), "validation"
        pool = self.splits.train_pool
        return self.subjects(pool[max(0, len(pool) - n):]), "training pool (tail): no validation subjects"

    def validation_subjects(self, n: int | None = None) -> list[Subject]:
        """The first ``n`` validation subjects: where every choice is made (tuning, plateaus, the probe)."""
        if not self.splits.validation:
            raise DataError("there are no validation subjects: set data.validation_set in the profile, or give the "
                            "manifest a split column with validation rows")
        if n is not None and n > len(self.splits.validation):
            raise DataError(f"{n} validation subjects asked for, but the validation set has "
                            f"{len(self.splits.validation)}; raise data.validation_set or ask for fewer")
        indices = self.splits.validation if n is None else self.splits.validation[:n]
        return self.subjects(indices)
