"""The lightweight baselines: T2I-Adapter, ControlNet-LITE, ControlNet-MLP, MCM and MCM-L.

Parameter counts are taken on the meta device (nothing allocated), against Table 5 of the VCM
supplementary at ``paper`` and against the paper's order of sizes at every profile. The
behaviour tests use a randomly initialised base model of the ``smoke`` architecture: they check
shapes, where gradients go, initial identity, modality drop and that a few steps on a fixed
batch lower the loss - not the quality of the methods.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from benchmark.base.model import BaseLDM
from benchmark.profiles import load_profile
from methods._light_blocks import add_to_level_outputs, pixel_unshuffle_3d, unet_layout
from methods.base import Conditions
from methods.registry import MethodError, get_method, known_methods

LIGHT = ["t2i_adapter", "controlnet_lite", "controlnet_mlp", "mcm", "mcm_l"]
# Table 5 order of sizes: MLP < MCM < VCM < LITE < ControlNet < T2I-Adapter < scratch < fine-tuned.
ORDER = ["controlnet_mlp", "mcm", "vcm", "controlnet_lite", "controlnet", "t2i_adapter", "ldm_scratch", "ldm_finetune"]
TABLE5 = {  # trainable parameters (VCM suppl. Table 5); MCM-L is built at VCM's complexity
    "controlnet_lite": 63.56e6,
    "controlnet_mlp": 9.03e6,
    "t2i_adapter": 447.26e6,
    "mcm": 11.45e6,
    "mcm_l": 45.88e6,
}
LV = {"lv_mask": 1}
MULTI = {"semantics": 4, "skull": 1}
ZERO_INIT = ["controlnet_lite", "controlnet_mlp", "mcm", "mcm_l"]  # zero convs / zero gamma-beta heads


# ---- parameter counts ------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _meta_base(profile_name: str):
    profile = load_profile(profile_name)
    with torch.device("meta"):
        return profile, BaseLDM.from_profile(profile)


def _count(profile_name: str, name: str, channels=LV) -> int:
    profile, base = _meta_base(profile_name)
    with torch.device("meta"):
        method = get_method(name)(base, channels, profile.methods[name])
    return method.num_trainable_parameters()


@pytest.mark.parametrize("name", sorted(TABLE5))
def test_paper_parameter_count_is_within_15_percent_of_table5(name):
    n = _count("paper", name)
    assert abs(n / TABLE5[name] - 1) < 0.15, f"{name}: {n / 1e6:.2f}M vs Table 5 {TABLE5[name] / 1e6:.2f}M"


def test_paper_counts_match_table5_closely_where_the_port_reproduces_it():
    # LITE, MLP and MCM reproduce Table 5 to within 0.3%; T2I-Adapter with 6 blocks per level to 0.5%.
    for name in ("controlnet_lite", "controlnet_mlp", "mcm", "t2i_adapter"):
        assert abs(_count("paper", name) / TABLE5[name] - 1) < 0.006, name


@pytest.mark.parametrize("profile_name", ["smoke", "cpu", "gpu", "paper"])
def test_sizes_follow_the_papers_order_at_every_profile(profile_name):
    profile, _ = _meta_base(profile_name)
    registered = set(known_methods())
    counts, absent = {}, []
    for name in ORDER + ["mcm_l"]:
        if name not in registered:
            absent.append(f"{name} (not registered)")
        elif name not in profile.methods:
            absent.append(f"{name} (no methods.{name} in the {profile_name} profile)")
        else:
            counts[name] = _count(profile_name, name)
    present = [n for n in ORDER if n in counts]
    sizes = [counts[n] for n in present]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes), (
        f"order at {profile_name}: " + " < ".join(f"{n} {counts[n] / 1e6:.3f}M" for n in present)
    )
    if "mcm_l" in counts and "vcm" in counts:  # MCM-L: the same complexity as VCM
        assert abs(counts["mcm_l"] / counts["vcm"] - 1) < 0.15, (counts["mcm_l"], counts["vcm"])
    if absent:
        pytest.skip("order checked without " + ", ".join(absent))


# ---- building blocks -------------------------------------------------------------------


def test_pixel_unshuffle_3d_moves_every_voxel_to_its_channel():
    r = 2
    x = torch.arange(2 * 3 * 4 * 6 * 2, dtype=torch.float32).reshape(2, 3, 4, 6, 2)
    y = pixel_unshuffle_3d(x, r)
    assert y.shape == (2, 3 * r**3, 2, 3, 1)
    for c, i, j, k, X, Y, Z in [(0, 0, 0, 0, 0, 0, 0), (1, 1, 0, 1, 1, 2, 0), (2, 1, 1, 1, 1, 1, 0)]:
        assert y[1, c * r**3 + i * r * r + j * r + k, X, Y, Z] == x[1, c, X * r + i, Y * r + j, Z * r + k]
    assert torch.equal(torch.sort(y.flatten())[0], torch.sort(x.flatten())[0])
    with pytest.raises(ValueError, match="multiple of 4"):
        pixel_unshuffle_3d(x, 4)


# ---- behaviour at the smoke shape --------------------------------------------------------


@pytest.fixture(scope="module")
def smoke():
    profile = load_profile("smoke")
    torch.manual_seed(0)
    base = BaseLDM.from_profile(profile).freeze()
    # MONAI zero-initialises the UNet's output convolution (and each resnet's second one), so a
    # freshly built UNet predicts zero whatever it is given. Give those weights small random
    # values, as pretraining would, so that the frozen model's output depends on its inputs.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in base.diffusion.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return profile, base


def _config(profile, name):
    cfg = dict(profile.methods[name])
    if name == "t2i_adapter":
        cfg["num_res_blocks"] = 1  # one block per level keeps the test fast; the structure is the same
    return cfg


def _build(smoke, name, conds=LV, **overrides):
    profile, base = smoke
    torch.manual_seed(1)
    return get_method(name)(base, conds, {**_config(profile, name), **overrides})


def _batch(base, channels=LV, present=None, seed=2, batch=2):
    g = torch.Generator().manual_seed(seed)
    shape = base.image_shape
    tensors = {}
    for name, c in channels.items():
        if name == "semantics":
            labels = torch.randint(0, 5, (batch, *shape), generator=g)
            tensors[name] = torch.stack([(labels == k) for k in range(1, 5)], 1).float()
        elif name == "lv_mask":
            tensors[name] = (torch.rand(batch, c, *shape, generator=g) > 0.7).float()
        else:
            tensors[name] = torch.rand(batch, c, *shape, generator=g)
    present = present or {name: torch.ones(batch) for name in channels}
    for name, flags in present.items():  # the engine zeroes a dropped modality
        tensors[name] = tensors[name] * flags.view(-1, 1, 1, 1, 1)
    z0 = torch.randn(batch, *base.latent_shape, generator=g)
    noise = torch.randn(batch, *base.latent_shape, generator=g)
    t = torch.tensor([50, 700][:batch])
    z_t = base.train_scheduler.add_noise(original_samples=z0, noise=noise, timesteps=t)
    scalars = torch.rand(batch, base.num_scalars, generator=g)
    return z_t, t, Conditions(tensors, present), scalars, noise


def _skip_shapes(base, z_t, t, scalars):
    """Shapes of the tensors the frozen UNet keeps for its skips, read off a forward pass."""
    shapes = []
    unet = base.diffusion
    hooks = [unet.conv_in.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))]
    for block in unet.down_blocks:
        hooks.append(block.register_forward_hook(lambda m, i, o: shapes.extend(tuple(r.shape) for r in o[1])))
    try:
        with torch.no_grad():
            base.unet(z_t, t, scalars)
    finally:
        for h in hooks:
            h.remove()
    return shapes


@pytest.mark.parametrize("name", ["controlnet_lite", "controlnet_mlp"])
def test_lite_residuals_match_every_skip_of_the_frozen_unet(smoke, name):
    _, base = smoke
    z_t, t, cond, scalars, _ = _batch(base)
    method = _build(smoke, name)
    with torch.no_grad():
        down, mid = method.net(cond.stacked())
    assert [tuple(d.shape) for d in down] == _skip_shapes(base, z_t, t, scalars)
    assert len(unet_layout(base.diffusion_config).residual_channels) == len(down)
    assert mid.shape[1] == base.diffusion_config["channels"][-1]


@pytest.mark.parametrize("name", LIGHT)
def test_predicts_noise_at_latent_shape(smoke, name):
    _, base = smoke
    z_t, t, cond, scalars, _ = _batch(base)
    method = _build(smoke, name)
    with torch.no_grad():
        out = method.predict_noise(z_t, t, cond, scalars)
    assert out.shape == z_t.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ZERO_INIT)
def test_starts_as_the_frozen_model(smoke, name):
    _, base = smoke
    z_t, t, cond, scalars, _ = _batch(base)
    # MCM's identity start is its zero_init_heads option (the default is the authors' init).
    method = _build(smoke, name, **({"zero_init_heads": True} if name.startswith("mcm") else {}))
    with torch.no_grad():
        torch.testing.assert_close(method.predict_noise(z_t, t, cond, scalars), base.unet(z_t, t, scalars),
                                   rtol=0, atol=1e-6)


def test_t2i_adapter_adds_features_inside_the_encoder_and_cleans_up(smoke):
    _, base = smoke
    z_t, t, cond, scalars, _ = _batch(base)
    layout = unet_layout(base.diffusion_config)
    with torch.no_grad():
        plain = base.unet(z_t, t, scalars)
        feats = [torch.zeros(2, c, *[s // 2**i for s in z_t.shape[2:]]) for i, c in enumerate(layout.level_channels)]
        with add_to_level_outputs(base.diffusion, feats):
            torch.testing.assert_close(base.unet(z_t, t, scalars), plain, rtol=0, atol=0)
        # A feature at the first level also flows through the deeper levels and the middle block,
        # which MONAI's skip-only residual (added to the same skip tensor) does not reproduce.
        bump = torch.randn(2, layout.level_channels[0], *z_t.shape[2:])
        feats[0] = bump
        with add_to_level_outputs(base.diffusion, feats):
            inside = base.unet(z_t, t, scalars)
        skip_only = [torch.zeros(2, c, 1, 1, 1) for c in layout.residual_channels]
        skip_only[layout.res_blocks[0]] = bump  # the last resnet of level 0
        outside = base.unet(z_t, t, scalars, down_residuals=skip_only)
        assert not torch.allclose(inside, plain) and not torch.allclose(inside, outside, atol=1e-4)
        torch.testing.assert_close(base.unet(z_t, t, scalars), plain, rtol=0, atol=0)  # hooks removed
        # No zero initialisation in T2I-Adapter: the adapter acts from the first step.
        method = _build(smoke, "t2i_adapter")
        assert not torch.allclose(method.predict_noise(z_t, t, cond, scalars), plain)


@pytest.mark.parametrize("name", LIGHT)
def test_training_moves_only_the_method_and_lowers_the_loss(smoke, name):
    _, base = smoke
    z_t, t, cond, scalars, noise = _batch(base)
    # MCM's L1 penalty on gamma/beta is exactly at its minimum when the heads start at zero, and
    # a few steps on two random samples cannot buy it back; the fall of the loss is checked on
    # the MSE here and the penalty on its own in test_mcm_loss_adds_the_l1_penalty.
    overrides = {"l1_weight": 0.0} if name in ("mcm", "mcm_l") else {}
    method = _build(smoke, name, **overrides)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    own = {id(p) for p in method.parameters()}
    opt = torch.optim.AdamW(method.trainable_parameters(), lr=1e-3, weight_decay=0.0)
    losses = []
    for _ in range(4):
        opt.zero_grad(set_to_none=True)
        loss = method.training_loss(z_t, t, cond, scalars, noise)
        loss.backward()
        losses.append(loss.item())
        assert all(p.grad is None for p in base.parameters())
        got_grad = [p for p in method.parameters() if p.grad is not None]
        assert got_grad and all(id(p) in own for p in got_grad)
        opt.step()
    with torch.no_grad():
        final = method.training_loss(z_t, t, cond, scalars, noise).item()
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), f"the frozen model changed: {k}"
    assert final < losses[0], f"{name}: loss {losses} -> {final:.5f}"
    assert not any(k.startswith(("autoencoder.", "diffusion.")) for k in method.state_dict())


@pytest.mark.parametrize("name", ["mcm", "mcm_l"])
def test_mcm_loss_adds_the_l1_penalty(smoke, name):
    _, base = smoke
    z_t, t, cond, scalars, noise = _batch(base)
    method = _build(smoke, name, zero_init_heads=False)
    with torch.no_grad():
        eps = base.unet(z_t, t, scalars)
        y = F.adaptive_avg_pool3d(cond.stacked(), z_t.shape[2:])
        gamma, beta = method.net(torch.cat([z_t, eps, y], 1), t)
        pred = method.predict_noise(z_t, t, cond, scalars)
        torch.testing.assert_close(pred, eps * (1 + gamma) + beta)
        # lambda (|gamma|_1 + |beta|_1), 1/lambda = B*C*x*y*z of the latent batch (B.2)
        expected = F.mse_loss(pred, noise) + (gamma.abs().sum() + beta.abs().sum()) / z_t.numel()
        torch.testing.assert_close(method.training_loss(z_t, t, cond, scalars, noise), expected)
    assert gamma.abs().sum() > 0


@pytest.mark.parametrize("name", LIGHT)
def test_multimodal_with_modality_drop(smoke, name):
    _, base = smoke
    present = {"semantics": torch.tensor([1.0, 1.0]), "skull": torch.tensor([1.0, 0.0])}  # sample 1: semantic only
    z_t, t, cond, scalars, noise = _batch(base, MULTI, present)
    method = _build(smoke, name, MULTI)
    loss = method.training_loss(z_t, t, cond, scalars, noise)
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameters())
    with torch.no_grad():
        for p in method.parameters():  # leave the zero start so the conditions matter
            p.add_(0.05 * torch.randn_like(p))
        out = method.predict_noise(z_t, t, cond, scalars)
        assert out.shape == z_t.shape and torch.isfinite(out).all()
        # Sample 1 sees its semantic map: changing it changes sample 1's prediction only.
        other = Conditions(dict(cond.tensors), dict(cond.present))
        other.tensors["semantics"] = cond.tensors["semantics"].clone()
        other.tensors["semantics"][1] = other.tensors["semantics"][1].flip(1)
        moved = method.predict_noise(z_t, t, other, scalars)
    assert not torch.allclose(out[1], moved[1])
    torch.testing.assert_close(out[0], moved[0], rtol=1e-5, atol=1e-5)


def test_t2i_adapter_compose_ignores_a_dropped_modality(smoke):
    _, base = smoke
    present = {"semantics": torch.tensor([1.0, 1.0]), "skull": torch.tensor([1.0, 0.0])}
    z_t, t, cond, scalars, _ = _batch(base, MULTI, present)
    method = _build(smoke, "t2i_adapter", MULTI, multimodal="compose")
    assert set(method.adapters) == {"semantics", "skull"}
    noisy = Conditions(dict(cond.tensors), dict(cond.present))
    noisy.tensors["skull"] = torch.rand_like(cond.tensors["skull"])  # content where the flag says dropped
    with torch.no_grad():
        a = method.predict_noise(z_t, t, cond, scalars)
        b = method.predict_noise(z_t, t, noisy, scalars)
    torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[0], b[0])


def test_bad_settings_are_clear_errors(smoke):
    with pytest.raises(MethodError, match="hint_channels|stride-2"):
        _build(smoke, "controlnet_lite", hint_channels=[8, 16, 32, 64])
    with pytest.raises(MethodError, match="concat"):
        _build(smoke, "t2i_adapter", multimodal="sum")
    with pytest.raises(MethodError, match="norm_num_groups"):
        _build(smoke, "mcm", channels=[6, 8, 12])
    profile, base = smoke
    with pytest.raises(MethodError, match=r"needs the setting 'methods\.mcm_l\.\w+' in the profile"):
        get_method("mcm_l")(base, LV, {})
