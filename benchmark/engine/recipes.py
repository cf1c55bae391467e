"""Tuned recipes: what ``python run_benchmark.py tune`` chose for each method, per profile and task.

A recipe file (``benchmark/recipes/<profile>/<task>.yaml``) holds each method's chosen settings with
the evidence behind them (every trial's validation scores, the search space, the seeds, the commit,
the command and the tuning cost). A run uses it when the profile says ``training.recipe: tuned`` and
the file exists; the run's record keeps the file's sha256, which is part of the run's config hash.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import yaml

RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes"
TUNABLE = ("training.lr",)  # the settings a recipe may choose (the profile's tuning search space)


class RecipeError(ValueError):
    """A recipe file the suite cannot use."""


def recipe_path(profile_name: str, task: str, root: Path | None = None) -> Path:
    return Path(root or RECIPE_DIR) / profile_name / f"{task}.yaml"


@dataclass(frozen=True)
class Recipe:
    path: Path
    sha256: str
    data: dict

    def chosen(self, method: str) -> dict:
        """The settings chosen for ``method`` (dotted keys), or {} when it was not tuned or no trial qualified."""
        entry = (self.data.get("methods") or {}).get(method) or {}
        chosen = dict(entry.get("chosen") or {})
        unknown = sorted(set(chosen) - set(TUNABLE))
        if unknown:
            raise RecipeError(f"recipe {self.path}: method '{method}' chooses {', '.join(unknown)}, which a recipe "
                              f"cannot set (only {', '.join(TUNABLE)}); regenerate it with run_benchmark.py tune")
        return chosen

    def describe(self, method: str) -> dict:
        return {"path": str(self.path.relative_to(RECIPE_DIR.parent.parent)) if self.path.is_relative_to(
            RECIPE_DIR.parent.parent) else str(self.path), "sha256": self.sha256, "chosen": self.chosen(method)}


def load_recipe(profile, task: str, root: Path | None = None) -> Recipe | None:
    """The tuned recipe of ``profile`` and ``task`` when the profile uses tuned recipes and one exists."""
    if profile.training.get("recipe", "profile") != "tuned":
        return None
    path = recipe_path(profile.name, task, root)
    if not path.is_file():
        return None
    raw = path.read_bytes()
    try:
        data = yaml.safe_load(raw) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {path} is not valid YAML ({err}); restore it from git or rerun tune") from None
    if data.get("profile") != profile.name or data.get("task") != task:
        raise RecipeError(f"recipe {path} was made for profile {data.get('profile')!r}, task {data.get('task')!r}, "
                          f"not {profile.name!r}, {task!r}; move it or rerun tune")
    return Recipe(path, hashlib.sha256(raw).hexdigest(), data)


def tuning_hours(profile_name: str, task: str, method: str, root: Path | None = None) -> float | None:
    """Wall-clock hours the committed recipe spent tuning ``method`` on ``task`` (None: not tuned)."""
    path = recipe_path(profile_name, task, root)
    if not path.is_file():
        return None
    entry = ((yaml.safe_load(path.read_text()) or {}).get("methods") or {}).get(method) or {}
    seconds = entry.get("trial_seconds")
    return None if seconds is None else float(seconds) / 3600
