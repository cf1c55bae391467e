"""Fixtures shared by some test modules (imported there, so they apply to those modules only)."""
import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small tensors: one intra-op thread is about as fast, and far faster when the 2 cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fresh_registry(monkeypatch):
    """Methods registered in a test leave with it."""
    from methods import registry

    registry.known_methods()  # the built-ins first, so that the copy holds them
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def random_base_and_subjects(overrides, cache, n_subjects: int = 6):
    """A smoke-shaped profile with ``overrides``, a seeded randomly initialised frozen base model of
    its architecture (no pretraining: the tests check mechanics, not quality) and the first
    ``n_subjects`` synthetic subjects generated into ``cache``."""
    from benchmark.base.model import BaseLDM
    from benchmark.profiles import load_profile
    from datasets.synthetic import SyntheticPopulation

    profile = load_profile("smoke", overrides)
    torch.manual_seed(0)
    base = BaseLDM.from_profile(profile).freeze()
    subjects = SyntheticPopulation(tuple(profile.image_shape), seed=0, cache_dir=cache).subjects(range(n_subjects))
    return profile, base, subjects
