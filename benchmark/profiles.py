"""Named profiles: every size the suite uses (image shape, pools, widths, steps, samples) lives here.

A profile is a YAML file in ``benchmark/profiles/``. ``load_profile("smoke", ["training.steps=20"])``
returns a read-only :class:`Profile`; overrides use dotted keys and YAML values.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

PROFILE_DIR = Path(__file__).parent / "profiles"


class ProfileError(ValueError):
    """A profile name or override the suite cannot use."""


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


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
    declared = _declared_settings(parts)
    if declared:  # a registered method's own settings: its section may be missing (a plugin's), its keys are these
        if parts[2] not in declared:
            raise ProfileError(f"override '{override}': method '{parts[1]}' has no setting '{parts[2]}'; "
                               f"it takes: {', '.join(sorted(declared))}")
        data.setdefault("methods", {}).setdefault(parts[1], {})
    node = data
    for depth, part in enumerate(parts[:-1]):
        if not isinstance(node.get(part), dict):
            where = ".".join(parts[: depth + 1])
            raise ProfileError(f"override '{override}': '{where}' is not a section of the profile")
        node = node[part]
    leaf = parts[-1]
    if leaf not in node and leaf not in declared:
        raise ProfileError(
            f"override '{override}': no setting '{key}' in the profile; known here: {', '.join(sorted(node))}"
        )
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ProfileError(f"override '{override}': value '{raw}' is not valid YAML ({err})") from None
    old = node[leaf] if leaf in node else declared[leaf]
    if isinstance(old, dict):
        raise ProfileError(f"override '{override}': '{key}' is a section; override one of its settings instead")
    if isinstance(old, (int, float)) and not isinstance(old, bool) and isinstance(value, str):
        try:  # YAML reads '1e-3' as a string; a numeric setting takes it as a number
            value = float(value)
        except ValueError:
            raise ProfileError(f"override '{override}': '{key}' expects a number, got '{raw}'") from None
    node[leaf] = value


def _declared_settings(parts: list[str]) -> dict:
    """For an override of ``methods.<name>.<key>``, the settings registered method ``<name>`` declares
    (``methods.base.BaseMethod.settings``, with their defaults); empty for any other key."""
    if len(parts) != 3 or parts[0] != "methods":
        return {}
    from methods.registry import declared_settings

    return declared_settings(parts[1])


RECIPES = ("tuned", "profile", "paper")
# training.recipe: paper -- the paper's protocol (VCM B.2) for every method alike, whatever the profile says.
PAPER_RECIPE = {
    "training": {"lr": 5.0e-5, "lr_by_method": {}, "budget": "epochs", "epochs": 10000},
    "methods": {name: {"l1_weight": 1.0, "head_norm": "instance"} for name in ("vcm", "mcm", "mcm_l")},
}


def _apply_paper_recipe(data: dict) -> None:
    for section, values in PAPER_RECIPE.items():
        for key, value in values.items():
            target = data.setdefault(section, {})
            if isinstance(value, dict) and section == "methods":
                target.setdefault(key, {}).update(value)
            else:
                target[key] = copy.deepcopy(value)


def load_profile(name: str, overrides: Iterable[str] = ()) -> Profile:
    path = PROFILE_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ProfileError(f"unknown profile '{name}'; choose one of: {', '.join(available_profiles())}")
    with open(path) as fh:
        data = yaml.safe_load(fh)
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
    return Profile(data)
