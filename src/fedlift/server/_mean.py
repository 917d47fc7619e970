"""FedAvg's weighted mean as an :class:`~fedlift.server.AggregatorFactory` (:class:`Mean`).

:class:`StreamingMean` predates the seam: it takes one ``(source, model)`` at a time and
gives the params, metrics and weight separately. :class:`Mean` starts one per round behind
the seam's :class:`Aggregator` protocol (``add(results)`` / ``result()``), configured from
the controller's :class:`Memory` (output arrays, adopting private results) and the round
(``expected``: the last fold scales the sums into the mean; ``strict``: every result is
scanned for NaN and Inf before it changes anything). Extras (meta keys holding param
trees, e.g. SCAFFOLD's control-variate change) get a mean of their own, with the same
weights as the params.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, InvalidResultError
from ..model import FLModel, MetaKey, ParamTree
from ._aggregate import Layout, StreamingMean, check_result
from ._seam import Aggregate, Aggregator, Memory

__all__ = ["Mean", "check_extra"]

_EMPTY: Layout = (None, [], [], None)


def check_extra(
    model: FLModel, site: str, key: str, layout: Layout, *, finite: bool
) -> tuple[Layout, list[Any]]:
    """Check the param tree a result carries in ``meta[key]`` as :func:`check_result` checks
    params (against ``layout``; the first one fixes an empty layout). Returns the layout the
    next one must match and the tree's arrays. InvalidResultError naming ``site`` and the
    key when it is missing, not a tree of numeric arrays, or (``finite``) holds NaN/Inf."""
    source = f"{site} (meta[{key!r}])"
    tree = model.meta.get(key)
    if tree is None:
        raise InvalidResultError(
            f"{site} sent no meta[{key!r}]; this round combines it across the results (e.g. "
            "SCAFFOLD's control-variate change), so every result must carry it as a param "
            f"tree. Received: meta keys={sorted(model.meta)}."
        )
    try:
        new_layout, _, arrays = check_result(FLModel(params=tree), source, layout, finite=finite)
    except ConfigError as exc:  # a leaf that is no array (flatten's error)
        raise InvalidResultError(f"{source} is not a param tree of numeric arrays: {exc}") from None
    return new_layout, arrays or []


@dataclass(frozen=True)
class Mean:
    """The weighted mean of the results (FedAvg), streamed: each result is folded into one
    running sum as it arrives, so the server holds one model's worth of sums whatever the
    number of clients (see :class:`~fedlift.server.StreamingMean`)."""

    def __call__(
        self,
        reference: ParamTree,
        *,
        expected: int,
        memory: Memory,
        strict: bool,
        extras: tuple[str, ...] = (),
    ) -> Aggregator:
        return _MeanAggregator(
            reference, expected=expected, memory=memory, strict=strict, extras=extras
        )


class _MeanAggregator:
    """A :class:`StreamingMean` (plus one per extra) behind the :class:`Aggregator` protocol.

    A refused result changes nothing: extras are checked first (pure checks), then the
    params mean checks every result of the call before folding any, and only then are the
    extras folded (already checked, so they cannot be refused half-way).
    """

    streaming = True

    def __init__(
        self,
        reference: ParamTree,
        *,
        expected: int,
        memory: Memory,
        strict: bool,
        extras: tuple[str, ...],
    ) -> None:
        self._strict = strict
        self._mean = StreamingMean(
            reference,
            allocate=memory.allocate,
            adopt=memory.private_results,
            expected=expected,
            prescan=strict,
        )
        # Extras are scanned here (when strict) before anything folds: no prescan of theirs.
        self._extras = {
            key: StreamingMean(
                None, allocate=memory.allocate, adopt=memory.private_results, expected=expected
            )
            for key in extras
        }
        self._extra_layouts: dict[str, Layout] = dict.fromkeys(extras, _EMPTY)
        self._lock = threading.Lock()

    def add(self, results: list[tuple[str, FLModel]]) -> None:
        # Calls may overlap (results still arriving): each takes the state in turn, and
        # the folds then go over the sums in that order (StreamingMean.fold).
        with self._lock:
            layouts = dict(self._extra_layouts)
            folds: dict[str, list[tuple[str, FLModel]]] = {key: [] for key in self._extras}
            for site, model in results:
                for key in self._extras:
                    layouts[key], _ = check_extra(
                        model, site, key, layouts[key], finite=self._strict
                    )
                    weight: Any = model.meta.get(MetaKey.NUM_STEPS_CURRENT_ROUND, 1)
                    folds[key].append(
                        (
                            f"{site} (meta[{key!r}])",
                            FLModel(
                                params=model.meta[key],
                                meta={MetaKey.NUM_STEPS_CURRENT_ROUND: weight},
                            ),
                        )
                    )
            # Checks every weight and params before changing anything.
            prepared = self._mean.prepare(results)
            self._extra_layouts = layouts
            extra_folds = {key: mean.prepare(folds[key]) for key, mean in self._extras.items()}
        self._mean.fold(prepared)
        for key, mean in self._extras.items():
            mean.fold(extra_folds[key])

    def result(self) -> Aggregate:
        meta = {key: tree for key, m in self._extras.items() if (tree := m.params()) is not None}
        return Aggregate(
            params=self._mean.params(),
            params_type=self._mean.params_type,
            metrics=self._mean.metrics(),
            total_weight=self._mean.total_weight,
            count=self._mean.count,
            meta=meta,
            weights=dict(self._mean.weights),
        )
