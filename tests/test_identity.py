"""A results folder knows what made its records: a record made otherwise than the command would make
it now (another profile, an edited plugin, other settings) is stale and is not redone silently; a
folder mixing profiles or base models is refused by ``tables``; records made before identities
existed are still read."""
import json
import shutil
import sys

import pytest

from benchmark.run.identity import method_code_sha256, record_identity, stale_fields
from tests.test_runner import main_in_process, tiny_flags

PLUGIN = '''
import torch
import torch.nn.functional as F
from torch import nn

from methods.base import Method
from methods.registry import register


@register("identity_shift", tasks=("lv",))
class IdentityShift(Method):
    """A frozen-model residual whose file the tests edit."""

    def __init__(self, base, condition_channels, config):
        super().__init__(base, condition_channels, config)
        latent = base.latent_shape[0]
        self.net = nn.Conv3d(sum(condition_channels.values()) + latent, latent, 3, padding=1)

    def predict_noise(self, z_t, t, conditions, scalars):
        with torch.no_grad():
            eps = self.base.unet(z_t, t, scalars)
        condition = F.avg_pool3d(conditions.stacked(), self.base.compression)
        return eps + self.net(torch.cat([condition, eps], dim=1))
'''
METHOD_RUN = "lv__identity_shift__n2__s0"


@pytest.fixture(scope="module")
def grid(tiny_cache, tmp_path_factory):
    """A finished tiny grid (the four context rows and the plugin at N = 2) and its plugin file."""
    where = tmp_path_factory.mktemp("identity")
    plugin = where / "identity_plugin.py"
    plugin.write_text(PLUGIN)
    out = where / "grid"
    code, log = main_in_process(["run", *tiny_flags(tiny_cache, out), "--plugin", plugin, "--methods",
                                 "identity_shift", "--sizes", "2", "--no-validation"])
    assert code == 0, log
    return out, plugin, tiny_cache


def _copy(grid, tmp_path):
    out, plugin, cache = grid
    (tmp_path / "grid").mkdir()
    shutil.copytree(out / "records", tmp_path / "grid" / "records")
    copied = tmp_path / "identity_plugin.py"
    shutil.copy(plugin, copied)
    return tmp_path / "grid", copied, cache


def _edit(plugin, text):
    """Edit the plugin file and make this process import it anew, as a new process would (and hash it anew)."""
    from benchmark.run import identity
    from methods import registry

    plugin.write_text(text)
    registry._REGISTRY.pop("identity_shift", None)
    sys.modules.pop(plugin.stem, None)
    identity._code_sha256.cache_clear()


def _mtimes(out):
    return {p.name: p.stat().st_mtime_ns for p in (out / "records").glob("*.json")}


def test_a_record_carries_the_identity_of_what_made_it(grid):
    out, _, _ = grid
    record = json.loads((out / "records" / f"{METHOD_RUN}.json").read_text())
    identity = record["identity"]
    assert identity["profile"] == "smoke" and identity["config_hash"] == record["config_hash"]
    assert identity["base_model_sha256"] == record["base_model"]["sha256"] and len(identity["base_model_sha256"]) == 64
    assert identity["method_code_sha256"] == method_code_sha256("identity_shift")
    assert identity["suite_version"] and identity["data"] == record["data"]
    reference = json.loads((out / "records" / "lv__reference__n0__s0.json").read_text())
    assert reference["identity"]["base_model_sha256"] is None  # real volumes do not depend on the base model
    assert reference["identity"]["method_code_sha256"] is None


