"""Feature extractors: the real loading paths, the announced fallback, clear errors, FID behaviour.

The pretrained weights cannot be downloaded here, so every loading test builds a *randomly
initialised* network of the real architecture, saves it in the upstream file format into a temporary
weights folder (or torch.hub cache layout), and loads it back through the suite's loading path.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

import metrics.common as common
from metrics.common import WeightsError, sha256_file
from metrics.extractor_nets import RadImageNetResNet50, medicalnet_resnet10, medicalnet_resnet50
from metrics.extractors import (
    InDomainConfig,
    find_weights,
    get_extractors,
    load_pretrained,
    medicalnet_intensity_normalisation,
    train_in_domain,
)
from metrics.fid import clear_feature_cache, fid_2d, fid_3d
from tests.phantom import phantom_population
from tests.fixtures import one_thread  # noqa: F401  (autouse: one torch thread in this module)


TINY = InDomainConfig(steps_2d=40, steps_3d=20, batch_2d=16, batch_3d=2)


@pytest.fixture(scope="module")
def phantoms():
    shape = (32, 48, 32)
    return {
        "train": phantom_population(shape, 12, seed=1)["image"],
        "real": phantom_population(shape, 16, seed=2)["image"],
        "other": phantom_population(shape, 16, seed=3)["image"],
    }


@pytest.fixture(scope="module")
def in_domain(tmp_path_factory, phantoms):
    cache = tmp_path_factory.mktemp("cache")
    return {
        "2d": train_in_domain("2d", phantoms["train"], cache, data_id="phantom-train", config=TINY, device="cpu"),
        "3d": train_in_domain("3d", phantoms["train"], cache, data_id="phantom-train", config=TINY, device="cpu"),
        "cache": cache,
    }


# ----------------------------------------------------------------------------- architecture keys


def test_architectures_match_upstream_state_dict_layout():
    # key counts and names of the upstream state dicts (Warvito/radimagenet-models, warvito/MedicalNet-models)
    r = RadImageNetResNet50().state_dict()
    assert len(r) == 371 and "conv1.bias" in r and "layer1.0.downsample.0.bias" in r
    assert tuple(r["layer2.0.conv1.weight"].shape) == (128, 256, 1, 1)  # Keras layout: stride on the 1x1 conv
    m10 = medicalnet_resnet10().state_dict()
    assert len(m10) == 72 and "layer4.0.downsample.0.weight" in m10 and "conv1.bias" not in m10


# ----------------------------------------------------------------------------- loading paths


def test_radimagenet_loads_from_weights_dir(tmp_path):
    torch.manual_seed(0)
    net = RadImageNetResNet50().eval()  # random init: NOT pretrained, only the real architecture and format
    wdir = tmp_path / "weights"
    wdir.mkdir()
    torch.save(net.state_dict(), wdir / "radimagenet_resnet50.pt")
    ext = load_pretrained("radimagenet", weights_dir=wdir, hub_dir=tmp_path / "nohub", device="cpu")
    assert ext.name == "radimagenet" and ext.spatial_dims == 2 and ext.pretrained
    assert ext.weights_hash == sha256_file(wdir / "radimagenet_resnet50.pt")
    x = torch.rand(3, 1, 40, 56)
    feats = ext.features(x)
    assert feats.shape == (3, 2048)
    # the documented preprocessing: 3 channels, BGR, subtract the mean, then global average
    bgr = x.repeat(1, 3, 1, 1)[:, [2, 1, 0]] - torch.tensor([0.406, 0.456, 0.485]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = net(bgr).mean(dim=(2, 3))
    torch.testing.assert_close(feats, ref, rtol=1e-4, atol=1e-5)


def test_radimagenet_found_in_torch_hub_cache_layout(tmp_path):
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    torch.save(RadImageNetResNet50().state_dict(), hub / "checkpoints" / "RadImageNet-ResNet50_notop.pth")
    assert find_weights("radimagenet", None, hub) == hub / "checkpoints" / "RadImageNet-ResNet50_notop.pth"
    ext = load_pretrained("radimagenet", None, hub, device="cpu")
    assert ext is not None and ext.source.endswith("RadImageNet-ResNet50_notop.pth")


@pytest.mark.parametrize("name,builder,dim", [
    ("medicalnet-resnet10", medicalnet_resnet10, 512),
    ("medicalnet-resnet50", medicalnet_resnet50, 2048),
])
def test_medicalnet_loads_upstream_checkpoint_format(tmp_path, name, builder, dim):
    torch.manual_seed(0)
    net = builder().eval()  # random init, real architecture
    # upstream format: {"state_dict": {"module.<key>": tensor}} (saved from DataParallel)
    ckpt = {"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}
    fname = "medicalnet_resnet10_23datasets.pt" if name.endswith("10") else "medicalnet_resnet50_23datasets.pt"
    torch.save(ckpt, tmp_path / fname)
    ext = load_pretrained(name, weights_dir=tmp_path, hub_dir=tmp_path / "nohub", device="cpu")
    assert ext.name == name and ext.spatial_dims == 3 and ext.feature_dim == dim
    assert ext.weights_hash == sha256_file(tmp_path / fname)
    x = torch.rand(2, 1, 24, 32, 24)
    with torch.no_grad():
        ref = net(medicalnet_intensity_normalisation(x)).mean(dim=(2, 3, 4))
    torch.testing.assert_close(ext.features(x), ref, rtol=1e-4, atol=1e-5)
    z = medicalnet_intensity_normalisation(x)
    assert abs(float(z[0].mean())) < 1e-5 and float(z[0].std()) == pytest.approx(1.0, rel=1e-4)


def test_get_extractors_prefers_weights_and_names_columns(tmp_path):
    torch.save(RadImageNetResNet50().state_dict(), tmp_path / "radimagenet_resnet50.pt")
    torch.save({"state_dict": medicalnet_resnet10().state_dict()}, tmp_path / "medicalnet_resnet10_23datasets.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning when both files exist
        ex = get_extractors(weights_dir=tmp_path, hub_dir=tmp_path / "nohub", device="cpu")
    assert ex["2d"].name == "radimagenet" and ex["3d"].name == "medicalnet-resnet10"


# ----------------------------------------------------------------------------- malformed / missing


def test_malformed_weights_file_raises_clear_error(tmp_path):
    bad = tmp_path / "radimagenet_resnet50.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(WeightsError) as e:
        get_extractors(weights_dir=tmp_path, hub_dir=tmp_path / "nohub", train_volumes=np.zeros((2, 1, 8, 8, 8), np.float32))
    msg = str(e.value)
    assert str(bad) in msg and "put there" in msg and "RadImageNet" in msg
    # right format, wrong architecture: also an error, never a silent fallback
    torch.save({"conv1.weight": torch.zeros(3)}, bad)
    with pytest.raises(WeightsError, match="does not match the radimagenet architecture"):
        load_pretrained("radimagenet", tmp_path, tmp_path / "nohub")
    torch.save(medicalnet_resnet10().state_dict(), tmp_path / "medicalnet_resnet50_23datasets.pt")
    with pytest.raises(WeightsError, match="medicalnet-resnet50"):
        load_pretrained("medicalnet-resnet50", tmp_path, tmp_path / "nohub")


def test_missing_weights_fall_back_to_in_domain_with_one_warning(tmp_path, phantoms, in_domain):
    common._WARNED.discard("fallback-radimagenet")
    common._WARNED.discard("fallback-medicalnet-resnet10")
    kw = dict(weights_dir=tmp_path / "empty", hub_dir=tmp_path / "nohub", cache_dir=in_domain["cache"],
              train_volumes=phantoms["train"], data_id="phantom-train", config=TINY, device="cpu")
    with pytest.warns(UserWarning, match="in-domain") as rec:
        ex = get_extractors(**kw)
    assert len([w for w in rec if "not found" in str(w.message)]) == 2  # one per extractor
    assert ex["2d"].name == "in-domain-2d" and ex["3d"].name == "in-domain-3d"
    assert not ex["2d"].pretrained
    # loaded from the cache the fixture trained: same weights
    assert ex["2d"].weights_hash == in_domain["2d"].weights_hash
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # announced once per process
        get_extractors(**kw)
    with pytest.raises(common.MetricError, match="train_volumes"):
        get_extractors(weights_dir=tmp_path / "empty", hub_dir=tmp_path / "nohub")


def test_in_domain_cache_key_and_corrupt_cache(tmp_path, phantoms):
    a = train_in_domain("2d", phantoms["train"][:4], tmp_path, config=InDomainConfig(steps_2d=2, steps_3d=2, batch_2d=4), device="cpu")
    b = train_in_domain("2d", phantoms["train"][:4], tmp_path, config=InDomainConfig(steps_2d=2, steps_3d=2, batch_2d=4), device="cpu")
    assert a.source == b.source and a.weights_hash == b.weights_hash
    c = train_in_domain("2d", phantoms["train"][4:8], tmp_path, config=InDomainConfig(steps_2d=2, steps_3d=2, batch_2d=4), device="cpu")
    assert c.source != a.source
    with open(a.source, "wb") as f:
        f.write(b"garbage")
    with pytest.raises(WeightsError, match="delete the file"):
        train_in_domain("2d", phantoms["train"][:4], tmp_path, config=InDomainConfig(steps_2d=2, steps_3d=2, batch_2d=4), device="cpu")


# ----------------------------------------------------------------------------- FID behaviour


def test_fid_rises_with_noise_and_blur(phantoms, in_domain):
    clear_feature_cache()
    real, other = phantoms["real"], phantoms["other"]
    rng = np.random.default_rng(0)
    e2, e3 = in_domain["2d"], in_domain["3d"]
    noisy = [np.clip(other + rng.normal(0, s, other.shape).astype(np.float32), 0, 1) for s in (0.05, 0.1, 0.2)]
    blurred = [ndi.gaussian_filter(other, (0, 0, s, s, s)).astype(np.float32) for s in (0.7, 1.4, 2.5)]
    for series in ([other] + noisy, [other] + blurred):
        f2 = [fid_2d(real, v, e2, slices_per_axis=4)["FID-2D mean"] for v in series]
        f3 = [fid_3d(real, v, e3)["FID-3D"] for v in series]
        assert all(a < b for a, b in zip(f2, f2[1:])), f2
        assert all(a < b for a, b in zip(f3, f3[1:])), f3


def test_fid_2d_reports_protocol(phantoms, in_domain):
    r = fid_2d(phantoms["real"], phantoms["other"], in_domain["2d"], slices_per_axis=6, central_fraction=0.5)
    p = r["protocol"]
    assert set(r) == {"FID-A", "FID-C", "FID-S", "FID-2D mean", "protocol"}
    assert r["FID-2D mean"] == pytest.approx((r["FID-A"] + r["FID-C"] + r["FID-S"]) / 3)
    assert p["slices_per_axis"] == {"axial": 6, "coronal": 6, "sagittal": 6}
    assert p["n_generated_slices"]["axial"] == 16 * 6
    assert p["extractor"]["name"] == "in-domain-2d" and p["extractor"]["weights_hash"]
    assert fid_2d(phantoms["real"], phantoms["real"], in_domain["2d"])["FID-2D mean"] == pytest.approx(0.0, abs=1e-6)
