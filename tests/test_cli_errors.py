"""Environment and command-line errors stop in one line before any work (issue 31, items 3 and 4): a device
this machine lacks, an output or cache folder it cannot write, Ctrl-C, more test subjects or a larger
training set than the data has. Each exit-code test runs run_benchmark.py as the user would."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

from benchmark.cli import INTERRUPTED
from tests.paths import ROOT
from tests.test_runner import main_in_process, tiny_flags


def _cli(*args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run_benchmark.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def _one_line_error(result: subprocess.CompletedProcess, *words: str) -> str:
    """The one stderr line of a user error (exit status 2, no traceback), checked to hold ``words``."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _grid(out, cache, *args):
    return ["--profile", "smoke", "--methods", "vcm", "--sizes", "10", "--out", out, "--cache-dir", cache, *args]


# ---- the device -------------------------------------------------------------------------------


@pytest.mark.parametrize("device, words", [
    ("tpu", ["--device tpu", "not a device"]),
    ("cuda", ["--device cuda", "no CUDA device"]),
    ("cuda:99", ["--device cuda:99"]),
])
def test_a_device_this_machine_lacks_stops_before_anything_is_written(tmp_path, device, words):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "out"
    _one_line_error(_cli(*_grid(out, tmp_path / "cache", "--device", device)), *words)
    assert not out.exists() and not (tmp_path / "cache").exists()  # no grid.json, no grid.lock


def test_debug_shows_the_traceback(tmp_path):
    from benchmark.cli import SetupError, main

    with pytest.raises(SetupError, match="--device tpu"):
        main([str(a) for a in _grid(tmp_path / "out", tmp_path / "cache", "--device", "tpu", "--debug")])


# ---- the output and cache folders --------------------------------------------------------------


def test_an_out_that_cannot_be_written_stops_before_anything_is_written(tmp_path):
    if os.geteuid() == 0:  # root writes into a read-only folder: take a folder that cannot be created instead
        (tmp_path / "a_file").write_text("")
        out, words = tmp_path / "a_file" / "results", ["cannot be created", "a_file is a file"]
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        out, words = locked / "results", ["not writable", "read-only"]
    _one_line_error(_cli(*_grid(out, tmp_path / "cache")), "--out", *words)
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_an_out_that_is_a_file_stops_before_anything_is_written(tmp_path):
    out = tmp_path / "results"
    out.write_text("not a folder")
    _one_line_error(_cli(*_grid(out, tmp_path / "cache")), "--out", "is a file")
    assert out.read_text() == "not a folder" and not (tmp_path / "cache").exists()


def test_a_read_only_results_folder_stops_tables_in_one_line(tmp_path, monkeypatch):
    """os.access is what the check asks (root passes a chmod, so the read-only folder is simulated)."""
    out = tmp_path / "results"
    (out / "records").mkdir(parents=True)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(out) else real_access(path, mode))
    code, log = main_in_process(["tables", "--profile", "smoke", "--out", out, "--cache-dir", tmp_path / "cache"])
    assert code == 2 and log.strip().splitlines() == [f"error: --out {out} is not writable ({out} is read-only "
                                                      "for this user); give a folder you can write to"], log
    assert sorted(p.name for p in out.iterdir()) == ["records"]


def test_a_cache_dir_that_is_a_file_stops_every_command_but_compare(tmp_path):
    cache = tmp_path / "cache"
    cache.write_text("")
    code, log = main_in_process(["status", "--profile", "smoke", "--out", tmp_path, "--cache-dir", cache])
    assert code == 2 and f"--cache-dir {cache} is a file" in log, log
    (tmp_path / "a" / "records").mkdir(parents=True)
    code, log = main_in_process(["compare", tmp_path / "a", tmp_path / "a", "--cache-dir", cache, "--quiet"])
    assert code == 0 and "0 differences" in log, log  # compare takes the common flags and uses no cache


# ---- Ctrl-C -----------------------------------------------------------------------------------


