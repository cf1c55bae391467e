"""LPIPS: agreement with the lpips package, the trunk-weights path, unavailability, errors.

AlexNet's ImageNet weights cannot be downloaded here; these tests save a *randomly initialised*
torchvision AlexNet in torchvision's state-dict format into a temporary weights folder and load it
through the suite's path. Such a trunk exists only inside these tests.
"""
from __future__ import annotations

import contextlib
import io
import warnings

import lpips
import pytest
import torch
import torchvision

from metrics.common import WeightsError
from metrics.lpips_metric import (
    find_alexnet_weights,
    load_lpips,
    lpips_diversity,
    lpips_fidelity,
    lpips_volume_pairs,
)
from tests.phantom import phantom_population
from tests.fixtures import one_thread  # noqa: F401  (autouse: one torch thread in this module)


@pytest.fixture(scope="module")
def alexnet_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), d / "alexnet.pt")
    return d


@pytest.fixture(scope="module")
def model(alexnet_dir, tmp_path_factory):
    return load_lpips(weights_dir=alexnet_dir, hub_dir=tmp_path_factory.mktemp("nohub"), device="cpu")


@pytest.fixture(scope="module")
def reference_lpips(alexnet_dir):
    """The lpips package called directly, its AlexNet trunk set by hand from the same file."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ref = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False).eval()
    alex = torchvision.models.alexnet(weights=None)
    alex.load_state_dict(torch.load(alexnet_dir / "alexnet.pt", weights_only=True))
    slices = [ref.net.slice1, ref.net.slice2, ref.net.slice3, ref.net.slice4, ref.net.slice5]
    for sl in slices:
        for name, module in sl.named_children():
            src = alex.features[int(name)]
            for pname, p in module.named_parameters():
                p.data.copy_(getattr(src, pname).data)
    return ref


@pytest.fixture(scope="module")
def vols():
    return torch.as_tensor(phantom_population((32, 48, 32), 4, seed=9)["image"])


def test_slice_pair_matches_lpips_package(model, reference_lpips):
    assert model.available and model.weights_hash
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 1, 64, 72, generator=g), torch.rand(2, 1, 64, 72, generator=g)
    ours = model.distance(a * 2 - 1, b * 2 - 1)
    with torch.no_grad():
        ref = reference_lpips(a.repeat(1, 3, 1, 1), b.repeat(1, 3, 1, 1), normalize=True).reshape(-1)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    # linear heads really come from the wheel (not random): they equal the package's own file
    import os
    heads = torch.load(os.path.join(os.path.dirname(lpips.__file__), "weights/v0.1/alex.pth"), map_location="cpu", weights_only=True)
    torch.testing.assert_close(model.net.lin0.model[1].weight, heads["lin0.model.1.weight"])


def test_volume_lpips_is_mean_over_selected_slices(model, reference_lpips, vols):
    a, b = vols[:1], vols[1:2]
    got = float(lpips_volume_pairs(model, a, b, fraction=0.25, central_fraction=0.8, min_side=64)[0])
    # by hand: round(0.25*depth) slices from the central 80%, upsampled so the short side is 64
    from metrics.common import central_slice_indices, extract_slices
    vals = []
    for orient, ax in (("axial", 2), ("coronal", 1), ("sagittal", 0)):
        depth = a.shape[2 + ax]
        idx = central_slice_indices(depth, round(0.25 * depth), 0.8)
        sa, sb = extract_slices(a, orient, idx), extract_slices(b, orient, idx)
        f = 64 / min(sa.shape[-2:])
        size = (round(sa.shape[-2] * f), round(sa.shape[-1] * f))
        up = lambda s: torch.nn.functional.interpolate(s, size=size, mode="bilinear", align_corners=False)  # noqa: E731
        with torch.no_grad():
            vals.append(reference_lpips(up(sa).repeat(1, 3, 1, 1), up(sb).repeat(1, 3, 1, 1), normalize=True).reshape(-1))
    assert got == pytest.approx(float(torch.cat(vals).mean()), rel=1e-5)


def test_diversity_and_fidelity(model, vols):
    same = vols[:1].repeat(3, 1, 1, 1, 1)
    assert lpips_diversity(same, model)["LPIPS diversity"] == pytest.approx(0.0, abs=1e-6)
    d = lpips_diversity(vols, model)
    assert d["LPIPS diversity"] > 0 and d["protocol"]["n_pairs"] == 6
    assert d["protocol"]["slices_per_axis"] == {"axial": 8, "coronal": 12, "sagittal": 8}
    assert lpips_fidelity(vols, vols, model)["LPIPS fidelity"] == pytest.approx(0.0, abs=1e-6)
    noisy = (vols + 0.1 * torch.randn(vols.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert lpips_fidelity(noisy, vols, model)["LPIPS fidelity"] > 0


def test_missing_trunk_reports_unavailable(tmp_path, vols):
    m = load_lpips(weights_dir=tmp_path, hub_dir=tmp_path / "nohub")
    assert not m.available and "AlexNet" in m.reason
    r = lpips_diversity(vols, m)
    assert r["LPIPS diversity"] is None and r["reason"] == m.reason
    assert lpips_fidelity(vols, vols, m)["LPIPS fidelity"] is None


def test_trunk_found_in_torchvision_cache_layout(tmp_path, alexnet_dir):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "alexnet-owt-7be5be79.pth").write_bytes((alexnet_dir / "alexnet.pt").read_bytes())
    assert find_alexnet_weights(None, tmp_path) == tmp_path / "checkpoints" / "alexnet-owt-7be5be79.pth"


def test_malformed_trunk_file_raises(tmp_path):
    (tmp_path / "alexnet.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="alexnet.pt"):
        load_lpips(weights_dir=tmp_path, hub_dir=tmp_path / "nohub")
    torch.save({"features.0.weight": torch.zeros(3)}, tmp_path / "alexnet.pt")
    with pytest.raises(WeightsError, match="put there"):
        load_lpips(weights_dir=tmp_path, hub_dir=tmp_path / "nohub")