def test_an_edited_plugin_is_stale_and_is_redone_only_when_asked(grid, tmp_path):
    out, plugin, cache = _copy(grid, tmp_path)
    flags = [*tiny_flags(cache, out), "--plugin", plugin]
    code, log = main_in_process(["status", *flags])
    assert code == 0 and "5 runs: 5 done, 0 stale" in log, log

    _edit(plugin, PLUGIN.replace("3, padding=1", "3, padding=1, bias=False"))
    code, log = main_in_process(["status", *flags])
    line = next(x for x in log.splitlines() if x.startswith(METHOD_RUN))
    assert "stale" in line and "method code" in line and "4 done, 1 stale" in log, log

    before = _mtimes(out)
    grid_args = ["--methods", "identity_shift", "--sizes", "2", "--no-validation"]
    code, log = main_in_process(["run", *flags, *grid_args])
    assert code == 2 and "Traceback" not in log, log
    assert f"1 finished record(s) that this command would make otherwise (stale): {METHOD_RUN} (method code" in log
    assert "--redo-stale" in log and _mtimes(out) == before and not (out / "grid.json").exists()

    code, log = main_in_process(["run", *flags, *grid_args, "--redo-stale"])
    assert code == 0, log
    after = _mtimes(out)
    assert after[f"{METHOD_RUN}.json"] != before[f"{METHOD_RUN}.json"]
    assert {k: v for k, v in after.items() if k != f"{METHOD_RUN}.json"} == {
        k: v for k, v in before.items() if k != f"{METHOD_RUN}.json"}, "only the stale run was redone"


def test_a_stale_run_starts_afresh_instead_of_resuming_weights_trained_otherwise(grid, tmp_path):
    out, plugin, cache = grid
    shutil.copytree(out, tmp_path / "grid")  # records and run folders: the finished run's checkpoint is there
    out = tmp_path / "grid"
    copied = tmp_path / "identity_plugin.py"
    shutil.copy(plugin, copied)
    run_dir = out / "runs" / METHOD_RUN
    made_by = json.loads((out / "records" / f"{METHOD_RUN}.json").read_text())["identity"]
    assert json.loads((run_dir / "identity.json").read_text())["method_code_sha256"] == made_by["method_code_sha256"]
    old_checkpoint = (run_dir / "checkpoint.pt").read_bytes()
    flags = [*tiny_flags(cache, out), "--plugin", copied, "--methods", "identity_shift", "--sizes", "2", "--no-validation"]
    # the same parameters, another forward: the old checkpoint would load and be taken as finished
    _edit(copied, PLUGIN.replace("return eps + self.net(", "return eps + 0.5 * self.net("))
    code, log = main_in_process(["run", *flags, "--redo-stale"])
    assert code == 0, log
    record = json.loads((out / "records" / f"{METHOD_RUN}.json").read_text())
    assert record["status"] == "ok" and record["training"]["resumed_from"] == 0, record.get("training")
    assert f"{METHOD_RUN}: its folder held a run made otherwise (method code" in log, log
    aside = list((run_dir / "stale").iterdir())
    assert len(aside) == 1 and (aside[0] / "checkpoint.pt").read_bytes() == old_checkpoint
    assert json.loads((run_dir / "identity.json").read_text())["method_code_sha256"] == record["identity"]["method_code_sha256"]
    # the same settings again: an interrupted or forced rerun resumes from that folder, nothing is moved
    code, log = main_in_process(["run", *flags, "--force"])
    assert code == 0 and "made otherwise" not in log and len(list((run_dir / "stale").iterdir())) == 1, log


def test_another_profile_finds_the_folder_stale_and_names_what_differs(grid, tmp_path):
    out, plugin, cache = _copy(grid, tmp_path)
    code, log = main_in_process(["status", "--profile", "cpu", "--cache-dir", cache, "--out", out, "--plugin", plugin])
    assert code == 0 and "0 done, 5 stale" in log, log
    assert all("profile smoke → cpu" in x for x in log.splitlines() if " stale " in x)
    before = _mtimes(out)
    code, log = main_in_process(["run", "--profile", "cpu", "--quiet", "--cache-dir", cache, "--out", out,
                                 "--methods", "vcm", "--sizes", "2", "--no-validation"])
    assert code == 2 and "(stale)" in log and "profile smoke → cpu" in log and _mtimes(out) == before, log