def _ctrl_c_as_in_a_terminal():
    # A shell without job control starts background commands with SIGINT ignored, and children inherit it
    # (so do `make test &` and CI runners started that way): the grid would then never see the Ctrl-C.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_is_one_line_and_exit_130_and_a_rerun_resumes(tiny_cache, tmp_path):
    out = tmp_path / "grid"
    proc = subprocess.Popen([sys.executable, str(ROOT / "run_benchmark.py"), *map(str, tiny_flags(tiny_cache, out)),
                             "--methods", "vcm", "--sizes", "2", "--no-validation"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            preexec_fn=_ctrl_c_as_in_a_terminal)
    # interrupted right after the method run's first checkpoint: mid-training, whatever the machine's speed
    first_checkpoint = out / "runs" / "lv__vcm__n2__s0" / "checkpoint.pt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not first_checkpoint.is_file():
        time.sleep(0.02)
    assert proc.poll() is None, f"the grid ended before it could be interrupted:\n{proc.communicate()}"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    # one line says so (a cold cache's "base model: ready" line may come before it), no traceback
    assert stderr.strip().splitlines()[-1] == INTERRUPTED and "Traceback" not in stdout + stderr, stderr
    code, log = main_in_process(["status", "--profile", "smoke", "--out", out, "--cache-dir", tiny_cache])
    assert code == 0 and "interrupted" in log and "rerun to resume" in log, log
    # the same command again resumes and finishes the grid
    code, log = main_in_process(["run", *tiny_flags(tiny_cache, out), "--methods", "vcm", "--sizes", "2",
                                 "--no-validation"])
    assert code == 0 and (out / "records" / "lv__vcm__n2__s0.json").is_file(), log


def test_ctrl_c_anywhere_in_a_command_is_caught_by_main(tmp_path, monkeypatch):
    import benchmark.report.compare

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(benchmark.report.compare, "compare_folders", interrupted)
    (tmp_path / "records").mkdir()
    assert main_in_process(["compare", tmp_path, tmp_path]) == (130, INTERRUPTED + "\n")


# ---- what the grid asks of the data ------------------------------------------------------------


def test_more_test_subjects_than_the_test_set_is_an_error_before_any_run(tmp_path):
    out = tmp_path / "out"
    code, log = main_in_process(_grid(out, tmp_path / "cache", "--override", "sampling.n_test=1000", "--quiet"))
    assert code == 2 and "sampling.n_test is 1000, but the test set has 104 subjects" in log, log
    assert "sampling.n_test=104" in log and not out.exists()


def _manifest(folder, cache, rows: int):
    """A manifest of the first ``rows`` of 7 exported synthetic training subjects (exported once per folder)."""
    export = folder / "export"
    if not export.is_dir():
        code, log = main_in_process(["data", "export", "--profile", "smoke", "--quiet", "--cache-dir", cache,
                                     "--out", export, "--n", "7", "--split", "train"])
        assert code == 0, log
    with open(export / "manifest.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    path = export / f"manifest_{rows}.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table[:rows])
    return path


def test_a_manifest_smaller_than_the_sizes_says_to_list_more_subjects(tiny_cache, tmp_path):
    out = tmp_path / "out"
    code, log = main_in_process(_grid(out, tiny_cache, "--data", _manifest(tmp_path, tiny_cache, 7), "--quiet"))
    assert code == 2 and "training-set size 10 is larger than the training pool of 6 subjects" in log, log
    assert "list more subjects in the manifest" in log and "data.train_pool" not in log
    assert not out.exists()


@pytest.mark.parametrize("rows, overrides, needed", [
    (3, [], 5),  # a fifth of the rows are for testing: 1 test and 4 training subjects
    (1, ["data.train_pool=1", "data.test_set=1"], 2),  # the profile's own split needs only 2
])
def test_a_manifest_too_small_to_split_names_the_real_minimum(tiny_cache, tmp_path, rows, overrides, needed):
    from benchmark.profiles import load_profile
    from benchmark.run.data_source import manifest_splits
    from datasets.subject import DataError

    manifest = _manifest(tmp_path, tiny_cache, rows)
    with pytest.raises(DataError, match=f"lists {rows} subjects; at least {needed} are needed"):
        manifest_splits(manifest, [None] * rows, load_profile("smoke", overrides).data)
    more = _manifest(tmp_path, tiny_cache, needed)  # and that many are enough
    assert manifest_splits(more, [None] * needed, load_profile("smoke", overrides).data)[0].test


# ---- smaller items ------------------------------------------------------------------------------


def test_quiet_silences_the_missing_weights_warnings_that_the_records_state(tmp_path, monkeypatch):
    import benchmark.report.compare

    def compare_with_warning(*args, **kwargs):
        warnings.warn("Pretrained radimagenet weights not found (looked for ...)", UserWarning)
        return [], []

    monkeypatch.setattr(benchmark.report.compare, "compare_folders", compare_with_warning)
    (tmp_path / "records").mkdir()
    for flags, expected in (([], 1), (["--quiet"], 0)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main_in_process(["compare", tmp_path, tmp_path, *flags])[0] == 0
        assert len([w for w in caught if "weights not found" in str(w.message)]) == expected, flags


def test_no_table6_file_without_sphere_validation_records(tmp_path):
    from benchmark.report.tables import build_tables

    def record(method, size):
        name = f"lv__{method.replace('+', '_')}__n{size}__s0.json"
        (tmp_path / "records" / name).write_text(json.dumps(
            {"task": "lv", "method": method, "size": size, "seed": 0, "status": "ok", "metrics": {"Dice": 0.5}}))

    (tmp_path / "records").mkdir()
    record("brainldm", 0)
    record("vcm", 50)
    assert "table6_validation" not in build_tables(tmp_path)
    assert not list((tmp_path / "tables").glob("table6*"))
    record("vcm+sphere", 50)
    assert "table6_validation" in build_tables(tmp_path)
    assert (tmp_path / "tables" / "table6_validation.csv").is_file()


def test_data_export_help_names_the_data_flag():
    code, log = main_in_process(["data", "export", "--help"])
    assert code == 0 and "--data" in log and "--manifest" not in log, log
