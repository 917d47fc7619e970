"""FedAvg's maths as pure functions and one streaming accumulator.

:class:`StreamingMean` folds each client's result into a single running weighted mean as it
arrives (``mean += (w / W) * (x - mean)``), so the server holds one model's worth of sums no
matter how many clients answer, and the mean of one client is that client's params exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..model import FLModel, ParamsType, ParamTree, Structure, flat_keys, flatten, unflatten

__all__ = [
    "Allocator",
    "StreamingMean",
    "apply_update",
    "fold_into",
    "fold_many_into",
    "weighted_mean",
    "weighted_mean_metrics",
]


Allocator = Callable[[list[tuple[tuple[int, ...], np.dtype[Any]]]], list[np.ndarray]]
"""Makes arrays of the given shapes and dtypes (e.g. in shared memory); their contents are
unspecified, callers fill them."""

_BLOCK = 1 << 16  # elements folded at a time: temporaries stay in the CPU cache (fastest here)


def fold_into(acc: np.ndarray, x: np.ndarray, fraction: float) -> None:
    """``acc += fraction * (x - acc)``, in cache-sized blocks (no full-size temporary).

    ``x`` may be a :class:`~fedlift.codec._remote.RemoteArray`: each block is read from the
    client's memory into a cache-sized buffer, then folded.
    """
    fold_many_into(acc, [(x, fraction)])


def fold_many_into(acc: np.ndarray, parts: list[tuple[np.ndarray, float]]) -> None:
    """``fold_into(acc, x, f)`` for each ``(x, f)`` in turn, in one pass over ``acc``.

    Each block of ``acc`` takes every part while it is in the CPU cache, so ``acc`` crosses
    the memory bus once for the batch instead of once per part; the arithmetic, and so the
    result, is exactly that of folding the parts one after the other.
    """
    flat_acc = acc.reshape(-1)
    if flat_acc.size <= _BLOCK and all(isinstance(x, np.ndarray) for x, _ in parts):
        for x, fraction in parts:
            delta = np.subtract(x.reshape(-1), flat_acc, dtype=acc.dtype)
            delta *= fraction
            flat_acc += delta
        return
    size = min(_BLOCK, flat_acc.size)
    scratch = np.empty(size, acc.dtype)
    sources = [
        (x.reshape(-1), None, f) if isinstance(x, np.ndarray) else (x, np.empty(size, x.dtype), f)
        for x, f in parts
    ]
    for start in range(0, flat_acc.size, _BLOCK):
        stop = min(start + _BLOCK, flat_acc.size)
        tmp, acc_block = scratch[: stop - start], flat_acc[start:stop]
        for x, fetched, fraction in sources:
            if fetched is not None:
                block = fetched[: stop - start]
                x.read_into(block, start)
            else:
                block = x[start:stop]
            np.subtract(block, acc_block, out=tmp, casting="unsafe")
            tmp *= fraction
            acc_block += tmp


class StreamingMean:
    """Running weighted mean of param trees and numeric metrics, one result at a time.

    ``allocate`` makes the accumulator's arrays (default: numpy); the simulator puts them in
    shared memory, so the new global model goes out to the clients without another copy.
    ``adopt=True`` lets the first result's arrays become the sums (folded in place) when the
    caller guarantees nobody else holds them (results decoded off the wire).
    """

    def __init__(
        self, reference: ParamTree | None, allocate: Allocator | None = None, adopt: bool = False
    ) -> None:
        self._allocate = allocate
        self._adopt = adopt
        if reference is not None:
            self._structure, ref = flatten(reference)
            self._shapes = [(a.shape, a.dtype) for a in ref]
            self._keys = flat_keys(self._structure)
        else:
            self._structure, self._shapes, self._keys = None, [], []
        self._sums: list[np.ndarray] | None = None
        self._weight = 0.0
        self._params_type: ParamsType | None = None
        self._metric_sums: dict[str, float] = {}
        self._metric_weights: dict[str, float] = {}
        self.count = 0

    @property
    def total_weight(self) -> float:
        return self._weight

    def add(self, model: FLModel, source: str = "a client") -> None:
        """Fold ``model`` (params weighted by its ``NUM_STEPS_CURRENT_ROUND``) into the mean."""
        self.add_many([(source, model)])

    def add_many(self, results: list[tuple[str, FLModel]]) -> None:
        """Fold several ``(source, model)`` results, exactly as ``add`` one after the other,
        in one pass over the sums (results that queued up while the last was folded)."""
        # Validate before changing any state: a rejected result leaves the mean as it was.
        validated = [
            (model, None if model.params is None else self._validated(model, source))
            for source, model in results
        ]
        parts: list[tuple[list[np.ndarray], float]] = []
        for model, arrays in validated:
            weight = model.weight()
            self._add_metrics(model.metrics, weight)
            self.count += 1
            if arrays is None:
                continue
            self._weight += weight
            if self._sums is None:
                self._sums = self._new_sums(arrays)
                continue
            parts.append((arrays, weight / self._weight))
        if not parts or self._sums is None:
            return
        for i, acc in enumerate(self._sums):
            fold_many_into(acc, [(arrays[i], fraction) for arrays, fraction in parts])

    def _new_sums(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        specs = [(a.shape, _acc_dtype(a.dtype)) for a in arrays]
        if (
            self._adopt
            and self._allocate is None
            and all(
                isinstance(a, np.ndarray)
                and a.flags.writeable
                and a.flags.c_contiguous
                and a.dtype == dtype
                for a, (_, dtype) in zip(arrays, specs, strict=True)
            )
        ):
            # The first result's own buffers become the sums: no copy, no second model.
            return arrays
        sums = (
            self._allocate(specs)
            if self._allocate is not None
            else [np.empty(shape, dtype) for shape, dtype in specs]
        )
        for acc, a in zip(sums, arrays, strict=True):
            if not isinstance(a, np.ndarray) and a.dtype == acc.dtype:
                a.read_into(acc.reshape(-1))  # straight from the client's memory
            else:
                np.copyto(acc, np.asarray(a), casting="unsafe")
        return sums

    def _validated(self, model: FLModel, source: str) -> list[np.ndarray]:
        structure, arrays = flatten(model.params)
        params_type = self._params_type or model.params_type or ParamsType.FULL
        if model.params_type not in (None, params_type):
            raise ConfigError(
                f"{source} sent params_type={model.params_type.value} but earlier results in "
                f"this round were {params_type.value}; all clients must send the same "
                "kind of params in a round."
            )
        if self._structure is None:
            keys = flat_keys(structure)
            shapes = [(a.shape, a.dtype) for a in arrays]
        elif structure != self._structure:
            theirs = flat_keys(structure)
            missing = [k for k in self._keys if k not in set(theirs)]
            extra = [k for k in theirs if k not in set(self._keys)]
            raise ConfigError(
                f"{source} sent params whose layout differs from the global model "
                f"(missing: {missing[:5] or 'none'}, unexpected: {extra[:5] or 'none'}). "
                "Send every layer/key of the model received, e.g. "
                "{layer.name: layer.get_weights() for layer in model.layers}."
            )
        else:
            keys, shapes = self._keys, self._shapes
        for key, (shape, _), array in zip(keys, shapes, arrays, strict=True):
            if array.shape != shape:
                raise ConfigError(
                    f"{source} sent {key!r} with shape {array.shape}; the global model has "
                    f"{shape}. Did the script change the model's architecture?"
                )
            if not np.issubdtype(array.dtype, np.number) and array.dtype != np.bool_:
                raise ConfigError(f"{source} sent {key!r} with non-numeric dtype {array.dtype}.")
        self._params_type = params_type
        self._structure, self._keys, self._shapes = structure, keys, shapes
        return arrays

    def _add_metrics(self, metrics: Mapping[str, Any] | None, weight: float) -> None:
        for key, value in (metrics or {}).items():
            if isinstance(value, bool) or not isinstance(value, int | float | np.number):
                continue
            self._metric_sums[key] = self._metric_sums.get(key, 0.0) + float(value) * weight
            self._metric_weights[key] = self._metric_weights.get(key, 0.0) + weight

    def params(self) -> ParamTree | None:
        """The weighted mean tree (None if no result carried params)."""
        if self._sums is None:
            return None
        out = [
            acc if acc.dtype == dtype else _cast_back(acc, dtype)
            for acc, (_, dtype) in zip(self._sums, self._shapes, strict=True)
        ]
        return unflatten(self._structure, out)

    @property
    def params_type(self) -> ParamsType | None:
        return self._params_type

    @property
    def structure(self) -> Structure:
        return self._structure

    def metrics(self) -> dict[str, float]:
        return {k: self._metric_sums[k] / self._metric_weights[k] for k in self._metric_sums}


def _acc_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    return dtype if np.issubdtype(dtype, np.floating) else np.dtype(np.float64)


def _cast_back(acc: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
    source = np.rint(acc) if np.issubdtype(dtype, np.integer) or dtype == np.bool_ else acc
    out: np.ndarray = source.astype(dtype)
    return out


def weighted_mean(models: Iterable[FLModel]) -> StreamingMean:
    """Fold every model into a :class:`StreamingMean` (reference: the first one's layout)."""
    acc: StreamingMean | None = None
    for i, model in enumerate(models):
        if acc is None:
            acc = StreamingMean(model.params)
        acc.add(model, f"result {i}")
    if acc is None:
        raise ConfigError("weighted_mean() needs at least one model; received none.")
    return acc


def weighted_mean_metrics(models: Iterable[FLModel]) -> dict[str, float]:
    """Weighted mean of every numeric metric, over the models that report it."""
    acc = StreamingMean(None)
    for model in models:
        acc._add_metrics(model.metrics, model.weight())
    return acc.metrics()


def apply_update(
    global_params: ParamTree, update: ParamTree, params_type: ParamsType | None
) -> ParamTree:
    """New global params: the mean itself for FULL, ``global + mean`` for DIFF."""
    if params_type in (None, ParamsType.FULL):
        return update
    g_structure, g_arrays = flatten(global_params)
    u_structure, u_arrays = flatten(update)
    if g_structure != u_structure:
        raise ConfigError("a DIFF update must have the global model's layout.")
    summed = [
        np.add(g, u, dtype=g.dtype, casting="unsafe") if np.issubdtype(g.dtype, np.number) else g
        for g, u in zip(g_arrays, u_arrays, strict=True)
    ]
    return unflatten(g_structure, summed)
