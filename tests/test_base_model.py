"""The frozen base model: pretraining cache and resume, sampling and the scalar conditioning of a
really pretrained base model (cpu profile by default). BrainLDM loading: tests/test_brainldm.py."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark.base.cache import load_base_model
from benchmark.base.keys import BaseModelError, autoencoder_dir, base_model_dir, base_model_hash
from benchmark.profiles import load_profile
from tests.paths import ROOT

# A tiny pretraining: small image, few subjects, narrow nets, a handful of steps, a checkpoint every 2.
TINY = [
    "image_shape=[16,32,16]",
    "data.pretrain_pool=6", "data.train_pool=2", "data.test_set=2",
    "autoencoder.channels=[8,8,8]", "autoencoder.steps=5", "autoencoder.batch_size=2",
    "autoencoder.warmup_steps=2", "autoencoder.checkpoint_every=2",
    "diffusion.channels=[8,16,16]", "diffusion.num_head_channels=[0,8,16]", "diffusion.norm_num_groups=8",
    "diffusion.steps=6", "diffusion.batch_size=2", "diffusion.warmup_steps=2", "diffusion.checkpoint_every=2",
]

class Stop(Exception):
    """Raised from a step callback to simulate an interrupted run."""


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One folder of generated synthetic subjects, shared by the tests' own cache folders."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def cache(tmp_path, data_cache) -> Path:
    """A fresh cache folder per test whose synthetic subjects are shared (generated once)."""
    (data_cache / "synthetic").mkdir(exist_ok=True)
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "synthetic").symlink_to(data_cache / "synthetic", target_is_directory=True)
    return folder


def tiny(*extra: str):
    return load_profile("smoke", TINY + list(extra))


def states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def recorder():
    calls: list[tuple[str, int]] = []
    return calls, lambda stage, step: calls.append((stage, step))


# ---------------------------------------------------------------------------------------------
# pretraining cache and resume
# ---------------------------------------------------------------------------------------------
def test_second_call_loads_and_config_change_retrains(cache):
    profile = tiny()
    calls, cb = recorder()
    first = load_base_model(profile, cache, progress=False, step_callback=cb)
    assert ("autoencoder", 5) in calls and ("diffusion", 6) in calls
    out = base_model_dir(profile, cache)
    assert (out / "done").is_file() and (out / "model.pt").is_file()
    assert not any(p.suffix == ".ckpt" for p in out.parent.rglob("*"))  # checkpoints cleared when done
    assert first.scale_factor > 0 and first.scale_factor != 1.0
    assert not first.training and not any(p.requires_grad for p in first.parameters())

    mtime = (out / "model.pt").stat().st_mtime_ns
    calls.clear()
    second = load_base_model(profile, cache, progress=False, step_callback=cb)
    assert calls == []  # loaded, not trained
    assert (out / "model.pt").stat().st_mtime_ns == mtime
    assert states_equal(first, second) and second.scale_factor == first.scale_factor

    # A diffusion setting changes: new hash, the diffusion model is trained again on the cached autoencoder.
    changed = tiny("diffusion.lr=1.0e-3")
    assert base_model_hash(changed) != base_model_hash(profile)
    assert autoencoder_dir(changed, cache) == autoencoder_dir(profile, cache)
    calls.clear()
    third = load_base_model(changed, cache, progress=False, step_callback=cb)
    assert {s for s, _ in calls} == {"diffusion"}
    assert states_equal(third.autoencoder, first.autoencoder)
    assert not states_equal(third.diffusion, first.diffusion)

    # An autoencoder setting changes: everything is trained again.
    calls.clear()
    load_base_model(tiny("autoencoder.lr=2.0e-3"), cache, progress=False, step_callback=cb)
    assert {s for s, _ in calls} == {"autoencoder", "diffusion"}
    # So does a change of the pretraining data.
    assert base_model_hash(tiny("data.pretrain_pool=7")) != base_model_hash(profile)
    assert base_model_hash(tiny("image_shape=[16,32,32]")) != base_model_hash(profile)
    assert base_model_hash(tiny("scheduler.beta_end=0.02")) != base_model_hash(profile)


@pytest.mark.parametrize("ema", ["diffusion.ema_decay=0.0", "diffusion.ema_decay=0.9"])
def test_resume_after_interruption_matches_uninterrupted_run(cache, tmp_path, data_cache, ema):
    profile = tiny(ema)
    reference = load_base_model(profile, cache, progress=False)

    other = tmp_path / "other"
    other.mkdir()
    (other / "synthetic").symlink_to(data_cache / "synthetic", target_is_directory=True)

    def stop_at(stage_, step_):
        def cb(stage, step):
            if (stage, step) == (stage_, step_):
                raise Stop
        return cb

    # Interrupted in the autoencoder between two checkpoints (at 2 and 4): resumes from step 2.
    with pytest.raises(Stop):
        load_base_model(profile, other, progress=False, step_callback=stop_at("autoencoder", 3))
    assert (autoencoder_dir(profile, other) / "autoencoder.ckpt").is_file()
    assert not (base_model_dir(profile, other) / "done").exists()
    # Interrupted again in the diffusion stage, right after its checkpoint at step 4.
    calls, cb = recorder()

    def record_then_stop(stage, step):
        cb(stage, step)
        if (stage, step) == ("diffusion", 4):
            raise Stop

    with pytest.raises(Stop):
        load_base_model(profile, other, progress=False, step_callback=record_then_stop)
    assert calls[0] == ("autoencoder", 3)  # resumed after the checkpoint at step 2
    assert (base_model_dir(profile, other) / "diffusion.ckpt").is_file()

    calls.clear()
    resumed = load_base_model(profile, other, progress=False, step_callback=cb)
    assert calls == [("diffusion", 5), ("diffusion", 6)]
    assert resumed.scale_factor == reference.scale_factor
    assert states_equal(resumed, reference), "a resumed run must end with the same weights as an uninterrupted one"


def _old_pretraining_loop(stage, module, cfg, ckpt_path, step_fn, seed, callback):
    """``Pretrainer._loop`` before it moved onto core.loop (commit 74fe83c), verbatim but for the
    progress bar: it writes the checkpoints of the old format, ``{step, model, optimizer, generator,
    seconds, running, ema}``."""
    import math
    import time

    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    def lr_at(step, total, base_lr, warmup):
        if warmup > 0 and step < warmup:
            return base_lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return base_lr * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))

    steps, lr, warmup = int(cfg.steps), float(cfg.lr), int(cfg.get("warmup_steps", 0))
    every = max(1, int(cfg.get("checkpoint_every", max(1, steps // 10))))
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=float(cfg.get("weight_decay", 0.0)))
    gen = torch.Generator().manual_seed(seed + {"autoencoder": 1, "diffusion": 2}.get(stage, 4))
    decay = float(cfg.get("ema_decay", 0.0) or 0.0)
    ema = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(decay)) if decay > 0 else None
    running, t0 = None, time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        loss, logs = step_fn(step, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        if ema is not None:
            ema.update_parameters(module)
        logs = {k: float(v) for k, v in logs.items()}
        running = logs if running is None else {k: 0.98 * running[k] + 0.02 * logs[k] for k in logs}
        done = step + 1
        if done % every == 0 and done < steps:
            torch.save({"step": done, "model": module.state_dict(), "optimizer": opt.state_dict(),
                        "generator": gen.get_state(), "seconds": time.time() - t0,
                        "running": running, "ema": ema.state_dict() if ema is not None else None}, ckpt_path)
        callback(stage, done)
    if ema is not None:
        module.load_state_dict(ema.module.state_dict())
    return running


@pytest.mark.parametrize("decay", [0.0, 0.9])
def test_a_checkpoint_of_the_old_pretraining_loop_resumes_bit_for_bit(tmp_path, decay):
    """A pretraining run interrupted under the loop before core.loop (its checkpoint format) is
    resumed by today's loop and ends with the weights and logs of an uninterrupted run, bit for bit."""
    from benchmark.base.pretrain import Pretrainer, upgrade_old_checkpoint

    cfg = load_profile("smoke", ["diffusion.steps=7", "diffusion.lr=0.05", "diffusion.warmup_steps=2",
                                 "diffusion.checkpoint_every=2", f"diffusion.ema_decay={decay}"]).diffusion
    x = torch.linspace(-1, 1, 64).reshape(16, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    def step_fn_of(net):
        def step_fn(step, gen):
            idx = torch.randint(0, 16, (5,), generator=gen)
            loss = torch.nn.functional.mse_loss(net(x[idx]) + 0.01 * torch.randn(5, 1, generator=gen), y[idx])
            return loss, {"mse": loss.detach()}
        return step_fn

    def pretrainer(callback=None):
        p = Pretrainer.__new__(Pretrainer)  # only what _loop reads
        p.seed, p.progress, p.callback, p.device = 5, False, callback, torch.device("cpu")
        return p

    whole = model()
    summary = pretrainer()._loop("diffusion", whole, cfg, tmp_path / "whole.ckpt", step_fn_of(whole))
    old_whole = model()
    old_running = _old_pretraining_loop("diffusion", old_whole, cfg, tmp_path / "old.ckpt", step_fn_of(old_whole),
                                        5, lambda stage, step: None)
    assert states_equal(whole, old_whole)  # the port itself changes no number
    assert summary["final_mse"] == round(old_running["mse"], 6)

    def stop_at_5(stage, step):
        if step == 5:
            raise Stop
    cut = model()
    with pytest.raises(Stop):  # killed at step 5: the old checkpoint holds step 4
        _old_pretraining_loop("diffusion", cut, cfg, tmp_path / "cut.ckpt", step_fn_of(cut), 5, stop_at_5)
    assert set(torch.load(tmp_path / "cut.ckpt", weights_only=False)) == {
        "step", "model", "optimizer", "generator", "seconds", "running", "ema"}

    calls, cb = recorder()
    resumed = model()
    resumed_summary = pretrainer(cb)._loop("diffusion", resumed, cfg, tmp_path / "cut.ckpt", step_fn_of(resumed))
    assert calls == [("diffusion", 5), ("diffusion", 6), ("diffusion", 7)]
    assert states_equal(resumed, whole), "a run resumed from an old checkpoint must end as an uninterrupted one"
    assert resumed_summary["final_mse"] == summary["final_mse"]
    assert torch.load(tmp_path / "cut.ckpt", weights_only=False)["format"] == "core.loop/1"  # upgraded in place
    assert not upgrade_old_checkpoint(tmp_path / "cut.ckpt")  # a checkpoint of today's format is left alone


def test_ema_weights_become_the_final_diffusion_model(cache):
    plain = load_base_model(tiny(), cache, progress=False)
    averaged = load_base_model(tiny("diffusion.ema_decay=0.9"), cache, progress=False)
    assert states_equal(plain.autoencoder, averaged.autoencoder)  # same cached autoencoder
    assert not states_equal(plain.diffusion, averaged.diffusion)
    with pytest.raises(BaseModelError, match=r"diffusion.ema_decay must lie in \[0, 1\)"):
        load_base_model(tiny("diffusion.ema_decay=1.0"), cache, progress=False)


FINETUNE = ["diffusion_finetune.steps=3", "diffusion_finetune.batch_size=2", "diffusion_finetune.lr=1e-4",
            "diffusion_finetune.offset_noise=0.1", "diffusion_finetune.checkpoint_every=1", "diffusion_finetune.warmup_steps=0",
            "diffusion_finetune.ema_decay=0.0"]


def test_offset_noise_stage_trains_the_diffusion_model_on_from_the_earlier_stages(cache):
    from benchmark.base.keys import without_diffusion_finetune

    profile = load_profile("smoke", TINY + ["decoder_finetune.steps=0"] + FINETUNE)
    start = load_base_model(without_diffusion_finetune(profile), cache, progress=False)
    calls, callback = recorder()
    tuned = load_base_model(profile, cache, progress=False, step_callback=callback)
    assert calls == [("diffusion_finetune", 1), ("diffusion_finetune", 2), ("diffusion_finetune", 3)]  # nothing else
    assert base_model_hash(profile) != base_model_hash(without_diffusion_finetune(profile))
    assert states_equal(start.autoencoder, tuned.autoencoder) and tuned.scale_factor == start.scale_factor
    assert not states_equal(start.diffusion, tuned.diffusion)
    assert all(not p.requires_grad for p in tuned.parameters())  # frozen, as every base model
    summary = (base_model_dir(profile, cache) / "summary.json").read_text()
    assert '"diffusion_finetune"' in summary and '"started_from"' in summary
    # the offset changes what is learned: the same stage without it ends elsewhere
    plain = load_base_model(load_profile("smoke", TINY + ["decoder_finetune.steps=0"] + FINETUNE
                                         + ["diffusion_finetune.offset_noise=0.0"]), cache, progress=False)
    assert not states_equal(plain.diffusion, tuned.diffusion)


def test_no_pretraining_pool_is_a_clear_error(cache):
    with pytest.raises(BaseModelError, match="pretrain_pool"):
        load_base_model(tiny("data.pretrain_pool=0"), cache, progress=False)


# ---------------------------------------------------------------------------------------------
# a really pretrained base model (cpu by default): samples and scalar conditioning
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pretrained_model():
    """A fully pretrained base model, cached in the suite's cache folder (``SCB_CACHE_DIR`` or
    ``.cache``), where the benchmark finds it too. Profile ``cpu`` by default (``SCB_SLOW_PROFILE``
    picks another): its samples have skulls and ventricles (~32 min of pretraining on 2 cores, once);
    the smoke model's blurred samples carry no ventricles, so the conditioning test fails there."""
    cache = Path(os.environ.get("SCB_CACHE_DIR", ROOT / ".cache"))
    profile = load_profile(os.environ.get("SCB_SLOW_PROFILE", "cpu"))
    return profile, cache, load_base_model(profile, cache, progress=False)


def central_dark_fraction(volumes: np.ndarray) -> np.ndarray:
    """Per volume: the fraction of dark voxels in the central brain region where the lateral
    ventricles lie (30-70% left-right, 35-65% posterior-anterior, 45-70% inferior-superior of the
    field of view). Dark: below 0.4 x the median intensity of that region (CSF against grey and
    white matter). On the synthetic test subjects it correlates with the ventricular-volume
    scalar at r ~ 0.77 (see the next test)."""
    x, y, z = volumes.shape[2:]
    box = volumes[:, 0, int(0.3 * x):int(0.7 * x), int(0.35 * y):int(0.65 * y), int(0.45 * z):int(0.7 * z)]
    box = box.reshape(len(volumes), -1)
    threshold = 0.4 * np.median(box, axis=1, keepdims=True)
    return (box < threshold).mean(axis=1)


@pytest.mark.slow  # needs a fully pretrained base model: `make test-slow`
def test_dark_region_measure_tracks_ventricles_in_real_data(pretrained_model):
    """The measure the conditioning test uses follows the ventricular-volume scalar on data."""
    from datasets.splits import make_splits
    from datasets.synthetic import SyntheticPopulation

    profile, cache, _ = pretrained_model
    d = profile.data
    pop = SyntheticPopulation(tuple(profile.image_shape), seed=d.seed, cache_dir=cache)
    subjects = pop.subjects(make_splits(d.pretrain_pool, d.train_pool, d.test_set, d.seed).test)
    dark = central_dark_fraction(np.stack([s.image for s in subjects]))
    ventricles = np.array([s.scalars[2] for s in subjects])
    assert np.corrcoef(dark, ventricles)[0, 1] > 0.6


@pytest.mark.slow  # needs a fully pretrained base model: `make test-slow`
def test_samples_in_range_and_not_constant(pretrained_model):
    from benchmark.base.unconditional_samples import sample_volumes

    profile, _, base = pretrained_model
    volumes = sample_volumes(base, [0.5, 0.5, 0.5, 0.5], 4, int(profile.sampling.ddim_steps), seed=0)
    assert volumes.shape == (4, 1, *profile.image_shape)
    assert volumes.dtype == np.float32 and np.isfinite(volumes).all()
    assert volumes.min() >= 0.0 and volumes.max() <= 1.0
    assert all(v.std() > 0.05 for v in volumes)  # not constant
    assert np.abs(volumes[0] - volumes[1]).mean() > 0.01  # different seeds, different samples
    again = sample_volumes(base, [0.5, 0.5, 0.5, 0.5], 2, int(profile.sampling.ddim_steps), seed=0)
    np.testing.assert_allclose(again, volumes[:2], atol=1e-5)  # seeded


@pytest.mark.slow  # needs a fully pretrained base model: `make test-slow`
def test_ventricular_volume_scalar_enlarges_the_dark_central_region(pretrained_model):
    from benchmark.base.unconditional_samples import sample_volumes

    profile, _, base = pretrained_model
    steps = int(profile.sampling.ddim_steps)
    n = 8  # seeds; both settings start from the same noise
    small = sample_volumes(base, [0.5, 0.5, 0.1, 0.5], n, steps, seed=1)
    large = sample_volumes(base, [0.5, 0.5, 0.9, 0.5], n, steps, seed=1)
    dark_small, dark_large = central_dark_fraction(small), central_dark_fraction(large)
    assert dark_large.mean() > dark_small.mean(), (dark_small, dark_large)
    assert (dark_large > dark_small).mean() >= 7 / 8, (dark_small, dark_large)  # issue 14: >= 7 of 8 seeds


@pytest.mark.slow  # needs a fully pretrained base model: `make test-slow`
def test_sample_base_cli_writes_nifti_and_montage(pretrained_model, tmp_path):
    import nibabel as nib

    from benchmark.cli import main

    profile, cache, _ = pretrained_model
    out = tmp_path / "samples"
    assert main(["sample", "--profile", profile.name, "--n", "2", "--out", str(out), "--cache-dir", str(cache),
                 "--scalars", "0.2,0.5,0.9,0.5", "--seed", "3", "--quiet"]) == 0
    files = sorted(out.glob("sample_*.nii.gz"))
    assert [f.name for f in files] == ["sample_000.nii.gz", "sample_001.nii.gz"]
    img = nib.load(files[0])
    assert img.shape == tuple(profile.image_shape)
    from benchmark.base.unconditional_samples import population_affine

    np.testing.assert_allclose(img.affine, population_affine(profile, cache))
    assert np.isfinite(np.asarray(img.dataobj)).all()
    assert (out / "montage.png").stat().st_size > 1000
    assert main(["sample", "--profile", "smoke", "--n", "2", "--out", str(out), "--scalars", "0.5,2"]) == 2
