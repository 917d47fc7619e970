"""FedAvg as one readable loop over small hooks; the maths lives in :mod:`._aggregate`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..errors import ClientFailedError, ConfigError
from ..model import FLModel, MetaKey, ParamTree, flatten, unflatten
from ._aggregate import (
    Allocator,
    ErrorPolicy,
    StreamingMean,
    _ResultLost,
    apply_update,
    check_error_policy,
)
from ._store import RoundRecord, RunRecorder

__all__ = ["Controller", "FedAvg", "FedAvgResult", "all_clients"]

log = logging.getLogger("fedlift.server")

RoundCallback = Callable[[RoundRecord], None]


class Controller(Protocol):
    """What a workflow needs from the clients' side of a job.

    :class:`~fedlift.server.ServerRuntime` implements it for clients that connect over a
    transport (worker processes, real sites); local backends implement it by calling client
    functions directly.
    """

    def wait_for_clients(self, count: int, timeout: float, grace: float = 10.0) -> list[str]:
        """Block until enough clients are there; returns their names."""
        ...

    def registered_sites(self) -> list[str]:
        """The clients available now."""
        ...

    def run_task(
        self,
        task_name: str,
        model: FLModel,
        sites: Sequence[str],
        *,
        on_result: Callable[[str, FLModel], None],
        timeout: float,
        min_responses: int,
        lazy_results: bool = False,
        on_results: Callable[[list[tuple[str, FLModel]]], None] | None = None,
        on_client_error: ErrorPolicy = "fail",
    ) -> list[str]:
        """Send ``model`` to ``sites``; call ``on_result`` for each result as it arrives;
        return the sites that answered (see :meth:`ServerRuntime.run_task`).
        ``lazy_results``: ``on_result`` accepts params it must read during the call;
        ``on_results``: takes the results that arrived together, instead of ``on_result``;
        ``on_client_error``: the :data:`ErrorPolicy` for sites that fail or whose result
        ``on_result`` refuses with :class:`~fedlift.errors.InvalidResultError`."""
        ...


def all_clients(sites: Sequence[str], round_number: int) -> list[str]:
    """The default client sampling: every registered client, every round."""
    return list(sites)


@dataclass
class FedAvgResult:
    """What a finished FedAvg run produced."""

    params: ParamTree
    rounds: list[RoundRecord]
    final_metrics: dict[str, float]
    best_round: int | None
    best_value: float | None


@dataclass
class FedAvg:
    """Federated averaging (McMahan et al., 2017).

    Each round: send the global model to the sampled clients as task ``train``, fold each
    result into a streaming weighted mean (weights: ``meta[NUM_STEPS_CURRENT_ROUND]``),
    replace (FULL) or add to (DIFF) the global params, record metrics and models. With
    ``final_evaluation`` a last ``validate`` task asks every client to evaluate the final
    global model, so the job reports the metrics of the model it produced.

    Every result is checked before it counts (layout, shapes, dtype kinds, a finite weight
    > 0, no NaN or Inf; see :class:`~fedlift.server.StreamingMean`). ``on_client_error``
    (an :data:`ErrorPolicy`) says what a failing site or a refused result does: ``"fail"``
    the job (default), or ``"exclude"`` the site from the round, which goes on while
    ``min_clients`` answered (each result is then read once more, to be checked before it
    is folded, so the aggregate is exactly that of the others). A site whose process died
    is left out under either policy; if its result was being read when it died, the round
    runs again without it.

    Hooks are plain functions: ``sample_clients(sites, round) -> sites``.
    """

    num_rounds: int
    min_clients: int
    round_timeout: float = 3600.0
    register_timeout: float = 600.0
    final_evaluation: bool = True
    sample_clients: Callable[[Sequence[str], int], list[str]] = all_clients
    on_round: RoundCallback | None = field(default=None, repr=False)
    allocate: Allocator | None = field(default=None, repr=False)
    """Where aggregates live (the simulator: shared memory, sent on without a copy)."""
    on_client_error: ErrorPolicy = "fail"

    def __post_init__(self) -> None:
        if not isinstance(self.num_rounds, int) or self.num_rounds < 1:
            raise ConfigError(f"num_rounds must be an int >= 1; received: {self.num_rounds!r}.")
        if not isinstance(self.min_clients, int) or self.min_clients < 1:
            raise ConfigError(f"min_clients must be an int >= 1; received: {self.min_clients!r}.")
        if self.round_timeout <= 0:
            raise ConfigError(f"round_timeout must be > 0 s; received: {self.round_timeout!r}.")
        check_error_policy(self.on_client_error, "FedAvg(on_client_error=...)")

    def run(
        self,
        runtime: Controller,
        initial_params: ParamTree,
        recorder: RunRecorder,
        start_round: int = 0,
    ) -> FedAvgResult:
        runtime.wait_for_clients(self.min_clients, self.register_timeout)
        params = self._publish(initial_params)
        del initial_params  # once published, the caller's copy can go
        for round_number in range(start_round, self.num_rounds):
            started = time.monotonic()
            sites = self.sample_clients(runtime.registered_sites(), round_number)
            task = self._task_model(params, round_number, start_round)
            mean, answered = self._train(runtime, task, params, sites, round_number)
            new_params = self._update(params, mean)
            record = recorder.record(
                RoundRecord(
                    round_number,
                    "train",
                    answered,
                    mean.metrics(),
                    time.monotonic() - started,
                    extra={"total_weight": mean.total_weight},
                ),
                evaluated_params=params,
            )
            params = new_params
            recorder.save_global(params, round_number, final=round_number == self.num_rounds - 1)
            self._notify(record)
        final_metrics: dict[str, float] = {}
        if self.final_evaluation:
            final_metrics = self._evaluate_final(runtime, params, recorder, start_round)
        return FedAvgResult(
            params, recorder.records, final_metrics, recorder.best_round, recorder.best_value
        )

    def _train(
        self,
        runtime: Controller,
        task: FLModel,
        params: ParamTree,
        sites: list[str],
        round_number: int,
    ) -> tuple[StreamingMean, list[str]]:
        """One round's ``train`` task folded into a mean; run again without the sites whose
        results were lost part-way through their fold (the sites left: fewer each time)."""
        while True:
            mean = StreamingMean(
                params,
                allocate=self.allocate,
                adopt=bool(getattr(runtime, "results_are_private", False)),
                expected=len(sites),
                prescan=self.on_client_error == "exclude",
            )
            try:
                answered = runtime.run_task(
                    "train",
                    task,
                    sites,
                    on_result=lambda site, result, m=mean: m.add(result, site),  # type: ignore[misc]
                    timeout=self.round_timeout,
                    min_responses=self.min_clients,
                    lazy_results=True,  # StreamingMean reads each result as it folds it
                    on_results=mean.add_many,  # queued results: one pass over the sums
                    on_client_error=self.on_client_error,
                )
            except _ResultLost as exc:
                left = [s for s in sites if s not in exc.sites]
                if len(left) < self.min_clients:
                    raise ClientFailedError(
                        f"{exc}\nRound {round_number + 1} cannot go on without "
                        f"{', '.join(exc.sites)}: {len(left)} clients left, fewer than "
                        f"min_clients={self.min_clients}."
                    ) from None
                log.warning(
                    "round %d: %s; it runs again without %s",
                    round_number + 1,
                    exc,
                    ", ".join(exc.sites),
                )
                del mean
                sites = left
                continue
            return mean, answered

    def _publish(self, params: ParamTree) -> ParamTree:
        """Copy the initial params to where ``allocate`` puts aggregates (shared memory), so
        every client's first task references one copy instead of getting its own."""
        if self.allocate is None:
            return params
        structure, arrays = flatten(params)
        published = self.allocate([(a.shape, a.dtype) for a in arrays])
        for target, source in zip(published, arrays, strict=True):
            np.copyto(target, source)
        return unflatten(structure, published)

    def _task_model(self, params: ParamTree, round_number: int, start_round: int) -> FLModel:
        return FLModel(
            params=params,
            current_round=round_number,
            total_rounds=self.num_rounds,
            start_round=start_round,
            meta={MetaKey.CURRENT_ROUND: round_number, MetaKey.TOTAL_ROUNDS: self.num_rounds},
        )

    @staticmethod
    def _update(params: ParamTree, mean: StreamingMean) -> ParamTree:
        aggregate = mean.params()
        if aggregate is None:
            log.warning("no client sent params this round; the global model is unchanged")
            return params
        return apply_update(params, aggregate, mean.params_type)

    def _evaluate_final(
        self, runtime: Controller, params: ParamTree, recorder: RunRecorder, start_round: int
    ) -> dict[str, float]:
        started = time.monotonic()
        mean = StreamingMean(None)
        task = self._task_model(params, self.num_rounds, start_round)
        answered = runtime.run_task(
            "validate",
            task,
            self.sample_clients(runtime.registered_sites(), self.num_rounds),
            on_result=lambda site, result: mean.add(
                FLModel(metrics=result.metrics, meta=result.meta)
            ),
            timeout=self.round_timeout,
            min_responses=self.min_clients,
            on_client_error=self.on_client_error,
        )
        record = recorder.record(
            RoundRecord(
                self.num_rounds, "validate", answered, mean.metrics(), time.monotonic() - started
            ),
            evaluated_params=params,
        )
        self._notify(record)
        return record.metrics

    def _notify(self, record: RoundRecord) -> None:
        if self.on_round is not None:
            self.on_round(record)
