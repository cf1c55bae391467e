"""Methods register themselves by name; the runner looks them up here.

    @register("my_method")                      # every task that takes its family (datasets.tasks)
    class MyMethod(Method): ...

    @register("my_lv_method", tasks=("lv",))    # only the tasks named

A user's own module is imported with ``load_plugin("my_module")`` (``--plugin my_module``).
"""
from __future__ import annotations

import dataclasses
import importlib
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

from methods.base import BaseMethod, MethodError, build_settings

_REGISTRY: dict[str, type[BaseMethod]] = {}


def register(name: str, tasks: tuple[str, ...] | None = None) -> Callable[[type[BaseMethod]], type[BaseMethod]]:
    """Register a method class. It supports every task that takes its ``family``; ``tasks`` (names)
    narrows that to the tasks named."""
    def decorate(cls: type[BaseMethod]) -> type[BaseMethod]:
        if not (isinstance(cls, type) and issubclass(cls, BaseMethod)):
            raise MethodError(f"@register('{name}') must decorate a subclass of methods.base.Method "
                              "(or methods.base.DirectMethod)")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise MethodError(f"a method named '{name}' is already registered ({_REGISTRY[name].__module__})")
        if isinstance(tasks, str):
            raise MethodError(f"@register('{name}', tasks=...) takes a tuple of task names, got the string '{tasks}'")
        if not dataclasses.is_dataclass(cls.Settings) or "settings" in vars(cls):  # or the old dict form
            raise MethodError(f"method '{name}' must declare its settings as a dataclass in the class attribute "
                              "Settings (README, Adding a method)")
        cls.name = name
        cls.tasks = None if tasks is None else tuple(tasks)
        _REGISTRY[name] = cls
        return cls

    return decorate


def _load_builtins() -> None:
    import methods.builtin  # noqa: F401  (imports every built-in method module)


def known_methods() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def declared_settings(name: str) -> dict:
    """The settings of registered method ``name`` that have a default in its ``Settings``, with that
    default; empty when none has (a built-in's live in the profile) or no method has that name."""
    _load_builtins()
    cls = _REGISTRY.get(name)
    fields = dataclasses.fields(cls.Settings) if cls is not None else ()
    defaults = {f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory() for f in fields}
    return {key: value for key, value in defaults.items() if value is not dataclasses.MISSING}


def method_settings(name: str, section: Mapping[str, Any]) -> Any:
    """Method ``name``'s ``Settings`` built from its profile section ``section`` (``methods.<name>``);
    a MethodError names an unknown, missing or mistyped key."""
    return build_settings(get_method(name).Settings, section, name)


def _task(task):
    from datasets.tasks import get_task  # methods know tasks by their properties, looked up here

    return get_task(task)


def supported_tasks(name: str) -> list[str]:
    """The registered tasks method ``name`` supports."""
    from datasets.tasks import TASKS

    cls = get_method(name)
    return [t.name for t in TASKS.values() if cls.supports(t)]


def get_method(name: str, task=None) -> type[BaseMethod]:
    """The class of method ``name``; with ``task`` (a Task or its name), checked to support it."""
    _load_builtins()
    if name not in _REGISTRY:
        raise MethodError(f"unknown method '{name}'; known methods: {', '.join(sorted(_REGISTRY))}")
    cls = _REGISTRY[name]
    if task is not None:
        task = _task(task)
        if not cls.supports(task):
            raise MethodError(
                f"method '{name}' does not support task '{task.name}'; it supports: "
                f"{', '.join(supported_tasks(name)) or 'no registered task'}"
            )
    return cls


def resolve_methods(spec: str, task) -> list[str]:
    """'all' or a comma-separated list -> method names, checked against the task (a Task or its name)."""
    _load_builtins()
    task = _task(task)
    if spec.strip() == "all":
        return [n for n in sorted(_REGISTRY) if _REGISTRY[n].supports(task)]
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise MethodError("no method named; give 'all' or a comma-separated list such as 'vcm,controlnet'")
    for n in names:
        get_method(n, task)
    return names


def load_plugin(module: str) -> None:
    """Import a user's module (dotted name or path to a .py file) so its methods register."""
    try:
        if module.endswith(".py"):
            path = Path(module).resolve()
            if not path.is_file():
                raise FileNotFoundError(f"no such file: {path}")
            sys.path.insert(0, str(path.parent))
            importlib.import_module(path.stem)
        else:
            importlib.import_module(module)
    except Exception as err:  # report any import failure as the plugin's fault, with its cause
        raise MethodError(
            f"plugin '{module}' could not be imported ({type(err).__name__}: {err}); "
            "check the module name and that it is on PYTHONPATH"
        ) from err
