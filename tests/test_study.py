"""A study of record (``python run_benchmark.py study``): a small study at smoke runs what is missing,
estimates before it starts, and a second call runs nothing and rebuilds the same tables; bad study
files stop with a sentence."""
import json
import shutil

import pytest
import yaml

from benchmark.cli import main
from benchmark.run.grid import GridError
from benchmark.run.study import load_study
from tests.test_runner import TINY


def _study(tmp_path, **changes):
    data = {"profile": "smoke", "out": str(tmp_path / "study"),
            "overrides": TINY + ["probe.enabled=false", "training.recipe=profile"],
            # no judged task: no judge to train, so the machinery is tested in the least time
            "grid": [{"task": "sr4", "methods": ["controlnet_mlp", "trilinear"], "sizes": [2], "seeds": [0]},
                     {"task": "sr8", "methods": "trilinear", "sizes": [2], "seeds": [0]}]}
    data.update(changes)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _tables(out):
    return {p.name: p.read_bytes() for p in sorted((out / "tables").glob("*.csv"))}


def test_a_study_runs_what_is_missing_then_nothing_and_rebuilds_the_same_tables(tmp_path, capsys, tiny_cache):
    path = _study(tmp_path, bench={"task": "sr4", "size": 2, "steps": 1})
    common = ["--quiet", "--cache-dir", str(tiny_cache)]
    assert main(["study", str(path), "--dry-run", *common]) == 0
    printed = capsys.readouterr().out
    assert "0 done, 5 to run" in printed and "estimated" in printed and "sr4 controlnet_mlp:" in printed
    assert "not in the estimate: 2 runs of methods that fit themselves (sr4 trilinear x1, sr8 trilinear x1)" in printed
    assert "would run python run_benchmark.py bench --profile smoke --task sr4 --size 2 --steps 1" in printed
    assert not (tmp_path / "study" / "records").exists()  # a dry run runs nothing

    assert main(["study", str(path), "--no-estimate", *common]) == 0
    out = tmp_path / "study"
    records = {p.name: p.stat().st_mtime_ns for p in (out / "records").glob("*.json")}
    assert "sr4__controlnet_mlp__n2__s0.json" in records and "sr8__trilinear__n2__s0.json" in records
    first = _tables(out)
    assert "table_sr.csv" in first and (out / "REPORT.md").is_file()
    # the bench entry: every method's step timed in one process, beside the records' medians in Table 5
    bench = out / "bench" / "methods-smoke-sr4-2.json"
    assert bench.is_file() and "s/step (one bench run)" in first["table5_cost.csv"].decode()
    assert "One bench run timed every method's training step" in (out / "REPORT.md").read_text()
    capsys.readouterr()

    montages = sorted(p.name for p in (out / "figures").glob("montage_*.png"))
    assert montages and all(f"(figures/{name})" in (out / "REPORT.md").read_text() for name in montages)

    for p in (out / "tables").glob("*"):  # a clone: the records and figures, no tables, no runs/
        p.unlink()
    shutil.rmtree(out / "runs")
    (out / "plateau").mkdir()  # what `plateau --out <study>/plateau` leaves: the report links its figure
    (out / "plateau" / "plateau-lv.png").write_bytes(b"")
    assert main(["study", str(path), *common]) == 0
    printed = capsys.readouterr().out
    assert "5 done, 0 to run" in printed and "timing every method" not in printed  # the bench is not rerun
    timed = json.loads(bench.read_text())  # an interrupted bench leaves a part: that one is rerun
    bench.write_text(json.dumps({**timed, "methods": timed["methods"][:1]}))
    assert main(["study", str(path), "--dry-run", *common]) == 0
    assert "would run python run_benchmark.py bench" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (out / "records").glob("*.json")} == records  # nothing rerun
    assert _tables(out) == first
    # the montages drawn before stay, and the report still links them
    assert sorted(p.name for p in (out / "figures").glob("montage_*.png")) == montages
    assert all(f"(figures/{name})" in (out / "REPORT.md").read_text() for name in montages)
    assert "(plateau/plateau-lv.png)" in (out / "REPORT.md").read_text()
    assert "Planned, not yet recorded" not in (out / "REPORT.md").read_text()  # every planned run has its record

    # a planned run without a record (a study still running) is named in the report, not left out silently
    from benchmark.profiles import load_profile
    from benchmark.report.write import write_outputs

    plan = json.loads((out / "grid.json").read_text())
    plan["sr8__controlnet_mlp__n2__s1"] = {"kind": "method", "method": "controlnet_mlp", "seed": 1, "size": 2, "task": "sr8"}
    (out / "grid.json").write_text(json.dumps(plan))
    report = write_outputs(out, load_profile("smoke")).read_text()
    assert "**Not finished: 1 of the runs" in report and "| sr8 | controlnet_mlp | 2 | 1 |" in report


def test_a_study_waits_for_the_tuned_recipes_of_its_judged_tasks(tmp_path, capsys):
    # smoke uses tuned recipes and has none committed: lv waits, and so does every grid after it
    path = _study(tmp_path, overrides=TINY, grid=[{"task": "lv", "methods": ["controlnet_mlp"], "sizes": [2], "seeds": [0]},
                                                  {"task": "sr4", "methods": "trilinear", "sizes": [2], "seeds": [0]}])
    assert main(["study", str(path), "--dry-run", "--no-estimate", "--cache-dir", str(tmp_path / "c")]) == 1
    printed = capsys.readouterr().out
    assert "waiting for a tuned recipe: lv (controlnet_mlp); sr4 (after the grid above)" in printed
    assert "tune --profile smoke --task lv --methods controlnet_mlp" in printed and "0 runs ready" in printed


