"""The method contract (issue 31): the engine stops a method whose ``predict_noise`` or ``generate``
returns the wrong shape with a sentence naming it, instead of letting PyTorch broadcast it; and a
method declares its own settings, which ``--override methods.<name>.<key>=...`` then reaches."""
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from benchmark.engine.latents import LatentCache, condition_batch, scalar_batch
from benchmark.engine.sampling import sample_batch
from benchmark.engine.training import TrainSettings, train_method
from benchmark.profiles import ProfileError, load_profile
from benchmark.run.records import iter_records
from benchmark.run.runner import generate
from datasets.tasks import get_task
from methods import registry
from methods.base import DirectMethod, Method, MethodError, check_noise_prediction
from tests.fixtures import fresh_registry, one_thread, random_base_and_subjects  # noqa: F401  (fixtures)
from tests.paths import EXAMPLE_PLUGIN
from tests.test_runner import main_in_process, tiny_flags

OVERRIDES = ["training.steps=3", "training.batch_size=2", "training.checkpoint_every=1", "training.warmup_steps=1",
             "sampling.ddim_steps=2", "sampling.batch_size=2"]


class OneChannel(Method):
    """Broken on purpose: one noise channel for a three-channel latent (PyTorch would broadcast it)."""

    def __init__(self, base, condition_channels, config):
        super().__init__(base, condition_channels, config)
        self.scale = torch.nn.Parameter(torch.ones(()))

    def predict_noise(self, z_t, t, conditions, scalars):
        return self.scale * z_t[:, :1]


class WrongVolumes(DirectMethod):
    """Broken on purpose: volumes at half the profile's image shape."""

    def generate(self, conditions, scalars, subjects, engine=None):
        return torch.zeros(len(subjects), 1, 16, 24, 16)


class NaNVolumes(DirectMethod):
    def generate(self, conditions, scalars, subjects, engine=None):
        return torch.full((len(subjects), 1, 32, 48, 32), float("nan"))


@dataclass
class WidthsSettings:
    width: int = 16
    depth: int = 2


class Widths(Method):
    Settings = WidthsSettings


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    profile, base, subjects = random_base_and_subjects(OVERRIDES, cache)
    return profile, base, subjects, cache


def _expected_sentence(name, base, batch):
    latent = (batch, *base.latent_shape)
    return (f"method '{name}' predict_noise returned shape {(batch, 1, *latent[2:])} float32; the engine expects "
            f"the noisy latent's shape {latent} float32: return one noise value per latent voxel and channel")


def test_training_stops_at_the_first_step_with_a_sentence(setup, tmp_path, fresh_registry):
    profile, base, subjects, cache = setup
    registry.register("one_channel_for_test")(OneChannel)
    task = get_task("lv")
    method = OneChannel(base, task.modalities, {})
    settings = TrainSettings.from_profile(profile, 4)
    start = time.perf_counter()
    with pytest.raises(MethodError) as err:
        train_method(method, base, subjects[:4], task, settings, LatentCache(base, cache / "latents.pt"),
                     tmp_path / "run", seed=0, progress=False)
    assert str(err.value) == _expected_sentence("one_channel_for_test", base, 2)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # stopped before the first step's checkpoint
    assert time.perf_counter() - start < 60
    assert "predict_noise" not in vars(method)  # the check leaves the method as it was


def test_sampling_checks_the_first_prediction(setup, fresh_registry):
    profile, base, subjects, _ = setup
    registry.register("one_channel_for_test")(OneChannel)
    task = get_task("lv")
    method = OneChannel(base, task.modalities, {})
    with pytest.raises(MethodError) as err:
        sample_batch(method.predict_noise, base, subjects[:2], condition_batch(task, subjects[:2]),
                     scalar_batch(subjects[:2]), num_steps=2, seed=0)
    assert str(err.value) == _expected_sentence("one_channel_for_test", base, 2)


def test_dtype_is_compared_outside_autocast_only():
    z_t = torch.zeros(2, 3, 4, 4, 4)
    with pytest.raises(MethodError, match="returned shape .* float64; .* float32: return it in the latent's dtype"):
        check_noise_prediction("m", z_t.double(), z_t)
    with pytest.raises(MethodError, match="returned shape .* int64;"):
        check_noise_prediction("m", z_t.long(), z_t)
    with pytest.raises(MethodError, match="returned a tuple, not a tensor"):
        check_noise_prediction("m", (z_t,), z_t)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 training: autocast's lower precision is legitimate
        check_noise_prediction("m", z_t.bfloat16(), z_t)
        with pytest.raises(MethodError, match="return one noise value per latent voxel and channel"):
            check_noise_prediction("m", z_t[:, :1].bfloat16(), z_t)
    check_noise_prediction("m", z_t.clone(), z_t)


