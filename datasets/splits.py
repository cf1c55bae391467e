"""Disjoint subject splits: pretraining pool, benchmark training pool, validation set, test set.

Indices are laid out test first, then the training pool, then the pretraining pool, so that changing
the size of the pretraining pool (the one that differs most between profiles) leaves the test set and
the training pool unchanged. The validation set (every choice: recipes, tuning, plateaus, the control
probe) starts at :data:`VALIDATION_START`, far above every other split, so that adding it moved no
subject of the others (the shipped base models, judges and extractors were made from those). The
training pool is stored in one fixed, seeded order; training subsets are its prefixes, so the 10
subjects of size 10 are among the 50 of size 50, and so on.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .subject import DataError

VALIDATION_START = 1_000_000  # first index of the synthetic validation set
SPLIT_NAMES = ("pretrain", "train_pool", "validation", "test")


@dataclass(frozen=True)
class Splits:
    pretrain: tuple[int, ...]
    train_pool: tuple[int, ...]   # already in the fixed permutation that training subsets are prefixes of
    test: tuple[int, ...]
    validation: tuple[int, ...] = ()

    def training_subset(self, size: int) -> tuple[int, ...]:
        """The first ``size`` subjects of the training pool's fixed permutation (nested across sizes)."""
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise DataError(f"training subset size must be a positive integer, got {size!r}")
        if size > len(self.train_pool):
            raise DataError(f"training subset size {size} exceeds the training pool of {len(self.train_pool)} "
                            "subjects; choose a smaller size or enlarge data.train_pool in the profile")
        return self.train_pool[: int(size)]

    def all_indices(self) -> tuple[int, ...]:
        return self.test + tuple(sorted(self.train_pool)) + self.pretrain + self.validation

    def split_of(self, index: int) -> str:
        for name in SPLIT_NAMES:
            if index in getattr(self, name):
                return name
        raise DataError(f"subject index {index} is in none of the splits")


def make_splits(pretrain_pool: int, train_pool: int, test_set: int, seed: int, validation_set: int = 0) -> Splits:
    """Disjoint index ranges (test, then training pool, then pretraining pool, and the validation set from
    :data:`VALIDATION_START`); the pool's order is seeded."""
    for name, value in (("pretrain_pool", pretrain_pool), ("train_pool", train_pool), ("test_set", test_set),
                        ("validation_set", validation_set)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise DataError(f"data.{name} must be a non-negative integer number of subjects, got {value!r}")
    if train_pool < 1 or test_set < 1:
        raise DataError(f"the training pool and the test set need at least one subject each "
                        f"(got train_pool={train_pool}, test_set={test_set})")
    test = tuple(range(0, test_set))
    pool = np.arange(test_set, test_set + train_pool)
    order = np.random.default_rng([0x5B117, int(seed)]).permutation(pool)
    pretrain = tuple(range(test_set + train_pool, test_set + train_pool + pretrain_pool))
    if test_set + train_pool + pretrain_pool > VALIDATION_START:
        raise DataError(f"the test set, training pool and pretraining pool ({test_set + train_pool + pretrain_pool} "
                        f"subjects) would reach the validation set at index {VALIDATION_START}; use fewer subjects")
    validation = tuple(range(VALIDATION_START, VALIDATION_START + validation_set))
    return Splits(pretrain=pretrain, train_pool=tuple(int(i) for i in order), test=test, validation=validation)
