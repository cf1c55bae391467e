"""docs/ARCHITECTURE.md, "Where to make a common change": the rows that no other test does, each done here
and seen to take effect through the public entry point (the other rows name their tests there)."""
from __future__ import annotations

import sys
import types
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import yaml

from benchmark import cli, profiles
from benchmark.profiles import available_profiles, load_profile
from datasets.tasks import DEFAULT_TASK


class ThreadExecutor:
    """An executor as the table describes it: ``map(job, specs)`` yielding ``(spec, record)``; here the
    job runs on two threads."""

    def __init__(self):
        self.ran = []

    def map(self, job, specs):
        with ThreadPoolExecutor(2) as pool:
            for spec, record in zip(specs, pool.map(job, specs)):
                self.ran.append(spec.name)
                yield spec, record


def test_an_executor_is_a_class_with_map(tmp_path, monkeypatch):
    from benchmark.run import executors
    from benchmark.run.grid import build_specs
    from benchmark.run.spec import RunContext

    profile = load_profile("smoke")
    # one run is what execute_run does (other tests); here the job only says which profile it was given
    monkeypatch.setattr(executors, "run_and_record", lambda spec, ctx, force: {"status": "ok", "profile": ctx.profile.name})
    specs = build_specs(["lv"], "vcm", [2], [0], profile, validation=False)
    executor = ThreadExecutor()
    ctx = RunContext(profile, tmp_path / "out", tmp_path / "cache", device="cpu", progress=False)
    summary = executors.run_grid(specs, ctx, executor)
    assert summary.ok and sorted(summary.done) == sorted(executor.ran) == sorted(s.name for s in specs)


def test_a_command_is_a_module_with_register(tmp_path, monkeypatch, capsys):
    def register(sub, common):
        p = sub.add_parser("hello", parents=[common], help="print the training steps and the task")
        p.add_argument("--task", default=DEFAULT_TASK)
        p.set_defaults(func=lambda args: print(cli.load_profile_from(args).training.steps, args.task))

    monkeypatch.setitem(sys.modules, "benchmark.cli.hello", types.SimpleNamespace(register=register))
    monkeypatch.setattr(cli, "COMMANDS", (*cli.COMMANDS, "hello"))
    assert cli.main(["hello", "--profile", "smoke", "--override", "training.steps=7", "--cache-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.split() == ["7", DEFAULT_TASK]


def test_a_default_is_changed_in_its_one_place(tmp_path, monkeypatch):
    # a setting: base.yaml, and every profile that does not set it has the new value
    for name in ("base", *available_profiles()):
        (tmp_path / f"{name}.yaml").write_text((profiles.PROFILE_DIR / f"{name}.yaml").read_text())
    base = yaml.safe_load((tmp_path / "base.yaml").read_text())
    before = base["probe"]["subjects"]
    base["probe"]["subjects"] = before + 1
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    monkeypatch.setattr(profiles, "PROFILE_DIR", tmp_path)
    for name in available_profiles():
        own = (yaml.safe_load((tmp_path / f"{name}.yaml").read_text()).get("probe") or {}).get("subjects")
        assert load_profile(name).probe.subjects == (own if own is not None else before + 1), name
    # the task: every command's --task defaults to datasets.tasks.DEFAULT_TASK
    commands = next(a for a in cli.build_parser()._actions if a.dest == "command").choices
    defaults = {name: action.default for name, parser in commands.items()
                for action in parser._actions if action.dest == "task"}
    assert defaults and set(defaults.values()) == {DEFAULT_TASK}, defaults


def test_a_pseudo_methods_label_is_changed_in_labels_py(tmp_path, monkeypatch):
    from benchmark.report import labels
    from benchmark.report.tables import task_table, write_table
    from benchmark.run.spec import REFERENCE

    monkeypatch.setitem(labels.PSEUDO_METHODS, REFERENCE, "real volumes")
    frame = pd.DataFrame([{"task": "lv", "method": m, "size": n, "seed": 0, "status": "ok", "Dice": d}
                          for m, n, d in [(REFERENCE, 0, 0.9), ("vcm", 2, 0.4)]])
    write_table(task_table(frame, "lv"), tmp_path, "table_lv", "lv")
    assert "| real volumes " in (tmp_path / "table_lv.md").read_text()