@pytest.mark.parametrize("cls, message", [
    (WrongVolumes, r"method 'direct_for_test' generate returned shape \(2, 1, 16, 24, 16\) float32; the runner "
                   r"expects floats of shape \(2, 1, 32, 48, 32\): return one \(1, X, Y, Z\) volume per subject"),
    (NaNVolumes, r"method 'direct_for_test' generate returned 98304 non-finite values \(NaN or inf\)"),
])
def test_a_direct_methods_volumes_are_checked(setup, fresh_registry, cls, message):
    profile, _, subjects, _ = setup
    registry.register("direct_for_test")(cls)
    task = get_task("lv")
    ctx = SimpleNamespace(profile=profile, device="cpu", progress=False)
    with pytest.raises(MethodError, match=message):
        generate(cls(None, task.modalities, {}), subjects[:3], task, None, ctx)


BAD_PLUGIN = '''
import torch
from methods.base import Method
from methods.registry import register


@register("bad_channels_for_test")
class BadChannels(Method):
    def __init__(self, base, condition_channels, config):
        super().__init__(base, condition_channels, config)
        self.scale = torch.nn.Parameter(torch.ones(()))

    def predict_noise(self, z_t, t, conditions, scalars):
        return self.scale * z_t[:, :1]
'''


def test_a_broken_plugin_fails_its_run_with_the_sentence(tiny_cache, tmp_path, fresh_registry):
    plugin = tmp_path / "bad_channels_plugin.py"
    plugin.write_text(BAD_PLUGIN)
    out = tmp_path / "grid"
    try:
        code, log = main_in_process([*tiny_flags(tiny_cache, out), "--plugin", plugin, "--methods",
                                     "bad_channels_for_test", "--sizes", "2", "--no-validation"])
    finally:
        sys.modules.pop("bad_channels_plugin", None)
    assert code == 1, log  # the grid goes on and ends non-zero because a run failed
    record, = [r for r in iter_records(out) if r["method"] == "bad_channels_for_test"]
    assert record["status"] == "failed"
    assert record["error"].startswith("MethodError: method 'bad_channels_for_test' predict_noise returned shape (")
    assert record["error"].endswith("return one noise value per latent voxel and channel")


# ---- a method's own settings ------------------------------------------------------------------


def test_declared_settings_are_defaults_under_the_profile(fresh_registry):
    registry.register("widths_for_test")(Widths)
    assert Widths(None, {}, {}).settings.width == 16
    assert Widths(None, {}, {"width": 4}).settings == WidthsSettings(width=4, depth=2)
    with pytest.raises(MethodError, match=r"method 'widths_for_test' has no setting 'wdth' \(did you mean 'width'\?\)"):
        Widths(None, {}, {"wdth": 4})


def test_override_reaches_a_plugin_method():
    registry.load_plugin(str(EXAMPLE_PLUGIN))  # stays registered, as in the other test files that load it
    profile = load_profile("smoke", ["methods.residual_shift.width=4"])
    assert profile.methods.residual_shift.to_dict() == {"width": 4}
    cls = registry.get_method("residual_shift", "lv")
    torch.manual_seed(0)
    base = SimpleNamespace(latent_shape=(3, 8, 12, 8))  # the example reads only the latent channels here
    method = cls(base, get_task("lv").modalities, profile.methods.get("residual_shift", {}))  # as build_method does
    assert method.net[0].out_channels == 4
    assert cls(base, get_task("lv").modalities, load_profile("smoke").methods.get("residual_shift", {})
               ).net[0].out_channels == 16  # no override: the declared default


def test_override_of_an_undeclared_setting_lists_the_settings_it_takes(fresh_registry):
    registry.register("widths_for_test")(Widths)
    with pytest.raises(ProfileError, match="method 'widths_for_test' has no setting 'wdth'; it takes: depth, width"):
        load_profile("smoke", ["methods.widths_for_test.wdth=3"])
    assert load_profile("smoke", ["methods.widths_for_test.width=12"]).methods.widths_for_test.width == 12
    with pytest.raises(ProfileError, match="setting 'width' expects an integer, got 10.0"):  # typed: no silent int()
        load_profile("smoke", ["methods.widths_for_test.width=1e1"])
