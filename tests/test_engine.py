"""Engine: resume gives the same numbers, sampling is seeded per subject, NaN stops a run.

A randomly initialised base model of the smoke architecture is enough here: these tests check
the engine's bookkeeping, not the quality of the model.
"""
import math

import numpy as np
import pytest
import torch

from benchmark.engine.latents import ConditionStore, FLIP_AXIS, LatentCache, condition_batch, scalar_batch
from benchmark.engine.sampling import sample_unconditioned
from benchmark.engine.training import TrainSettings, TrainingDiverged, backward_in_micro_batches, train_method
from datasets.tasks import get_task
from methods.registry import get_method, load_plugin
from tests.fixtures import random_base_and_subjects
from tests.paths import EXAMPLE_PLUGIN

OVERRIDES = ["training.steps=6", "training.batch_size=2", "training.checkpoint_every=2", "training.warmup_steps=2",
             "sampling.ddim_steps=3", "sampling.batch_size=2"]

# the VCM authors' schedule and flip (the profiles' training.warmup_fraction, lr_floor, flip_probability)
AUTHORS = dict(micro_batch_size=None, mixed_precision="fp32", schedule="authors", warmup_fraction=1 / 30, lr_floor=0.1,
               flip_probability=0.5, fused_optimizer=True)  # base.yaml's training and speed settings, as TrainSettings takes them


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    profile, base, subjects = random_base_and_subjects(OVERRIDES, cache)
    load_plugin(str(EXAMPLE_PLUGIN))
    return profile, base, subjects, cache


def _train(setup, run_dir, stop_after=None, task="lv"):
    profile, base, subjects, cache = setup
    t = get_task(task)
    torch.manual_seed(1)
    method = get_method("residual_shift", task)(base, t.modalities, {"width": 4})
    latents = LatentCache(base, cache / "latents.pt")
    settings = TrainSettings.from_profile(profile, len(subjects[:4]))
    result = train_method(method, base, subjects[:4], t, settings, latents, run_dir, seed=0,
                                 progress=False, stop_after=stop_after)
    return method, result


def test_interrupted_training_resumes_to_the_same_numbers(setup, tmp_path):
    whole, whole_result = _train(setup, tmp_path / "whole")
    _, partial = _train(setup, tmp_path / "interrupted", stop_after=3)
    assert len(partial.losses) == 3
    resumed, resumed_result = _train(setup, tmp_path / "interrupted")
    assert resumed_result.resumed_from == 2  # the last checkpoint before the interruption
    assert resumed_result.losses == pytest.approx(whole_result.losses, rel=1e-5, abs=1e-7)
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_training_changes_only_the_method(setup, tmp_path):
    profile, base, subjects, cache = setup
    before = {k: v.clone() for k, v in base.state_dict().items()}
    method, result = _train(setup, tmp_path / "run", task="multimodal")
    assert all(math.isfinite(l) for l in result.losses) and result.seconds_per_step > 0
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), f"base parameter {k} changed during training"
    assert any(p.abs().sum() > 0 for p in method.net[-1].parameters())  # the zero-initialised layer moved


def test_sampling_is_seeded_per_subject(setup):
    profile, base, subjects, _ = setup
    task = get_task("lv")
    run = lambda subs, seed: sample_unconditioned(base, subs, task, 3, 2, seed, progress=False)
    first = run(subjects[:3], 0)
    again = run(subjects[:3], 0)
    np.testing.assert_array_equal(first, again)
    # The same subject gets the same noise whatever its batch and position.
    alone = run(subjects[2:3], 0)
    np.testing.assert_allclose(alone[0], first[2], atol=1e-5)
    assert not np.allclose(run(subjects[:1], 1)[0], first[0])
    assert first.shape == (3, 1, *profile.image_shape) and first.min() >= 0 and first.max() <= 1


def test_nan_loss_stops_with_a_clear_error(setup, tmp_path):
    profile, base, subjects, cache = setup
    t = get_task("lv")
    method = get_method("residual_shift", "lv")(base, t.modalities, {"width": 4})
    method.training_loss = lambda *a, **k: method.net[0].weight.sum() * float("nan")
    settings = TrainSettings.from_profile(profile, 4)
    with pytest.raises(TrainingDiverged, match="loss became nan at step 1"):
        train_method(method, base, subjects[:4], t, settings, LatentCache(base, None),
                            tmp_path / "nan", seed=0, progress=False)


