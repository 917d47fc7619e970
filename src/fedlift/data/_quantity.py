"""Partitions whose labels are IID: equal sizes (:func:`iid`) or skewed sizes
(:func:`quantity_skew`, NIID-Bench's quantity-based label-IID skew)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ..errors import ConfigError
from ._checks import (
    MAX_RETRIES,
    check_alpha,
    check_min_size,
    check_n_clients,
    check_seed,
    labels_or_count,
)

__all__ = ["iid", "quantity_skew"]


def iid(
    labels_or_n: npt.ArrayLike | int, n_clients: int, *, seed: int
) -> list[npt.NDArray[np.int64]]:
    """Shuffle the samples and deal them out in ``n_clients`` parts of near-equal size.

    ``labels_or_n`` is the label array or just the number of samples (labels play no part:
    every client sees the same label distribution in expectation). Sizes differ by at most
    one. Returns one sorted int64 index array per client; together they cover every sample.
    Every client needs a sample, so ``n_clients`` may not exceed the number of samples.
    """
    total = labels_or_count(labels_or_n)
    n = check_n_clients(n_clients)
    rng = np.random.default_rng(check_seed(seed))
    if n > total:
        raise ConfigError(
            f"iid cannot give each of {n} clients a sample: there are only {total} samples; "
            f"use fewer clients. Received: n_clients={n}, number of samples={total}"
        )
    order = rng.permutation(total).astype(np.int64, copy=False)
    return [np.sort(part) for part in np.array_split(order, n)]


def quantity_skew(
    labels_or_n: npt.ArrayLike | int,
    n_clients: int,
    *,
    alpha: float,
    seed: int,
    min_size: int = 10,
) -> list[npt.NDArray[np.int64]]:
    """IID labels, skewed sizes: client shares ``q ~ Dir(alpha)`` of the shuffled samples.

    NIID-Bench's quantity-based skew (Li et al. 2022): small ``alpha`` gives a few large
    clients and many small ones, large ``alpha`` near-equal sizes. A draw that leaves some
    client with fewer than ``min_size`` samples is redrawn (NIID-Bench does the same with
    10, checked there on the expected size; here on the actual one), at most
    :data:`MAX_RETRIES` times; then a :class:`~fedlift.errors.ConfigError` says to lower
    ``min_size`` or raise ``alpha``. Every sample is assigned.
    """
    total = labels_or_count(labels_or_n)
    n = check_n_clients(n_clients)
    concentration = check_alpha(alpha)
    rng = np.random.default_rng(check_seed(seed))
    least = check_min_size(min_size)
    if least * n > total:
        raise ConfigError(
            f"{n} clients of at least min_size={least} samples need {least * n} samples, "
            f"more than the {total} there are; lower min_size or use fewer clients. "
            f"Received: min_size={least}, n_clients={n}, number of samples={total}"
        )
    order = rng.permutation(total).astype(np.int64, copy=False)
    for _ in range(MAX_RETRIES):
        shares = rng.dirichlet(np.full(n, concentration))
        if not np.isfinite(shares).all():
            continue  # (older numpy: 0/0 for a tiny alpha) a failed draw, drawn again
        bounds = np.rint(np.cumsum(shares)[:-1] * total).astype(np.int64)  # (see dirichlet)
        sizes = np.diff(bounds, prepend=0, append=total)
        if sizes.min() >= least:
            return [np.sort(part) for part in np.split(order, bounds)]
    raise ConfigError(
        f"quantity_skew found no split in {MAX_RETRIES} draws that gives every client at "
        f"least min_size={least} samples: with alpha={concentration} and {n} clients some "
        "client is nearly always too small; lower min_size or raise alpha. "
        f"Received: min_size={least}, alpha={concentration}, n_clients={n}, "
        f"number of samples={total}"
    )
