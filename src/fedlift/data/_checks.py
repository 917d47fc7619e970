"""Argument checks shared by the partitioners and the summaries.

Every bad argument is a :class:`~fedlift.errors.ConfigError` that names the argument, says
what was expected and ends with ``Received: name=value``, so that a wrong experiment setup
fails at once with a line that says what to change, not deep inside numpy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from ..errors import ConfigError

__all__ = [
    "MAX_RETRIES",
    "check_alpha",
    "check_labels",
    "check_min_size",
    "check_n_clients",
    "check_parts",
    "check_seed",
    "as_int",
    "labels_or_count",
    "short",
]

MAX_RETRIES = 1000
"""How often a draw that leaves a client below ``min_size`` is redrawn before giving up."""


def short(value: object, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: a label array must not flood a message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def as_int(value: object) -> int | None:
    """``value`` as an int when it is an integer (Python or numpy; a bool is not), else None."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        return None
    return int(value)


def check_n_clients(n_clients: object) -> int:
    n = as_int(n_clients)
    if n is None or n < 1:
        raise ConfigError(
            "n_clients must be an integer >= 1 (the number of parts to make); pass e.g. "
            f"n_clients=10. Received: n_clients={short(n_clients)}"
        )
    return n


def check_seed(seed: object) -> int:
    """The seed for ``np.random.default_rng``: an integer >= 0, so a run can be repeated."""
    value = as_int(seed)
    if value is None or value < 0:
        raise ConfigError(
            "seed must be an integer >= 0 (the same seed gives the same partition); pass "
            f"e.g. seed=0. Received: seed={short(seed)}"
        )
    return value


def check_alpha(alpha: object) -> float:
    value = math.nan
    if not isinstance(alpha, bool) and isinstance(alpha, int | float | np.integer | np.floating):
        value = float(alpha)
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(
            "alpha must be a finite number > 0 (the Dirichlet concentration: small is "
            f"skewed, large is near uniform); pass e.g. alpha=0.5. Received: alpha={short(alpha)}"
        )
    return value


def check_min_size(min_size: object) -> int:
    value = as_int(min_size)
    if value is None or value < 0:
        raise ConfigError(
            "min_size must be an integer >= 0 (the fewest samples a client may get; 0 allows "
            f"empty clients). Received: min_size={short(min_size)}"
        )
    return value


def check_labels(labels: object) -> npt.NDArray[np.int64]:
    """``labels`` as a 1-D int64 array: one integer class label per sample."""
    array = np.asarray(labels)
    if array.ndim != 1 or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
        raise ConfigError(
            "labels must be a 1-D array of integer class labels, one per sample (for one-hot "
            "labels pass labels.argmax(axis=1); for float labels labels.astype(int)). "
            f"Received: labels with shape {array.shape} and dtype {array.dtype}"
        )
    if array.size == 0:
        raise ConfigError(
            "labels is empty: there are no samples to partition. Received: labels of length 0"
        )
    return array.astype(np.int64, copy=False)


def labels_or_count(labels_or_n: object) -> int:
    """The number of samples: ``labels_or_n`` itself (an integer) or the length of labels."""
    n = as_int(labels_or_n)
    if n is not None:
        if n < 1:
            raise ConfigError(
                "labels_or_n must be the number of samples (>= 1) or a label array. "
                f"Received: labels_or_n={n}"
            )
        return n
    array = np.asarray(labels_or_n)
    if array.ndim != 1 or array.size == 0:
        raise ConfigError(
            "labels_or_n must be the number of samples (an integer >= 1) or a non-empty 1-D "
            f"label array. Received: labels_or_n={short(labels_or_n)}"
        )
    return int(array.size)


def check_parts(parts: Sequence[npt.ArrayLike], n_samples: int) -> list[npt.NDArray[np.int64]]:
    """``parts`` as int64 index arrays, each index in ``[0, n_samples)``, no index twice."""
    if isinstance(parts, np.ndarray | str | bytes) or not isinstance(parts, Sequence):
        raise ConfigError(
            "parts must be a list of index arrays, one per client (what a partitioner "
            f"returns). Received: parts of type {type(parts).__name__}"
        )
    out: list[npt.NDArray[np.int64]] = []
    seen = np.zeros(n_samples, dtype=bool)
    for i, part in enumerate(parts):
        array = np.asarray(part)
        if array.ndim != 1 or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
            raise ConfigError(
                f"parts[{i}] must be a 1-D array of integer sample indices. "
                f"Received: parts[{i}] with shape {array.shape} and dtype {array.dtype}"
            )
        index = array.astype(np.int64, copy=False)
        if index.size and (index.min() < 0 or index.max() >= n_samples):
            raise ConfigError(
                f"parts[{i}] holds an index outside the labels (expected 0 <= index < "
                f"{n_samples}, the number of labels); were the parts made for other labels? "
                f"Received: parts[{i}] with indices from {index.min()} to {index.max()}"
            )
        repeated = index[seen[index]]
        if repeated.size == 0:
            values, counts = np.unique(index, return_counts=True)
            repeated = values[counts > 1]
        if repeated.size:
            raise ConfigError(
                f"parts[{i}] holds a sample that is in a part already: parts must be "
                f"disjoint. Received: index {int(repeated[0])} twice (the second in parts[{i}])"
            )
        seen[index] = True
        out.append(index)
    return out
