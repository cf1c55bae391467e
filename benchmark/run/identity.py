"""What made a record, and whether the same command would make it the same way now.

Every record carries an ``identity``: the suite's version, the profile's name, the config hash (the
profile's settings, the data, the run, the code version and the settings the recipe chose for the
method), the base model's sha256, the sha256 of the method's code and the recipe file's sha256.
A finished record whose identity differs from the one this command would write is **stale**: it is not
done, and it is redone only with ``--force`` (or into a new ``--out``). Records made before identities
existed are read too: only the fields they have are compared (profile, config hash, data, base model,
the recipe's choice)."""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import sys
from functools import lru_cache
from importlib import metadata
from pathlib import Path

# The fields a staleness check compares, and how a difference is named. The recipe file's sha256 is
# kept for provenance but not compared: retuning another method in the same recipe file leaves this
# run as it was (what the recipe chose for this method is in the config hash).
COMPARED = {
    "profile": "profile",
    "suite_version": "suite version",
    "config_hash": "settings (profile, data, code version or the recipe's choice)",
    "data": "data",
    "base_model_sha256": "base model",
    "method_code_sha256": "method code",
}
_SHOWN_WHOLE = ("profile", "suite_version", "data")  # short enough to print both values


def suite_version() -> str:
    try:
        return metadata.version("spatial-control-bench")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "uninstalled"


def _imported_method_modules(path: Path) -> list[str]:
    """The ``methods.*`` modules a source file imports (``methods.registry`` left out: it only names
    methods, and every method imports it)."""
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError):
        return []
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return [n for n in names if n.startswith("methods.") and n != "methods.registry"]


def code_files(module_name: str) -> list[Path]:
    """The source file of ``module_name`` (a built-in method's module or a plugin's file) and, transitively,
    those of the suite's ``methods.*`` modules it imports (shared blocks, the method base classes)."""
    start = getattr(sys.modules.get(module_name), "__file__", None)
    if start is None:
        spec = importlib.util.find_spec(module_name)
        start = spec.origin if spec is not None else None
    if start is None:
        return []
    seen: dict[str, Path] = {module_name: Path(start)}
    todo = [Path(start)]
    while todo:
        for name in _imported_method_modules(todo.pop()):
            if name in seen:
                continue
            spec = importlib.util.find_spec(name)
            if spec is not None and spec.origin:
                seen[name] = Path(spec.origin)
                todo.append(seen[name])
    return [seen[k] for k in sorted(seen)]


def method_code_sha256(method: str) -> str | None:
    """The sha256 over the code of registered method ``method`` (:func:`code_files`); None for the
    reference rows and for a method that is not registered in this process (a plugin not loaded)."""
    from methods.base import MethodError
    from methods.registry import get_method

    try:
        cls = get_method(method)
    except MethodError:
        return None
    return _code_sha256(cls.__module__)


@lru_cache(maxsize=None)
def _code_sha256(module_name: str) -> str | None:
    # Hashed once per process, near when the module was imported: the code that runs, even if the
    # file is edited while a long grid goes on.
    files = code_files(module_name)
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def uses_base_model(spec) -> bool:
    """Whether the run's numbers depend on the base model (the reference rows' do not)."""
    from benchmark.run.spec import RunKind
    from methods.base import MethodError
    from methods.registry import get_method

    if spec.kind in (RunKind.BASE_UNCONDITIONED, RunKind.AUTOENCODER):
        return True
    if spec.kind in (RunKind.REFERENCE, RunKind.REFERENCE_OTHER):
        return False
    try:
        return bool(get_method(spec.trained().method).uses_base_model)
    except MethodError:  # a plugin not loaded in this process: assume it does
        return True


def run_identity(spec, ctx) -> dict:
    """The identity a record of ``spec`` made now, in ``ctx``, carries."""
    recipe = ctx.recipe(spec) or {}
    return {
        "suite_version": suite_version(),
        "profile": ctx.profile.name,
        "config_hash": ctx.config_hash(spec),
        "data": ctx.data.identity,
        "base_model_sha256": ctx.expected_base_sha256 if uses_base_model(spec) else None,
        "method_code_sha256": method_code_sha256(spec.trained().method),
        "recipe_sha256": recipe.get("sha256"),
    }


def record_identity(record: dict) -> dict:
    """The identity a record says it has; for a record made before identities existed, the fields it
    has that say the same (absent fields are not compared)."""
    if isinstance(record.get("identity"), dict):
        return record["identity"]
    legacy = {"profile": record.get("profile"), "config_hash": record.get("config_hash"), "data": record.get("data"),
              "base_model_sha256": (record.get("base_model") or {}).get("sha256")}
    return {k: v for k, v in legacy.items() if v is not None}


def stale_fields(record: dict, now: dict) -> list[str]:
    """What differs between ``record``'s identity and ``now`` (one phrase per field; empty: not stale).
    A field missing on either side, or unknown now (a base model not yet pretrained), is not compared."""
    theirs = record_identity(record)
    out = []
    for key, label in COMPARED.items():
        old, new = theirs.get(key), now.get(key)
        if old is None or new is None or old == new:
            continue
        if key == "config_hash":  # a hash of many settings: its values say nothing to a reader
            out.append(label)
        else:
            out.append(f"{label} {old} → {new}" if key in _SHOWN_WHOLE else f"{label} {str(old)[:12]}… → {str(new)[:12]}…")
    return out


def folder_makers(records) -> dict[str, set[str]]:
    """Which profiles and base models (sha256) a folder's records were made with."""
    profiles, bases = set(), set()
    for record in records:
        identity = record_identity(record)
        if identity.get("profile"):
            profiles.add(str(identity["profile"]))
        if identity.get("base_model_sha256"):
            bases.add(str(identity["base_model_sha256"]))
    return {"profiles": profiles, "base models": bases}


def mixed_folder_error(folder: Path, records, flag: str = "--allow-mixed") -> str | None:
    """One sentence when ``folder``'s records were made with more than one profile or base model; else None."""
    makers = folder_makers(records)
    mixed = [f"{len(v)} {what} ({', '.join(sorted(s[:12] if what == 'base models' else s for s in v))})"
             for what, v in makers.items() if len(v) > 1]
    if not mixed:
        return None
    return (f"the records in {folder} were made with {' and '.join(mixed)}; their numbers do not belong in one table: "
            f"give each configuration its own --out (or pass {flag} to tabulate them together anyway)")


def staleness_in(ctx):
    """``record -> what differs`` against what ``ctx`` would make now (for ``status``)."""
    from benchmark.engine.recipes import RecipeError
    from benchmark.run.spec import RunSpec

    def differs(record: dict) -> list[str]:
        try:
            spec = RunSpec.of(str(record["task"]), str(record["method"]), int(record["size"]), int(record["seed"]))
            return stale_fields(record, run_identity(spec, ctx))
        except (KeyError, ValueError, TypeError, RecipeError):  # a record naming no run this suite can place
            return []

    return differs