def test_latents_are_cached_for_plain_and_mirrored_views(setup, tmp_path):
    _, base, subjects, _ = setup
    cache = LatentCache(base, tmp_path / "l.pt")
    got = cache.get(subjects[:2], progress=False)
    assert got.shape == (2, 2, 2, *base.latent_shape)
    reloaded = LatentCache(base, tmp_path / "l.pt")
    assert set(reloaded.entries) == {s.id for s in subjects[:2]}
    with torch.no_grad():
        mu, _ = base.encode(torch.from_numpy(subjects[0].image[None]).flip(FLIP_AXIS))
    torch.testing.assert_close(got[0, 1, 0], mu[0])


@pytest.mark.parametrize("task_name", ["multimodal", "sr4"])
def test_condition_store_gives_each_subjects_conditions_mirrored_and_dropped(setup, task_name):
    _, _, subjects, _ = setup
    task = get_task(task_name)
    store = ConditionStore(task, subjects)
    for name, stored in store.tensors.items():  # binary maps lossless as uint8, images as float32
        binary = name == "semantics"
        assert stored.dtype == (torch.uint8 if binary else torch.float32), name
    indices = np.array([4, 1, 4])
    flip = np.array([True, False, False])
    present = {name: np.array([1.0, 0.0, 1.0], dtype=np.float32) for name in task.modalities}
    batch = store.batch(indices, present, flip)
    for name in task.modalities:
        expected = [task.conditions(subjects[i])[name] for i in indices]
        expected[0] = np.flip(expected[0], axis=FLIP_AXIS - 1)  # (C, X, Y, Z): X is axis 1
        expected[1] = np.zeros_like(expected[1])
        assert batch.tensors[name].dtype == torch.float32
        np.testing.assert_array_equal(batch.tensors[name].numpy(), np.stack(expected))
        np.testing.assert_array_equal(batch.present[name].numpy(), present[name])


def test_micro_batches_accumulate_to_the_whole_batch_gradient(setup):
    _, base, subjects, _ = setup
    task = get_task("lv")
    torch.manual_seed(1)
    method = get_method("residual_shift", "lv")(base, task.modalities, {"width": 4})
    n = 4
    z_t = torch.randn((n, *base.latent_shape))
    noise = torch.randn_like(z_t)
    t = torch.randint(0, 1000, (n,))
    conditions = condition_batch(task, subjects[:n])
    scalars = scalar_batch(subjects[:n])

    def loss_of(part):
        return method.training_loss(z_t[part], t[part], conditions.select(part), scalars[part], noise[part])

    results = {}
    for micro in (n, 3, 1):  # whole batch; unequal micro-batches (3 + 1); one example each
        method.zero_grad(set_to_none=True)
        value = backward_in_micro_batches(loss_of, n, micro)
        results[micro] = value, [p.grad.clone() for p in method.trainable_parameters()]
    whole_value, whole_grads = results[n]
    for micro in (3, 1):
        value, grads = results[micro]
        assert value == pytest.approx(whole_value, rel=1e-5)
        for a, b in zip(whole_grads, grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_training_settings_reject_impossible_micro_batches_and_precisions():
    with pytest.raises(ValueError, match="micro_batch_size must be at least 1"):
        TrainSettings(10, 4, 1e-4, 0.0, 0, 5, **{**AUTHORS, "micro_batch_size": 0})
    with pytest.raises(ValueError, match="mixed_precision must be 'fp32' or 'bf16'"):
        TrainSettings(10, 4, 1e-4, 0.0, 0, 5, **{**AUTHORS, "mixed_precision": "fp16"})
    assert TrainSettings(10, 4, 1e-4, 0.0, 0, 5, **{**AUTHORS, "micro_batch_size": 16}).micro_batch_size == 4


def test_a_method_gets_its_own_learning_rate_where_the_profile_names_one():
    from benchmark.profiles import Profile, load_profile

    cpu = load_profile("cpu")
    assert TrainSettings.from_profile(cpu, 50, "vcm").lr == float(cpu.training.lr) == 1e-3
    assert TrainSettings.from_profile(cpu, 50, "t2i_adapter").lr == 1e-4  # diverges at 1e-3 (docs/CONTROL.md)
    data = cpu.to_dict()
    data["training"]["lr_by_method"] = {"t2i_adaptor": 1e-5}  # a typo in a profile file
    typo = Profile(data)
    with pytest.raises(ValueError, match="'t2i_adaptor', which is not a method; use one of: .*t2i_adapter"):
        TrainSettings.from_profile(typo, 50, "vcm")
