"""Label-skewed partitions of NIID-Bench (Li et al. 2022, "Federated Learning on Non-IID
Data Silos"): distribution-based (:func:`dirichlet`) and quantity-based (:func:`pathological`,
"#C=k").

Classes are the distinct values of ``labels`` in sorted order (they need not be 0..K-1);
"class j" below is the j-th of them.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ..errors import ConfigError
from ._checks import (
    MAX_RETRIES,
    as_int,
    check_alpha,
    check_labels,
    check_min_size,
    check_n_clients,
    check_seed,
    short,
)

__all__ = ["dirichlet", "pathological"]


def _by_class(labels: npt.NDArray[np.int64]) -> list[npt.NDArray[np.int64]]:
    """The sample indices of each class, classes in sorted order."""
    _, codes = np.unique(labels, return_inverse=True)
    order = np.argsort(codes, kind="stable").astype(np.int64)
    counts = np.bincount(codes)
    return np.split(order, np.cumsum(counts)[:-1])


def _dirichlet_draw(
    classes: list[npt.NDArray[np.int64]],
    n: int,
    alpha: float,
    rng: np.random.Generator,
) -> list[list[npt.NDArray[np.int64]]] | None:
    """One draw: per class, shuffle its samples and cut them by ``p ~ Dir(alpha)``.

    NIID-Bench's balancing: a client that already holds at least N / n samples gets share 0
    of every later class, so that no client grows far past its fair size. Where that would
    zero every share (a tiny alpha can put all of the mass on full clients), the class is
    cut by the unbalanced draw. None for a draw that failed (non-finite shares).

    Cut points are rounded to the nearest sample, where NIID-Bench truncates: truncating
    ``0.99999... * size`` hands a last client whose share is 0 a sample, and so breaks the
    balancing rule through rounding error alone.
    """
    fair = sum(part.size for part in classes) / n
    pieces: list[list[npt.NDArray[np.int64]]] = [[] for _ in range(n)]
    sizes = np.zeros(n, dtype=np.int64)
    for members in classes:
        shuffled = rng.permutation(members)
        shares = rng.dirichlet(np.full(n, alpha))
        if not np.isfinite(shares).all():
            return None
        balanced = np.where(sizes < fair, shares, 0.0)
        if balanced.sum() > 0:
            shares = balanced / balanced.sum()
        bounds = np.rint(np.cumsum(shares)[:-1] * shuffled.size).astype(np.int64)
        for client, piece in enumerate(np.split(shuffled, bounds)):
            pieces[client].append(piece)
            sizes[client] += piece.size
    return pieces


def dirichlet(
    labels: npt.ArrayLike,
    n_clients: int,
    *,
    alpha: float,
    seed: int,
    min_size: int = 10,
) -> list[npt.NDArray[np.int64]]:
    """Label skew by class proportions ``p_k ~ Dir(alpha)`` over the clients, per class k.

    NIID-Bench's distribution-based label skew: each class's shuffled samples are cut among
    the clients by a fresh Dirichlet draw (with NIID-Bench's balancing, see below). Small
    ``alpha`` (0.1) gives each client a few dominant classes; large ``alpha`` (100) is near
    IID. While some client has fewer than ``min_size`` samples the whole draw is redrawn, as
    NIID-Bench does (with 10), at most :data:`MAX_RETRIES` times; then a
    :class:`~fedlift.errors.ConfigError` says to lower ``min_size`` or raise ``alpha``.
    ``min_size=0`` accepts any draw, empty clients included.

    Balancing (NIID-Bench's): when a class is cut, a client that already holds at least
    ``len(labels) / n_clients`` samples gets no share of it. Every sample is assigned.
    Returns one sorted int64 index array per client.
    """
    y = check_labels(labels)
    n = check_n_clients(n_clients)
    concentration = check_alpha(alpha)
    rng = np.random.default_rng(check_seed(seed))
    least = check_min_size(min_size)
    if least * n > y.size:
        raise ConfigError(
            f"{n} clients of at least min_size={least} samples need {least * n} samples, "
            f"more than the {y.size} labels there are; lower min_size or use fewer clients. "
            f"Received: min_size={least}, n_clients={n}, len(labels)={y.size}"
        )
    classes = _by_class(y)
    for _ in range(MAX_RETRIES):
        pieces = _dirichlet_draw(classes, n, concentration, rng)
        if pieces is None:
            continue
        parts = [np.sort(np.concatenate(client)) for client in pieces]
        if min(part.size for part in parts) >= least:
            return parts
    raise ConfigError(
        f"dirichlet found no partition in {MAX_RETRIES} draws that gives every client at "
        f"least min_size={least} samples: with alpha={concentration}, {n} clients and "
        f"{y.size} labels some client is nearly always too small; lower min_size or raise "
        f"alpha. Received: min_size={least}, alpha={concentration}, n_clients={n}, "
        f"len(labels)={y.size}"
    )


def pathological(
    labels: npt.ArrayLike,
    n_clients: int,
    *,
    classes_per_client: int,
    seed: int,
) -> list[npt.NDArray[np.int64]]:
    """Each client holds exactly ``classes_per_client`` (k) classes: NIID-Bench's "#C=k".

    NIID-Bench's assignment: client i gets class ``i % K`` (K classes) first, then k - 1
    other distinct classes drawn at random. Each class's shuffled samples are then split
    equally (sizes differ by at most one) among the clients that hold it.

    A class that no client holds (certain when ``n_clients * k < K``, possible by chance
    otherwise) is dropped: its samples are in no part, so the parts need not cover every
    sample (NIID-Bench fails there instead). :func:`summary_table` shows what was left
    out. A client left without samples (its classes have fewer samples than holders) is a
    :class:`~fedlift.errors.ConfigError`. Returns one sorted int64 index array per client.
    """
    y = check_labels(labels)
    n = check_n_clients(n_clients)
    rng = np.random.default_rng(check_seed(seed))
    classes = _by_class(y)
    n_classes = len(classes)
    k = as_int(classes_per_client)
    if k is None or not 1 <= k <= n_classes:
        raise ConfigError(
            f"classes_per_client must be an integer from 1 to the number of classes in labels "
            f"({n_classes}). Received: classes_per_client={short(classes_per_client)}"
        )
    holders: list[list[int]] = [[] for _ in range(n_classes)]
    for client in range(n):
        first = client % n_classes
        others = rng.choice(np.delete(np.arange(n_classes), first), size=k - 1, replace=False)
        for held in (first, *others.tolist()):
            holders[held].append(client)
    pieces: list[list[npt.NDArray[np.int64]]] = [[] for _ in range(n)]
    for members, owners in zip(classes, holders, strict=True):
        if not owners:
            continue  # a class nobody holds: dropped (see above)
        for client, piece in zip(
            owners, np.array_split(rng.permutation(members), len(owners)), strict=True
        ):
            pieces[client].append(piece)
    parts = [
        np.sort(np.concatenate(client)) if client else np.zeros(0, np.int64) for client in pieces
    ]
    empty = [i for i, part in enumerate(parts) if part.size == 0]
    if empty:
        raise ConfigError(
            f"pathological left client {empty[0]} without samples: its classes have fewer "
            "samples than clients that hold them; use fewer clients or more samples per "
            f"class. Received: n_clients={n}, classes_per_client={k}, len(labels)={y.size}, "
            f"empty clients={short(empty)}"
        )
    return parts
