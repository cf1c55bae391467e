"""datasets/: the synthetic population, splits, tasks, degrade_axial, the generator's workers (the NIfTI
manifest and the data CLI: tests/test_manifest.py)."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from datasets.manifest import export_subjects, load_manifest
from datasets.splits import make_splits
from datasets.subject import SEMANTIC_LABELS, DataError, Subject
from datasets.synthetic import BLOCK, SyntheticPopulation
from datasets.tasks import TASKS, Modality, Task, TaskError, check_task, degrade_axial, get_task
from tests.paths import ROOT

SHAPE = (32, 48, 32)  # the smoke profile's
N_TREND = 96          # subjects for the age trends: three cache blocks


@pytest.fixture(scope="module")
def cache(population_cache) -> Path:
    return population_cache


@pytest.fixture(scope="module")
def pop(cache) -> SyntheticPopulation:
    return SyntheticPopulation(SHAPE, seed=0, cache_dir=cache)


@pytest.fixture(scope="module")
def cohort(pop) -> list[Subject]:
    return pop.subjects(range(N_TREND))  # generated with the pool of 2, then read from the cache


def assert_same_subject(a: Subject, b: Subject) -> None:
    """``a`` and ``b`` are the same subject, array for array and byte for byte."""
    assert a.id == b.id
    for name in ("image", "lv_mask", "semantics", "skull", "scalars", "affine"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert x.tobytes() == y.tobytes(), name


# --- the synthetic population -------------------------------------------------------------------
def test_subject_types_shapes_and_ranges(pop):
    s = pop.subject(0)
    vol = (1,) + SHAPE
    assert s.image.shape == s.lv_mask.shape == s.semantics.shape == s.skull.shape == vol
    assert s.image.dtype == np.float32 and s.skull.dtype == np.float32
    assert s.lv_mask.dtype == np.uint8 and s.semantics.dtype == np.uint8
    assert s.scalars.shape == (4,) and s.scalars.dtype == np.float32
    assert s.affine.shape == (4, 4) and s.affine.dtype == np.float64
    assert 0.0 <= s.image.min() and s.image.max() <= 1.0 and np.isfinite(s.image).all()
    assert set(np.unique(s.semantics)) <= set(SEMANTIC_LABELS)
    assert set(np.unique(s.semantics)) == set(SEMANTIC_LABELS)  # every class present
    assert np.array_equal(s.lv_mask, (s.semantics == 4).astype(np.uint8))
    brain = s.semantics > 0
    assert np.all(s.skull[brain] == 0) and np.array_equal(s.skull[~brain], s.image[~brain])
    assert np.all((0 <= s.scalars) & (s.scalars <= 1)) and s.scalars[0] in (0.0, 1.0)
    # A head around the brain: bright scalp outside the brain mask, dark background in the corners.
    assert s.skull.max() > 0.6 and s.image[0, :3, :3, :3].mean() < 0.1
    # RAS voxel -> mm with positive diagonal: x left->right, y posterior->anterior, z inferior->superior.
    assert np.all(np.diag(s.affine)[:3] > 0)


def test_deterministic_and_distinct(pop, cache):
    a = pop.subject(5)
    assert_same_subject(a, pop.subject(5))
    assert_same_subject(a, SyntheticPopulation(SHAPE, seed=0, cache_dir=cache).subject(5))
    for other in (pop.subject(6), SyntheticPopulation(SHAPE, seed=1, cache_dir=cache).subject(5)):
        assert other.id != a.id and not np.array_equal(other.image, a.image)


def test_cache_hit_equals_fresh_generation(pop, cohort):
    fresh = [pop.subject(i) for i in (0, 3, BLOCK + 1, N_TREND - 1)]
    for s in fresh:
        assert_same_subject(s, cohort[int(s.id.split("-")[-1])])
    assert len(list(pop.block_dir.glob("block_*.npz"))) == N_TREND // BLOCK
    again = pop.subjects([N_TREND - 1, 3, 3])  # order kept, duplicates allowed, from disk
    assert_same_subject(again[0], fresh[3])
    assert_same_subject(again[1], fresh[1])
    assert_same_subject(again[2], fresh[1])


def test_damaged_cache_block_is_regenerated(tmp_path, pop):
    fresh = pop.subject(2)
    other = SyntheticPopulation(SHAPE, seed=0, cache_dir=tmp_path, workers=1)
    other.ensure([2])
    path = next(other.block_dir.glob("block_*.npz"))
    path.write_bytes(b"not a zip file")
    assert_same_subject(other.subjects([2])[0], fresh)


def test_labels_and_age_trends(cohort):
    sex, ages, lv, bv = (np.array([s.scalars[k] for s in cohort]) for k in range(4))
    for s in cohort:
        assert s.lv_mask.any(), s.id
        # the ventricles lie inside the brain: their neighbourhood is brain too
        grown = ndi.binary_dilation(s.lv_mask[0] > 0, iterations=1)
        assert np.all(s.semantics[0][grown] > 0), s.id
    assert np.corrcoef(ages, lv)[0, 1] > 0.5
    assert np.corrcoef(ages, bv)[0, 1] < -0.2
    assert bv[sex == 1].mean() > bv[sex == 0].mean()  # head size by sex
    assert 0.2 < sex.mean() < 0.8 and ages.min() < 0.15 and ages.max() > 0.85
    assert len({s.scalars.tobytes() for s in cohort}) == len(cohort)


@pytest.mark.parametrize("shape", [SHAPE, (48, 64, 48)])  # smoke, cpu
def test_ventricle_masks_say_more_than_the_scalars(cohort, cache, shape):
    """Issue 13: masks of different subjects overlap little (pairwise Dice <= 0.25 over 48 subjects;
    0.229 over the whole cpu test split of 104), while the ventricles still grow with age (r >= 0.5)."""
    from benchmark.cli.data import pairwise_lv_dice

    subjects = cohort[:48] if shape == SHAPE else SyntheticPopulation(shape, seed=0, cache_dir=cache).subjects(range(48))
    mean, _, pairs = pairwise_lv_dice(subjects)
    assert pairs == 48 * 47 // 2 and mean <= 0.25, mean
    ages = [s.scalars[1] for s in subjects]
    volumes = [s.lv_mask.sum() for s in subjects]
    assert np.corrcoef(ages, volumes)[0, 1] >= 0.5
    solid = [ndi.binary_fill_holes(s.lv_mask[0]).sum() <= 1.05 * s.lv_mask.sum() for s in subjects]
    assert all(solid)  # enlarged ventricles stay solid (no tissue folded into them)


def test_bad_population_arguments(pop):
    with pytest.raises(DataError, match="index"):
        pop.subject(-1)
    with pytest.raises(DataError, match="shape"):
        SyntheticPopulation((4, 4))


# --- splits ---------------------------------------------------------------------------------------
def test_splits_disjoint_nested_and_seeded():
    sp = make_splits(300, 500, 104, seed=0)
    sets = [set(sp.pretrain), set(sp.train_pool), set(sp.test)]
    assert [len(s) for s in sets] == [300, 500, 104]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    s10, s50, s500 = (sp.training_subset(n) for n in (10, 50, 500))
    assert s50[:10] == s10 and s500[:50] == s50 and set(s500) == sets[1]
    assert sp.training_subset(10) == make_splits(300, 500, 104, seed=0).training_subset(10)
    assert sp.training_subset(10) != make_splits(300, 500, 104, seed=1).training_subset(10)
    # a bigger pretraining pool leaves the test set and the training pool unchanged
    bigger = make_splits(2000, 500, 104, seed=0)
    assert bigger.test == sp.test and bigger.train_pool == sp.train_pool
    with pytest.raises(DataError, match="500"):
        sp.training_subset(501)
    with pytest.raises(DataError):
        sp.training_subset(0)
    with pytest.raises(DataError, match="train_pool"):
        make_splits(10, -1, 5, seed=0)


# --- tasks ----------------------------------------------------------------------------------------
def test_task_conditions(pop):
    s = pop.subject(1)
    assert set(TASKS) == {"lv", "multimodal", "sr4", "sr8", "sr4mm", "sr8mm"}
    for name, task in TASKS.items():
        if task.sr_spacing_mm is not None and not task.exists_at(s.voxel_mm[2]):
            continue  # test_spacing_tasks_keep_the_factor_nearest_their_spacing
        conds = task.conditions(s)
        assert list(conds) == list(task.modalities)
        for key, channels in task.modalities.items():
            assert conds[key].shape == (channels,) + SHAPE and conds[key].dtype == np.float32
    assert np.array_equal(TASKS["lv"].conditions(s)["lv_mask"], s.lv_mask.astype(np.float32))
    mm = TASKS["multimodal"].conditions(s)
    assert np.array_equal(mm["semantics"].sum(0), (s.semantics[0] > 0).astype(np.float32))
    assert np.array_equal(mm["semantics"][3], s.lv_mask[0].astype(np.float32))
    assert np.array_equal(mm["skull"], s.skull)
    assert TASKS["sr4"].paired and TASKS["sr8"].paired and not TASKS["lv"].paired
    assert np.array_equal(TASKS["sr8"].conditions(s)["low_res"], degrade_axial(s.image, 8))


def test_modality_drop_frequencies():
    rng = np.random.default_rng(0)
    p = TASKS["multimodal"].sample_presence(rng, 20000)
    sem, skull = p["semantics"], p["skull"]
    assert sem.dtype == np.float32 and set(np.unique(sem)) <= {0.0, 1.0}
    assert np.all(sem + skull >= 1)  # never both dropped
    freq = [np.mean((sem == 1) & (skull == 0)), np.mean((sem == 0) & (skull == 1)), np.mean((sem == 1) & (skull == 1))]
    assert np.allclose(freq, [0.3, 0.3, 0.4], atol=0.015)
    lv = TASKS["lv"].sample_presence(rng, 7)
    assert list(lv) == ["lv_mask"] and np.array_equal(lv["lv_mask"], np.ones(7, np.float32))


def test_get_task_unknown_lists_known():
    assert get_task("sr4") is TASKS["sr4"]
    with pytest.raises(DataError, match="lv, multimodal, sr4, sr8, sr4mm, sr8mm"):
        get_task("segmentation")


def _subject_of_voxel(voxel_mm: float) -> Subject:
    rng = np.random.default_rng(0)
    shape = (1, 4, 5, 24)
    return Subject("v", rng.random(shape).astype(np.float32), np.zeros(shape, np.uint8), np.zeros(shape, np.uint8),
                   np.zeros(shape, np.float32), np.zeros(4, np.float32), np.diag([voxel_mm] * 3 + [1.0]))


def test_spacing_tasks_keep_the_factor_nearest_their_spacing():
    # the paper's 4 and 8 mm: every 4th / 8th slice at 1 mm, the nearest whole factor elsewhere
    for voxel, factors in ((1.0, (4, 8)), (2.3, (2, 3)), (4.025, (None, 2)), (5.75, (None, None))):
        s = _subject_of_voxel(voxel)
        for name, factor in zip(("sr4mm", "sr8mm"), factors):
            task = TASKS[name]
            assert task.super_resolution and task.paired and task.sr_factor is None
            if factor is None:  # no coarser than a voxel: no task here, said with the way out
                assert not task.exists_at(voxel)
                for attempt in (lambda: task.at_voxel(voxel), lambda: task.conditions(s)):
                    with pytest.raises(TaskError, match=f"{name}.*not coarser than these .* mm voxels.*sr4 / sr8"):
                        attempt()
                continue
            assert task.at_voxel(voxel).sr_factor == factor and task.at_voxel(voxel).name == name
            assert np.array_equal(task.conditions(s)["low_res"], degrade_axial(s.image, factor))
    assert TASKS["sr8"].at_voxel(4.025) is TASKS["sr8"]  # a factor is a factor at every voxel size
    with pytest.raises(DataError, match="voxel size along Z"):
        TASKS["sr8mm"].at_voxel(0.0)


def test_a_super_resolution_task_has_a_factor_or_a_spacing_not_both():
    low_res = {"low_res": Modality(1, lambda s: s.image)}
    for bad, match in (({"sr_factor": 4, "sr_spacing_mm": 8.0}, "both sr_factor and sr_spacing_mm"),
                       ({"sr_spacing_mm": -8.0}, "positive number of mm"),
                       ({"sr_spacing_mm": float("nan")}, "positive number of mm"),
                       ({"sr_spacing_mm": 8.0, "paired": False}, "paired ground truth"),
                       ({}, "has no sr_factor")):
        settings = {"paired": True, "method_families": ("generation", "super_resolution"), **bad}
        with pytest.raises(TaskError, match=match):
            check_task(Task("sr_bad", low_res, **settings))


def test_degrade_axial_keeps_exactly_the_intended_slices():
    rng = np.random.default_rng(0)
    x = rng.random((1, 3, 4, 19)).astype(np.float32)
    for k in (1, 2, 4, 8):
        y = degrade_axial(x, k)
        assert y.shape == x.shape and y.dtype == np.float32
        assert np.array_equal(y[..., ::k], x[..., ::k])  # kept slices untouched
        last = (x.shape[-1] - 1) // k * k
        assert np.array_equal(y[..., last:], np.repeat(x[..., last:last + 1], x.shape[-1] - last, -1))
    y = degrade_axial(x, 4)
    assert np.allclose(y[..., 1], 0.75 * x[..., 0] + 0.25 * x[..., 4])
    assert np.allclose(y[..., 6], 0.5 * x[..., 4] + 0.5 * x[..., 8])
    # nothing of the dropped slices leaks in
    z = x.copy()
    z[..., 1:4] = 99.0
    assert np.array_equal(degrade_axial(z, 4), y)
    with pytest.raises(DataError):
        degrade_axial(x, 0)


# --- workers ------------------------------------------------------------------------------------
def test_data_workers_come_from_the_environment_or_default_to_two(monkeypatch, tmp_path):
    monkeypatch.delenv("SCB_DATA_WORKERS", raising=False)
    assert SyntheticPopulation((16, 32, 16), cache_dir=tmp_path).workers == min(2, os.cpu_count() or 1)
    monkeypatch.setenv("SCB_DATA_WORKERS", "7")
    assert SyntheticPopulation((16, 32, 16), cache_dir=tmp_path).workers == 7
    assert SyntheticPopulation((16, 32, 16), cache_dir=tmp_path, workers=3).workers == 3
    monkeypatch.setenv("SCB_DATA_WORKERS", "many")
    with pytest.raises(DataError, match="SCB_DATA_WORKERS must be a positive whole number"):
        SyntheticPopulation((16, 32, 16), cache_dir=tmp_path)


_KILLED_WHILE_GENERATING = """
import sys, time
from core.files import file_lock
from datasets.synthetic import _worker_pool

with file_lock(sys.argv[1]):  # as ensure() holds the cache's lock while its pool generates
    pool = _worker_pool(1)
    pool.submit(time.sleep, 120)  # a worker busy with a block
    time.sleep(1)
    print("generating", flush=True)
    time.sleep(120)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forked workers (and their guard) are Linux's")
def test_a_killed_generator_leaves_no_worker_holding_its_locks(tmp_path):
    """A forked worker shares its parent's file locks; killed with its parent, it frees them, so the
    rerun of a killed grid does not wait for ever."""
    import fcntl

    lock = tmp_path / "lock"
    # a session of its own, so that what the killed parent leaves running is ended after the check
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WHILE_GENERATING, str(lock)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "generating"
        proc.kill()
        proc.wait()
        deadline = time.time() + 20
        while True:
            with open(lock, "a") as fh:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    assert time.time() < deadline, "an orphaned worker still holds the lock 20 s after its parent was killed"
            time.sleep(0.2)
    finally:  # the orphaned forkserver and its worker would otherwise compute beside the tests that follow
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
