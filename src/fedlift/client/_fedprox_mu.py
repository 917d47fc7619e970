"""FedProx's ``mu`` as a script reads it, for every framework's helpers (no framework here).

The server's FedProx strategy sends ``mu`` with every task, in the task config
(``flare.get_config()["fedprox_mu"]``); the Keras and PyTorch helpers both read it here,
so that reading it needs neither framework.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..model import AlgorithmConstants
from ._api import get_config

__all__ = ["fedprox_mu", "get_fedprox_mu"]


def _check_mu(mu: Any, what: str) -> float:
    if isinstance(mu, bool) or not isinstance(mu, int | float | np.number):
        raise ConfigError(
            f"{what} is FedProx's mu and must be a number >= 0. Received: mu={mu!r:.60} "
            f"({type(mu).__name__})."
        )
    value = float(mu)
    if not math.isfinite(value) or value < 0:
        raise ConfigError(
            f"{what} is FedProx's mu and must be a finite number >= 0 (0 is FedAvg). "
            f"Received: mu={mu!r}."
        )
    return value


def fedprox_mu(default: float = 0.0) -> float:
    """FedProx's ``mu`` for the current task: ``get_config()["fedprox_mu"]``, which the
    server's FedProx strategy sends with every task; ``default`` when the task has none
    (e.g. a FedAvg server, where 0 makes the helpers plain local training)."""
    raw = get_config().get(AlgorithmConstants.FEDPROX_MU, default)
    return _check_mu(raw, f"the task config's {AlgorithmConstants.FEDPROX_MU!r}")


get_fedprox_mu = fedprox_mu
"""NVFlare's name of :func:`fedprox_mu`."""
