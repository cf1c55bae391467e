"""The control probe: 0 for a method that ignores its condition, positive for one that uses it; kept
through checkpoints; the schedule options; the three Dice reference rows and the gap curves."""
import json

import numpy as np
import pytest
import torch

from benchmark.engine.latents import LatentCache
from benchmark.engine.training import TrainSettings, train_method
from benchmark.engine.probe import ControlProbe, ProbeError, bands_above_zero, derangement, summary_columns
from benchmark.profiles import load_profile
from datasets.tasks import get_task
from methods.base import Method
from tests.fixtures import random_base_and_subjects

OVERRIDES = ["training.steps=4", "training.batch_size=2", "training.checkpoint_every=2", "sampling.batch_size=2"]

# the VCM authors' schedule and flip (the profiles' training.warmup_fraction, lr_floor, flip_probability)
AUTHORS = dict(micro_batch_size=None, mixed_precision="fp32", schedule="authors", warmup_fraction=1 / 30, lr_floor=0.1,
               flip_probability=0.5, fused_optimizer=True)  # base.yaml's training and speed settings, as TrainSettings takes them


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    profile, base, subjects = random_base_and_subjects(OVERRIDES, tmp_path_factory.mktemp("cache"))
    latents = LatentCache(base, None).get(subjects, progress=False)[:, 0, 0]
    return profile, base, subjects, latents


class IgnoresCondition(Method):
    """Trains a correction that never looks at the condition."""

    def __init__(self, base, condition_channels, config):
        super().__init__(base, condition_channels, config)
        self.shift = torch.nn.Parameter(torch.full((1, base.latent_shape[0], 1, 1, 1), 0.3))

    def predict_noise(self, z_t, t, conditions, scalars):
        return self.base.unet(z_t, t, scalars) + self.shift


class KnowsTheLatentOfItsCondition(Method):
    """An oracle that recognises a subject by its condition and recovers the noise from that
    subject's clean latent: exact with the own condition, wrong with another's."""

    def __init__(self, base, condition_channels, config, conditions, latents):
        super().__init__(base, condition_channels, config)
        self.known = list(zip(conditions, latents))

    def predict_noise(self, z_t, t, conditions, scalars):
        z0 = torch.stack([next(z for c, z in self.known if torch.equal(c, mask)) for mask in conditions.tensors["lv_mask"]])
        alpha_bar = self.base.train_scheduler.alphas_cumprod[t.cpu()].view(-1, 1, 1, 1, 1)
        return (z_t - alpha_bar.sqrt() * z0) / (1 - alpha_bar).sqrt()


def test_derangement_moves_everyone_and_is_fixed_by_the_seed():
    for n in (2, 3, 16, 104):
        perm = derangement(n, seed=0)
        assert sorted(perm) == list(range(n)) and not np.any(perm == np.arange(n))
    np.testing.assert_array_equal(derangement(16, 3), derangement(16, 3))
    with pytest.raises(ProbeError, match="at least 2 test subjects"):
        derangement(1, 0)


def test_probe_gap_is_exactly_zero_when_the_condition_is_ignored_and_positive_when_it_is_used(setup):
    profile, base, subjects, latents = setup
    task = get_task("lv")
    probe = ControlProbe(base, task, subjects, latents, seed=0, bands=4, draws=2, batch_size=4)
    ignoring = probe.measure(IgnoresCondition(base, task.modalities, {}))
    assert [row["band"] for row in ignoring["bands"]] == ["t0-249", "t250-499", "t500-749", "t750-999"]
    for row in ignoring["bands"]:
        assert row["gap"] == 0.0 and row["gap_ci_low"] == 0.0 and row["gap_ci_high"] == 0.0
        assert row["mse_own"] == row["mse_other"] != row["mse_frozen"]  # it did change the prediction
    assert bands_above_zero(ignoring) == 0

    masks = [torch.from_numpy(s.lv_mask.astype(np.float32)) for s in subjects]
    assert all(not torch.equal(a, b) for i, a in enumerate(masks) for b in masks[i + 1:])
    oracle = KnowsTheLatentOfItsCondition(base, task.modalities, {}, masks, list(latents))
    using = probe.measure(oracle)
    for row in using["bands"]:
        assert row["mse_own"] < 1e-6 < row["mse_other"]
        assert row["gap"] > 0 and row["gap_ci_low"] > 0
    assert bands_above_zero(using) == 4
    columns = summary_columns(using)
    assert columns["control gap: bands CI>0"] == 4 and columns["control gap t0-249"] == using["bands"][0]["gap"]
    # fixed inputs: the same numbers twice
    assert probe.measure(oracle) == using


