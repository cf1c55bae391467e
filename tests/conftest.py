"""Fixtures shared across test files.

`make test` runs the suite in pytest-xdist workers (one per core, up to four), each with one intra-op
thread: most tests are single-process work on small tensors, so two workers on two cores do twice the
work of one process that leaves a core idle between its few large operations."""
import os

import pytest


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # The processes a test starts inherit the worker's one thread, so that a run in a subprocess
        # sums in the same order as the same run in the test's own process.
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


def _shared_dir(tmp_path_factory, name: str):
    """A folder every xdist worker of this session sees (each worker has a base temp dir of its own, under
    one shared parent). Cache entries are written under file locks, so workers building the same entry
    wait for each other instead of racing."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    folder = base / name
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """One cache for every test that runs grids with tests.test_runner.TINY: the data, base model, judge
    and extractors those overrides imply are built once per session instead of once per file (entries
    are keyed by their settings, so tests that change them get entries of their own)."""
    return _shared_dir(tmp_path_factory, "tiny-cache")


@pytest.fixture(scope="session")
def population_cache(tmp_path_factory):
    """One cache of synthetic subjects for the data tests of every file (test_datasets, test_manifest):
    the cohort they read is generated once per session."""
    return _shared_dir(tmp_path_factory, "data_cache")
