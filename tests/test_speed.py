"""The profile's speed options compute the same numbers as plain PyTorch (benchmark.engine.speed).

Speed itself is measured by ``python run_benchmark.py bench --compare-off``, not here."""
import numpy as np
import pytest
import torch
from torch import nn

from benchmark.base.model import BaseLDM
from benchmark.engine.latents import LatentCache, condition_batch, scalar_batch, stable_seed
from benchmark.engine.probe import ControlProbe
from benchmark.engine.sampling import sample_batch
from benchmark.engine.speed import SpeedOptions
from benchmark.engine.training import TrainSettings, train_method
from benchmark.profiles import ProfileError, load_profile
from core.speed import channels_last_convs, contiguous_convs, fused_swish, uses_channels_last_convs
from datasets.synthetic import SyntheticPopulation
from datasets.tasks import get_task
from methods._blocks import ConditionEncoder, hint_encoder
from methods.registry import get_method, resolve_methods
from tests.fixtures import one_thread  # noqa: F401  (autouse)

PROFILE = load_profile("smoke", ["training.steps=2", "training.batch_size=2", "training.checkpoint_every=100",
                                 "training.warmup_steps=1"])
ON = SpeedOptions.from_profile(PROFILE)
OFF = SpeedOptions.off()


def _randomised(module: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.2)
    return module


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    base = BaseLDM.from_profile(PROFILE).freeze()
    with torch.no_grad():  # a fresh MONAI UNet predicts exactly 0: give its output conv weights
        for p in base.diffusion.out[-1].parameters():
            p.normal_(0, 0.02)
    cache = tmp_path_factory.mktemp("cache")
    subjects = SyntheticPopulation(tuple(PROFILE.image_shape), seed=0, cache_dir=cache).subjects(range(5))
    return base, subjects, LatentCache(base, None)


def test_profiles_switch_every_option_on_and_the_schema_checks_them():
    for name in ("smoke", "cpu", "gpu", "paper"):
        options = SpeedOptions.from_profile(load_profile(name))
        assert all(options.as_dict().values()), name
    assert not any(OFF.as_dict().values())
    with pytest.raises(ProfileError, match="did you mean 'speed.channels_last_convs'"):
        load_profile("smoke", ["speed.channel_last=true"])
    with pytest.raises(ProfileError, match="'speed.channels_last_convs' expects true or false"):
        load_profile("smoke", ["speed.channels_last_convs=often"])


@pytest.mark.parametrize("make", [lambda: ConditionEncoder(2, [4, 8], 2, 4),
                                  lambda: fused_swish(hint_encoder(2, 8, [4, 8, 16], 4))])
def test_channels_last_convs_give_the_same_values_and_gradients(make):
    plain, fast = _randomised(make()), _randomised(make())
    channels_last_convs(fast)
    assert uses_channels_last_convs(fast)
    x = torch.rand(2, 2, 16, 24, 16)
    out_plain, out_fast = plain(x), fast(x)
    torch.testing.assert_close(out_fast, out_plain, rtol=1e-4, atol=1e-5)
    out_plain.square().mean().backward()
    out_fast.square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), fast.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    contiguous_convs(fast)
    assert not uses_channels_last_convs(fast)
    assert all(p.is_contiguous() for p in fast.parameters())


def test_fused_swish_replaces_monai_swish_by_the_same_function():
    from monai.networks.blocks.activation import Swish

    net = _randomised(hint_encoder(1, 8, [4, 8, 16], 4))
    x = torch.rand(2, 1, 16, 24, 16)
    before = net(x)
    fused_swish(net)
    assert not any(isinstance(m, Swish) for m in net.modules())
    assert any(isinstance(m, nn.SiLU) for m in net.modules())
    torch.testing.assert_close(net(x), before, rtol=1e-4, atol=1e-5)


def _trained(name, options, setup, tmp_path):
    base, subjects, latents = setup
    task = get_task("lv")
    torch.manual_seed(stable_seed(0, "init", name))
    method = options.apply(get_method(name, task.name)(base, task.modalities, PROFILE.methods[name]))
    settings = TrainSettings.from_profile(PROFILE, 3)
    assert settings.fused_optimizer  # the profile's speed section reaches the training settings
    settings.fused_optimizer = options.fused_optimizer
    result = train_method(method, base, subjects[:3], task, settings, latents, tmp_path, 0, progress=False)
    return method, result


