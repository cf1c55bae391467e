"""The judge (segmenter for Dice) and the one scoring entry point."""
from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from metrics.common import MetricError, WeightsError
from metrics.extractors import FeatureExtractor
from metrics.judge import Judge, JudgeConfig, _build, get_judge, train_judge
from metrics.lpips_metric import load_lpips
from tests.phantom import phantom_population
from metrics.protocol import ScoringSettings, reference_row, score_generated
from tests.fixtures import one_thread  # noqa: F401  (autouse: one torch thread in this module)


SHAPE = (32, 48, 32)
QUICK = JudgeConfig(steps=40, batch_size=2)


@pytest.fixture(scope="module")
def data():
    tr = phantom_population(SHAPE, 8, seed=11)
    te = phantom_population(SHAPE, 6, seed=11, start=100)
    return tr, te


@pytest.fixture(scope="module")
def lv_judge(tmp_path_factory, data):
    tr, _ = data
    return get_judge(2, tr["image"], tr["lv_mask"], tmp_path_factory.mktemp("cache"), data_id="phantom-lv",
                     config=QUICK, device="cpu")


def test_judge_segments_and_is_cached(lv_judge, data):
    tr, te = data
    seg = lv_judge.segment(te["image"])
    assert seg.shape == (6, 1) + SHAPE and seg.dtype == torch.uint8 and int(seg.max()) <= 1
    r = lv_judge.dice(te["image"], te["lv_mask"])
    assert r["Dice"] > 0.5, r["Dice"]  # a quick 40-step judge on the easy phantom; the real bar is in bench_scoring
    assert r["protocol"]["judge"]["weights_hash"] == lv_judge.weights_hash
    cache = os.path.dirname(os.path.dirname(lv_judge.source))
    t0 = time.perf_counter()
    again = get_judge(2, tr["image"], tr["lv_mask"], cache, data_id="phantom-lv", config=QUICK, device="cpu")
    assert time.perf_counter() - t0 < 5 and again.weights_hash == lv_judge.weights_hash
    torch.testing.assert_close(again.segment(te["image"][:2]), seg[:2])


def test_corrupt_judge_cache_is_an_error(tmp_path, data):
    tr, _ = data
    cfg = JudgeConfig(steps=1, batch_size=1)
    j = train_judge(tr["image"][:2], tr["lv_mask"][:2], 2, tmp_path, config=cfg, device="cpu")
    with open(j.source, "wb") as f:
        f.write(b"broken")
    with pytest.raises(WeightsError, match="delete the file"):
        train_judge(tr["image"][:2], tr["lv_mask"][:2], 2, tmp_path, config=cfg, device="cpu")
    shipped = tmp_path / "shipped" / "metrics"  # a broken shipped file is restored, not retrained
    shipped.mkdir(parents=True)
    shutil.copy(j.source, shipped / os.path.basename(j.source))
    with pytest.raises(WeightsError, match="ships with the suite: restore it"):
        train_judge(tr["image"][:2], tr["lv_mask"][:2], 2, tmp_path / "fresh", config=cfg, device="cpu",
                    shipped_dirs=[shipped.parent])
    with pytest.raises(MetricError):
        train_judge(tr["image"][:2], tr["semantics"][:2], 2, tmp_path, config=cfg)  # labels 0-4 for 2 classes


def test_multimodal_judge_has_five_classes(tmp_path, data):
    tr, te = data
    one_hot = np.stack([(tr["semantics"][:, 0] == k) for k in (1, 2, 3, 4)], axis=1).astype(np.float32)
    j = get_judge(5, tr["image"][:2], one_hot[:2], tmp_path, config=JudgeConfig(steps=2, batch_size=1),
                  device="cpu")
    assert j.num_classes == 5
    assert int(j.segment(te["image"][:1]).max()) <= 4


def test_dice_on_synthetic_population(tmp_path):
    """Measure the judge on the suite's own synthetic population (an import error fails the test)."""
    from datasets.synthetic import SyntheticPopulation

    pop = SyntheticPopulation(SHAPE, seed=0, cache_dir=tmp_path)
    subs = pop.subjects(range(24))
    img = np.stack([s.image for s in subs])
    lv = np.stack([s.lv_mask for s in subs])
    j = get_judge(2, img[:16], lv[:16], tmp_path, config=JudgeConfig(steps=100, batch_size=2), device="cpu")
    d = j.dice(img[16:], lv[16:])["Dice"]
    print(f"judge Dice (LV, synthetic {SHAPE}, 16 train / 8 test, 100 steps): {d:.3f}")
    assert d > 0.5  # short training in a test; bench_scoring measures the full judge at 40x56x40


# ------------------------------------------------------------------------------------------ scoring


def _fixed_extractor(name: str, dims: int) -> FeatureExtractor:
    """A fixed random convolutional feature map, only for testing the plumbing."""
    torch.manual_seed(0)
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    net = nn.Sequential(conv(1, 8, 3, stride=2), nn.ReLU(), conv(8, 12, 3, stride=2), nn.ReLU())
    fdims = tuple(range(2, 2 + dims))
    return FeatureExtractor(name, net, dims, "0" * 12, "test", False, "test", lambda n, x: n(x).mean(fdims), 12,
                            device="cpu")


@pytest.fixture(scope="module")
def lpips_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("alex")
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), d / "alexnet.pt")  # random: tests only
    return load_lpips(weights_dir=d, hub_dir=d / "nohub", device="cpu")


