"""Judges and in-domain extractors that are shipped or cached are found by (shape, data_id) alone:
the training volumes behind them are read only when a network must be trained
(metrics.common.DeferredVolumes, benchmark.run.scoring)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmark.base.shipped import SHIPPED_ROOT
from benchmark.profiles import load_profile
from benchmark.run.scoring import Scorer
from benchmark.run.spec import RunContext
from datasets.tasks import get_task
from metrics.common import DeferredVolumes, MetricError
from metrics.extractors import InDomainConfig, train_in_domain
from metrics.judge import JudgeConfig, train_judge
from tests.fixtures import one_thread  # noqa: F401  (autouse: one torch thread in this module)
from tests.phantom import phantom_population

QUICK_JUDGE = JudgeConfig(steps=2, batch_size=2)
QUICK_2D = InDomainConfig(steps_2d=2, steps_3d=2, batch_2d=4)


@pytest.fixture(scope="module")
def phantoms():
    return phantom_population((32, 48, 32), 4, seed=3)


def counted(array, reads: list, name: str) -> DeferredVolumes:
    def load():
        reads.append(name)
        return array
    return DeferredVolumes(array.shape, load)


def never(shape) -> DeferredVolumes:
    def load():
        raise AssertionError("training volumes were read although a trained network was cached")
    return DeferredVolumes(shape, load)


def test_deferred_judge_data_is_read_only_to_train(tmp_path, phantoms):
    images, labels = phantoms["image"], phantoms["lv_mask"].astype(np.int64)
    reads: list = []
    trained = train_judge(counted(images, reads, "images"), counted(labels, reads, "labels"), 2, tmp_path,
                          data_id="toy", config=QUICK_JUDGE, device="cpu")
    assert sorted(reads) == ["images", "labels"]
    cached = train_judge(never(images.shape), never(labels.shape), 2, tmp_path, data_id="toy", config=QUICK_JUDGE,
                         device="cpu")
    eager = train_judge(images, labels, 2, tmp_path, data_id="toy", config=QUICK_JUDGE, device="cpu")
    assert cached.source == eager.source == trained.source  # one key, deferred or not
    assert cached.weights_hash == trained.weights_hash


def test_deferred_extractor_data_is_read_only_to_train(tmp_path, phantoms):
    images = phantoms["image"]
    reads: list = []
    trained = train_in_domain("2d", counted(images, reads, "images"), tmp_path, data_id="toy", config=QUICK_2D,
                              device="cpu")
    assert reads == ["images"]
    cached = train_in_domain("2d", never(images.shape), tmp_path, data_id="toy", config=QUICK_2D, device="cpu")
    eager = train_in_domain("2d", images, tmp_path, data_id="toy", config=QUICK_2D, device="cpu")
    assert cached.source == eager.source == trained.source


def test_deferred_data_needs_a_data_id_and_its_declared_shape(tmp_path, phantoms):
    images, labels = phantoms["image"], phantoms["lv_mask"].astype(np.int64)
    with pytest.raises(MetricError, match="data_id"):
        train_judge(counted(images, [], "i"), counted(labels, [], "l"), 2, tmp_path, config=QUICK_JUDGE)
    with pytest.raises(MetricError, match="data_id"):
        train_in_domain("2d", counted(images, [], "i"), tmp_path, config=QUICK_2D)
    wrong = DeferredVolumes((len(images) + 1, *images.shape[1:]), lambda: images)
    with pytest.raises(MetricError, match="declared"):
        train_in_domain("2d", wrong, tmp_path, data_id="toy-wrong", config=QUICK_2D, device="cpu")


def test_a_grid_with_shipped_judge_and_extractors_reads_no_training_volume(tmp_path, monkeypatch):
    ctx = RunContext(load_profile("smoke"), tmp_path / "out", tmp_path / "cache", device="cpu", progress=False)
    reads: list = []
    monkeypatch.setattr(ctx.data, "subjects", lambda indices: reads.append(list(indices)) or [])
    scorer = Scorer(ctx, get_task("lv"))
    sources = [scorer.judge.source] + [e.source for e in scorer.shared.extractors.values()]
    assert all(Path(s).is_relative_to(SHIPPED_ROOT) for s in sources), sources
    assert reads == [], "training volumes were read although shipped networks fit"