@pytest.mark.parametrize("name", resolve_methods("all", "lv"))
def test_a_training_step_gives_the_same_loss_with_and_without_the_options(name, setup, tmp_path):
    _, fast = _trained(name, ON, setup, tmp_path / "on")
    _, plain = _trained(name, OFF, setup, tmp_path / "off")
    np.testing.assert_allclose(fast.losses, plain.losses, rtol=1e-4)


# The part of each method that depends on the condition alone.
CONDITION_ENCODER = {"vcm": lambda m: next(iter(m.encoders.values())), "controlnet": lambda m: m.net.controlnet_cond_embedding,
                     "controlnet_lite": lambda m: m.net, "t2i_adapter": lambda m: m.adapters["all"]}


@pytest.mark.parametrize("name", sorted(CONDITION_ENCODER))
def test_condition_features_are_computed_once_per_batch_and_change_nothing(name, setup, tmp_path):
    base, subjects, _ = setup
    task = get_task("lv")
    method, _ = _trained(name, ON, setup, tmp_path)
    method.eval()
    test = subjects[3:5]
    conditions, scalars = condition_batch(task, test), scalar_batch(test)
    calls = []
    encoder = CONDITION_ENCODER[name](method)
    encoder.register_forward_hook(lambda *_: calls.append(1))

    def sampled():
        before = len(calls)
        with torch.no_grad():
            volumes = sample_batch(method.predict_noise, base, test, conditions, scalars, 3, seed=0)
        return volumes, len(calls) - before

    plain, runs_plain = sampled()
    with method.reusing_condition_features():
        reused, runs_reused = sampled()
    assert (runs_plain, runs_reused) == (3, 1)  # 3 DDIM steps: once instead of at every step
    torch.testing.assert_close(reused, plain, rtol=0, atol=1e-5)
    method.reuse_condition_features = False  # the profile's switch: computed at every step again
    with method.reusing_condition_features():
        assert sampled()[1] == 3


@pytest.mark.parametrize("name", ["vcm", "controlnet_lite", "t2i_adapter"])
def test_the_probe_gives_the_same_numbers_with_and_without_reuse(name, setup, tmp_path):
    base, subjects, latents = setup
    task = get_task("lv")
    method, _ = _trained(name, ON, setup, tmp_path)
    test = subjects[:4]
    plain_latents = latents.get(test, progress=False)[:, 0, 0]
    results, frozen_calls = {}, {}
    for reuse in (True, False):
        method.reuse_condition_features = reuse
        probe = ControlProbe(base, task, test, plain_latents, seed=0, bands=2, draws=2, batch_size=2,
                             reuse_frozen=reuse)
        calls = []
        predict = base._predict
        base._predict = lambda *args: (calls.append(1), predict(*args))[1]
        try:
            results[reuse] = probe.measure(method)
        finally:
            del base._predict
        frozen_calls[reuse] = len(calls)
    for fast, plain in zip(results[True]["bands"], results[False]["bands"]):
        for key in ("mse_frozen", "mse_own", "mse_other", "gap"):
            assert fast[key] == pytest.approx(plain[key], rel=1e-5, abs=1e-9), key
    if name == "vcm":  # VCM asks the frozen model too: once per noisy latent instead of three times
        assert frozen_calls[False] == 3 * frozen_calls[True]
    else:  # T2I-Adapter steers the frozen network through hooks, LITE through residuals: never reused
        assert frozen_calls[False] == frozen_calls[True]


def test_the_frozen_prediction_is_reused_only_for_the_same_input_without_gradients(setup):
    base, _, _ = setup
    z = torch.randn(2, *base.latent_shape)
    t = torch.tensor([10, 500])
    s = torch.rand(2, 4)
    with torch.no_grad():
        plain = base.unet(z, t, s)
        with base.reusing_predictions():
            first = base.unet(z, t, s)
            assert base.unet(z, t, s) is first                 # the same tensors: reused
            assert base.unet(z.clone(), t, s) is not first     # another tensor: computed
            z.add_(0.0)                                         # modified in place: computed again
            assert base.unet(z, t, s) is not first
    torch.testing.assert_close(first, plain)
    with base.reusing_predictions():  # with gradients, never reused
        assert base.unet(z, t, s) is not base.unet(z, t, s)