def test_probe_history_is_kept_through_an_interrupted_run(setup, tmp_path):
    from methods.registry import get_method, load_plugin
    from tests.paths import EXAMPLE_PLUGIN

    profile, base, subjects, latents = setup
    load_plugin(str(EXAMPLE_PLUGIN))
    task = get_task("lv")
    probe = ControlProbe(base, task, subjects[4:6], latents[4:6], seed=0, bands=2, draws=1)

    def train(run_dir, stop_after=None):
        torch.manual_seed(1)
        method = get_method("residual_shift", "lv")(base, task.modalities, {"width": 4})
        settings = TrainSettings.from_profile(profile, 4)
        return train_method(method, base, subjects[:4], task, settings, LatentCache(base, None),
                                   run_dir, seed=0, progress=False, stop_after=stop_after, probe=probe)

    whole = train(tmp_path / "whole").extra["control_probe"]
    from benchmark.cli.train import probe_table

    assert probe_table(whole).splitlines()[2].split()[0] == "0" and len(probe_table(whole).splitlines()) == 5
    assert [h["step"] for h in whole] == [0, 2, 4]
    assert all(len(h["bands"]) == 2 and "gap" in h["bands"][0] for h in whole)
    assert whole[0]["bands"][0]["gap"] == 0.0  # zero-initialised output layer: no use of the mask yet
    train(tmp_path / "cut", stop_after=3)
    resumed = train(tmp_path / "cut").extra["control_probe"]
    assert [h["step"] for h in resumed] == [0, 2, 4]
    for a, b in zip(whole, resumed):
        assert a["bands"][1]["gap"] == pytest.approx(b["bands"][1]["gap"], rel=1e-4, abs=1e-9)


def test_learning_rate_schedules():
    authors = TrainSettings(300, 4, 1e-4, 0.0, 7, 100, **AUTHORS).lr_factor()  # default: the authors'
    assert authors(0) == pytest.approx(0.1) and authors(10) == pytest.approx(1.0)  # warm-up: 300 // 30 steps
    assert authors(5) == pytest.approx(0.55)
    assert authors(155) == pytest.approx(0.55) and authors(299) == pytest.approx(0.1, abs=1e-4)
    linear = TrainSettings(300, 4, 1e-4, 0.0, 10, 100, **{**AUTHORS, "schedule": "linear"}).lr_factor()
    assert linear(0) == pytest.approx(0.1) and linear(9) == 1.0 and linear(300) == 0.0
    with pytest.raises(ValueError, match="training.schedule must be one of authors, linear"):
        TrainSettings(10, 4, 1e-4, 0.0, 0, 5, **{**AUTHORS, "schedule": "cosine"})


def test_judged_tasks_get_four_reference_rows_first(tmp_path):
    from benchmark.report.figures import control_gap_curves
    from benchmark.run.grid import build_specs
    from benchmark.report.labels import AUTOENCODER_ROW, BASE_ROW, OTHER_ROW, REFERENCE_ROW
    from benchmark.report.frame import records_frame
    from benchmark.report.tables import task_table

    profile = load_profile("smoke")
    specs = build_specs(["lv", "multimodal", "sr4"], "vcm", [10], [0], profile, validation=False)
    for task in ("lv", "multimodal"):
        assert {s.method for s in specs if s.task == task} == {"reference", "autoencoder", "reference_other",
                                                               "brainldm", "vcm"}
    assert {s.method for s in specs if s.task == "sr4"} == {"reference", "vcm"}

    history = [{"step": step, "bands": [{"band": "t0-499", "gap": g, "gap_ci_low": g - 1e-3, "gap_ci_high": g + 1e-3}]}
               for step, g in ((0, 0.0), (50, 2e-3), (100, 5e-3))]
    records = [("reference", 0, 0.9, None), ("vcm", 10, 0.5, history), ("brainldm", 0, 0.3, None),
               ("reference_other", 0, 0.2, None), ("autoencoder", 0, 0.8, None)]
    (tmp_path / "records").mkdir()
    for method, size, dice, hist in records:
        rec = {"task": "lv", "method": method, "size": size, "seed": 0, "status": "ok", "metrics": {"Dice": dice}}
        if hist:
            rec["control_probe"] = {"history": hist}
            rec["metrics"].update(summary_columns(hist[-1]))
        (tmp_path / "records" / f"{method}.json").write_text(json.dumps(rec))
    table = task_table(records_frame(tmp_path), "lv")
    assert list(table.method) == [REFERENCE_ROW, AUTOENCODER_ROW, OTHER_ROW, BASE_ROW, "vcm"]
    assert list(table.Dice) == ["0.9", "0.8", "0.2", "0.3", "0.5"]
    assert table["control gap: bands CI>0"].iloc[-1] == "1"
    path = control_gap_curves(tmp_path, "lv", tmp_path)
    assert path is not None and path.stat().st_size > 1000
    assert control_gap_curves(tmp_path, "multimodal", tmp_path) is None
