"""The grid runner end to end on a tiny grid: records, resume after a kill, recorded failures,
tables, figures and the report. Sizes are cut by profile overrides so the whole file runs in a
few minutes on 2 cores; the numbers are not meaningful, the bookkeeping is what is tested.
"""
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from benchmark.run.records import iter_records
from tests.paths import EXAMPLE_PLUGIN, ROOT

TINY = [
    "data.pretrain_pool=6", "data.train_pool=8", "data.test_set=3",
    "autoencoder.steps=2", "autoencoder.batch_size=2", "autoencoder.checkpoint_every=1",
    "diffusion.steps=2", "diffusion.batch_size=2", "diffusion.checkpoint_every=1",
    "training.steps=3", "training.batch_size=2", "training.checkpoint_every=1", "training.warmup_steps=1",
    "sampling.ddim_steps=2", "sampling.n_test=3", "sampling.batch_size=3",
    "metrics.reference_volumes=8", "metrics.judge.steps=2", "metrics.in_domain.steps_2d=2",
    "metrics.in_domain.steps_3d=2",
    # the costly parts of a run that other tests cover: FRD (a fixed sqrtm per row, tests/test_metrics_prdc.py)
    # and a probe of 16 subjects x 2 draws (tests/test_control_probe.py)
    "metrics.frd=false", "probe.subjects=4", "probe.draws=1",
]

FAILING_PLUGIN = '''
from methods.base import Method
from methods.registry import register


@register("always_fails", tasks=("lv",))
class AlwaysFails(Method):
    def __init__(self, base, condition_channels, config):
        super().__init__(base, condition_channels, config)
        raise RuntimeError("this method fails on purpose")
'''


def run_cli(args, cache, out, **kwargs):
    cmd = [sys.executable, str(ROOT / "run_benchmark.py"), "--profile", "smoke", "--quiet",
           "--cache-dir", str(cache), "--out", str(out), *sum((["--override", o] for o in TINY), []), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **kwargs)


def main_in_process(argv) -> tuple[int, str]:
    """run_benchmark.py's entry point in this process: (exit code, stdout and stderr). For commands whose
    test needs no process of its own; it saves the seconds a fresh interpreter spends importing torch
    and MONAI."""
    from benchmark.cli import main

    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as stop:  # argparse's own errors
            code = stop.code
    return code, log.getvalue()


def tiny_flags(cache, out) -> list:
    return ["--profile", "smoke", "--quiet", "--cache-dir", cache, "--out", out, *sum((["--override", o] for o in TINY), [])]


@pytest.fixture(scope="module")
def cache(tiny_cache):
    return tiny_cache


def _records(out):
    return {(r["task"], r["method"], r["size"]): r for r in iter_records(out)}


