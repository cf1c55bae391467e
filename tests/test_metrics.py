"""Core metric math: Fréchet distance, slice rules, MS-SSIM, PSNR/SSIM, Dice, cost."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from metrics.common import MetricError, as_volumes, central_slice_indices, extract_slices, pick_pairs
from metrics.cost import PAPER_PROTOCOL, PeakMemory, StepTimer, WallTimer, count_parameters, device_days
from metrics.dice import condition_to_labels, dice_score
from metrics.fid import _frechet_svd, frechet_distance, slice_rule
from metrics.msssim import msssim_diversity, msssim_fidelity, msssim_pairs, msssim_params
from metrics.paired import psnr, ssim
from tests.phantom import phantom_population
from tests.fixtures import one_thread  # noqa: F401  (autouse: one torch thread in this module)


def _scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# ----------------------------------------------------------------------------------- Fréchet


def test_frechet_equals_direct_scipy_computation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(60, 8)) @ rng.normal(size=(8, 8))
    b = rng.normal(0.3, 1.2, size=(50, 8)) @ rng.normal(size=(8, 8))
    ours = frechet_distance(torch.tensor(a), torch.tensor(b))
    ref = _scipy_frechet(a, b)
    assert ref > 1.0
    assert ours == pytest.approx(ref, rel=1e-6)
    # the exact SVD form (fallback, and the optional fast method) agrees too
    assert _frechet_svd(torch.tensor(a), torch.tensor(b)) == pytest.approx(ref, rel=1e-6)
    value, method = frechet_distance(a, b, return_method=True, method="svd")
    assert method == "svd" and value == pytest.approx(ref, rel=1e-6)
    # wide features, fewer samples than dimensions (as with RadImageNet's 2048): still the same number
    w = rng.normal(size=(30, 64))
    a2, b2 = rng.normal(size=(40, 30)) @ w, rng.normal(0.2, 1.0, size=(45, 30)) @ w
    assert frechet_distance(a2, b2) == pytest.approx(frechet_distance(a2, b2, method="svd"), rel=1e-5)


def test_frechet_identical_sets_is_zero_and_is_symmetric():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(40, 6)).astype(np.float32)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    b = rng.normal(0.5, 1.0, size=(40, 6)).astype(np.float32)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)


def test_frechet_rejects_bad_inputs():
    with pytest.raises(MetricError):
        frechet_distance(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(MetricError):
        frechet_distance(np.zeros((5, 4)), np.zeros((5, 3)))


# ----------------------------------------------------------------------------------- slices


def test_central_slice_rule_is_documented_rule():
    # central 60% of 40 slices: indices 8..31; 8 evenly spaced
    assert central_slice_indices(40, 8, 0.6) == [8, 11, 15, 18, 21, 24, 28, 31]
    assert central_slice_indices(32, 100, 0.5) == list(range(8, 24))  # clipped to the range
    assert central_slice_indices(10, 1, 1.0) == [4]
    assert central_slice_indices(56, 8, 0.6) == [11, 16, 20, 25, 30, 35, 39, 44]
    rule = slice_rule((40, 56, 40), 8, 0.6)
    assert {k: len(v) for k, v in rule.items()} == {"axial": 8, "coronal": 8, "sagittal": 8}


def test_extract_slices_orientation_follows_conventions():
    v = torch.zeros(2, 1, 4, 5, 6)
    v[0, 0, 1, 2, 3] = 1.0
    ax = extract_slices(v, "axial", [3])  # Z = 3 -> (X, Y) slices
    assert ax.shape == (2, 1, 4, 5) and ax[0, 0, 1, 2] == 1.0
    co = extract_slices(v, "coronal", [2])  # Y = 2 -> (X, Z)
    assert co.shape == (2, 1, 4, 6) and co[0, 0, 1, 3] == 1.0
    sa = extract_slices(v, "sagittal", [0, 1])  # X -> (Y, Z), volume-major order
    assert sa.shape == (4, 1, 5, 6) and sa[1, 0, 2, 3] == 1.0 and sa[0].sum() == 0


def test_volume_checks():
    with pytest.raises(MetricError, match=r"\(N, 1, X, Y, Z\)"):
        as_volumes(np.zeros((2, 2, 4, 4, 4), np.float32))
    with pytest.raises(MetricError, match=r"\[0, 1\]"):
        as_volumes(np.full((1, 1, 4, 4, 4), 2.0, np.float32))
    with pytest.raises(MetricError, match="NaN"):
        as_volumes(np.full((1, 1, 4, 4, 4), np.nan, np.float32))
    assert as_volumes(np.zeros((1, 4, 4, 4), np.float32)).shape == (1, 1, 4, 4, 4)


def test_pick_pairs():
    assert pick_pairs(3, 10, 0) == [(0, 1), (0, 2), (1, 2)]
    p = pick_pairs(50, 20, 0)
    assert len(p) == 20 and len(set(p)) == 20 and all(i < j for i, j in p)
    assert p == pick_pairs(50, 20, 0)


# ----------------------------------------------------------------------------------- MS-SSIM


@pytest.fixture(scope="module")
def small_vols():
    return phantom_population((32, 48, 32), 4, seed=5)["image"]


def test_msssim_params_valid_for_profile_shapes():
    assert msssim_params((32, 48, 32))["scales"] == 3 and msssim_params((32, 48, 32))["kernel_size"] == 7
    assert msssim_params((40, 56, 40))["kernel_size"] == 9
    p = msssim_params((160, 224, 160))
    assert p["scales"] == 5 and abs(sum(p["weights"]) - 1) < 1e-5
    with pytest.raises(MetricError):
        msssim_params((6, 6, 6))


def test_msssim_identity_is_one_and_falls_with_noise(small_vols):
    x = torch.as_tensor(small_vols[:2])
    assert msssim_fidelity(x, x)["MS-SSIM fidelity"] == pytest.approx(1.0, abs=1e-5)
    g = torch.Generator().manual_seed(0)
    vals = []
    for s in (0.0, 0.05, 0.1, 0.2):
        y = (x + s * torch.randn(x.shape, generator=g)).clamp(0, 1)
        vals.append(float(msssim_pairs(y, x).mean()))
    assert vals[0] == pytest.approx(1.0, abs=1e-5)
    assert all(a > b for a, b in zip(vals, vals[1:])), vals
    r = msssim_fidelity(x, x)
    assert r["protocol"]["scales"] == 3 and r["protocol"]["kernel_size"] == 7


def test_msssim_diversity(small_vols):
    same = np.repeat(small_vols[:1], 3, axis=0)
    assert msssim_diversity(same)["MS-SSIM diversity"] == pytest.approx(1.0, abs=1e-5)
    d = msssim_diversity(small_vols)
    assert d["protocol"]["n_pairs"] == 6 and d["MS-SSIM diversity"] < 1.0


# ----------------------------------------------------------------------------------- PSNR / SSIM


def test_psnr_ssim(small_vols):
    x = torch.as_tensor(small_vols[:2])
    y = (x + 0.1).clamp(max=1.0)
    mse = float(((y - x) ** 2).flatten(1).mean(1).mean())
    r = psnr(y, x)
    expected = np.mean([10 * np.log10(1.0 / float(((y[i] - x[i]) ** 2).mean())) for i in range(2)])
    assert r["PSNR"] == pytest.approx(expected, rel=1e-5) and mse > 0
    assert math.isinf(psnr(x, x)["PSNR"])
    assert ssim(x, x)["SSIM"] == pytest.approx(1.0, abs=1e-5)
    assert ssim(y, x)["SSIM"] < 1.0
    with pytest.raises(MetricError):
        psnr(x, x[:1])


# ----------------------------------------------------------------------------------- Dice


def test_dice_self_one_disjoint_zero():
    m = np.zeros((2, 1, 8, 8, 8), np.uint8)
    m[:, :, 2:5, 2:5, 2:5] = 1
    assert dice_score(m, m, 2)["Dice"] == pytest.approx(1.0)
    d = np.zeros_like(m)
    d[:, :, 5:8, 5:8, 5:8] = 1
    assert dice_score(d, m, 2)["Dice"] == pytest.approx(0.0)
    half = m.copy()
    half[:, :, 2:5, 2:5, 2] = 0  # 18 of 27 voxels kept: dice = 2*18 / (18 + 27)
    assert dice_score(half, m, 2)["Dice"] == pytest.approx(36 / 45)


def test_dice_multiclass_mean_over_present_foreground_classes():
    t = np.zeros((1, 1, 6, 6, 6), np.int64)
    t[..., :2, :, :] = 1
    t[..., 2:4, :, :] = 2  # class 3 and 4 absent from the reference: ignored
    p = t.copy()
    p[..., 2:4, :, :] = 0  # class 2 missed entirely
    r = dice_score(p, t, 5)
    assert r["Dice"] == pytest.approx(0.5)
    assert r["Dice per class"][1] == pytest.approx(1.0) and r["Dice per class"][2] == pytest.approx(0.0)


def test_condition_to_labels():
    sem = np.zeros((1, 1, 4, 4, 4), np.uint8)
    sem[..., 0, :, :] = 1
    sem[..., 1, :, :] = 4
    one_hot = np.stack([(sem[:, 0] == k) for k in (1, 2, 3, 4)], axis=1).astype(np.float32)
    assert torch.equal(condition_to_labels(one_hot, 5), torch.as_tensor(sem, dtype=torch.int64))
    assert torch.equal(condition_to_labels(sem, 5), torch.as_tensor(sem, dtype=torch.int64))
    assert condition_to_labels((sem == 4).astype(np.float32), 2).max() == 1
    with pytest.raises(MetricError, match="skull"):
        condition_to_labels(np.zeros((1, 5, 4, 4, 4)), 5)
    with pytest.raises(MetricError, match="labels must lie in 0..2"):
        condition_to_labels(sem, 3)
    with pytest.raises(MetricError, match="at least 2 classes"):
        condition_to_labels(sem, 1)
    # metrics know no task names: the number of classes comes from the task's definition
    with pytest.raises(MetricError, match="at least 2 classes"):
        condition_to_labels(sem, "multimodal")


def test_metric_descriptors_and_suites():
    from metrics.suite import COLUMNS, metric_of, suite_columns as metric_suite

    assert {m.family for m in COLUMNS} == {"FID-2D", "FID-3D", "PRDC", "FRD", "LPIPS", "MS-SSIM", "Dice", "PSNR",
                                           "SSIM"}
    assert metric_of("FID-2D mean [in-domain-2d]").name == "FID-2D" and not metric_of("FID-3D [x]").higher_is_better
    assert metric_of("Dice").arrow == "↑" and metric_of("MS-SSIM diversity").arrow == "↓"
    assert metric_of("control gap t0-249") is None
    plain = {m.name for m in metric_suite(dice=False, paired=False)}
    assert plain == {"FID-2D", "FID-3D", "FID-2D rel", "FID-3D rel", "Precision", "Recall", "Density", "Coverage",
                     "FRD", "LPIPS diversity", "MS-SSIM diversity"}
    assert metric_of("FID-3D rel [in-domain-3d]").name == "FID-3D rel" and metric_of("Coverage-2D [x]").arrow == "↑"
    assert {m.name for m in metric_suite(dice=True, paired=False)} - plain == {"Dice"}
    assert {m.name for m in metric_suite(dice=False, paired=True)} - plain == {
        "LPIPS fidelity", "MS-SSIM fidelity", "PSNR", "SSIM", "anatomy Dice"}
    assert metric_of("anatomy Dice [lv_mask]").higher_is_better


# ----------------------------------------------------------------------------------- cost


def test_count_parameters_trainable_and_total():
    net = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    for p in net[0].parameters():
        p.requires_grad_(False)
    assert count_parameters(net) == {"trainable": 3 * 2 + 2, "total": 4 * 3 + 3 + 3 * 2 + 2}


def test_step_timer_median_after_warmup():
    t = StepTimer(warmup=2)
    for s in (5.0, 4.0, 1.0, 3.0, 2.0):
        t.record(s)
    assert t.seconds_per_step == pytest.approx(2.0)
    t2 = StepTimer(warmup=1)
    with t2.step():
        pass
    assert t2.seconds_per_step is None
    with t2.step():
        sum(range(1000))
    assert t2.seconds_per_step > 0


def test_device_days_projection_and_memory():
    r = device_days(1.0, **PAPER_PROTOCOL)
    assert r["steps"] == 10000 * 32 and r["device_days"] == pytest.approx(320000 / 86400)
    assert "CPU" in r["device"] or torch.cuda.is_available()
    r8 = device_days(0.5, **PAPER_PROTOCOL, measured_batch_size=8)
    assert r8["seconds_per_step"] == pytest.approx(1.0) and r8["scaling"]
    with pytest.raises(MetricError):
        device_days(float("nan"), **PAPER_PROTOCOL)
    with PeakMemory("cpu") as pm, WallTimer() as w:
        _ = np.ones(10**6)
    assert pm.peak_bytes > 10**6 and w.seconds >= 0
