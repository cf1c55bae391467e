"""Record versions: old records are read, a record newer than the suite is refused with a clear error."""
from __future__ import annotations

import json

import pytest

from benchmark.run.records import RECORD_VERSION, RecordError, iter_records, read_record


def write(folder, name, record):
    (folder / "records").mkdir(exist_ok=True)
    path = folder / "records" / f"{name}.json"
    path.write_text(json.dumps(record))
    return path


def test_old_and_current_records_are_read(tmp_path):
    unversioned = write(tmp_path, "a", {"status": "ok"})  # the first records had no version field
    current = write(tmp_path, "b", {"status": "ok", "record_version": RECORD_VERSION})
    assert read_record(unversioned) == {"status": "ok"} and read_record(current)["record_version"] == RECORD_VERSION
    assert read_record(tmp_path / "missing.json") is None  # missing: the run is (re)done


def test_a_newer_record_is_refused_not_skipped(tmp_path):
    # skipping it would have the grid redo the run and overwrite the record, and the tables drop it silently
    path = write(tmp_path, "new", {"status": "ok", "record_version": RECORD_VERSION + 1})
    with pytest.raises(RecordError, match="newer than this suite reads"):
        read_record(path)
    with pytest.raises(RecordError, match="new.json"):
        list(iter_records(tmp_path))



def test_the_report_names_shipped_files_from_the_repository_root(tmp_path):
    # records made on two checkouts name the same shipped files by two absolute paths: the REPORT reads one line
    from benchmark.report.write import _base_models, _extractors

    for name, root in (("a", "/work/main"), ("b", "/tmp/ci.1234")):
        shipped = f"{root}/benchmark/shipped/cpu"
        write(tmp_path, name, {"status": "ok",
                               "base_model": {"source": "shipped base model", "path": f"{shipped}/base_model.pt",
                                              "sha256": "ab" * 32},
                               "protocol": {"FID-3D": {"extractor": {"name": "in-domain-3d", "pretrained": False,
                                                                     "source": f"{shipped}/metrics/x.pt"}}}})
    assert _base_models(tmp_path) == ["shipped base model: `benchmark/shipped/cpu/base_model.pt` (sha256 abababababababab…)"]
    assert _extractors(tmp_path) == ["FID-3D: extractor `in-domain-3d` (trained by the suite on real training volumes; "
                                     "weights benchmark/shipped/cpu/metrics/x.pt)"]
