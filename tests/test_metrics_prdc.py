"""Reading a Fréchet distance: precision/recall/density/coverage, relative FD, bootstrap CI, sample size,
FRD; and a collapsed generator (copies of one real volume) against a real-vs-real reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from metrics.extractors import FeatureExtractor
from metrics.fd_context import half_split, real_floor, relative, rows_of
from metrics.fid import frechet_distance
from metrics.frd import frd, frd_unavailable
from metrics.prdc import prdc
from metrics.protocol import ScoringSettings, reference_row, score_generated
from tests.fixtures import one_thread  # noqa: F401  (autouse: one torch thread in this module)
from tests.phantom import phantom_population

SHAPE = (24, 32, 24)


def _tiny(dims: int, width: int = 12, name: str = "") -> FeatureExtractor:
    """A fixed random conv net (seeded): a small extractor, so the test is fast."""
    torch.manual_seed(dims)
    conv = nn.Conv3d if dims == 3 else nn.Conv2d
    net = nn.Sequential(conv(1, width, 5, stride=2), nn.Tanh(), conv(width, width, 3, stride=2), nn.Tanh())
    return FeatureExtractor(name or f"tiny-{dims}d", net, dims, f"seed{dims}-w{width}", "test", False, "none",
                            lambda n, x: n(x).flatten(2).mean(2), width, device="cpu")


@pytest.fixture(scope="module")
def volumes():
    return {"ref": phantom_population(SHAPE, 24, seed=1), "test": phantom_population(SHAPE, 24, seed=2)}


def test_prdc_equals_the_prdc_package():
    from prdc import compute_prdc  # installed with the test extra: an import error fails the test
    rng = np.random.default_rng(0)
    for n_real, n_fake, dim, shift in ((40, 30, 8, 0.0), (64, 64, 32, 0.5), (25, 50, 3, 1.0)):
        real = rng.normal(size=(n_real, dim))
        fake = rng.normal(shift, 1.2, size=(n_fake, dim))
        ours = prdc(real, fake, k=5)
        ref = compute_prdc(real_features=real, fake_features=fake, nearest_k=5)
        for name in ("precision", "recall", "density", "coverage"):
            assert ours[name.capitalize()] == pytest.approx(float(ref[name]), abs=1e-6), (name, ours, ref)
    assert len({tuple(prdc(real, fake + s).values()) for s in (0.0, 3.0)}) == 2  # can fail: values move


def test_prdc_of_copies_and_of_itself():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(50, 6))
    copies = np.repeat(real[:1], 50, 0)
    c = prdc(real, copies)
    assert c["Recall"] == 0.0 and 0 < c["Coverage"] <= 0.2  # only the real balls around the copied point
    s = prdc(real, real)
    assert s["Precision"] == 1.0 and s["Recall"] == 1.0 and s["Coverage"] == 1.0


def test_relative_fd_of_the_real_halves_is_one():
    rng = np.random.default_rng(2)
    feats = torch.as_tensor(rng.normal(size=(40 * 3, 5)))  # 40 volumes, 3 slices each
    floor = real_floor(feats, 3, seed=7, method="svd")
    a, b = half_split(40, 7)
    assert sorted(np.concatenate([a, b]).tolist()) == list(range(40)) and floor["half_a"] == a.tolist()
    halves = frechet_distance(feats[rows_of(a, 3)], feats[rows_of(b, 3)], method="svd")
    assert relative(halves, floor["fd_real_halves"]) == pytest.approx(1.0, abs=1e-12)
    assert relative(2 * halves, floor["fd_real_halves"]) == pytest.approx(2.0)
    assert not np.array_equal(half_split(40, 8)[0], a)  # the seed matters


def test_collapsed_generator_against_real_reference(volumes):
    ex = [_tiny(2), _tiny(3)]
    st = ScoringSettings(slices_per_axis=4, bootstrap_resamples=50, max_pairs=20, frd=False)
    collapsed = np.repeat(volumes["test"]["image"][:1], 24, 0)
    gen = score_generated(collapsed, volumes["ref"]["image"], extractors=ex, settings=st)
    ref = reference_row(volumes["test"]["image"], volumes["ref"]["image"], extractors=ex, settings=st)
    report = {k: (round(gen[k], 4), round(ref[k], 4)) for k in gen if k not in ("protocol", "per_volume") and gen[k] is not None}
    print("\ncolumn: (collapsed, real-vs-real)\n" + "\n".join(f"  {k}: {v}" for k, v in report.items()))
    for d in ("2D", "3D"):
        e = f"tiny-{d.lower()}"
        # a collapsed set lies only in the balls of the real samples near the copied one: coverage ~ k / n
        assert gen[f"Recall-{d} [{e}]"] < 0.1 and gen[f"Coverage-{d} [{e}]"] < 0.3, report
        assert gen[f"Coverage-{d} [{e}]"] < ref[f"Coverage-{d} [{e}]"] / 3, report
        assert ref[f"Recall-{d} [{e}]"] > 0.8 and ref[f"Coverage-{d} [{e}]"] > 0.8, report
    assert gen["MS-SSIM diversity"] > 0.99 and ref["MS-SSIM diversity"] < 0.95, report
    # the protocol: split, CI over volumes, sample size against the feature size
    p3 = gen["protocol"]["FID-3D [tiny-3d]"]
    assert p3["relative"]["split_seed"] == 0 and len(p3["relative"]["half_a"]) == 12
    assert gen["FID-3D rel [tiny-3d]"] == pytest.approx(gen["FID-3D [tiny-3d]"] / p3["relative"]["fd_real_halves"])
    assert p3["bootstrap"]["resamples"] == 50 and p3["bootstrap"]["ci95"][0] <= p3["bootstrap"]["ci95"][1]
    assert p3["sample_size"] == {**p3["sample_size"], "n_real_volumes": 24, "feature_dim": 12, "undersampled": False}
    p2 = ref["protocol"]["FID-2D [tiny-2d]"]
    assert set(p2["bootstrap"]) == {"FID-A", "FID-C", "FID-S", "FID-2D mean"}
    assert ref["protocol"]["PRDC-3D [tiny-3d]"]["k"] == 5
    assert gen["FRD"] is None if "FRD" in gen else True


def test_undersampled_flag_and_too_few_volumes_for_k(volumes):
    wide = _tiny(3, width=30, name="wide")
    st = ScoringSettings(bootstrap_resamples=0, max_pairs=5, frd=False)
    row = score_generated(volumes["test"]["image"][:4], volumes["ref"]["image"], extractors=[wide], settings=st)
    assert row["protocol"]["FID-3D [wide]"]["sample_size"]["undersampled"] is True
    assert row["Recall-3D [wide]"] is None and "k=5" in row["protocol"]["PRDC-3D [wide]"]["reason"]
    no_mask = score_generated(volumes["test"]["image"][:4], volumes["ref"]["image"][:4], extractors=[],
                              settings=ScoringSettings(max_pairs=5))
    assert no_mask["FRD"] is None and no_mask["protocol"]["FRD"]["reason"]


def test_frd_real_vs_real_is_smallest_and_the_real_features_are_extracted_once(volumes, tmp_path, monkeypatch):
    import frd_score.frd as package

    assert frd_unavailable() is None  # frd-score and pyradiomics-bhklab are dependencies of the suite
    ref, test = volumes["ref"]["image"][:6], volumes["test"]["image"][:6]
    mask = (volumes["ref"]["semantics"][:, 0] > 0).mean(0) >= 0.5
    noisy = np.clip(test + np.random.default_rng(0).normal(0, 0.1, test.shape), 0, 1).astype(np.float32)
    extracted, plain = [], package.compute_features

    def counting(files, feature_extractor, masks=None, **kwargs):
        extracted.append(len(files))
        return plain(files, feature_extractor, masks=masks, **kwargs)

    monkeypatch.setattr(package, "compute_features", counting)
    values = {name: frd(ref, v, mask, cache_dir=tmp_path)["FRD"] for name, v in
              (("real", test), ("collapsed", np.repeat(test[:1], 6, 0)), ("noisy", noisy))}
    print("FRD:", values)
    assert values["real"] < values["collapsed"] and values["real"] < values["noisy"], values
    assert extracted == [6, 6, 6, 6], extracted  # the real set's 6 once; then only the generated 6 each time
    assert len(list(tmp_path.glob("real-*.npz"))) == 1
    assert frd(ref, test, mask)["FRD"] == values["real"]  # without the cache: the same value, to the bit
    assert extracted[-2:] == [6, 6]
