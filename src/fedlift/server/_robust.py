"""Robust aggregation: coordinate-wise median, trimmed mean, Krum and Multi-Krum.

Why: the mean follows any single client anywhere -- one update scaled x100 or sign-flipped
moves FedAvg's aggregate as far as the attacker likes. These rules bound what a few bad
clients can do:

- :func:`coordinate_median` (Yin et al. 2018): per coordinate, the median of the clients'
  values. Fewer than half of the clients cannot move it outside the honest values' range.
- :func:`trimmed_mean` (Yin et al. 2018): per coordinate, drop the ``floor(beta * n)``
  largest and smallest values and average the rest; tolerates that many bad clients while
  averaging more of the honest ones than the median does.
- :func:`krum_scores` / :func:`multikrum` (Blanchard et al. 2017): each update is scored by
  the sum of squared distances to its ``n - f - 2`` nearest others; an outlier is far from
  the rest and scores high. Krum takes the lowest-score update, Multi-Krum the weighted
  mean of the ``m`` lowest. Needs ``n > 2f + 2``.

The median and the trimmed mean count clients, not their claimed weights (a weight is what
a bad client would inflate); Multi-Krum weighs the updates it selected.

FULL or DIFF: the rules are applied to what the clients sent. For FULL params that is the
models themselves, and this is the same as applying them to the updates: per coordinate
``median(x_i) = x + median(x_i - x)`` for the global model ``x`` (a shift moves every order
statistic by the same amount), the trimmed mean likewise (it is a mean of order
statistics), and Krum's distances ``|x_i - x_j|`` are translation invariant, so it selects
the same clients, whose mean is shifted by ``x`` as well.

Memory: the rules need every update at once, so a collecting aggregator (``streaming =
False``) holds every result of the round -- the clients' own arrays, not copied -- plus its
output: n + 1 models for n results (10 clients of a 100 MB model: 1.1 GB; FedAvg's
streaming mean holds one). On top of that each rule needs one block temporary: the n
clients' values of one block of elements stacked in float64 (``_BLOCK_BYTES``, 4 MiB, split
over the clients; Krum also makes one difference stack of that size), never an n x model
stack. Krum adds an n x n matrix of distances.

Maths runs in float64 (complex leaves as their real and imaginary parts); the output is in
the model's dtypes (integer and bool leaves rounded to the nearest value).
"""

from __future__ import annotations

import functools
import math
import numbers
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..model import FLModel, ParamTree, Structure, flat_keys, flatten, unflatten
from ._aggregate import Layout, _on_threads, check_result, weighted_mean_metrics
from ._mean import check_extra
from ._seam import Aggregate, Aggregator, Allocator, Memory

__all__ = [
    "AggregateFn",
    "Custom",
    "FedMedian",
    "FedTrimmedAvg",
    "Krum",
    "coordinate_median",
    "krum_scores",
    "multikrum",
    "trimmed_mean",
]

_BLOCK_BYTES = 4 * 1024 * 1024
"""Bytes of one stack of the clients' values (n x block elements, float64): bounds the
temporaries whatever the model's size."""

Updates = Sequence[Sequence[np.ndarray]]
"""One list of arrays per client (a flattened param tree), all with the same layout."""


# --------------------------------------------------------------------------- pure maths


