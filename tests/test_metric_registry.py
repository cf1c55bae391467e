"""A metric is one class plus one line in metrics.suite.METRICS: score_generated then writes its
column, protocol entry and per-volume values, and the tables find its direction."""
from __future__ import annotations

import numpy as np
import pytest

from metrics import suite
from metrics.metric import LOWER, NEEDS_GROUND_TRUTH, Column, Metric
from metrics.protocol import ScoringSettings, score_generated


class MeanAbsError(Metric):
    """A toy paired metric: mean absolute error of each volume against its ground truth."""
    name = "MAE"
    needs = NEEDS_GROUND_TRUTH
    columns = (Column("MAE", "MAE", LOWER, "mean |generated - ground truth| per volume", needs=NEEDS_GROUND_TRUTH),)

    def score(self, inputs, out):
        if inputs.ground_truth is None:
            return
        per_volume = (inputs.fake - inputs.ground_truth).abs().flatten(1).mean(1).tolist()
        out.row["MAE"] = float(np.mean(per_volume))
        out.protocol["MAE"] = {"definition": self.columns[0].protocol}
        out.per_volume["MAE"] = per_volume


@pytest.fixture
def with_mae(monkeypatch):
    monkeypatch.setattr(suite, "METRICS", (*suite.METRICS, MeanAbsError()))  # the one suite line


def test_a_registered_metric_is_scored_and_described(with_mae):
    rng = np.random.default_rng(0)
    real = rng.random((3, 1, 16, 16, 16), dtype=np.float32)
    fake = np.clip(real + 0.1, 0, 1)
    settings = ScoringSettings(slices_per_axis=2, max_pairs=2, bootstrap_resamples=0, frd=False)
    out = score_generated(fake, real, ground_truth=real, extractors=[], settings=settings)
    expected = np.abs(fake - real).reshape(3, -1).mean(1)
    assert out["MAE"] == pytest.approx(expected.mean(), abs=1e-6)
    assert out["per_volume"]["MAE"] == pytest.approx(expected.tolist(), abs=1e-6)
    assert out["protocol"]["MAE"]["definition"].startswith("mean |generated")
    assert "PSNR" in out and "MS-SSIM fidelity" in out  # the built-in metrics still run
    assert suite.metric_of("MAE").arrow == "↓"
    assert "MAE" in {m.name for m in suite.metric_suite(dice=False, paired=True)}
    assert "MAE" not in {m.name for m in suite.metric_suite(dice=False, paired=False)}

    unpaired = score_generated(fake, real, extractors=[], settings=settings)
    assert "MAE" not in unpaired and "MAE" not in unpaired["per_volume"]


def test_every_column_stem_has_one_descriptor():
    stems = [s for c in suite.COLUMNS for s in c.stems]
    assert len(stems) == len(set(stems))
    assert all(isinstance(m, Metric) and m.columns for m in suite.METRICS)
