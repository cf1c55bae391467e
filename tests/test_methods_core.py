"""The first four methods: VCM, ControlNet, fine-tuned LDM, scratch LDM.

Parameter counts are taken on the meta device (nothing is allocated, so the paper profile's
553M UNet costs nothing); behaviour is checked at the smoke profile's shapes with a randomly
initialised base model whose weights are perturbed so that none of MONAI's zero-initialised
layers is zero (a fresh MONAI UNet predicts exactly 0, which would make identity checks void).
"""
from __future__ import annotations

import pytest
import torch

from benchmark.base.model import BaseLDM
from benchmark.profiles import load_profile
from methods.base import Conditions
from methods.registry import MethodError, get_method

CORE = ("vcm", "controlnet", "ldm_scratch", "ldm_finetune")  # ascending size, as in Table 5
TABLE5 = {"vcm": 45.88e6, "controlnet": 193.88e6, "ldm_finetune": 553.19e6, "ldm_scratch": 475.43e6}
LV = {"lv_mask": 1}
MULTIMODAL = {"semantics": 4, "skull": 1}
PROFILES = ("smoke", "cpu", "gpu", "paper")
LITE_RATIO = 63.56 / 553.17  # ControlNet-LITE / BrainLDM UNet in Table 5: must fit between VCM and ControlNet


def _counts_on_meta(profile_name: str, channels=LV) -> tuple[int, dict[str, int]]:
    profile = load_profile(profile_name)
    with torch.device("meta"):
        base = BaseLDM.from_profile(profile).freeze()
        unet = sum(p.numel() for p in base.diffusion.parameters())
        counts = {
            name: get_method(name)(base, channels, profile.methods[name]).num_trainable_parameters()
            for name in CORE
        }
    return unet, counts


# ---- sizes -------------------------------------------------------------------------------


def test_paper_counts_are_within_15_percent_of_table5():
    unet, counts = _counts_on_meta("paper")
    assert abs(unet - 553.17e6) < 0.01e6  # BrainLDM's UNet in MONAI
    for name, n in counts.items():
        assert abs(n - TABLE5[name]) / TABLE5[name] < 0.15, f"{name}: {n / 1e6:.2f}M vs Table 5 {TABLE5[name] / 1e6}M"
    # The ports that match Table 5 to the rounding: ControlNet and the LDM baselines.
    assert abs(counts["controlnet"] - TABLE5["controlnet"]) < 0.05e6
    assert abs(counts["ldm_scratch"] - TABLE5["ldm_scratch"]) < 0.05e6
    assert abs(counts["ldm_finetune"] - TABLE5["ldm_finetune"]) < 0.05e6


@pytest.mark.parametrize("profile_name", PROFILES)
def test_sizes_follow_the_papers_order_with_room_for_lite(profile_name):
    unet, counts = _counts_on_meta(profile_name)
    ordered = [counts[name] for name in CORE]
    assert ordered == sorted(ordered) and len(set(ordered)) == len(ordered), counts
    assert counts["vcm"] < 0.9 * LITE_RATIO * unet < LITE_RATIO * unet < counts["controlnet"], (unet, counts)


def test_multimodal_vcm_keeps_the_single_condition_size():
    _, single = _counts_on_meta("paper", LV)
    _, multi = _counts_on_meta("paper", MULTIMODAL)
    assert abs(multi["vcm"] - single["vcm"]) / single["vcm"] < 0.02


def test_what_table5_counts_for_controlnet_and_scratch():
    """Table 5's 193.88M and 475.43M are MONAI's ControlNet and UNet *without* the scalar
    cross-attention (self-attention only); with it they would be 230.68M and 553.18M."""
    profile = load_profile("paper")
    with torch.device("meta"):
        base = BaseLDM.from_profile(profile).freeze()
        stock = get_method("controlnet")(base, LV, dict(profile.methods.controlnet, cross_attention=True))
        full = get_method("ldm_scratch")(base, LV, dict(profile.methods.ldm_scratch, cross_attention=True))
        wide = get_method("vcm")(base, MULTIMODAL, dict(profile.methods.vcm, split_encoder_width=False))
    assert abs(stock.num_trainable_parameters() - 230.68e6) < 0.01e6
    assert abs(full.num_trainable_parameters() - 553.18e6) < 0.01e6
    assert abs(wide.num_trainable_parameters() - TABLE5["vcm"]) < 0.05e6  # full-width encoder per modality