def test_score_generated_columns_and_protocol(data, lv_judge, lpips_model):
    tr, te = data
    ex = {"2d": _fixed_extractor("fixed-2d", 2), "3d": _fixed_extractor("fixed-3d", 3)}
    fake = np.clip(te["image"] + 0.05, 0, 1)
    st = ScoringSettings(slices_per_axis=4, lpips_fraction=0.1, max_pairs=4)
    row = score_generated(fake, tr["image"], conditions=te["lv_mask"], ground_truth=te["image"], extractors=ex,
                          judge=lv_judge, task="lv", lpips=lpips_model, settings=st)
    expected = {"FID-A [fixed-2d]", "FID-C [fixed-2d]", "FID-S [fixed-2d]", "FID-2D mean [fixed-2d]",
                "FID-3D [fixed-3d]", "LPIPS diversity", "LPIPS fidelity", "MS-SSIM diversity",
                "MS-SSIM fidelity", "PSNR", "SSIM", "Dice", "volume error", "protocol"}
    # each Fréchet column also relative to real-vs-real, and precision/recall/density/coverage per feature space
    expected |= {f"{c} rel [fixed-2d]" for c in ("FID-A", "FID-C", "FID-S", "FID-2D mean")} | {"FID-3D rel [fixed-3d]"}
    expected |= {f"{m}-{d}D [fixed-{d}d]" for m in ("Precision", "Recall", "Density", "Coverage") for d in (2, 3)}
    expected.add("FRD")  # None here: no brain mask given (the protocol says why)
    assert set(row) - {"per_volume"} == expected
    assert row["FRD"] is None and row["protocol"]["FRD"]
    # the per-volume values behind the means, in the order of the volumes
    per = row["per_volume"]
    assert set(per) == {"Dice", "volume error", "MS-SSIM fidelity", "PSNR", "SSIM"}
    assert all(len(v) == 6 for v in per.values())
    assert row["Dice"] == pytest.approx(np.nanmean(per["Dice"]))
    assert all(isinstance(row[k], float) for k in expected - {"protocol", "FRD"})
    p = row["protocol"]
    assert p["n_generated_volumes"] == 6 and p["n_real_reference_volumes"] == 8
    assert p["FID-2D [fixed-2d]"]["slices_per_axis"] == {"axial": 4, "coronal": 4, "sagittal": 4}
    assert p["FID-3D [fixed-3d]"]["extractor"]["weights_hash"] == "0" * 12
    assert p["Dice"]["judge"]["weights_hash"] == lv_judge.weights_hash
    json.dumps(row)  # records are written as JSON

    ref = reference_row(te["image"], tr["image"], conditions_test=te["lv_mask"], extractors=ex, judge=lv_judge,
                        task="lv", lpips=None, settings=st)
    assert "LPIPS fidelity" not in ref and "PSNR" not in ref and ref["LPIPS diversity"] is None
    assert "no LPIPS model" in ref["protocol"]["LPIPS"]["reason"]
    assert ref["protocol"]["row"].startswith("reference")


def test_score_generated_sr_task_and_errors(data):
    tr, te = data
    ex = [_fixed_extractor("fixed-3d", 3)]
    row = score_generated(te["image"], tr["image"], ground_truth=te["image"], extractors=ex, task="sr4",
                          settings=ScoringSettings(max_pairs=2))
    assert row["SSIM"] == pytest.approx(1.0, abs=1e-5) and "Dice" not in row
    with pytest.raises(MetricError, match="share a name"):
        score_generated(te["image"], tr["image"], extractors=[ex[0], ex[0]])
    j5 = Judge(_build(5, QUICK), 5, QUICK, "x", "x", {}, device="cpu")
    with pytest.raises(MetricError, match="judge segments 5 classes but the conditions of task 'lv' have 2"):
        score_generated(te["image"], tr["image"], extractors=ex, judge=j5, conditions=te["lv_mask"], task="lv",
                        dice_classes=2)
    with pytest.raises(MetricError, match="pair one to one"):
        score_generated(te["image"], tr["image"], extractors=ex, ground_truth=tr["image"])


def test_anatomy_dice_scores_each_volume_against_its_own_subjects_labels(data, lv_judge):
    """A paired task's anatomy Dice: the judge's segmentation of each volume against the true label map of the
    subject it should reproduce, one column per label map; another subject's labels score lower."""
    tr, te = data
    ex = [_fixed_extractor("fixed-3d", 3)]
    st = ScoringSettings(max_pairs=2)
    own = score_generated(te["image"], tr["image"], ground_truth=te["image"], extractors=ex, task="sr4", settings=st,
                          anatomy=[("lv_mask", lv_judge, te["lv_mask"])])
    other = score_generated(te["image"], tr["image"], ground_truth=te["image"], extractors=ex, task="sr4",
                            settings=st, anatomy=[("lv_mask", lv_judge, np.roll(te["lv_mask"], 1, axis=0))])
    key = "anatomy Dice [lv_mask]"
    assert own[key] == pytest.approx(lv_judge.dice(te["image"], te["lv_mask"])["Dice"])
    assert len(own["per_volume"][key]) == 6 and own[key] > other[key], (own[key], other[key])
    assert own["protocol"][key]["judge"]["weights_hash"] == lv_judge.weights_hash
    assert "own true 'lv_mask'" in own["protocol"][key]["against"] and "Dice" not in own
    plain = score_generated(te["image"], tr["image"], ground_truth=te["image"], extractors=ex, task="sr4", settings=st)
    assert key not in plain  # no label maps given, no column
    with pytest.raises(MetricError, match="true 'lv_mask' labels .* must pair one to one"):
        score_generated(te["image"], tr["image"], extractors=ex, settings=st,
                        anatomy=[("lv_mask", lv_judge, te["lv_mask"][:3])])
