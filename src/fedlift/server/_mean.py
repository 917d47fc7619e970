"""The streaming weighted mean as a seam :class:`~fedlift.server.Aggregator`.

:class:`Mean` is the aggregator FedAvg, FedProx, FedOpt and SCAFFOLD use: each result is
folded into one running sum as it arrives (:class:`~fedlift.server.StreamingMean`), on
the controller's fast path where it has one (sums in shared memory, results read where
they lie), so the server holds about one model of sums whatever the number of clients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import InvalidResultError
from ..model import FLModel, ParamTree
from ._aggregate import StreamingMean
from ._seam import Aggregate, Aggregator, Memory

__all__ = ["Mean"]


class _MeanAggregator:
    """:class:`StreamingMean` of the params, and one per extra meta tree (same weights)."""

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
        self._mean = StreamingMean(
            reference,
            allocate=memory.allocate,
            adopt=memory.private_results,
            expected=expected,
            prescan=strict,
        )
        # Extras (e.g. SCAFFOLD's control-variate changes) have the model's layout; they are
        # combined in plain memory: strategy state, never broadcast as they are.
        self._extras = {
            key: StreamingMean(
                reference, adopt=memory.private_results, expected=expected, prescan=strict
            )
            for key in extras
        }

    def add(self, results: list[tuple[str, FLModel]]) -> None:
        if self._extras:
            # One result at a time: each is checked whole before any of its parts is folded,
            # so a refused extra cannot leave the params mean holding its model.
            for site, model in results:
                trees = {key: _extra(site, model, key) for key in self._extras}
                for key, mean in self._extras.items():
                    mean.add_many(
                        [(f"{site} ({key})", FLModel(params=trees[key], meta=model.meta))]
                    )
                self._mean.add_many([(site, model)])
            return
        self._mean.add_many(results)

    def result(self) -> Aggregate:
        params = self._mean.params()
        return Aggregate(
            params=params,
            params_type=self._mean.params_type,
            metrics=self._mean.metrics(),
            total_weight=self._mean.total_weight,
            count=self._mean.count,
            meta={key: mean.params() for key, mean in self._extras.items()},
        )


def _extra(site: str, model: FLModel, key: str) -> Any:
    value = model.meta.get(key)
    if value is None:
        raise InvalidResultError(
            f"{site} sent no {key!r} in its result's meta; this strategy needs it in every "
            f"result (see the strategy's client helper). Received: meta keys "
            f"{sorted(model.meta)[:10]}."
        )
    return value


@dataclass(frozen=True)
class Mean:
    """The weighted mean of the results (weights: ``meta[NUM_STEPS_CURRENT_ROUND]``),
    folded as they arrive; the :class:`~fedlift.server.AggregatorFactory` of FedAvg."""

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