def test_wrong_stage_counts_are_clear_errors():
    profile = load_profile("smoke")  # compression 4: two stride-2 stages
    with torch.device("meta"):
        base = BaseLDM.from_profile(profile).freeze()
        vcm_cfg = dict(profile.methods.vcm, encoder_channels=[4, 8, 12])
        with pytest.raises(MethodError, match="encoder_channels .* 3 levels.* compresses by 4: give 2"):
            get_method("vcm")(base, LV, vcm_cfg)
        with pytest.raises(MethodError, match="hint_channels .* 3 stride-2 stages.* give 3 widths"):
            get_method("controlnet")(base, LV, dict(profile.methods.controlnet, hint_channels=[8, 16, 32, 64]))
        with pytest.raises(MethodError, match="needs the setting 'methods.vcm.unet_channels'"):
            get_method("vcm")(base, LV, {"encoder_channels": [4, 8]})
        with pytest.raises(MethodError, match="unknown condition downsampling 'cubic'"):
            get_method("ldm_finetune")(base, LV, {"condition_downsample": "cubic"})


# ---- behaviour at smoke shapes -------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke():
    # One thread: these volumes are tiny, and on a shared 2-core machine two busy threads
    # wait on each other for far longer than the work takes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    profile = load_profile("smoke")
    base = BaseLDM.from_profile(profile).freeze()
    with torch.no_grad():  # stand-in for pretrained weights: nothing zero-initialised stays zero
        for p in base.diffusion.parameters():
            p.add_(0.05 * torch.randn_like(p))
    yield profile, base
    torch.set_num_threads(threads)


def _batch(base, channels, batch=2, seed=1, present=None):
    g = torch.Generator().manual_seed(seed)
    z_t = torch.randn(batch, *base.latent_shape, generator=g)
    t = torch.tensor([100, 700][:batch])
    scalars = torch.rand(batch, 4, generator=g)
    flags = {k: torch.ones(batch) for k in channels} if present is None else present
    tensors = {k: torch.rand(batch, c, *base.image_shape, generator=g) * flags[k].view(-1, 1, 1, 1, 1)
               for k, c in channels.items()}
    noise = torch.randn(batch, *base.latent_shape, generator=g)
    return z_t, t, Conditions(tensors, flags), scalars, noise


def _build(name, profile, base, channels=LV, **overrides):
    torch.manual_seed(0)
    return get_method(name)(base, channels, {**profile.methods[name], **overrides})


@pytest.mark.parametrize("name", CORE)
def test_method_trains_only_itself_from_the_base_models_prediction(smoke, name):
    profile, base = smoke
    # VCM's identity start is its zero_init_heads option (the default is the authors' init); with the
    # authors' instance-normalised heads the first update jumps to unit-std modulation, so this
    # four-step descent check uses plain heads (the instance norm has its own test below).
    overrides = {"zero_init_heads": True, "head_norm": "none"} if name == "vcm" else {}
    method = _build(name, profile, base, **overrides)
    z_t, t, cond, scalars, noise = _batch(base, LV)
    with torch.no_grad():
        reference = base.unet(z_t, t, scalars)
        out = method.predict_noise(z_t, t, cond, scalars)
    assert out.shape == (2, *base.latent_shape) and torch.isfinite(out).all()
    if name == "ldm_scratch":
        assert not torch.allclose(out, reference)  # its own, randomly initialised UNet
    else:  # zero convolutions / zero-initialised new weights: the frozen model at step 0
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)

    trainable = method.trainable_parameters()
    assert trainable and len(trainable) == len(list(method.parameters()))
    base_before = {k: v.clone() for k, v in base.state_dict().items()}
    optimizer = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.0)
    method.train()
    losses = []
    for step in range(4):
        loss = method.training_loss(z_t, t, cond, scalars, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:
            assert all(p.grad is not None for p in trainable)
            assert any(float(p.grad.abs().sum()) > 0 for p in trainable)
            assert all(p.grad is None and not p.requires_grad for p in base.parameters())
        optimizer.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        final = float(method.training_loss(z_t, t, cond, scalars, noise))
    assert final < losses[0], (losses, final)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in base_before.items())


