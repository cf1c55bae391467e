"""The per-method training-step benchmark (benchmark.cli.bench) runs and writes its report."""
from __future__ import annotations

import json

from benchmark.cli import main

TINY = ["data.train_pool=8", "data.test_set=2", "training.batch_size=2"]


def _args(tmp_path, *extra):
    return ["bench", "--profile", "smoke", "--random-base", "--steps", "1", "--size", "4",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"),
            *sum((["--override", o] for o in TINY), []), *extra]


def test_reports_seconds_per_step_and_ratio_for_each_method(tmp_path):
    assert main(_args(tmp_path, "--methods", "vcm,controlnet_mlp")) == 0
    report = json.loads((tmp_path / "out" / "methods-smoke-lv-4.json").read_text())
    assert [r["method"] for r in report["methods"]] == ["vcm", "controlnet_mlp"]
    assert report["base"].startswith("randomly initialised")
    assert report["autoencoder_step_seconds"] > 0  # the machine-speed yardstick
    for row in report["methods"]:
        assert row["seconds_per_step"] > 0 and row["frozen_forward_seconds"] > 0
        assert abs(row["ratio_to_frozen_forward"] - row["seconds_per_step"] / row["frozen_forward_seconds"]) < 1e-9
        assert row["trainable_parameters"] > 0
    table = (tmp_path / "out" / "methods-smoke-lv-4.md").read_text()
    assert "| vcm |" in table and "| controlnet_mlp |" in table
    assert "base-autoencoder pretraining step" in table


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    assert main(_args(tmp_path, "--methods", "no_such_method")) == 2
    assert "unknown method 'no_such_method'" in capsys.readouterr().err
    assert main(_args(tmp_path, "--methods", "vcm", "--size", "99")) == 2
    assert "exceeds the training pool" in capsys.readouterr().err
    assert main(_args(tmp_path, "--methods", "vcm", "--compare-off", "--repeats", "0")) == 2
    assert "--repeats 0: give at least 1" in capsys.readouterr().err


def test_compare_off_times_the_optimizer_step_fused_and_looped(tmp_path, monkeypatch):
    import torch

    kernels, adamw = [], torch.optim.AdamW

    def recording(*args, **kwargs):
        kernels.append(kwargs.get("fused"))
        return adamw(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", recording)
    assert main(_args(tmp_path, "--methods", "controlnet_mlp", "--compare-off", "--parts", "optimizer",
                      "--repeats", "2")) == 0
    report = json.loads((tmp_path / "out" / "methods-smoke-lv-4-speed.json").read_text())
    assert report["speed_on"]["fused_optimizer"] is True
    # the profile's options (fused), then every option off (PyTorch's default), alternating, twice
    assert kernels[-4:] == [True, None, True, None]
    row = report["methods"][0]
    for setting in ("on", "off"):  # each setting's median of its two repeats, both kept
        repeats = row[setting]["optimizer_seconds_repeats"]
        assert len(repeats) == 2 and row[setting]["optimizer_seconds"] == sum(repeats) / 2
    assert row["on"]["optimizer_seconds"] > 0 and row["off"]["optimizer_seconds"] > 0
    assert row["speedup"]["optimizer"] == row["off"]["optimizer_seconds"] / row["on"]["optimizer_seconds"]
