"""Strategies, and the one loop that drives every round-based one.

A :class:`Strategy` has a few hooks, each with a default that is FedAvg's:

``configure_train(round, sites, min_clients) -> Ask``   which sites, with what task config
``aggregator``                                           how results combine (a factory)
``update(round, params, aggregate) -> params``           how the global model moves
``after_round(record) -> bool``                          stop early?
``state() / load_state(state)``                          what a checkpoint keeps

:func:`run_rounds` is the loop: per round it asks the strategy, sends the task through the
:class:`Controller`, feeds the results to the round's aggregator as they arrive, moves the
model, records the round and saves the model with the strategy's state. Strategies that
are not round-based (cyclic weight transfer) override :meth:`Strategy.run` with a short
loop of their own on the same controller.

The controller's one-host fast path (:class:`~fedlift.server.FastPath`) is the loop's
business: it publishes each new global model once into the controller's memory (every
client maps that one copy), and hands the aggregator what it may use. A strategy sees
only numpy arrays.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import InitVar, dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np

from ..errors import ClientFailedError, ConfigError
from ..model import FLModel, MetaKey, ParamsType, ParamTree, flatten, is_bfloat16, unflatten
from ._aggregate import ErrorPolicy, _ResultLost, check_error_policy, weighted_mean_metrics
from ._mean import Mean
from ._roundlog import RoundLog, numeric_summary
from ._seam import Aggregate, AggregatorFactory, Allocator, Ask, FastPath, Filter, Memory
from ._store import RoundRecord, RunRecorder, _is_array_tree, split_state

__all__ = [
    "Controller",
    "RunResult",
    "RunSettings",
    "Strategy",
    "StrategyState",
    "run_rounds",
]

log = logging.getLogger("fedlift.server")

StrategyState = dict[str, Any]
"""What :meth:`Strategy.state` returns: JSON values, and param trees of numpy arrays (a
checkpoint writes those as arrays)."""


class Controller(Protocol):
    """What a workflow needs from the clients' side of a job.

    :class:`~fedlift.server.ServerRuntime` implements it for clients that connect over a
    transport (worker processes, real sites); local backends implement it by calling client
    functions directly. ``fast_path`` declares what the controller can do on one host.
    """

    @property
    def fast_path(self) -> FastPath:
        """How models may move (see :class:`~fedlift.server.FastPath`)."""
        ...

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
        on_left_out: Callable[[str, str], None] | None = None,
    ) -> list[str]:
        """Send ``model`` to ``sites``; call ``on_result`` for each result as it arrives;
        return the sites that answered (see :meth:`ServerRuntime.run_task`).
        ``lazy_results``: ``on_result`` accepts params it must read during the call;
        ``on_results``: takes the results that arrived together, instead of ``on_result``;
        ``on_client_error``: the :data:`ErrorPolicy` for sites that fail or whose result
        ``on_result`` refuses with :class:`~fedlift.errors.InvalidResultError`;
        ``on_left_out(site, why)``: called for each site left out of the task (failed, lost,
        or no answer in time)."""
        ...


@dataclass(frozen=True)
class RunSettings:
    """What every strategy's run shares: rounds, clients, time limits, error policy.

    ``min_clients``: the fewest results a round goes on with; ``final_evaluation``: a last
    ``validate`` task asks the sites to evaluate the final global model (off by default, as
    in NVFlare: a script that never checks ``is_evaluate()`` would train on that task, a
    round more than asked, and its params would be dropped); ``on_round`` is called with
    each round's record (e.g. to print it).
    """

    num_rounds: int
    min_clients: int
    round_timeout: float = 3600.0
    register_timeout: float = 600.0
    final_evaluation: bool = False
    on_client_error: ErrorPolicy = "fail"
    on_round: Callable[[RoundRecord], None] | None = field(default=None, repr=False)
    filters: tuple[Filter, ...] = ()
    """Server-side transforms of tasks and results (see :class:`~fedlift.server.Filter`)."""
    owner: InitVar[str] = "RunSettings"
    """Who takes these settings from the user (``"FedAvgJob"``, ``"run_local"``, a
    job.json's workflow): errors name it, so a setting is checked here, once, wherever it
    enters."""

    def __post_init__(self, owner: str) -> None:
        for name in ("num_rounds", "min_clients"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{owner}({name}=...) must be an int >= 1; received: {value!r}.")
        for name in ("round_timeout", "register_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ConfigError(f"{owner}({name}=...) must be seconds >= 0; received: {value!r}.")
        if self.round_timeout <= 0:
            raise ConfigError(
                f"{owner}(round_timeout=...) must be > 0 s; received: {self.round_timeout!r}."
            )
        if not isinstance(self.final_evaluation, bool):
            raise ConfigError(
                f"{owner}(final_evaluation=...) must be True or False; received: "
                f"{self.final_evaluation!r}."
            )
        check_error_policy(self.on_client_error, f"{owner}(on_client_error=...)")


@dataclass
class RunResult:
    """What a finished run produced."""

    params: ParamTree
    rounds: list[RoundRecord]
    final_metrics: dict[str, float]
    best_round: int | None
    best_value: float | None


class Strategy:
    """The hooks of a federated algorithm, each defaulting to FedAvg's behaviour.

    Subclasses are dataclasses with flat keyword options, validated in ``__post_init__``;
    ``name`` is the ``type`` that ``job.json`` gives
    (see :func:`~fedlift.server.strategy_from_spec`).
    """

    name: ClassVar[str] = ""
    aggregator: AggregatorFactory = Mean()
    """How a round's results combine (streaming mean; robust strategies collect)."""
    extras: ClassVar[tuple[str, ...]] = ()
    """Meta keys of each result whose param trees the aggregator combines too."""

    def configure_train(self, round_number: int, sites: Sequence[str], min_clients: int) -> Ask:
        """Which of the available ``sites`` train in round ``round_number``, and with what
        task config. Default: all of them, no config."""
        return Ask(list(sites))

    def update(self, round_number: int, params: ParamTree, aggregate: Aggregate) -> ParamTree:
        """The next global model from this one and the round's aggregate. Default: the
        aggregate itself (FULL results) or the model plus the aggregate (DIFF)."""
        if aggregate.params is None:
            return params
        return apply_in_place(params, aggregate.params, aggregate.params_type)

    def start(self, params: ParamTree) -> None:
        """Called once before the first round of a run (or of a resumed run, after
        :meth:`load_state`) with the global model, e.g. to shape state after it."""

    def configure_evaluate(self, round_number: int, sites: Sequence[str]) -> Ask | None:
        """Which sites evaluate the new global model after round ``round_number`` (task
        ``validate``), or None for no evaluation then. Default: none (a run's final
        evaluation is :attr:`RunSettings.final_evaluation`)."""
        return None

    def aggregate_evaluate(self, results: list[tuple[str, FLModel]]) -> dict[str, float]:
        """The round's evaluation metrics from the sites' (default: their weighted mean)."""
        return weighted_mean_metrics(result for _, result in results)

    def after_round(self, record: RoundRecord) -> bool:
        """Called with each training round's record; True stops the run after it."""
        return False

    def state(self) -> StrategyState:
        """What a checkpoint must keep to resume this strategy exactly (default: nothing)."""
        return {}

    def load_state(self, state: StrategyState) -> None:
        """Take back what :meth:`state` returned (on resume from a checkpoint)."""

    def summary(self) -> dict[str, float]:
        """Scalars that describe the strategy after a round (a server learning rate, a
        clipping norm), recorded with the round (``extra["strategy"]``) and plotted by the
        report. Default: the finite numbers in :meth:`state`, nested keys joined by ``.``."""
        plain, _ = split_state(self.state())
        return numeric_summary(plain)

    def run(
        self,
        controller: Controller,
        initial_params: ParamTree,
        recorder: RunRecorder,
        settings: RunSettings,
        start_round: int = 0,
    ) -> RunResult:
        """Run the job: by default :func:`run_rounds`.

        ``initial_params`` is handed on, not kept: this frame lets go of it, so the model
        the job started from is freed once round 1 replaced it (100M params: 400 MB less
        server memory for the whole job). An override should do the same."""
        handoff = [initial_params]
        del initial_params
        return run_rounds(self, controller, handoff.pop(), recorder, settings, start_round)


def apply_in_place(
    params: ParamTree, aggregate: ParamTree, params_type: ParamsType | None
) -> ParamTree:
    """FULL: the aggregate is the new model. DIFF: ``model + aggregate``, written into the
    aggregate's own buffers (they are this round's, already where the model is published,
    e.g. shared memory), so the new model costs no allocation and no extra copy."""
    if params_type in (None, ParamsType.FULL):
        return aggregate
    g_structure, g_arrays = flatten(params)
    u_structure, u_arrays = flatten(aggregate)
    if g_structure != u_structure:
        raise ConfigError("a DIFF update must have the global model's layout.")
    out = []
    for g, u in zip(g_arrays, u_arrays, strict=True):
        if not (np.issubdtype(g.dtype, np.number) or is_bfloat16(g.dtype)):
            out.append(g)
        elif u.dtype == g.dtype and u.flags.writeable and u.shape == g.shape:
            np.add(u, g, out=u)
            out.append(u)
        else:
            out.append(np.add(g, u, dtype=g.dtype, casting="unsafe"))
    return unflatten(g_structure, out)


class _Publisher:
    """Puts each new global model where the controller's clients map it (its
    ``allocate``), once per round: arrays already there (an aggregate made in that memory)
    are kept as they are, any other is copied in once. Without ``allocate``, a no-op."""

    def __init__(self, allocate: Allocator | None) -> None:
        self._allocate = allocate
        self._made: weakref.WeakValueDictionary[int, np.ndarray] = weakref.WeakValueDictionary()

    @property
    def memory_allocate(self) -> Allocator | None:
        """The allocator to give aggregators: it remembers what it made."""
        return None if self._allocate is None else self._track

    def _track(self, specs: list[tuple[tuple[int, ...], np.dtype[Any]]]) -> list[np.ndarray]:
        if self._allocate is None:
            raise ConfigError("no allocator")
        arrays = self._allocate(specs)
        for array in arrays:
            self._made[id(array)] = array
        return arrays

    def _published(self, array: np.ndarray) -> bool:
        return self._made.get(id(array)) is array

    def publish_with(
        self, params: ParamTree, meta: dict[str, Any]
    ) -> tuple[ParamTree, dict[str, Any]]:
        """The task's model and meta, published together: a task's arrays travel by
        reference only when they lie in one segment, so a model that goes with param trees
        in its meta (SCAFFOLD's control variate) is copied with them into one allocation,
        once per round (else each client's message would copy both)."""
        trees = {k: v for k, v in meta.items() if _is_array_tree(v)}
        if self._allocate is None or not trees:
            return params, meta
        parts = [params, *trees.values()]
        flat = [flatten(tree) for tree in parts]
        arrays = [a for _, leaves in flat for a in leaves]
        made = self._track([(a.shape, a.dtype) for a in arrays])
        for target, source in zip(made, arrays, strict=True):
            np.copyto(target, source)
        out, start = [], 0
        for structure, leaves in flat:
            out.append(unflatten(structure, made[start : start + len(leaves)]))
            start += len(leaves)
        return out[0], {**meta, **dict(zip(trees, out[1:], strict=True))}

    def publish(self, params: ParamTree) -> ParamTree:
        if self._allocate is None:
            return params
        structure, arrays = flatten(params)
        todo = [i for i, a in enumerate(arrays) if not self._published(a)]
        if not todo:
            return params
        made = self._track([(arrays[i].shape, arrays[i].dtype) for i in todo])
        out = list(arrays)
        for i, target in zip(todo, made, strict=True):
            np.copyto(target, arrays[i])
            out[i] = target
        return unflatten(structure, out)


def task_model(
    params: ParamTree | None,
    round_number: int,
    settings: RunSettings,
    start_round: int,
    ask: Ask | None = None,
    **meta: Any,
) -> FLModel:
    """The FLModel a task sends: the model, where the run stands and the strategy's ask."""
    full_meta: dict[str, Any] = {
        MetaKey.CURRENT_ROUND: round_number,
        MetaKey.TOTAL_ROUNDS: settings.num_rounds,
        **meta,
    }
    if ask is not None:
        if ask.config:
            full_meta["config"] = dict(ask.config)
        full_meta.update(ask.meta)
    return FLModel(
        params=params,
        current_round=round_number,
        total_rounds=settings.num_rounds,
        start_round=start_round,
        meta=full_meta,
    )


def _check_ask(ask: object, available: Sequence[str], strategy: Strategy) -> Ask:
    if not isinstance(ask, Ask):
        raise ConfigError(
            f"{type(strategy).__name__}.configure_train must return an Ask; received: {ask!r:.80}."
        )
    unknown = [s for s in ask.sites if s not in set(available)]
    if not ask.sites or unknown or len(set(ask.sites)) != len(ask.sites):
        raise ConfigError(
            f"{type(strategy).__name__}.configure_train must choose distinct sites among "
            f"the available ones ({', '.join(available)}); received: sites={ask.sites!r:.200}."
        )
    return ask


def train_round(
    strategy: Strategy,
    controller: Controller,
    params: ParamTree,
    task: FLModel,
    sites: list[str],
    round_number: int,
    settings: RunSettings,
    publisher: _Publisher,
    log_to: RoundLog | None = None,
) -> tuple[Aggregate, list[str]]:
    """One ``train`` task folded by the strategy's aggregator; run again without the sites
    whose results were lost part-way through their fold (fewer sites each time).
    ``log_to`` takes note of each site's result, and of the sites left out."""
    fast = controller.fast_path
    needed = min(settings.min_clients, len(sites))
    noted = log_to if log_to is not None else RoundLog()
    noted.sent(task, len(sites))
    while True:
        aggregator = strategy.aggregator(
            params,
            expected=len(sites),
            memory=Memory(publisher.memory_allocate, fast.private_results),
            strict=settings.on_client_error == "exclude",
            extras=strategy.extras,
        )
        streaming = aggregator.streaming
        add = noted.watch(_filtered(aggregator.add, settings.filters))
        try:
            answered = controller.run_task(
                "train",
                task,
                sites,
                on_result=lambda site, result, add=add: add([(site, result)]),  # type: ignore[misc]
                timeout=settings.round_timeout,
                min_responses=needed,
                lazy_results=streaming and fast.lazy_results and not settings.filters,
                on_results=add if streaming else None,
                on_client_error=settings.on_client_error,
                on_left_out=noted.left_out,
            )
        except _ResultLost as exc:
            left = [s for s in sites if s not in exc.sites]
            if len(left) < needed:
                raise ClientFailedError(
                    f"{exc}\nRound {round_number + 1} cannot go on without "
                    f"{', '.join(exc.sites)}: {len(left)} clients left, fewer than "
                    f"min_clients={needed}."
                ) from None
            log.warning(
                "round %d: %s; it runs again without %s",
                round_number + 1,
                exc,
                ", ".join(exc.sites),
            )
            del aggregator
            for site in exc.sites:
                noted.left_out(site, str(exc))
            sites = left
            continue
        return aggregator.result(), answered


def _filtered(
    add: Callable[[list[tuple[str, FLModel]]], None], filters: tuple[Filter, ...]
) -> Callable[[list[tuple[str, FLModel]]], None]:
    """``add`` behind the run's filters (results pass them in reverse order)."""
    if not filters:
        return add

    def filtered(results: list[tuple[str, FLModel]]) -> None:
        out = []
        for site, result in results:
            for f in reversed(filters):
                result = f.on_result(site, result)
            out.append((site, result))
        add(out)

    return filtered


def apply_task_filters(task: FLModel, settings: RunSettings) -> FLModel:
    """The task as the run's filters send it."""
    for f in settings.filters:
        task = f.on_task(task)
    return task


def filter_summary(settings: RunSettings) -> dict[str, Any]:
    """What the run's filters did since they were last asked (for a round's record)."""
    out: dict[str, Any] = {}
    for f in settings.filters:
        out.update(f.summary())
    return out


def run_rounds(
    strategy: Strategy,
    controller: Controller,
    initial_params: ParamTree,
    recorder: RunRecorder,
    settings: RunSettings,
    start_round: int = 0,
) -> RunResult:
    """The round loop every round-based strategy runs (see the module docstring)."""
    controller.wait_for_clients(settings.min_clients, settings.register_timeout)
    publisher = _Publisher(controller.fast_path.allocate)
    params = publisher.publish(initial_params)
    del initial_params  # once published, the caller's copy can go
    strategy.start(params)
    for round_number in range(start_round, settings.num_rounds):
        started = time.monotonic()
        available = controller.registered_sites()
        ask = _check_ask(
            strategy.configure_train(round_number, available, settings.min_clients),
            available,
            strategy,
        )
        sent, published = publisher.publish_with(params, ask.meta)
        ask = Ask(ask.sites, ask.config, published)
        task = apply_task_filters(
            task_model(sent, round_number, settings, start_round, ask), settings
        )
        del sent
        noted = RoundLog()
        aggregate, answered = train_round(
            strategy, controller, params, task, ask.sites, round_number, settings, publisher,
            noted,
        )  # fmt: skip
        del task
        if aggregate.params is None:
            log.warning("no client sent params this round; the global model is unchanged")
        new_params = publisher.publish(strategy.update(round_number, params, aggregate))
        record = recorder.record(
            RoundRecord(
                round_number,
                "train",
                answered,
                aggregate.metrics,
                time.monotonic() - started,
                extra={
                    "total_weight": aggregate.total_weight,
                    **noted.extra(answered, aggregate.weights),
                    **_strategy_summary(strategy),
                    **filter_summary(settings),
                },
            ),
            evaluated_params=params,
        )
        params = new_params
        del aggregate
        evaluation = strategy.configure_evaluate(round_number, controller.registered_sites())
        if evaluation is not None:
            evaluate_round(strategy, controller, params, evaluation, recorder, settings,
                           round_number, start_round)  # fmt: skip
        stop = strategy.after_round(record)
        last = stop or round_number == settings.num_rounds - 1
        recorder.save_global(params, round_number, final=last, strategy_state=strategy.state())
        _notify(settings, record)
        if stop:
            log.info("%s stops after round %d", type(strategy).__name__, round_number + 1)
            break
    final_metrics: dict[str, float] = {}
    if settings.final_evaluation:
        final_metrics = evaluate_final(controller, params, recorder, settings, start_round)
    return RunResult(
        params, recorder.records, final_metrics, recorder.best_round, recorder.best_value
    )


def evaluate_round(
    strategy: Strategy,
    controller: Controller,
    params: ParamTree,
    ask: Ask,
    recorder: RunRecorder,
    settings: RunSettings,
    round_number: int,
    start_round: int,
) -> RoundRecord:
    """The sites ``ask`` names evaluate ``params`` (task ``validate``); the strategy
    combines their metrics; recorded as the round's ``validate`` line."""
    started = time.monotonic()
    available = controller.registered_sites()
    unknown = [s for s in ask.sites if s not in set(available)]
    if not ask.sites or unknown:
        raise ConfigError(
            f"{type(strategy).__name__}.configure_evaluate must choose among the available "
            f"sites ({', '.join(available)}); received: sites={ask.sites!r:.200}."
        )
    results: list[tuple[str, FLModel]] = []
    noted = RoundLog()
    task = apply_task_filters(task_model(params, round_number, settings, start_round, ask),
                              settings)  # fmt: skip
    noted.sent(task, len(ask.sites))

    def take(site: str, result: FLModel) -> None:
        noted.took(site, result)
        results.append((site, FLModel(metrics=result.metrics, meta=result.meta)))

    answered = controller.run_task(
        "validate",
        task,
        ask.sites,
        on_result=take,
        timeout=settings.round_timeout,
        min_responses=min(settings.min_clients, len(ask.sites)),
        on_client_error=settings.on_client_error,
        on_left_out=noted.left_out,
    )
    del task
    record = recorder.record(
        RoundRecord(round_number, "validate", answered, strategy.aggregate_evaluate(results),
                    time.monotonic() - started,
                    extra={**noted.extra(answered), **filter_summary(settings)}),
        evaluated_params=params,
    )  # fmt: skip
    _notify(settings, record)
    return record


def evaluate_final(
    controller: Controller,
    params: ParamTree,
    recorder: RunRecorder,
    settings: RunSettings,
    start_round: int,
) -> dict[str, float]:
    """Every registered site evaluates the final global model (task ``validate``)."""
    from ._aggregate import StreamingMean

    started = time.monotonic()
    mean = StreamingMean(None)
    noted = RoundLog()
    task = apply_task_filters(
        task_model(params, settings.num_rounds, settings, start_round), settings
    )
    sites = controller.registered_sites()
    noted.sent(task, len(sites))

    def take(site: str, result: FLModel) -> None:
        noted.took(site, result)
        mean.add(FLModel(metrics=result.metrics, meta=result.meta), site)

    answered = controller.run_task(
        "validate",
        task,
        sites,
        on_result=take,
        timeout=settings.round_timeout,
        min_responses=settings.min_clients,
        on_client_error=settings.on_client_error,
        on_left_out=noted.left_out,
    )
    del task
    record = recorder.record(
        RoundRecord(
            settings.num_rounds,
            "validate",
            answered,
            mean.metrics(),
            time.monotonic() - started,
            extra={**noted.extra(answered, mean.weights), **filter_summary(settings)},
        ),
        evaluated_params=params,
    )
    _notify(settings, record)
    return record.metrics


def _strategy_summary(strategy: Strategy) -> dict[str, Any]:
    summary = strategy.summary()
    return {"strategy": summary} if summary else {}


def _notify(settings: RunSettings, record: RoundRecord) -> None:
    if settings.on_round is not None:
        settings.on_round(record)
