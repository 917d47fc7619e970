"""Late binding: how a lower layer calls a part of a higher one without importing it.

``FedAvgJob.simulator_run`` (job) runs the simulator, which sits above job and imports it.
Job asks here for the part by name; the top package (``fedlift/__init__``, above every
layer) provides, once, a loader that imports the part when it is first asked for. So the
source has no import against the layers, importing job does not import the simulator, and
nothing below the top package knows where the simulator lives.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import ConfigError

__all__ = ["load", "provide"]

Loader = Callable[[], Callable[..., Any]]

_loaders: dict[str, Loader] = {}


def provide(part: str, loader: Loader) -> None:
    """Say how to get ``part``: ``loader()`` imports and returns it (it runs on each
    :func:`load`, so it should only import; Python keeps the module). A second call for the
    same part replaces the first."""
    _loaders[part] = loader


def load(part: str) -> Callable[..., Any]:
    """The part ``provide`` was told about; ConfigError when nobody provided it."""
    loader = _loaders.get(part)
    if loader is None:
        known = ", ".join(sorted(_loaders)) or "none"
        raise ConfigError(
            f"no {part!r} was provided, so it cannot be called: the fedlift package provides "
            "its parts when it is imported (fedlift/__init__.py), so this fedlift install is "
            f"incomplete; reinstall it. Received: part={part!r} (provided: {known})."
        )
    return loader()