def coordinate_median(updates: Updates, *, out: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """Per coordinate, the median of the clients' values (for an even number of clients the
    mean of the two middle ones).

    ``out``: arrays to write the result into (the model's dtypes, e.g. in shared memory);
    default: new arrays of the first update's dtypes.
    """
    n = _check_updates(updates, out, "coordinate_median()")
    target = _output(updates, out)

    def middle(rows: list[np.ndarray]) -> np.ndarray:
        total = rows[(n - 1) // 2].astype(np.float64)
        total += rows[n // 2]
        total *= 0.5
        return total

    slow = _by_network(updates, target, middle)
    for i in slow:
        for lo, hi, stack in _blocks([u[i] for u in updates]):
            _store(target[i], lo, hi, np.median(stack, axis=0, overwrite_input=True))
    return target


def trimmed_mean(
    updates: Updates, beta: float, *, out: list[np.ndarray] | None = None
) -> list[np.ndarray]:
    """Per coordinate, the mean of the clients' values once the ``floor(beta * n)`` largest
    and the ``floor(beta * n)`` smallest are dropped (``beta`` in [0, 0.5); 0: the plain
    mean). ``out`` as in :func:`coordinate_median`."""
    n = _check_updates(updates, out, "trimmed_mean()")
    k = _trim_count(beta, n)
    target = _output(updates, out)
    kth = sorted({k, n - k - 1})

    def middle(rows: list[np.ndarray]) -> np.ndarray:
        total = rows[k].astype(np.float64)
        for row in rows[k + 1 : n - k]:
            total += row
        return total / (n - 2 * k)

    slow = _by_network(updates, target, middle)
    for i in slow:
        dest = target[i]
        for lo, hi, stack in _blocks([u[i] for u in updates]):
            if k:
                stack.partition(kth, axis=0)  # rows k .. n-k-1 now hold the middle values
            _store(dest, lo, hi, stack[k : n - k].mean(axis=0))
    return target


def krum_scores(updates: Updates, f: int) -> np.ndarray:
    """Krum's score of each update (Blanchard et al. 2017): the sum of its squared Euclidean
    distances to its ``n - f - 2`` nearest other updates, over all arrays. ``f``: how many
    updates may be Byzantine; needs ``n > 2f + 2``. Returns float64, one score per update."""
    n = _check_updates(updates, None, "krum_scores()")
    f = _check_f(f, n)
    distances = _squared_distances(updates)
    np.fill_diagonal(distances, np.inf)  # an update is not its own neighbour
    nearest = np.sort(distances, axis=1)[:, : n - f - 2]
    scores: np.ndarray = nearest.sum(axis=1)
    return scores


def multikrum(
    updates: Updates,
    weights: Sequence[float],
    f: int,
    m: int,
    *,
    out: list[np.ndarray] | None = None,
) -> tuple[list[np.ndarray], list[int]]:
    """Multi-Krum: the ``weights``-weighted mean of the ``m`` updates with the lowest
    :func:`krum_scores`, and their indices (lowest score first; ties: lower index first).
    ``m = 1`` is Krum (the selected update itself). ``m`` may be at most ``n - f``: more
    would take in a Byzantine update whenever there are ``f`` of them. ``out`` as in
    :func:`coordinate_median`."""
    n = _check_updates(updates, out, "multikrum()")
    if len(weights) != n:
        raise ConfigError(
            f"multikrum() needs one weight per update; received {len(weights)} weights for "
            f"{n} updates. Received: len(weights)={len(weights)}."
        )
    w = np.array([float(x) for x in weights], np.float64)
    if not (np.isfinite(w).all() and (w > 0).all()):
        raise ConfigError(
            f"multikrum() weights must be finite numbers > 0. Received: weights={list(weights)}."
        )
    scores = krum_scores(updates, f)
    m = _check_m(m, n, int(f))
    selected = [int(i) for i in np.argsort(scores, kind="stable")[:m]]
    target = _output(updates, out)
    _weighted_mean([updates[i] for i in selected], w[selected], target)
    return target, selected


def _check_updates(updates: Updates, out: Sequence[np.ndarray] | None, where: str) -> int:
    """How many updates there are; ConfigError unless there is one and all (and ``out``)
    share the first one's number of arrays and shapes."""
    n = len(updates)
    if n == 0:
        raise ConfigError(f"{where} needs at least one update; received none. Received: n=0.")
    shapes = [np.shape(a) for a in updates[0]]
    others = [(f"update {c}", u) for c, u in enumerate(updates)]
    if out is not None:
        others.append(("out", out))
    for name, arrays in others:
        if len(arrays) != len(shapes):
            raise ConfigError(
                f"{where}: {name} has {len(arrays)} arrays, update 0 has {len(shapes)}; every "
                f"update must have the same layout. Received: len({name})={len(arrays)}."
            )
        for i, (a, shape) in enumerate(zip(arrays, shapes, strict=True)):
            if np.shape(a) != shape:
                raise ConfigError(
                    f"{where}: array {i} of {name} has shape {np.shape(a)}, that of update 0 "
                    f"{shape}; every update must have the same layout. Received: "
                    f"shape={np.shape(a)}."
                )
    return n


def _trim_count(beta: float, n: int) -> int:
    """``floor(beta * n)``, checked. The product is rounded to 9 decimals first, so that a
    beta written in decimal (0.29 of 100 clients) drops what it says (29, not 28)."""
    _check_beta(beta, "trimmed_mean()")
    k = math.floor(round(beta * n, 9))
    if 2 * k >= n:
        raise ConfigError(
            f"trimmed_mean() drops floor(beta * n) = {k} values on each side of {n}, which "
            "leaves none; lower beta or aggregate more updates. "
            f"Received: beta={beta!r}, n={n}."
        )
    return k


def _check_beta(beta: object, where: str) -> float:
    if (
        isinstance(beta, bool)
        or not isinstance(beta, numbers.Real)
        or not math.isfinite(float(beta))
        or not 0 <= float(beta) < 0.5
    ):
        raise ConfigError(
            f"{where} beta is the fraction of the largest and of the smallest values dropped "
            "per coordinate and must be a number in [0, 0.5) (0.2 of 5 clients drops 1 on "
            f"each side). Received: beta={beta!r}."
        )
    return float(beta)


def _check_count(value: object, name: str, where: str, minimum: int, meaning: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(
            f"{where} {name} is {meaning} and must be an integer >= {minimum}. "
            f"Received: {name}={value!r}."
        )
    return int(value)


def _check_f(f: object, n: int) -> int:
    f = _check_count(f, "f", "krum_scores()", 0, "how many updates may be Byzantine")
    if n <= 2 * f + 2:
        raise ConfigError(
            f"Krum needs more than 2f + 2 updates (Blanchard et al. 2017): with f={f} at "
            f"least {2 * f + 3}; received {n}. Lower f or aggregate more updates. "
            f"Received: n={n}, f={f}."
        )
    return f


def _check_m(m: object, n: int, f: int) -> int:
    m = _check_count(m, "m", "multikrum()", 1, "how many updates are selected")
    if m > n - f:
        raise ConfigError(
            f"multikrum() selects at most n - f = {n - f} of {n} updates (more would take in "
            f"a Byzantine one whenever there are f={f}). Received: m={m}."
        )
    return m


_NETWORK_MAX = 64
"""Up to this many clients, order statistics come from a sorting network (below)."""
_NETWORK_BLOCK = 1 << 15


@functools.lru_cache(maxsize=64)
def _network(n: int) -> tuple[tuple[int, int], ...]:
    """Batcher's odd-even merge sort for ``n`` inputs: compare-exchange pairs ``(a, b)``,
    ``a < b``, after which position ``a`` holds the smaller value. Built for the next power
    of two; pairs that touch a position >= ``n`` are dropped (those act as +inf inputs,
    which never move, so the pairs left sort the ``n`` real ones)."""
    size = 1
    while size < n:
        size *= 2
    pairs: list[tuple[int, int]] = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    a, b = i + j, i + j + k
                    if a // (2 * p) == b // (2 * p) and b < n:
                        pairs.append((a, b))
            k //= 2
        p *= 2
    return tuple(pairs)


def _by_network(
    updates: Updates,
    target: list[np.ndarray],
    reduce: Callable[[list[np.ndarray]], np.ndarray],
) -> list[int]:
    """Fill ``target`` with ``reduce(sorted rows)`` per block, for every real float array,
    when there are at most :data:`_NETWORK_MAX` clients: a block of each client's values is
    sorted across clients by a sorting network of elementwise ``minimum``/``maximum`` (in
    the cache, vectorised, on the fold's threads), which is ~20x faster than ``np.median``
    along the client axis for 8 clients. Returns the indices of the arrays left to the
    general path (other kinds, or too many clients)."""
    n = len(updates)
    fast = [
        i
        for i, dest in enumerate(target)
        if n <= _NETWORK_MAX
        and dest.dtype.kind == "f"
        and dest.flags.c_contiguous
        and all(np.asarray(u[i]).dtype.kind == "f" and np.asarray(u[i]).flags.c_contiguous
                for u in updates)
    ]  # fmt: skip
    pairs = _network(n)
    chosen = [target[i] for i in fast]

    def run(j: int, lo: int, hi: int) -> None:
        i = fast[j]
        flats = [np.asarray(u[i]).reshape(-1) for u in updates]
        dest = target[i].reshape(-1)
        dtype = np.result_type(*[f.dtype for f in flats])
        size = min(_NETWORK_BLOCK, hi - lo)
        rows = [np.empty(size, dtype) for _ in range(n)]
        spare = np.empty(size, dtype)
        for start in range(lo, hi, _NETWORK_BLOCK):
            stop = min(start + _NETWORK_BLOCK, hi)
            m = stop - start
            block = [r[:m] for r in rows]
            for row, flat in zip(block, flats, strict=True):
                np.copyto(row, flat[start:stop])
            free = spare[:m]
            for a, b in pairs:
                np.minimum(block[a], block[b], out=free)
                np.maximum(block[a], block[b], out=block[b])
                block[a], free = free, block[a]
            np.copyto(dest[start:stop], reduce(block), casting="unsafe")

    if chosen:
        _on_threads(chosen, run)
    return [i for i in range(len(target)) if i not in set(fast)]


def _output(updates: Updates, out: list[np.ndarray] | None) -> list[np.ndarray]:
    if out is not None:
        return out
    return [np.empty(np.shape(a), np.asarray(a).dtype) for a in updates[0]]


def _blocks(column: Sequence[np.ndarray]) -> Iterator[tuple[int, int, np.ndarray]]:
    """The clients' values of one array, block by block: ``(lo, hi, stack)`` with ``stack``
    a C-contiguous (n, hi - lo) float64 array (complex: (n, 2 * (hi - lo)), each value's
    real and imaginary parts side by side), which the caller may overwrite."""
    arrays = [np.asarray(a) for a in column]
    n, size = len(arrays), arrays[0].size
    dtype = np.dtype(np.complex128 if any(a.dtype.kind == "c" for a in arrays) else np.float64)
    step = max(1, _BLOCK_BYTES // (n * dtype.itemsize))
    flats = [a.reshape(-1) if a.flags.c_contiguous else None for a in arrays]
    buffer = np.empty((n, min(step, size)), dtype)
    for lo in range(0, size, step):
        hi = min(lo + step, size)
        stack = buffer if hi - lo == buffer.shape[1] else np.empty((n, hi - lo), dtype)
        for row, a, flat in zip(stack, arrays, flats, strict=True):
            row[...] = flat[lo:hi] if flat is not None else a.flat[lo:hi]
        yield lo, hi, stack.view(np.float64) if dtype.kind == "c" else stack


def _store(dest: np.ndarray, lo: int, hi: int, values: np.ndarray) -> None:
    """Write one block's float64 results (complex: parts side by side) into ``dest``'s
    elements ``lo:hi``, in ``dest``'s dtype (integers and bools rounded)."""
    values = np.ascontiguousarray(values, np.float64)
    if values.size == 2 * (hi - lo):  # a complex block: parts side by side
        pairs = values.view(np.complex128)
        values = pairs if dest.dtype.kind == "c" else pairs.real
    if dest.dtype.kind in "iub":
        values = np.rint(values)
        if dest.dtype.kind == "b":
            values = values != 0
    if dest.flags.c_contiguous:
        dest.reshape(-1)[lo:hi] = values
    else:
        dest.flat[lo:hi] = values


def _squared_distances(updates: Updates) -> np.ndarray:
    """The n x n matrix of squared Euclidean distances between the updates (all arrays).

    Differences are taken directly, not as ``|a|^2 + |b|^2 - 2 a.b``: FULL models lie close
    together far from the origin, where that identity loses their distances to rounding."""
    n = len(updates)
    distances = np.zeros((n, n), np.float64)
    for i in range(len(updates[0])):
        for _, _, stack in _blocks([u[i] for u in updates]):
            for a in range(n - 1):
                diff = stack[a + 1 :] - stack[a]
                distances[a, a + 1 :] += np.einsum("ij,ij->i", diff, diff)
    distances += distances.T
    return distances


# --------------------------------------------------------------------------- aggregators


@dataclass
class _Kept:
    site: str
    model: FLModel
    weight: float
    params: list[np.ndarray] | None
    extras: dict[str, list[np.ndarray]]


class _Buffers:
    """Arrays for results read from another process's memory, reused round after round.

    A collecting aggregator must keep what it reads; fresh arrays for every result would
    fault in a model's pages per client and round (40 MB: ~15 ms here, more than the copy
    itself). Buffers go back when the aggregator is done; the pool keeps at most what the
    largest round needed (n models), the memory a round holds anyway.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: dict[tuple[tuple[int, ...], str], list[np.ndarray]] = {}

    def take(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        with self._lock:
            free = self._free.get((shape, np.dtype(dtype).str))
            if free:
                return free.pop()
        return np.empty(shape, dtype)

    def give(self, arrays: list[np.ndarray]) -> None:
        with self._lock:
            for array in arrays:
                self._free.setdefault((array.shape, array.dtype.str), []).append(array)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()


_buffers = _Buffers()


def _has_remote(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_has_remote(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_has_remote(v) for v in value)
    return hasattr(value, "read_into") and not isinstance(value, np.ndarray)


def _read_here(tree: Any, taken: list[np.ndarray]) -> Any:
    """``tree`` with every leaf that is not a numpy array (a result still in its client's
    memory, with ``read_into``) copied into a pooled buffer; the buffers go to ``taken``."""

    def local(leaf: Any) -> Any:
        if isinstance(leaf, np.ndarray):
            return leaf
        out = _buffers.take(tuple(leaf.shape), leaf.dtype)
        taken.append(out)
        leaf.read_into(out.reshape(-1), 0)
        return out

    if isinstance(tree, dict):
        return {k: _read_here(v, taken) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(_read_here(v, taken) for v in tree)
    return local(tree)


class _Collecting:
    """Keeps a round's results and combines them in :meth:`result`.

    ``streaming = True``: a result still in its client's memory is copied during
    :meth:`add` into a buffer of this process's (pooled across rounds, see
    :class:`_Buffers`), so the loop need not copy every result into fresh memory first.

    Each result is checked on :meth:`add` as :class:`~fedlift.server.StreamingMean` checks
    it (:func:`check_result`: weight, params type, layout, shapes, dtype kinds), and always
    for NaN and Inf too, since a kept result is read again in :meth:`result`, when it could
    no longer be left out; a refused result (InvalidResultError naming the site and key)
    leaves the aggregator as it was, whether or not ``strict`` was asked.
    """

    streaming = True

    def __init__(self, reference: ParamTree, *, memory: Memory, extras: tuple[str, ...]) -> None:
        structure, arrays = flatten(reference)
        self._structure: Structure = structure
        self._specs = [(a.shape, np.asarray(a).dtype) for a in arrays]
        self._layout: Layout = (structure, flat_keys(structure), list(self._specs), None)
        self._allocate: Allocator | None = memory.allocate
        self._extra_keys = extras
        self._extra_layouts: dict[str, Layout] = dict.fromkeys(extras, (None, [], [], None))
        self._kept: list[_Kept] = []
        self._taken: list[np.ndarray] = []
        self._lock = threading.Lock()

    def add(self, results: list[tuple[str, FLModel]]) -> None:
        # Calls may overlap (results still arriving): each reads its results here first,
        # then checks and keeps them in turn.
        taken: list[np.ndarray] = []
        try:
            local = [(site, self._local(model, taken)) for site, model in results]
        except BaseException:
            _buffers.give(taken)
            raise
        with self._lock:
            self._add_local(local, taken)

    def _add_local(self, results: list[tuple[str, FLModel]], taken: list[np.ndarray]) -> None:
        layout, extra_layouts = self._layout, dict(self._extra_layouts)
        staged: list[_Kept] = []
        try:
            for site, model in results:
                layout, weight, arrays = check_result(model, site, layout, finite=True)
                extras: dict[str, list[np.ndarray]] = {}
                for key in self._extra_keys:
                    extra_layouts[key], extras[key] = check_extra(
                        model, site, key, extra_layouts[key], finite=True
                    )
                staged.append(_Kept(site, model, weight, arrays, extras))
        except BaseException:
            _buffers.give(taken)  # refused: the aggregator is as it was
            raise
        self._layout, self._extra_layouts = layout, extra_layouts
        self._kept.extend(staged)
        self._taken.extend(taken)

    @staticmethod
    def _local(model: FLModel, taken: list[np.ndarray]) -> FLModel:
        """``model`` with its arrays in this process (see :func:`_read_here`)."""
        if not (_has_remote(model.params) or _has_remote(model.meta)):
            return model
        params = None if model.params is None else _read_here(model.params, taken)
        meta = {k: _read_here(v, taken) if _has_remote(v) else v for k, v in model.meta.items()}
        return FLModel(params_type=model.params_type, params=params, metrics=model.metrics,
                       meta=meta)  # fmt: skip

    def result(self) -> Aggregate:
        carrying = [k for k in self._kept if k.params is not None]
        params = None
        if carrying:
            out = self._new(self._specs)
            self._combine(carrying, out)
            params = unflatten(self._structure, out)
        meta: dict[str, Any] = {}
        for key in self._extra_keys if self._kept else ():
            structure, _, specs, _ = self._extra_layouts[key]
            out = self._new(specs)
            self._combine_extra(key, out)
            meta[key] = unflatten(structure, out)
        aggregate = Aggregate(
            params=params,
            params_type=self._layout[3] if carrying else None,
            metrics=weighted_mean_metrics(k.model for k in self._kept),
            total_weight=math.fsum(k.weight for k in carrying),
            count=len(self._kept),
            meta=meta,
            weights=self._weights(),
        )
        self._kept.clear()
        _buffers.give(self._taken)  # the copies are read: next round reuses them
        self._taken = []
        return aggregate

    def _new(self, specs: list[tuple[tuple[int, ...], np.dtype[Any]]]) -> list[np.ndarray]:
        if self._allocate is not None:
            return self._allocate(specs)
        return [np.empty(shape, dtype) for shape, dtype in specs]

    def _combine(self, carrying: list[_Kept], out: list[np.ndarray]) -> None:
        """Write the aggregate of the params of ``carrying`` (the results with params) into
        ``out``."""
        raise NotImplementedError

    def _combine_extra(self, key: str, out: list[np.ndarray]) -> None:
        """Write the aggregate of every kept result's ``meta[key]`` into ``out``."""
        raise NotImplementedError

    def _extra(self, key: str) -> list[list[np.ndarray]]:
        return [k.extras[key] for k in self._kept]

    def _weights(self) -> dict[str, float]:
        """Each kept site's weight in the aggregate (for the round's record): by default
        the weight it claimed; median and trimmed mean count each site once."""
        return {k.site: k.weight for k in self._kept}

    def _counted_once(self) -> dict[str, float]:
        return {k.site: 1.0 for k in self._kept}


def _params(carrying: list[_Kept]) -> list[list[np.ndarray]]:
    return [k.params for k in carrying if k.params is not None]


class _MedianAggregator(_Collecting):
    _weights = _Collecting._counted_once

    def _combine(self, carrying: list[_Kept], out: list[np.ndarray]) -> None:
        coordinate_median(_params(carrying), out=out)

    def _combine_extra(self, key: str, out: list[np.ndarray]) -> None:
        coordinate_median(self._extra(key), out=out)


class _TrimmedAggregator(_Collecting):
    def __init__(
        self, reference: ParamTree, *, memory: Memory, extras: tuple[str, ...], beta: float
    ) -> None:
        super().__init__(reference, memory=memory, extras=extras)
        self._beta = beta

    _weights = _Collecting._counted_once

    def _combine(self, carrying: list[_Kept], out: list[np.ndarray]) -> None:
        trimmed_mean(_params(carrying), self._beta, out=out)

    def _combine_extra(self, key: str, out: list[np.ndarray]) -> None:
        trimmed_mean(self._extra(key), self._beta, out=out)


class _KrumAggregator(_Collecting):
    """Multi-Krum over the params; an extra is the weighted mean of the selected results'
    (the results trusted this round). :attr:`selected`: their sites, once :meth:`result`
    has run."""

    def __init__(
        self, reference: ParamTree, *, memory: Memory, extras: tuple[str, ...], f: int, m: int
    ) -> None:
        super().__init__(reference, memory=memory, extras=extras)
        self._f, self._m = f, m
        self._chosen: list[_Kept] | None = None
        self.selected: list[str] = []

    def _need(self, n: int) -> None:
        if n <= 2 * self._f + 2 or self._m > n - self._f:
            raise ConfigError(
                f"Krum(f={self._f}, m={self._m}) needs at least "
                f"{max(2 * self._f + 3, self._m + self._f)} results in a round; this round "
                f"has {n}. Lower f or m, or ask more sites. "
                f"Received: n={n}, f={self._f}, m={self._m}."
            )

    def _combine(self, carrying: list[_Kept], out: list[np.ndarray]) -> None:
        self._need(len(carrying))
        weights = [k.weight for k in carrying]
        _, chosen = multikrum(_params(carrying), weights, self._f, self._m, out=out)
        self._chosen = [carrying[i] for i in chosen]
        self.selected = [k.site for k in self._chosen]

    def _weights(self) -> dict[str, float]:
        chosen = {id(k) for k in self._chosen or self._kept}
        return {k.site: k.weight if id(k) in chosen else 0.0 for k in self._kept}

    def _combine_extra(self, key: str, out: list[np.ndarray]) -> None:
        if self._chosen is None:  # no result carried params: select on the extra itself
            self._need(len(self._kept))
            weights = [k.weight for k in self._kept]
            multikrum(self._extra(key), weights, self._f, self._m, out=out)
            return
        chosen = [k.extras[key] for k in self._chosen]
        _weighted_mean(chosen, [k.weight for k in self._chosen], out)


def _weighted_mean(
    updates: Updates, weights: Sequence[float] | np.ndarray, out: list[np.ndarray]
) -> None:
    """``out`` = the ``weights``-weighted mean of ``updates``, block by block in float64."""
    w = np.array(weights, np.float64)
    coefficients = w / w.sum()
    for i, dest in enumerate(out):
        for lo, hi, stack in _blocks([u[i] for u in updates]):
            _store(dest, lo, hi, coefficients @ stack)


# --------------------------------------------------------------------------- factories


@dataclass(frozen=True)
class FedMedian:
    """Aggregator factory: the coordinate-wise median of the round's results
    (:func:`coordinate_median`; unweighted). Holds every result until the round ends (see
    the module's memory note)."""

    def __call__(
        self,
        reference: ParamTree,
        *,
        expected: int,
        memory: Memory,
        strict: bool,
        extras: tuple[str, ...] = (),
    ) -> Aggregator:
        return _MedianAggregator(reference, memory=memory, extras=extras)


@dataclass(frozen=True)
class FedTrimmedAvg:
    """Aggregator factory: the coordinate-wise trimmed mean (:func:`trimmed_mean`;
    unweighted), dropping ``floor(beta * n)`` values on each side of each coordinate."""

    beta: float = 0.2

    def __post_init__(self) -> None:
        _check_beta(self.beta, "FedTrimmedAvg:")

    def __call__(
        self,
        reference: ParamTree,
        *,
        expected: int,
        memory: Memory,
        strict: bool,
        extras: tuple[str, ...] = (),
    ) -> Aggregator:
        return _TrimmedAggregator(reference, memory=memory, extras=extras, beta=self.beta)


@dataclass(frozen=True)
class Krum:
    """Aggregator factory: Krum (``m = 1``, the one result closest to its neighbours) or
    Multi-Krum (``m > 1``: the weighted mean of the ``m`` best), tolerating ``f`` Byzantine
    results (:func:`multikrum`). A round needs more than ``2f + 2`` results and at least
    ``m + f``."""

    f: int = 1
    m: int = 1

    def __post_init__(self) -> None:
        _check_count(self.f, "f", "Krum:", 0, "how many results may be Byzantine")
        _check_count(self.m, "m", "Krum:", 1, "how many results are averaged (1: Krum)")

    def __call__(
        self,
        reference: ParamTree,
        *,
        expected: int,
        memory: Memory,
        strict: bool,
        extras: tuple[str, ...] = (),
    ) -> Aggregator:
        need = max(2 * self.f + 3, self.m + self.f)
        if expected < need:
            raise ConfigError(
                f"Krum(f={self.f}, m={self.m}) needs at least {need} results in a round, but "
                f"the round asks only {expected} sites. Lower f or m, or ask more sites. "
                f"Received: expected={expected}."
            )
        return _KrumAggregator(reference, memory=memory, extras=extras, f=self.f, m=self.m)


AggregateFn = Callable[[list[tuple[str, FLModel]]], ParamTree]
"""``fn([(site, result), ...]) -> params``: a round's combined params from its results."""


class _CustomAggregator(_Collecting):
    """Hands the round's checked results to a user's function; its output must have the
    global model's layout, shapes and dtype kinds, and be finite (else InvalidResultError)."""

    def __init__(
        self, reference: ParamTree, *, memory: Memory, extras: tuple[str, ...], fn: AggregateFn
    ) -> None:
        super().__init__(reference, memory=memory, extras=extras)
        self._fn = fn

    def _combine(self, carrying: list[_Kept], out: list[np.ndarray]) -> None:
        results = [
            (k.site, FLModel(params_type=k.model.params_type,
                             params=unflatten(self._structure, list(k.params or [])),
                             metrics=k.model.metrics, meta=k.model.meta))
            for k in carrying
        ]  # fmt: skip
        combined = self._fn(results)
        name = getattr(self._fn, "__qualname__", repr(self._fn))
        check = FLModel(params=combined, meta={"NUM_STEPS_CURRENT_ROUND": 1.0})
        _, _, arrays = check_result(check, f"the aggregation function {name}",
                                    self._layout, finite=True)  # fmt: skip
        if arrays is None:
            raise ConfigError(f"the aggregation function {name} returned no params.")
        for target, value in zip(out, arrays, strict=True):
            np.copyto(target, value, casting="unsafe")

    def _combine_extra(self, key: str, out: list[np.ndarray]) -> None:
        raise ConfigError(
            f"Custom(fn=...) combines params only; this strategy also needs meta[{key!r}] "
            "combined (e.g. SCAFFOLD): use Mean() or a robust aggregator."
        )


@dataclass(frozen=True)
class Custom:
    """Aggregator factory for a function of one's own: ``fn([(site, result), ...]) ->
    params``, called once a round with every result (checked as any result is: layout,
    shapes, kinds, weight, no NaN or Inf; numpy arrays). What it returns is checked the same
    way. In ``job.json``: ``{"aggregator": {"type": "custom", "fn": "my_module:combine"}}``,
    the module in the job's app folder. Holds every result, like the robust aggregators."""

    fn: AggregateFn

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise ConfigError(
                "Custom(fn=...) must be a function [(site, FLModel), ...] -> params; "
                f"received: fn={self.fn!r:.80}."
            )

    def __call__(
        self,
        reference: ParamTree,
        *,
        expected: int,
        memory: Memory,
        strict: bool,
        extras: tuple[str, ...] = (),
    ) -> Aggregator:
        return _CustomAggregator(reference, memory=memory, extras=extras, fn=self.fn)
