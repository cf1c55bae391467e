"""Imports every module in ``methods/`` so that each built-in method registers itself.

Adding a method is one file: drop ``methods/<name>.py`` with a registered class in it.
Modules starting with an underscore hold shared building blocks and register nothing.
"""
import pkgutil
from importlib import import_module
from pathlib import Path

_NOT_METHODS = {"base", "registry", "builtin"}

for _info in pkgutil.iter_modules([str(Path(__file__).parent)]):
    if _info.name not in _NOT_METHODS and not _info.name.startswith("_"):
        import_module(f"methods.{_info.name}")