def test_vcm_default_init_is_near_identity_and_trains_its_unet_from_the_first_step(smoke):
    """The authors' initialisation with plain heads: gamma/beta small but not zero, so the gradient
    reaches the time U-Net at once; with zero heads (and MONAI's zero output conv) it does not. With
    the authors' instance-normalised heads the same small fields are standardised to unit std."""
    profile, base = smoke
    z_t, t, cond, scalars, noise = _batch(base, LV)
    with torch.no_grad():
        eps = base.unet(z_t, t, scalars)
        gamma, _ = _build("vcm", profile, base, head_norm="instance").modulation(z_t, eps, t, cond)
    assert 0.5 < float(gamma.flatten(2).std(-1).mean()) <= 1.01
    for zero_heads, unet_gets_gradient in ((False, True), (True, False)):
        method = _build("vcm", profile, base, zero_init_heads=zero_heads, head_norm="none")
        with torch.no_grad():
            gamma, beta = method.modulation(z_t, eps, t, cond)
        assert float(gamma.abs().max()) < 0.1 and float(beta.abs().max()) < 0.1
        assert (float(gamma.abs().max()) > 0) == (not zero_heads)
        method.training_loss(z_t, t, cond, scalars, noise).backward()
        unet_grad = sum(float(p.grad.abs().sum()) for p in method.time_unet.parameters() if p.grad is not None)
        assert (unet_grad > 0) == unet_gets_gradient, (zero_heads, unet_grad)


def test_controlnet_copy_starts_from_the_frozen_encoder(smoke):
    profile, base = smoke
    method = _build("controlnet", profile, base)
    frozen = base.diffusion.state_dict()
    copy = method.net.state_dict()
    for key in ("conv_in.conv.weight", "time_embed.0.weight", "down_blocks.0.resnets.0.conv1.conv.weight",
                "middle_block.resnet_1.conv2.conv.weight"):
        assert torch.equal(copy[key], frozen[key]), key
    assert copy["conv_in.conv.weight"].data_ptr() != frozen["conv_in.conv.weight"].data_ptr()
    # without cross-attention only the self-attention blocks are fresh
    assert method.fresh_parameters and all("attention" in k for k in method.fresh_parameters)


@pytest.mark.parametrize("name", CORE)
def test_multimodal_with_a_dropped_modality(smoke, name):
    profile, base = smoke
    method = _build(name, profile, base, MULTIMODAL)
    present = {"semantics": torch.tensor([1.0, 0.0]), "skull": torch.tensor([0.0, 1.0])}
    z_t, t, cond, scalars, _ = _batch(base, MULTIMODAL, present=present)
    with torch.no_grad():
        out = method.predict_noise(z_t, t, cond, scalars)
    assert out.shape == (2, *base.latent_shape) and torch.isfinite(out).all()


def test_vcm_dropped_modality_contributes_nothing(smoke):
    profile, base = smoke
    method = _build("vcm", profile, base, MULTIMODAL)
    assert set(method.encoders) == {"semantics", "skull"}
    with torch.no_grad():  # move away from the zero-initialised start so that conditions matter
        for p in method.parameters():
            p.add_(0.05 * torch.randn_like(p))
    present = {"semantics": torch.ones(2), "skull": torch.zeros(2)}
    z_t, t, cond, scalars, _ = _batch(base, MULTIMODAL, present=present)
    other_skull = Conditions({"semantics": cond.tensors["semantics"], "skull": torch.rand_like(cond.tensors["skull"])},
                             present)
    shown_skull = Conditions(other_skull.tensors, {"semantics": torch.ones(2), "skull": torch.ones(2)})
    with torch.no_grad():
        encoded = method.encode_conditions(other_skull, z_t)
        half = method.encoders["semantics"].out_channels
        assert torch.count_nonzero(encoded[:, half:]) == 0
        a = method.predict_noise(z_t, t, cond, scalars)
        b = method.predict_noise(z_t, t, other_skull, scalars)
        c = method.predict_noise(z_t, t, shown_skull, scalars)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_vcm_loss_is_mse_plus_scaled_l1_of_the_modulation(smoke):
    profile, base = smoke
    method = _build("vcm", profile, base, head_norm="none")
    with torch.no_grad():
        for p in (*method.heads.head_gamma.parameters(), *method.heads.head_beta.parameters()):
            p.add_(0.01 * torch.randn_like(p))
    z_t, t, cond, scalars, noise = _batch(base, LV)
    with torch.no_grad():
        eps = base.unet(z_t, t, scalars)
        gamma, beta = method.modulation(z_t, eps, t, cond)
        expected = torch.nn.functional.mse_loss(eps * (1 + gamma) + beta, noise) + (
            gamma.abs().sum() + beta.abs().sum()) / z_t.numel()
        loss = method.training_loss(z_t, t, cond, scalars, noise)
    assert gamma.shape == beta.shape == z_t.shape and float(gamma.abs().max()) > 0
    torch.testing.assert_close(loss, expected)
    # l1_weight (profile: methods.vcm.l1_weight) scales the penalty; 0: plain MSE
    assert _build("vcm", profile, base, l1_weight=0.5).l1_weight == 0.5
    method.l1_weight = 0.0
    with torch.no_grad():
        unpenalised = method.training_loss(z_t, t, cond, scalars, noise)
    torch.testing.assert_close(unpenalised, torch.nn.functional.mse_loss(eps * (1 + gamma) + beta, noise))
    # l1_mode script: the authors' script unpacks (B, c, h, w, c), so the last latent axis replaces C
    method.l1_weight, method.l1_mode = 1.0, "script"
    b, c, x, y, z = z_t.shape
    with torch.no_grad():
        script = method.training_loss(z_t, t, cond, scalars, noise)
    torch.testing.assert_close(script, torch.nn.functional.mse_loss(eps * (1 + gamma) + beta, noise)
                               + (gamma.abs().sum() + beta.abs().sum()) / (b * z * x * y * z))
    with pytest.raises(MethodError, match="l1_mode must be one of paper, script"):
        _build("vcm", profile, base, l1_mode="half")