def test_killed_grid_resumes_without_redoing_finished_runs(cache, tmp_path):
    out = tmp_path / "grid"
    args = ["--plugin", str(EXAMPLE_PLUGIN), "--methods", "residual_shift,vcm", "--sizes", "2", "--no-validation"]
    proc = run_cli(args, cache, out)
    # Kill it as soon as two runs have finished (mid-grid).
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if len(list((out / "records").glob("*.json"))) >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.2)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the grid finished before it could be killed:\n{proc.stdout.read()}"
    before = {p.name: p.stat().st_mtime_ns for p in (out / "records").glob("*.json")}
    assert 2 <= len(before) < 6
    # Every record on disk is whole, even right after a kill.
    for path in (out / "records").glob("*.json"):
        json.loads(path.read_text())

    rerun = run_cli(args, cache, out)
    try:
        log = rerun.communicate(timeout=900)[0]
    except subprocess.TimeoutExpired:  # e.g. a lock still held by what the kill left behind
        rerun.kill()
        pytest.fail(f"the rerun after the kill did not finish in 15 minutes:\n{rerun.communicate()[0][-3000:]}")
    assert rerun.returncode == 0, log
    records = _records(out)
    references = {("lv", "reference", 0), ("lv", "autoencoder", 0), ("lv", "reference_other", 0),
                  ("lv", "brainldm", 0)}  # the four Dice rows
    assert set(records) == references | {("lv", m, 2) for m in ("residual_shift", "vcm")}
    assert all(r["status"] == "ok" for r in records.values()), log
    for name, mtime in before.items():  # finished runs were not redone
        assert (out / "records" / name).stat().st_mtime_ns == mtime, f"{name} was redone"
    assert f"{len(before)} already done" in log

    record = records[("lv", "vcm", 2)]
    assert record["config_hash"] and record["versions"]["torch"] and record["device"]
    assert record["cost"]["trainable_parameters"] > 0 and record["cost"]["seconds_per_step"] > 0
    assert any(k.startswith("FID-3D [") for k in record["metrics"]) and "Dice" in record["metrics"]
    assert record["protocol"]["n_generated_volumes"] == 3
    assert record["metrics"]["FRD"] is None and "metrics.frd is false" in record["protocol"]["FRD"]["reason"]
    # per-subject values, and the method's own swapped-condition null
    assert len(record["per_subject"]["ids"]) == 3 and len(record["per_subject"]["Dice swapped"]) == 3
    assert record["metrics"]["Control Δ"] == pytest.approx(
        np.nanmean(np.array(record["per_subject"]["Dice"]) - np.array(record["per_subject"]["Dice swapped"])))
    # the control probe: before training and at every checkpoint (3 steps, checkpoint every step)
    history = record["control_probe"]["history"]
    assert [h["step"] for h in history] == [0, 1, 2, 3] and len(history[-1]["bands"]) == 4
    assert record["metrics"]["control gap t0-249"] == history[-1]["bands"][0]["gap"]
    assert "not_applicable" in records[("lv", "brainldm", 0)]["control_probe"]
    assert set(records[("lv", "reference_other", 0)]["metrics"]) == {"Dice"}
    # the tiny profile matches no shipped base model: the record says it was pretrained here, and which file
    assert record["base_model"]["source"] == "pretrained by the suite (cache)"
    assert len(record["base_model"]["sha256"]) == 64 and record["base_model"]["path"].startswith(str(cache))

    # Tables, figures and report are rebuilt from records alone.
    for name in ("table_lv", "table5_cost"):
        for ext in ("csv", "md", "tex"):
            assert (out / "tables" / f"{name}.{ext}").is_file()
    report = (out / "REPORT.md").read_text()
    assert report.count("residual_shift") >= 1
    # The report names the judge (which one: its classes and weights) and the extractors behind the numbers.
    judge = record["protocol"]["Dice"]["judge"]
    assert f"judge `judge-unet` (2 classes, weights hash {judge['weights_hash']})" in report
    assert "extractor `in-domain-3d`" in report
    assert "no scored runs" not in report
    assert list((out / "figures").glob("montage_lv__vcm__n2*.png"))
    assert not (out / "figures" / "metrics_vs_size_lv.png").exists()  # one size: nothing to draw against
    assert (out / "figures" / "control_gap_lv.png").is_file() and "figures/control_gap_lv.png" in report
    assert "real, another subject's condition" in report
    assert "Base model: pretrained by the suite (cache)" in report
    code, log = main_in_process(["tables", "--profile", "smoke", "--out", out])
    assert code == 0, log


def test_failing_method_is_recorded_and_the_grid_goes_on(cache, tmp_path, monkeypatch):
    from methods import registry

    registry.known_methods()  # the built-ins registered first, so that the copy below holds them
    registry.load_plugin(str(EXAMPLE_PLUGIN))  # likewise the example: its module stays imported after this test
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # always_fails leaves with this test
    plugin = tmp_path / "failing_plugin.py"
    plugin.write_text(FAILING_PLUGIN)
    out = tmp_path / "grid"
    code, log = main_in_process([*tiny_flags(cache, out), "--plugin", plugin, "--plugin", EXAMPLE_PLUGIN,
                                 "--methods", "always_fails,residual_shift", "--sizes", "2", "--no-validation"])
    assert code == 1, log  # non-zero at the end because a run failed
    records = _records(out)
    assert records[("lv", "always_fails", 2)]["status"] == "failed"
    assert "this method fails on purpose" in records[("lv", "always_fails", 2)]["error"]
    assert records[("lv", "residual_shift", 2)]["status"] == "ok"
    assert "1 failed" in log and "always_fails" in log
    assert "this method fails on purpose" in (out / "REPORT.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--methods", "nope"], "unknown method 'nope'"),
    (["--sizes", "10,9999"], "larger than the training pool"),
    (["--plugin", "no_such_module_xyz"], "could not be imported"),
    (["--task", "bogus"], "bogus"),
    (["--profile", "huge"], "unknown profile"),
    (["--sizes", "a,b"], "comma-separated integers"),
    (["--ddp", "2", "--jobs", "2"], "--ddp 2 trains one run at a time"),
    (["--ddp", "16"], "training.batch_size 8 cannot be split over 16 ranks"),
])
def test_bad_command_lines_are_clear_errors(tmp_path, args, message):
    code, log = main_in_process(["--out", tmp_path, *args])
    assert code == 2 and message in log, log


