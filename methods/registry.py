"""Methods register themselves by name; the runner looks them up here.

    @register("my_method", tasks=("lv", "multimodal"))
    class MyMethod(Method): ...

A user's own module is imported with ``load_plugin("my_module")`` (``--plugin my_module``).
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Callable

from methods.base import Method

_REGISTRY: dict[str, type[Method]] = {}


class MethodError(ValueError):
    """An unknown method, a method asked for a task it does not support, or a broken plugin."""


def register(name: str, tasks: tuple[str, ...]) -> Callable[[type[Method]], type[Method]]:
    def decorate(cls: type[Method]) -> type[Method]:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise MethodError(f"@register('{name}') must decorate a subclass of methods.base.Method")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise MethodError(f"a method named '{name}' is already registered ({_REGISTRY[name].__module__})")
        cls.name = name
        cls.tasks = tuple(tasks)
        _REGISTRY[name] = cls
        return cls

    return decorate


def _load_builtins() -> None:
    import methods.builtin  # noqa: F401  (imports every built-in method module)


def known_methods() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def get_method(name: str, task: str | None = None) -> type[Method]:
    _load_builtins()
    if name not in _REGISTRY:
        raise MethodError(f"unknown method '{name}'; known methods: {', '.join(sorted(_REGISTRY))}")
    cls = _REGISTRY[name]
    if task is not None and task not in cls.tasks:
        raise MethodError(
            f"method '{name}' does not support task '{task}'; it supports: {', '.join(cls.tasks)}"
        )
    return cls


def resolve_methods(spec: str, task: str) -> list[str]:
    """'all' or a comma-separated list -> method names, checked against the task."""
    _load_builtins()
    if spec.strip() == "all":
        return [n for n in sorted(_REGISTRY) if task in _REGISTRY[n].tasks]
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