@pytest.mark.parametrize("name", ["vcm", "mcm", "mcm_l"])
def test_head_norm_instance_standardises_gamma_and_beta_as_the_authors_code(smoke, name):
    """head_norm instance (the authors' MONAI Convolution default): gamma and beta have zero mean and
    unit std per sample and channel once the heads see spatial variation; none: plain convolutions."""
    profile, base = smoke
    z_t, t, cond, scalars, _ = _batch(base, LV)
    out = {}
    for norm in ("instance", "none"):
        torch.manual_seed(0)
        method = _build(name, profile, base, head_norm=norm)
        with torch.no_grad():
            for p in method.parameters():  # move off MONAI's zero output convolution
                p.add_(0.05 * torch.randn_like(p))
            eps = base.unet(z_t, t, scalars)
            unet = method.time_unet if name == "vcm" else method.net.unet
            if name == "vcm":
                cond_in = method.encode_conditions(cond, z_t)
            else:
                from methods._blocks import to_latent_grid
                from methods._light_blocks import condition_input
                cond_in = to_latent_grid(condition_input(cond, method.condition_channels), z_t.shape[2:])
            heads = method.heads if name == "vcm" else method.net.heads
            out[norm] = heads(unet(torch.cat([z_t, eps, cond_in], dim=1), timesteps=t))
    for field in out["instance"]:
        flat = field.flatten(2)
        torch.testing.assert_close(flat.mean(-1), torch.zeros(flat.shape[:2]), atol=1e-4, rtol=0)
        torch.testing.assert_close(flat.std(-1, unbiased=False), torch.ones(flat.shape[:2]), atol=1e-2, rtol=0)
    assert float(out["none"][0].flatten(2).std(-1).mean()) < 0.5  # plain convolutions: no standardising
    with pytest.raises(MethodError, match="head_norm must be one of instance, none"):
        _build(name, profile, base, head_norm="batch")


def test_shared_blocks():
    from methods import _blocks

    torch.manual_seed(0)
    hint = _blocks.hint_encoder(2, 32, [8, 16, 32], compression=4)
    x = torch.rand(1, 2, 16, 24, 16)
    assert hint(x).shape == (1, 32, 4, 6, 4) and torch.count_nonzero(hint(x)) == 0  # zero conv out
    with pytest.raises(MethodError, match="give 4 widths"):
        _blocks.hint_encoder(2, 32, [8, 16], compression=8)

    block = _blocks.ResBlock3d(4, 8, norm_groups=4, temb_channels=16, down=True)
    assert block(torch.rand(2, 4, 8, 8, 8), torch.rand(2, 16)).shape == (2, 8, 4, 4, 4)
    encoder = _blocks.ConditionEncoder(1, [4, 8], num_res_blocks=1, norm_groups=4)
    assert encoder(x[:, :1]).shape == (1, 8, 4, 6, 4)

    conv = torch.nn.Conv3d(3, 5, 3, padding=1)
    wide = _blocks.widen_input_conv(conv, 2)
    y = torch.rand(1, 3, 4, 4, 4)
    torch.testing.assert_close(wide(torch.cat([y, torch.rand(1, 2, 4, 4, 4)], 1)), conv(y))

    mask = torch.zeros(1, 1, 8, 8, 8)
    mask[..., :4, :, :] = 1
    expected = torch.tensor([1.0, 0.0]).view(1, 1, 2, 1, 1).expand(1, 1, 2, 2, 2)
    assert torch.equal(_blocks.to_latent_grid(mask, (2, 2, 2)), expected)  # area: covered fraction
