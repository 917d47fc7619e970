"""Names a package exports but imports only on first use (its heavier parts).

``fedlift.model`` keeps Keras and safetensors out of ``import fedlift.client``;
``fedlift.deploy`` keeps certificate code (cryptography) out of the CLI's start. Each says
which module every such name comes from, and takes the two module hooks made here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, modules: Mapping[str, str], namespace: dict[str, Any], exported: Iterable[str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A module ``__getattr__`` that imports ``package + "." + modules[name]`` for a name on
    first use (then keeps it in ``namespace``, the package's globals), and its ``__dir__``."""
    names = sorted({*exported})

    def getattr_(name: str) -> Any:
        module = modules.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        namespace[name] = value  # later lookups skip this function
        return value

    def dir_() -> list[str]:
        return sorted({*namespace, *names})

    return getattr_, dir_
