"""Numbers and names that must live in one place (issue 29): a literal copy of one elsewhere in the
source fails here, so that the copies cannot drift apart again."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("benchmark", "metrics", "datasets", "core")

# Config dataclasses that may keep literal number defaults, and why.
LITERAL_DEFAULTS_ALLOWED = {
    "TrainResult": "what a training run measured, not a setting",
    "LoopSettings": "core's generic loop: its defaults are 'off' (no EMA, no clipping) or logging and timing only",
    "SlurmSettings": "where jobs run (partition, memory, time), not what they compute",
}


def sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def occurrences(pattern: str, allowed: set[str]) -> list[str]:
    found = []
    for path in sources(*PACKAGES):
        rel = str(path.relative_to(ROOT))
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(pattern, line) and rel not in allowed:
                found.append(f"{rel}:{n}: {line.strip()}")
    return found


def test_paper_protocol_is_written_once():
    # metrics.cost.PAPER_PROTOCOL; benchmark.profiles.paper_recipe takes its epochs from there
    found = occurrences(r"(?<![\d.])10_?000(?![\d.])", {"metrics/cost.py"})
    assert not found, "use metrics.cost.PAPER_PROTOCOL instead of:\n" + "\n".join(found)


def test_default_task_is_named_once():
    found = occurrences(r"""default=["']lv["']""", set())
    assert not found, "use datasets.tasks.DEFAULT_TASK instead of:\n" + "\n".join(found)


def test_config_dataclasses_have_no_literal_number_defaults():
    found = []
    for path in sources(*PACKAGES):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef) or node.name in LITERAL_DEFAULTS_ALLOWED:
                continue
            if not any("dataclass" in ast.unparse(d) for d in node.decorator_list):
                continue
            for field in node.body:
                value = field.value if isinstance(field, ast.AnnAssign) else None
                literals = [c for c in ast.walk(value) if isinstance(c, ast.Constant)] if value is not None else []
                if any(type(c.value) in (int, float) for c in literals):
                    found.append(f"{path.relative_to(ROOT)}:{field.lineno}: {node.name}.{ast.unparse(field.target)}")
    assert not found, ("a number that changes a result comes from the profile, or is a named module constant "
                       "(with why):\n" + "\n".join(found))


def test_no_dataclass_restates_a_profile_section():
    """A class holding a whole profile section takes its keys from the schema (``SpeedOptions(Speed)``)
    instead of listing them, with defaults of its own, a second time."""
    import dataclasses

    from benchmark import profile_schema

    sections = {frozenset(f.name for f in dataclasses.fields(cls)): name for name, cls in vars(profile_schema).items()
                if dataclasses.is_dataclass(cls) and cls.__module__ == profile_schema.__name__}
    found = []
    for path in sources(*PACKAGES):
        if path.name == "profile_schema.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any("dataclass" in ast.unparse(d) for d in node.decorator_list):
                names = frozenset(ast.unparse(f.target) for f in node.body if isinstance(f, ast.AnnAssign))
                if names in sections:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.name} (profile_schema.{sections[names]})")
    assert not found, "derive from the schema's section instead of restating its keys:\n" + "\n".join(found)


def test_report_names_pseudo_methods_by_their_constants():
    from benchmark.run.spec import AUTOENCODER, BASE_UNCONDITIONED, REFERENCE, REFERENCE_OTHER, SPHERE_SUFFIX

    names = {AUTOENCODER, BASE_UNCONDITIONED, REFERENCE, REFERENCE_OTHER}
    found = []
    for path in sources("benchmark/report"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and (
                    node.value in names or node.value.endswith(SPHERE_SUFFIX)):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not found, "import the names from benchmark.run.spec:\n" + "\n".join(found)
