"""Lazy exports (PEP 562): a package names what it exports and where, and imports each module on first access."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, table: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package`: `table` maps a public name to the module defining it, absolute
    (`"stompp_hf.nn"`) or relative to the package (`"policy"`). A resolved name is cached in the package."""

    def __getattr__(name: str) -> Any:
        target = table.get(name)
        if target is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = target if target.startswith("stompp_hf") else f"{package}.{target}"
        value = getattr(importlib.import_module(module), name)
        setattr(importlib.import_module(package), name, value)  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(importlib.import_module(package)), *table})

    return __getattr__, __dir__
