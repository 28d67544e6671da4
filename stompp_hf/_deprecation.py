"""Old import paths (`stompp_hf.layers`, `stompp_hf.xnor`, ...) that keep working for one release with a
`DeprecationWarning`: each old module is a small file that forwards attribute lookups to the new modules."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any

#: Old module name (under `stompp_hf.`) -> the modules that now define its names, searched in order.
OLD_MODULES: dict[str, tuple[str, ...]] = {
    "layers": (
        "stompp_hf.nn",
        "stompp_hf.nn.binarizer",
        "stompp_hf.nn.training",
        "stompp_hf.nn.packed",
        "stompp_hf.nn.recompute",
        "stompp_hf.core.dtensor",
        "stompp_hf.core.functional",
    ),
    "functional": ("stompp_hf.core.functional", "stompp_hf.core.surge"),
    "masks": ("stompp_hf.core.masks", "stompp_hf.core.packing"),
    "schedules": ("stompp_hf.core.schedules",),
    "xnor": ("stompp_hf.kernels.xnor",),
    "hf_quantizer": ("stompp_hf.integrations.transformers.quantizer",),
    "callback": ("stompp_hf.integrations.transformers.callback",),
    "hub": ("stompp_hf.integrations.transformers.hub",),
    "vision": ("stompp_hf.integrations.timm.io", "stompp_hf.integrations.timm.policy", "stompp_hf.integrations.timm"),
    "birealnet": ("stompp_hf.integrations.timm.birealnet",),
    "lora": ("stompp_hf.integrations.peft",),
}


def forward(old: str) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for the old module `old` (its `__name__`); warns once, when it is imported."""
    short = old.rsplit(".", 1)[-1]
    targets = OLD_MODULES[short]
    warnings.warn(
        f"`{old}` is deprecated and will be removed in the next release: import from `{targets[0]}` instead.",
        DeprecationWarning,
        stacklevel=3,
    )
    importlib.import_module(targets[0])  # side effects of the old import (e.g. registering timm models) still happen

    def __getattr__(name: str) -> Any:
        for target in targets:
            module = importlib.import_module(target)
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(f"module {old!r} has no attribute {name!r} (it moved to {', '.join(targets)})")

    def __dir__() -> list[str]:
        return sorted({n for t in targets for n in dir(importlib.import_module(t)) if not n.startswith("__")})

    return __getattr__, __dir__
