"""Time the scoring of generated volumes with every metric, and measure the judge, on the suite's
synthetic population (the timing itself is ``metrics.scoring_benchmark``, which knows no data set).

    python run_benchmark.py bench-scoring                       # cpu profile size, 100 "generated" volumes
    python run_benchmark.py bench-scoring --shape 32 48 32 --n-fake 20 --n-train 24 --judge-steps 100
"""
from __future__ import annotations

import argparse

import numpy as np

from datasets.splits import make_splits
from datasets.synthetic import SyntheticPopulation
from benchmark.cli import load_profile_from
from metrics import scoring_benchmark
from metrics.extractors import InDomainConfig
from metrics.frd import majority_mask
from metrics.judge import JudgeConfig


def load_data(shape, n_train, n_ref, n_fake, seed, cache_dir) -> tuple[dict[str, np.ndarray], str]:
    """Judge and extractors train on ``n_train`` subjects of the training pool; the reference set is the
    test set (``n_ref``); the stand-ins for generated volumes are ``n_fake`` other training-pool subjects."""
    splits = make_splits(0, max(500, n_train + n_fake), max(104, n_ref), seed)
    pop = SyntheticPopulation(tuple(shape), seed=seed, cache_dir=cache_dir, progress=True)
    pool = list(splits.train_pool)

    def load(idx):
        subs = pop.subjects(idx)
        return np.stack([s.image for s in subs]), np.stack([s.lv_mask for s in subs])

    tr, tr_lv = load(pool[:n_train])
    fk, fk_lv = load(pool[n_train : n_train + n_fake])
    ref, ref_lv = load(list(splits.test[:n_ref]))
    brain_mask = majority_mask(np.stack([s.semantics for s in pop.subjects(pool[:n_train])]))  # as a grid's FRD
    return {"train": tr, "train_lv": tr_lv, "ref": ref, "ref_lv": ref_lv, "fake_src": fk, "fake_lv": fk_lv,
            "brain_mask": brain_mask}, (
        f"datasets.synthetic seed {seed}: train pool[:{n_train}], stand-ins pool[{n_train}:{n_train + n_fake}], "
        f"reference test[:{n_ref}]"
    )


def register(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("bench-scoring", parents=[common], help="time the scoring of generated volumes; measure the judge",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    scoring_benchmark.add_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    metrics = load_profile_from(args).metrics  # how long the judge and the in-domain extractors train
    judge = JudgeConfig(steps=args.judge_steps or int(metrics.judge.steps))
    in_domain = InDomainConfig(steps_2d=int(metrics.in_domain.steps_2d), steps_3d=int(metrics.in_domain.steps_3d))
    scoring_benchmark.run(args, load_data, args.command_line, judge, in_domain)
    return 0
