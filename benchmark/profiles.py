"""Named profiles: every size the suite uses (image shape, pools, widths, steps, samples) lives here.

A profile is a YAML file in ``benchmark/profiles/`` that ``extends`` another (in the end ``base.yaml``,
which holds every default once) and lists only what differs: the child is deep-merged over its parent
(mappings key by key, anything else replaced; a null removes the parent's key). The resolved profile is
checked against the typed schema of :mod:`benchmark.profile_schema`. ``load_profile("smoke",
["training.steps=20"])`` returns a read-only :class:`Profile`; overrides use dotted keys and YAML values.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from benchmark import profile_schema as schema
from benchmark.profile_schema import ProfileError

PROFILE_DIR = Path(__file__).parent / "profiles"
BASE = "base"  # every default; the runnable profiles extend it, it does not run by itself


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml") if p.stem != BASE)


class Profile(Mapping):
    """Read-only nested mapping with attribute access (``profile.training.steps``)."""

    def __init__(self, data: Mapping[str, Any], path: str = ""):
        self._data = dict(data)
        self._path = path

    def __getitem__(self, key: str) -> Any:
        value = self._data[key]
        if isinstance(value, Mapping):
            return Profile(value, f"{self._path}{key}.")
        return copy.deepcopy(value)

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_"):
            raise AttributeError(key)
        try:
            return self[key]
        except KeyError:
            known = ", ".join(sorted(self._data))
            raise AttributeError(
                f"profile has no setting '{self._path}{key}'; settings here are: {known}"
            ) from None

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def to_dict(self) -> dict:
        return copy.deepcopy(self._data)

    def section_hash(self, *keys: str) -> str:
        """Short hash of the named top-level sections (all of them when none are named)."""
        chosen = {k: self._data[k] for k in (keys or sorted(self._data))}
        blob = json.dumps(chosen, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def __repr__(self) -> str:
        return f"Profile({self._data.get('name', self._path or '?')!r})"


def _apply_override(data: dict, override: str) -> None:
    if "=" not in override:
        raise ProfileError(f"override '{override}' is not of the form key.subkey=value (e.g. training.steps=20)")
    key, raw = override.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ProfileError(f"override '{override}' has an empty key")
    key = ".".join(parts)
    declared = _declared_settings(parts)
    if declared:  # a registered method's own settings: its section may be missing (a plugin's), its keys are these
        if parts[2] not in declared:
            raise ProfileError(f"override '{override}': method '{parts[1]}' has no setting '{parts[2]}'; "
                               f"it takes: {', '.join(sorted(declared))}")
        data.setdefault("methods", {}).setdefault(parts[1], {})
    node = data
    for depth, part in enumerate(parts[:-1]):
        if not isinstance(node.get(part), dict):
            where, prefix = ".".join(parts[: depth + 1]), "".join(f"{p}." for p in parts[:depth])
            sections = [k for k, v in node.items() if isinstance(v, dict)]
            raise ProfileError(f"override '{override}': '{where}' is not a section of the profile"
                               f"{schema.closest(part, sections, prefix, 'sections')}")
        node = node[part]
    leaf = parts[-1]
    known = set(node) | set(declared) | schema.keys_at(parts[:-1])  # with the optional keys the profile leaves out
    if leaf not in known:
        prefix = "".join(f"{p}." for p in parts[:-1])
        raise ProfileError(f"override '{override}': no setting '{key}' in the profile"
                           f"{schema.closest(leaf, known, prefix)}")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ProfileError(f"override '{override}': value '{raw}' is not valid YAML ({err})") from None
    old, hint = node.get(leaf, declared.get(leaf)), schema.field_type(parts)
    if isinstance(old, dict) or dataclasses.is_dataclass(hint):
        raise ProfileError(f"override '{override}': '{key}' is a section; override one of its settings instead")
    if hint is None and isinstance(old, (int, float)) and not isinstance(old, bool):
        hint = float  # a method's numeric setting (methods are not in the schema)
    value = _as_numbers(value, hint)
    if hint is not None and not schema.fits(value, hint):
        raise ProfileError(f"override '{override}': '{key}' expects {schema.type_name(hint)}, got '{raw}'")
    node[leaf] = value


def _as_numbers(value: Any, hint: Any) -> Any:
    """YAML reads '1e-3' as a string: a numeric setting takes it as a number."""
    try:
        if hint is float and isinstance(value, str):
            return float(value)
        if hint == list[float] and isinstance(value, list):
            return [float(v) if isinstance(v, str) else v for v in value]
    except ValueError:
        pass  # not a number: fits() refuses it with the expected type
    return value


def _declared_settings(parts: list[str]) -> dict:
    """For an override of ``methods.<name>.<key>``, the settings registered method ``<name>`` declares
    (``methods.base.BaseMethod.Settings``, with their defaults); empty for any other key."""
    if len(parts) != 3 or parts[0] != "methods":
        return {}
    from methods.registry import declared_settings

    return declared_settings(parts[1])


RECIPES = ("tuned", "profile", "paper")


def paper_recipe() -> dict:
    """``training.recipe: paper``: the paper's protocol (VCM B.2) for every method alike, whatever the
    profile says; its epochs are the paper's protocol's, which costs are projected to."""
    from metrics.cost import PAPER_PROTOCOL  # imports torch, which loading a profile does anyway

    return {"training": {"lr": 5.0e-5, "lr_by_method": {}, "budget": "epochs", "epochs": PAPER_PROTOCOL["epochs"]},
            "methods": {name: {"l1_weight": 1.0, "head_norm": "instance"} for name in ("vcm", "mcm", "mcm_l")}}


def _apply_paper_recipe(data: dict) -> None:
    for section, values in paper_recipe().items():
        for key, value in values.items():
            target = data.setdefault(section, {})
            if isinstance(value, dict) and section == "methods":
                target.setdefault(key, {}).update(value)
            else:
                target[key] = copy.deepcopy(value)


def _merge(parent: dict, child: Mapping) -> dict:
    """``child`` over ``parent``: mappings merged key by key, anything else replaced, null removes."""
    out = copy.deepcopy(parent)
    for key, value in child.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _resolve(name: str, chain: tuple[str, ...] = ()) -> dict:
    """Profile file ``name`` merged over the files it ``extends``, each file checked as it is read."""
    if name in chain:
        raise ProfileError(f"profile '{chain[0]}' extends itself ({' -> '.join(chain + (name,))}); "
                           f"remove one of these 'extends'")
    path = PROFILE_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ProfileError(f"profile '{chain[-1]}' extends '{name}', which is not a profile in {PROFILE_DIR}; "
                           f"fix its 'extends'")
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ProfileError(f"profile file {path} must be a mapping of keys to values, as base.yaml is")
    parent = data.pop("extends", None)
    if parent is not None and not isinstance(parent, str):
        raise ProfileError(f"profile file {path}: 'extends' must name one profile, got {parent!r}")
    schema.check(data, str(path), partial=True)
    return _merge(_resolve(parent, chain + (name,)) if parent else {}, data)


def load_profile(name: str, overrides: Iterable[str] = ()) -> Profile:
    if name == BASE:
        raise ProfileError(f"profile '{BASE}' holds the defaults the others extend and does not run by itself; "
                           f"choose one of: {', '.join(available_profiles())}")
    if not (PROFILE_DIR / f"{name}.yaml").is_file():
        raise ProfileError(f"unknown profile '{name}'; choose one of: {', '.join(available_profiles())}")
    data = _resolve(name)
    for override in overrides:
        _apply_override(data, override)
    data["name"] = name
    recipe = (data.get("training") or {}).get("recipe", "profile")
    if recipe not in RECIPES:
        raise ProfileError(f"profile '{name}': training.recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    if recipe == "paper":
        _apply_paper_recipe(data)
    shape = data.get("image_shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(s, int) and s > 0 for s in shape)):
        raise ProfileError(f"profile '{name}': image_shape must be three positive integers, got {shape!r}")
    schema.check(data, f"profile '{name}'")
    _check_method_sections(data, name)
    return Profile(data)


def _check_method_sections(data: dict, name: str) -> None:
    """Each registered method's section built into its typed settings (``methods.registry.method_settings``)
    now, so that a misspelt, missing or mistyped method setting stops before any run. A section for a
    method not registered in this process (a plugin not loaded) is left to the method."""
    from methods.base import MethodError
    from methods.registry import known_methods, method_settings

    known = set(known_methods())
    for method, section in (data.get("methods") or {}).items():
        if method in known:
            try:
                method_settings(method, section)
            except MethodError as err:
                raise ProfileError(f"profile '{name}': {err}") from None
