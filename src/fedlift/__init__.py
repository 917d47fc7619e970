"""fedlift: federated learning for existing training scripts.

* ``import fedlift.client as flare`` in the training script (the Client API),
* :class:`FedAvgJob` + :class:`ScriptRunner` in the job script,
* ``fedlift simulator`` (or ``job.run(SimEnv())``, ``PocEnv()``, ``ProdEnv(kit=...)``) to run it.

The job and simulator names here load on first use (PEP 562): a training script's
``import fedlift.client`` runs this file too, and must not pay for the server, the
simulator or their dependencies. This package sits above every layer: it is also where
the job API is given the simulator (:mod:`fedlift._late`).
"""

from __future__ import annotations

__version__ = "0.1.0"

import os as _os

# fedlift launches processes (workers, external scripts) while gRPC threads run. gRPC's fork
# handlers then touch its event engine in the child between fork and exec and can abort it
# ("epoll_wait error: Bad file descriptor"); fedlift always execs, so it needs no fork
# support. This must be set before grpc is first imported.
_os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import importlib as _importlib
from collections.abc import Callable as _Callable
from typing import TYPE_CHECKING, Any

from . import _late
from .errors import FedliftError
from .model import FLModel, MetaKey, ParamsType

if TYPE_CHECKING:
    from .codec import Compression
    from .deploy import PocEnv, ProdEnv
    from .job import FedAvgJob, FedJob, FrameworkType, ScriptRunner
    from .simulator import SimEnv, SimulationResult, run_simulator

__all__ = [
    "Compression",
    "FLModel",
    "FedAvgJob",
    "FedJob",
    "FedliftError",
    "FrameworkType",
    "MetaKey",
    "ParamsType",
    "PocEnv",
    "ProdEnv",
    "ScriptRunner",
    "SimEnv",
    "SimulationResult",
    "__version__",
    "run_simulator",
]

_LAZY = {
    "Compression": "codec",
    "FedAvgJob": "job",
    "FedJob": "job",
    "FrameworkType": "job",
    "ScriptRunner": "job",
    "SimEnv": "simulator",
    "PocEnv": "deploy",
    "ProdEnv": "deploy",
    "SimulationResult": "simulator",
    "run_simulator": "simulator",
}
"""Top-level names loaded on first use, and the subpackage each comes from."""

_SUBPACKAGES = frozenset(
    {"client", "codec", "deploy", "job", "model", "server", "simulator", "transport"}
)
"""``fedlift.simulator`` and the like still work after a bare ``import fedlift``."""


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(_importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name in _SUBPACKAGES:
        return _importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


def _load_run_simulator() -> _Callable[..., Any]:
    from .simulator import run_simulator

    return run_simulator


_late.provide("run_simulator", _load_run_simulator)
