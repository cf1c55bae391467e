"""Networks shipped with the suite (benchmark/shipped/): their files match the provenance, they
load without pretraining, a profile they do not fit is detected, --retrain-base pretrains, and the
decoder fine-tuning stage leaves the encoder and the diffusion model alone."""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark.base import shipped
from benchmark.base.cache import load_base_model
from benchmark.base.keys import (add_retrain_base_flag, base_model_dir, base_model_key, overrides_with_retrain_flag,
                                 without_decoder_finetune)
from benchmark.profiles import load_profile
from metrics.judge import JudgeConfig, train_judge
from tests.test_base_model import Stop, cache, data_cache, states_equal, tiny  # noqa: F401 (fixtures)

SHIPPED_PROFILES = ("smoke", "cpu")


def no_pretraining(stage: str, step: int) -> None:
    raise AssertionError(f"pretraining started ({stage} step {step}) although a shipped model fits")


def stop_at_first_step(stage: str, step: int) -> None:
    raise Stop(stage)


# ---------------------------------------------------------------------------------------------
# the shipped files themselves
# ---------------------------------------------------------------------------------------------
def test_shipped_files_match_their_provenance_sha256():
    found = {folder.name: folder for folder in shipped.folders()}
    assert set(SHIPPED_PROFILES) <= set(found), f"shipped folders: {sorted(found)}"
    total = 0
    for folder in found.values():
        record = shipped.provenance(folder)
        shipped.verify(folder)  # raises on any mismatch
        on_disk = {str(p.relative_to(folder)) for p in folder.rglob("*.pt")}
        assert on_disk == set(record["files"]), f"{folder}: files on disk and in the provenance differ"
        for key in ("command", "commit", "device"):
            assert record["made_with"][key], f"{folder}: provenance lacks made_with.{key}"
        assert record["base_model"]["wall_seconds"] > 0 and record["base_model"]["quality"]
        total += sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert total <= 60e6, f"shipped files take {total / 1e6:.1f} MB, more than the 60 MB budget"


@pytest.mark.parametrize("name", SHIPPED_PROFILES)
def test_shipped_base_model_loads_without_pretraining(name, tmp_path):
    base = load_base_model(load_profile(name), tmp_path, progress=False, step_callback=no_pretraining)
    folder = shipped.SHIPPED_ROOT / name
    assert base.origin["source"] == "shipped base model"
    assert base.origin["sha256"] == shipped.provenance(folder)["files"][shipped.BASE_MODEL_FILE]["sha256"]
    assert not (tmp_path / "base").exists(), "loading a shipped model wrote to the cache"
    assert all(not p.requires_grad for p in base.parameters())


def test_a_damaged_shipped_file_is_refused(tmp_path):
    root = tmp_path / "shipped"
    shutil.copytree(shipped.SHIPPED_ROOT / "smoke", root / "smoke")
    path = root / "smoke" / shipped.BASE_MODEL_FILE
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(shipped.ShippedError, match="does not match its sha256"):
        shipped.verify(root / "smoke")


def test_ship_writes_a_folder_that_verifies_and_is_found(cache, tmp_path):
    """The `ship` command's writer on a tiny profile: every file in the provenance with its sha256, a
    judge per class count and both in-domain extractors, and the folder is found by the base model's key."""
    from benchmark.run.ship import ship

    # the judges and extractors a few steps each: what is written is checked here, not how well they work
    profile = tiny("metrics.judge.steps=2", "metrics.in_domain.steps_2d=2", "metrics.in_domain.steps_3d=2")
    load_base_model(profile, cache, progress=False)  # pretrained into the cache, as `pretrain` does
    out = ship(profile, cache, tmp_path / "shipped", {"MS-SSIM": 0.5}, command="pytest", notes="tiny")
    record = shipped.provenance(out)
    shipped.verify(out)
    assert set(record["files"]) == {str(p.relative_to(out)) for p in out.rglob("*.pt")}
    whats = {m["what"] for m in record["metrics"]}
    assert {"Dice judge, task lv", "in-domain 2d feature extractor", "in-domain 3d feature extractor"} <= whats
    assert len([w for w in whats if w.startswith("Dice judge")]) == 2  # 2 classes (lv) and 5 (semantic map)
    assert record["base_model"]["quality"] == {"MS-SSIM": 0.5} and record["made_with"]["command"] == "pytest"
    found, _ = shipped.find_base_model(base_model_key(profile), "smoke", root=tmp_path / "shipped")
    assert found == out / shipped.BASE_MODEL_FILE


# ---------------------------------------------------------------------------------------------
# which model is used
# ---------------------------------------------------------------------------------------------
def test_a_profile_that_differs_from_the_shipped_one_says_so_and_pretrains(cache, capsys):
    profile = load_profile("smoke", ["diffusion.channels=[32,64,96]", "diffusion.num_head_channels=[0,32,96]"])
    found, reason = shipped.find_base_model(base_model_key(profile), "smoke")
    assert found is None
    assert "diffusion.channels (shipped [32, 64, 64], here [32, 64, 96])" in reason
    with pytest.raises(Stop):
        load_base_model(profile, cache, progress=True, step_callback=stop_at_first_step)
    err = capsys.readouterr().err
    assert "the shipped 'smoke' base model was made with other settings" in err and "pretrains its own" in err


