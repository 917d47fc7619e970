"""The seam between the round loop, the strategies and the aggregators.

A **strategy** decides, per round, which sites to ask and with what task config
(:class:`Ask`), how their results are combined (its :attr:`Strategy.aggregator`, an
:class:`AggregatorFactory`) and how the global model moves (:meth:`Strategy.update`). One
loop (:func:`fedlift.server.run_rounds`) drives every round-based strategy on any
:class:`Controller`.

What the controller can do on one host (shared memory, results read where they lie in a
client's memory) is one declared capability, :class:`FastPath`. The loop hands the part of
it an aggregator needs (:class:`Memory`) to the aggregator factory; a strategy never sees
it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ..model import FLModel, ParamsType, ParamTree

__all__ = [
    "Aggregate",
    "Aggregator",
    "AggregatorFactory",
    "Allocator",
    "Ask",
    "FastPath",
    "Filter",
    "Memory",
]

Allocator = Callable[[list[tuple[tuple[int, ...], np.dtype[Any]]]], list[np.ndarray]]
"""Makes arrays of the given shapes and dtypes (e.g. in shared memory); their contents are
unspecified, callers fill them."""


@dataclass(frozen=True)
class FastPath:
    """What a controller declares about how models move between it and its clients.

    ``allocate``: where aggregates and published global models live (the simulator: shared
    memory, which every client maps, so the model is published once per round and not
    copied per client); None: plain numpy. ``private_results``: results arrive in buffers
    nobody else holds (decoded off the wire), so an aggregator may fold into the first one
    in place. ``lazy_results``: a streaming aggregator may be handed results whose arrays
    are valid only during its ``add`` call (read block by block from a client's memory).
    """

    allocate: Allocator | None = None
    private_results: bool = False
    lazy_results: bool = False


NO_FAST_PATH = FastPath()


@dataclass(frozen=True)
class Memory:
    """What an aggregator may use for its output, from the controller's :class:`FastPath`."""

    allocate: Allocator | None = None
    private_results: bool = False


@dataclass(frozen=True)
class Ask:
    """Which sites a round asks, and what goes with the task.

    ``config`` (JSON values) reaches the script as ``FLModel.meta["config"]`` and through
    ``flare.get_config()``; ``meta`` entries are added to the task's ``FLModel.meta`` (they
    may be param trees of numpy arrays, e.g. SCAFFOLD's server control variate).
    """

    sites: list[str]
    config: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Aggregate:
    """What an aggregator made of one round's results.

    ``params``: the combined params (for DIFF results the combined update), None when no
    result carried params; ``meta``: combined extras (e.g. SCAFFOLD's mean control-variate
    change), by meta key; ``metrics``: the weighted mean of the results' numeric metrics;
    ``weights``: each site's weight in the aggregate (its share is ``weight /
    total_weight``), for the round's record; an aggregator may leave it empty, and the
    round then records each result's ``NUM_STEPS_CURRENT_ROUND``.
    """

    params: ParamTree | None
    params_type: ParamsType | None
    metrics: dict[str, float]
    total_weight: float
    count: int
    meta: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)


class Aggregator(Protocol):
    """Takes one round's results as they arrive, then gives the :class:`Aggregate`.

    ``streaming``: True when :meth:`add` reads each result during the call and keeps none
    of its arrays (so results may be lazily mapped, valid only during the call); False when
    it keeps results (a median needs them all), which then arrive as numpy arrays it may
    hold. A streaming aggregator's :meth:`add` may be called again before an earlier call
    returned: results that are still arriving are each read on a thread of their own, as
    they come in, so it must take its state in turn (a lock), and fold in the order the
    calls began if the order matters to the result (:class:`~fedlift.server.FoldOrder`).
    """

    streaming: bool

    def add(self, results: list[tuple[str, FLModel]]) -> None:
        """Take ``(site, result)`` pairs. A result it refuses raises
        :class:`~fedlift.errors.InvalidResultError` naming the site; when ``strict`` was
        asked of the factory, the aggregator is then as it was before the call."""
        ...

    def result(self) -> Aggregate:
        """The aggregate of everything added (called once, after the last ``add``)."""
        ...


class AggregatorFactory(Protocol):
    """Starts a round's :class:`Aggregator` (a strategy holds one; the loop calls it)."""

    def __call__(
        self,
        reference: ParamTree,
        *,
        expected: int,
        memory: Memory,
        strict: bool,
        extras: tuple[str, ...] = (),
    ) -> Aggregator:
        """``reference``: the global model the results must match (layout, shapes, dtype
        kinds); ``expected``: how many results the round asks for; ``memory``: where the
        output may live; ``strict``: every result is checked whole (NaN and Inf included)
        before it changes anything, so a refused one leaves the aggregate exactly as it was
        (the ``exclude`` error policy); ``extras``: meta keys whose param trees are to be
        combined too (their mean goes to :attr:`Aggregate.meta`)."""
        ...


class Filter(Protocol):
    """A server-side transform of what goes out and what comes back, around every strategy.

    The loop applies a run's filters (:attr:`~fedlift.server.RunSettings.filters`) in order
    to each task before it is sent, and in reverse order to each result before the
    aggregator sees it; a filter raises :class:`~fedlift.errors.InvalidResultError` to
    refuse a result (the error policy applies). This is where compression (decoding
    quantised or sparse results, :class:`~fedlift.server.CompressionFilter`) and privacy
    (clipping, noise) plug in, for every strategy alike. A client-side half (encoding a
    result before it is sent) runs in the site's worker, asked for through the task's meta.
    """

    def on_task(self, task: FLModel) -> FLModel:
        """The task as it is sent (called once per task, not per site)."""
        ...

    def on_result(self, site: str, result: FLModel) -> FLModel:
        """A result as the aggregator takes it (called from the transport's threads)."""
        ...

    def summary(self) -> dict[str, Any]:
        """What the filter did since the last call (e.g. bytes before and after), merged
        into the round's record (``metrics.jsonl``'s ``extra``); ``{}`` for nothing."""
        ...