def test_task_table_shows_the_unconditioned_base_as_the_floor_and_leaves_out_sphere_runs():
    import pandas as pd

    from benchmark.report.labels import BASE_ROW, REFERENCE_ROW
    from benchmark.report.tables import task_table

    runs = [("vcm", 50, 0.31), ("vcm", 50, 0.29), ("brainldm", 0, 0.24), ("reference", 0, 0.9), ("vcm+sphere", 50, 0.1),
            ("controlnet", 50, None)]
    frame = pd.DataFrame([{"task": "lv", "method": m, "size": n, "seed": i, "status": "ok" if d is not None else "failed",
                           "error": None, "device": "cpu", "Dice": d} for i, (m, n, d) in enumerate(runs)])
    table = task_table(frame, "lv").set_index("method")
    assert set(table.index) == {"vcm", BASE_ROW, REFERENCE_ROW}
    assert table.loc[BASE_ROW, "Dice"] == "0.24" and table.loc["vcm", "Dice"].startswith("0.3 ±")
    assert table.loc["vcm", "seeds"] == 2


def test_an_interrupted_generation_resumes_from_its_kept_batches_with_the_same_volumes(tiny_cache, tmp_path):
    from benchmark.profiles import load_profile
    from benchmark.run.runner import generate
    from benchmark.run.spec import RunContext
    from datasets.tasks import get_task
    from methods.base import DirectMethod

    ctx = RunContext(load_profile("smoke", [*TINY, "sampling.n_test=3", "sampling.batch_size=1"]), tmp_path / "out",
                     tiny_cache, progress=False)
    test, task = ctx.test_subjects(), get_task("sr4")

    class Counting(DirectMethod):
        """Volumes from the condition; what an optimiser at test time keeps in generate_info; may stop."""
        name = "counting"

        def __init__(self, stop_at=None):
            super().__init__(None, task.modalities, {})
            self.calls, self.stop_at = 0, stop_at

        def generate(self, conditions, scalars, subjects, engine=None):
            self.calls += 1
            if self.calls == self.stop_at:
                raise KeyboardInterrupt  # a kill in the middle of the test set
            self.generate_info.setdefault("objective_last", []).append(float(self.calls))
            # a draw from the global generator, as a plugin's test-time optimiser might make
            return conditions.tensors["low_res"].clamp(0, 1) * 0.5 + 0.01 * torch.rand(1)

    torch.manual_seed(0)
    whole, _ = generate(Counting(), test, task, None, ctx)  # nothing kept
    keep = tmp_path / "out" / "runs" / "r" / "generated"
    first = Counting(stop_at=3)
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        generate(first, test, task, None, ctx, keep_in=keep)
    assert sorted(p.name for p in keep.iterdir()) == ["own-00000.npz", "own-00001.npz"]
    again = Counting()
    torch.manual_seed(0)
    resumed, seconds = generate(again, test, task, None, ctx, keep_in=keep)
    assert again.calls == 1 and np.array_equal(resumed, whole) and seconds > 0
    assert again.generate_info == {"objective_last": [1.0, 2.0, 1.0]}  # the kept batches' info, then its own
    # another subject's conditions (the swapped null) are never read from the own-condition batches
    swapped = Counting()
    generate(swapped, test, task, None, ctx, condition_subjects=test[::-1], keep_in=keep)
    assert swapped.calls == 3
