"""Fixtures shared across test files."""
import pytest


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """One cache for every test that runs grids with tests.test_runner.TINY: the data, base model, judge
    and extractors those overrides imply are built once per session instead of once per file (entries
    are keyed by their settings, so tests that change them get entries of their own)."""
    return tmp_path_factory.mktemp("tiny-cache")


@pytest.fixture(scope="session")
def population_cache(tmp_path_factory):
    """One cache of synthetic subjects for the data tests of every file (test_datasets, test_manifest):
    the cohort they read is generated once per session."""
    return tmp_path_factory.mktemp("data_cache")
