"""Every registered method through the engine at smoke shape: a resumed run equals an
uninterrupted one, and sampling twice from the same seed gives identical volumes."""
import numpy as np
import pytest
import torch

from benchmark.engine.latents import LatentCache, stable_seed
from benchmark.engine.sampling import sample_method
from benchmark.engine.training import TrainSettings, train_method
from benchmark.base.model import BaseLDM
from benchmark.profiles import load_profile
from datasets.synthetic import SyntheticPopulation
from datasets.tasks import get_task
from methods.registry import get_method, resolve_methods

PROFILE = load_profile("smoke", ["training.steps=4", "training.batch_size=2", "training.checkpoint_every=2",
                                 "training.warmup_steps=1"])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    base = BaseLDM.from_profile(PROFILE).freeze()
    # A fresh MONAI UNet's output conv is zero (it would predict exactly 0); give it small
    # random weights so that the methods' outputs depend on their inputs.
    with torch.no_grad():
        for p in base.diffusion.out[-1].parameters():
            p.normal_(0, 0.02)
    cache = tmp_path_factory.mktemp("cache")
    subjects = SyntheticPopulation(tuple(PROFILE.image_shape), seed=0, cache_dir=cache).subjects(range(4))
    return base, subjects, LatentCache(base, None)


def _run(name, task, setup, run_dir, stop_after=None):
    base, subjects, latents = setup
    torch.manual_seed(stable_seed(0, "init", name))
    method = get_method(name, task.name)(base, task.modalities, PROFILE.methods[name])
    settings = TrainSettings.from_profile(PROFILE, 3)
    result = train_method(method, base, subjects[:3], task, settings, latents, run_dir, 0,
                                 progress=False, stop_after=stop_after)
    return method, result


@pytest.mark.parametrize("name", resolve_methods("all", "lv"))
def test_method_resumes_and_samples_deterministically(name, setup, tmp_path):
    base, subjects, _ = setup
    task = get_task("lv")
    _, whole = _run(name, task, setup, tmp_path / "whole")
    _run(name, task, setup, tmp_path / "cut", stop_after=3)
    resumed_method, resumed = _run(name, task, setup, tmp_path / "cut")
    assert resumed.resumed_from == 2
    np.testing.assert_allclose(resumed.losses, whole.losses, rtol=1e-5, atol=1e-7)
    first = sample_method(resumed_method, base, subjects[3:], task, 2, 1, seed=0, progress=False)
    second = sample_method(resumed_method, base, subjects[3:], task, 2, 1, seed=0, progress=False)
    np.testing.assert_array_equal(first, second)
    assert np.isfinite(first).all()


@pytest.mark.parametrize("name", resolve_methods("all", "multimodal"))
def test_method_trains_on_multimodal_with_modality_drop(name, setup, tmp_path):
    _, whole = _run(name, get_task("multimodal"), setup, tmp_path / "mm")
    assert len(whole.losses) == 4 and np.isfinite(whole.losses).all()
