"""Cyclic weight transfer (Chang et al. 2018): the model visits the sites one after another.

Each round the model goes through every available site in turn: a site trains the model it
receives (task ``train``) and its result is the model the next site gets (FULL results; a
DIFF result is added to it). The order is drawn by ``seed`` once, or again every round with
``shuffle_each_round``, from a generator seeded with ``(seed, round)``, so a resumed run
visits the sites exactly as an uninterrupted one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..errors import ClientFailedError, ConfigError
from ..model import ParamTree
from ._roundlog import RoundLog
from ._seam import Ask
from ._store import RoundRecord, RunRecorder
from ._strategy import (
    Controller,
    RunResult,
    RunSettings,
    Strategy,
    _Publisher,
    apply_task_filters,
    evaluate_final,
    filter_summary,
    task_model,
    train_round,
)

__all__ = ["Cyclic", "cyclic_order"]

log = logging.getLogger("fedlift.server")


def cyclic_order(
    sites: Sequence[str], round_number: int, *, seed: int, shuffle_each_round: bool
) -> list[str]:
    """The order in which round ``round_number`` visits ``sites``."""
    rng = np.random.default_rng([seed, round_number if shuffle_each_round else 0])
    return [sites[int(i)] for i in rng.permutation(len(sites))]


@dataclass
class Cyclic(Strategy):
    """Cyclic weight transfer; ``seed`` and ``shuffle_each_round`` fix the order."""

    name: ClassVar[str] = "cyclic"

    seed: int = 0
    shuffle_each_round: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(
                f"Cyclic(seed=...) must be an int >= 0; received: seed={self.seed!r}."
            )
        if not isinstance(self.shuffle_each_round, bool):
            raise ConfigError(
                "Cyclic(shuffle_each_round=...) must be True or False; received: "
                f"shuffle_each_round={self.shuffle_each_round!r}."
            )

    def run(
        self,
        controller: Controller,
        initial_params: ParamTree,
        recorder: RunRecorder,
        settings: RunSettings,
        start_round: int = 0,
    ) -> RunResult:
        controller.wait_for_clients(settings.min_clients, settings.register_timeout)
        publisher = _Publisher(controller.fast_path.allocate)
        params = publisher.publish(initial_params)
        del initial_params
        one = RunSettings(
            settings.num_rounds,
            1,
            settings.round_timeout,
            settings.register_timeout,
            on_client_error=settings.on_client_error,
            filters=settings.filters,
        )
        for round_number in range(start_round, settings.num_rounds):
            started = time.monotonic()
            order = cyclic_order(
                controller.registered_sites(),
                round_number,
                seed=self.seed,
                shuffle_each_round=self.shuffle_each_round,
            )
            visited: list[str] = []
            metrics: dict[str, float] = {}
            evaluated = params
            noted = RoundLog()
            weights: dict[str, float] = {}
            for site in order:
                task = apply_task_filters(
                    task_model(params, round_number, settings, start_round, Ask([site])), settings
                )
                try:
                    aggregate, answered = train_round(
                        self, controller, params, task, [site], round_number, one, publisher,
                        noted,
                    )  # fmt: skip
                except ClientFailedError as exc:
                    if settings.on_client_error == "fail":
                        raise
                    log.error("round %d: %s is skipped", round_number + 1, site)
                    noted.left_out(site, str(exc))
                    continue
                weights.update(aggregate.weights)
                if aggregate.params is not None:
                    params = publisher.publish(self.update(round_number, params, aggregate))
                visited += answered
                metrics = aggregate.metrics  # the last visit's view of the model it received
            if len(visited) < min(settings.min_clients, len(order)):
                raise ClientFailedError(
                    f"round {round_number + 1}: only {len(visited)} of {len(order)} sites "
                    f"trained the model, fewer than min_clients={settings.min_clients}."
                )
            record = recorder.record(
                RoundRecord(
                    round_number,
                    "train",
                    visited,
                    metrics,
                    time.monotonic() - started,
                    extra={
                        "order": order,
                        **noted.extra(visited, weights),
                        **filter_summary(settings),
                    },
                ),
                evaluated_params=evaluated,
            )
            last = round_number == settings.num_rounds - 1
            recorder.save_global(params, round_number, final=last, strategy_state=self.state())
            if settings.on_round is not None:
                settings.on_round(record)
        final_metrics: dict[str, float] = {}
        if settings.final_evaluation:
            final_metrics = evaluate_final(controller, params, recorder, settings, start_round)
        return RunResult(
            params, recorder.records, final_metrics, recorder.best_round, recorder.best_value
        )