def test_retrain_base_flag_pretrains_even_when_a_shipped_model_fits(cache):
    parser = argparse.ArgumentParser()
    parser.add_argument("--override", action="append", default=[])
    add_retrain_base_flag(parser)
    args = parser.parse_args(["--retrain-base"])
    profile = load_profile("smoke", overrides_with_retrain_flag(args))
    assert profile.base_weights == "pretrain"
    assert shipped.find_base_model(base_model_key(profile), "smoke")[0] is not None
    with pytest.raises(Stop):  # pretraining starts although the shipped smoke model fits
        load_base_model(profile, cache, progress=False, step_callback=stop_at_first_step)


def test_unknown_base_weights_value_is_an_error(cache):
    with pytest.raises(ValueError, match="base_weights 'download' is not one of"):
        load_base_model(load_profile("smoke", ["base_weights=download"]), cache, progress=False)


def test_shipped_judge_is_used_instead_of_training(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.random((4, 1, 16, 16, 16), dtype=np.float32)
    labels = (images > 0.5).astype(np.int64)
    cfg = JudgeConfig(steps=2)
    trained = train_judge(images, labels, 2, tmp_path / "a", data_id="toy", config=cfg, device="cpu")
    ship_root = tmp_path / "shipped"
    (ship_root / "metrics").mkdir(parents=True)
    shutil.move(trained.source, ship_root / "metrics" / Path(trained.source).name)
    loaded = train_judge(images, labels, 2, tmp_path / "b", data_id="toy", config=cfg, device="cpu",
                         shipped_dirs=[ship_root])
    assert Path(loaded.source).parent == ship_root / "metrics"
    assert not (tmp_path / "b").exists(), "a judge was trained although a shipped one fits"
    assert states_equal(loaded.net, trained.net)


# ---------------------------------------------------------------------------------------------
# stage 4: decoder fine-tuning
# ---------------------------------------------------------------------------------------------
DECODER = ["decoder_finetune.steps=3", "decoder_finetune.lr=1.0e-3", "decoder_finetune.warmup_steps=1",
           "decoder_finetune.checkpoint_every=2"]


def test_decoder_finetuning_changes_only_the_decoder(cache):
    start = load_base_model(tiny(), cache, progress=False)
    tuned = load_base_model(tiny(*DECODER), cache, progress=False)
    assert base_model_dir(tiny(*DECODER), cache) != base_model_dir(tiny(), cache)
    assert base_model_dir(without_decoder_finetune(tiny(*DECODER)), cache) == base_model_dir(tiny(), cache)
    assert states_equal(start.diffusion, tuned.diffusion)
    assert states_equal(start.autoencoder.encoder, tuned.autoencoder.encoder)
    assert float(start.scale_factor) == float(tuned.scale_factor)
    assert not states_equal(start.autoencoder.decoder, tuned.autoencoder.decoder)
    summary = json.loads((base_model_dir(tiny(*DECODER), cache) / "summary.json").read_text())
    assert summary["decoder_finetune"]["steps"] == 3
    assert torch.isfinite(torch.tensor(summary["decoder_finetune"]["final_l1"]))


# ---------------------------------------------------------------------------------------------
# the data identity that keys shipped and cached judges
# ---------------------------------------------------------------------------------------------
class WouldTrain(Exception):
    """Raised where a judge would be trained: the lookup found no shipped or cached judge for the data."""


def _would_train(*args, **kwargs):
    raise WouldTrain


def _lv_judge(tmp_path, overrides=()):
    from benchmark.run.spec import RunContext
    from datasets.tasks import get_task

    ctx = RunContext(load_profile("smoke", list(overrides)), tmp_path / "out", tmp_path / "cache", device="cpu",
                     progress=False)
    return ctx.scorer(get_task("lv")).judge


def test_today_s_data_is_served_the_shipped_judge(tmp_path, monkeypatch):
    import metrics.judge

    monkeypatch.setattr(metrics.judge, "materialise", _would_train)
    judge = _lv_judge(tmp_path)
    assert Path(judge.source).parent == shipped.SHIPPED_ROOT / "smoke" / "metrics"
    assert judge.meta["data_id"].startswith("synthetic(seed=0, synth-mni152-v3)|")


@pytest.mark.parametrize("change", ["generator", "split sizes"])
def test_changed_data_is_never_served_a_stale_shipped_judge(change, tmp_path, monkeypatch):
    import benchmark.run.data_source
    import metrics.judge

    monkeypatch.setattr(metrics.judge, "materialise", _would_train)
    overrides = []
    if change == "generator":
        monkeypatch.setattr(benchmark.run.data_source, "GENERATOR_VERSION", "synth-mni152-v999")
    else:  # another test-set size moves the training pool, so the judge's subjects differ
        overrides = [f"data.test_set={load_profile('smoke').data.test_set + 1}"]
    with pytest.raises(WouldTrain):
        _lv_judge(tmp_path, overrides)