def test_tables_refuse_a_folder_that_mixes_profiles(grid, tmp_path):
    out, plugin, cache = _copy(grid, tmp_path)
    path = out / "records" / f"{METHOD_RUN}.json"
    record = json.loads(path.read_text())
    record["identity"]["profile"] = "cpu"
    path.write_text(json.dumps(record))
    code, log = main_in_process(["tables", "--profile", "smoke", "--quiet", "--cache-dir", cache, "--out", out])
    assert code == 2 and "were made with 2 profiles (cpu, smoke)" in log and "--allow-mixed" in log, log
    assert not (out / "REPORT.md").exists()
    # a run into it would mix them too: refused before any work
    code, log = main_in_process(["run", *tiny_flags(cache, out), "--methods", "vcm", "--sizes", "2", "--no-validation"])
    assert code == 2 and "2 profiles" in log and not (out / "grid.json").exists(), log

    code, log = main_in_process(["tables", "--profile", "smoke", "--quiet", "--cache-dir", cache, "--out", out,
                                 "--allow-mixed"])
    assert code == 0, log
    assert "Profiles `cpu`, `smoke` (what the records say" in (out / "REPORT.md").read_text()


def test_the_report_names_the_profile_the_records_were_made_with(grid, tmp_path):
    out, _, cache = _copy(grid, tmp_path)
    records = sorted((out / "records").glob("*.json"))
    for path in records:  # 1.25 h each, so that the report's sum is not a rounded 0.0
        path.write_text(json.dumps({**json.loads(path.read_text()), "elapsed_seconds": 4500.0}))
    code, log = main_in_process(["tables", "--profile", "cpu", "--quiet", "--cache-dir", cache, "--out", out])
    assert code == 0, log
    report = (out / "REPORT.md").read_text()
    assert "Profile `smoke` (what the records say; the tables were rebuilt with `--profile cpu`)" in report
    assert f"failed, {1.25 * len(records):.1f} run-hours (the sum of each record's `elapsed_seconds`" in report
    threads = int(json.loads(records[0].read_text())["device"].rsplit("(", 1)[1].split()[0])  # "CPU ... (2 threads)"
    assert f"on CPU {1.25 * len(records) * threads:.1f} thread-hours (each run's hours times its threads). Devices: CPU " in report


def test_records_made_before_identities_are_read_by_the_fields_they_have(grid, tmp_path):
    out, plugin, cache = _copy(grid, tmp_path)
    for path in (out / "records").glob("*.json"):
        record = json.loads(path.read_text())
        del record["identity"]
        path.write_text(json.dumps(record))
    flags = [*tiny_flags(cache, out), "--plugin", plugin]
    code, log = main_in_process(["status", *flags])
    assert code == 0 and "5 done, 0 stale" in log, log
    # the old record has no method code to compare: an edited plugin does not make it stale ...
    _edit(plugin, PLUGIN + "\n# edited\n")
    assert "5 done, 0 stale" in main_in_process(["status", *flags])[1]
    # ... but a setting that enters the config hash does
    code, log = main_in_process(["status", *flags, "--override", "sampling.ddim_steps=3"])
    assert code == 0 and "0 done, 5 stale" in log and "settings (profile, data" in log, log


def test_stale_fields_compare_only_what_both_sides_know():
    now = {"profile": "cpu", "config_hash": "a", "base_model_sha256": None, "method_code_sha256": "m1",
           "suite_version": "0.1.0"}
    assert stale_fields({"identity": dict(now)}, now) == []
    assert stale_fields({"identity": {**now, "method_code_sha256": "m2"}}, now) == ["method code m2… → m1…"]
    assert stale_fields({"identity": {**now, "base_model_sha256": "b"}}, now) == []  # unknown now: not compared
    legacy = {"profile": "smoke", "config_hash": "a", "base_model": {"sha256": "b"}}
    assert record_identity(legacy) == {"profile": "smoke", "config_hash": "a", "base_model_sha256": "b"}
    assert stale_fields(legacy, now) == ["profile smoke → cpu"]