@pytest.mark.parametrize("change, message", [
    ({"grid": []}, "non-empty list"),
    ({"grid": [{"task": "lv", "methods": "vcm", "sizes": [10]}]}, "exactly the keys"),
    ({"grid": [{"task": "lv", "methods": "vcm", "sizes": ["ten"], "seeds": [0]}]}, "whole numbers"),
    ({"colour": "blue"}, "unknown key"),
    ({"bench": {"task": "lv", "size": 50}}, "exactly the keys"),
    ({"bench": {"task": "lv", "size": 50, "steps": 0}}, "at least 1"),
])
def test_bad_study_files_stop_with_a_sentence(tmp_path, change, message):
    with pytest.raises(GridError, match=message):
        load_study(_study(tmp_path, **change))


def test_a_missing_study_file_and_an_unknown_method_are_clear_errors(tmp_path, capsys):
    assert main(["study", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    path = _study(tmp_path, grid=[{"task": "lv", "methods": "no_such_method", "sizes": [2], "seeds": [0]}])
    assert main(["study", str(path), "--dry-run", "--no-estimate", "--cache-dir", str(tmp_path / "c")]) == 2
    assert "no_such_method" in capsys.readouterr().err


def test_jobs_runs_the_study_in_a_pool_of_processes_and_a_bad_count_stops_first(tmp_path, capsys, monkeypatch):
    from benchmark.run import executors

    path = _study(tmp_path)
    common = ["--no-estimate", "--quiet", "--cache-dir", str(tmp_path / "c")]
    assert main(["study", str(path), "--jobs", "0", *common]) == 2
    assert "--jobs must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "study" / "records").exists()

    class Handed(Exception):
        pass

    def run_grid(specs, ctx, executor, **kwargs):
        raise Handed(executor)

    monkeypatch.setattr(executors, "run_grid", run_grid)
    with pytest.raises(Handed) as handed:
        main(["study", str(path), "--jobs", "2", *common])
    pool = handed.value.args[0]
    assert isinstance(pool, executors.LocalPoolExecutor) and pool.jobs == 2


def test_the_cpu_study_names_the_grids_of_record():
    study = load_study("studies/cpu.yaml")
    assert study.profile == "cpu" and [b.task for b in study.blocks] == ["lv", "sr4", "sr8", "multimodal", "sr8mm", "sr8", "sr8mm"]
    lv = study.blocks[0]
    assert lv.methods == "all" and lv.sizes == (10, 50, 500) and lv.seeds == (0, 1, 2)


def test_the_committed_cpu_study_tables_rebuild_exactly_from_its_committed_records(tmp_path):
    """studies/cpu/ is committed as records and the tables made from them; rebuilding from the records
    alone must give the same tables, byte for byte."""
    from benchmark.report.tables import build_tables
    from tests.paths import ROOT

    study = ROOT / "studies" / "cpu"
    committed = {p.name: p.read_bytes() for p in sorted((study / "tables").glob("*.csv"))}
    if not committed:
        pytest.skip("the cpu study has no tables yet (studies/cpu/tables/)")
    assert list((study / "records").glob("*.json")), "tables are committed without the records they come from"
    build_tables(study, tmp_path)
    assert {p.name: p.read_bytes() for p in sorted(tmp_path.glob("*.csv"))} == committed


def test_the_committed_cpu_study_stays_under_20_mb():
    """The study commits its records, tables, figures and REPORT (not runs/): at most 20 MB (issue 34)."""
    import subprocess

    from tests.paths import ROOT

    listed = subprocess.run(["git", "ls-files", "-z", "studies/cpu"], cwd=ROOT, capture_output=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: which files are committed is unknown")
    files = [ROOT / name for name in listed.stdout.decode().split("\0") if name]
    size = sum(path.stat().st_size for path in files if path.is_file())
    assert not any("/runs/" in str(path.relative_to(ROOT)) for path in files), "checkpoints and volumes are not committed"
    assert size < 20e6, f"studies/cpu/ commits {size / 1e6:.1f} MB, over the 20 MB the study may take"


def test_a_method_that_fits_itself_is_estimated_from_what_the_folder_holds(tmp_path):
    """InverseSR has no training step for the estimate to time, and its runs are the study's longest: the
    estimate reads its finished records, else the batches an unfinished run has kept (the fastest, since
    a batch's seconds count any time its process waited beside other work)."""
    from benchmark.cli.study import folder_timing
    from core.files import atomic_json, atomic_npz

    assert folder_timing(tmp_path, "inversesr", 8) is None
    kept = tmp_path / "runs" / "sr4__inversesr__n50__s0" / "generated"
    for name, seconds in (("own-00000.npz", 3600.0), ("own-00008.npz", 1700.0)):
        atomic_npz(kept / name, seconds=seconds)
    assert folder_timing(tmp_path, "inversesr", 8) == (8 * 1700.0, "8 sampling batches at 1700 s, the fastest "
                                                                    "of its 2 kept batches in this folder")
    assert folder_timing(tmp_path, "liif3d", 8) is None  # another method's batches are not its own
    for seed, elapsed in ((0, 10000.0), (1, 14000.0), (2, 12000.0)):
        atomic_json(tmp_path / "records" / f"sr4__inversesr__n50__s{seed}.json",
                    {"method": "inversesr", "status": "ok", "elapsed_seconds": elapsed})
    atomic_json(tmp_path / "records" / "sr4__inversesr__n50__s3.json", {"method": "inversesr", "status": "failed"})
    assert folder_timing(tmp_path, "inversesr", 8) == (12000.0, "median of its 3 finished records in this folder")
