"""Many clients on one machine: FedAvg with clients that are plain functions.

:func:`run_local` runs the same :class:`~fedlift.server.FedAvg` workflow as the simulator,
against a :class:`LocalController` that calls ``client_fn(site, model) -> FLModel`` for each
client instead of talking to worker processes. Clients run in a thread pool (``threads``
at once; NumPy releases the GIL in its maths) or, with ``backend="ray"``, as Ray tasks on
this machine or a cluster (:mod:`._ray`).

Memory does not grow with the number of clients: at most ``2 * threads`` calls are in
flight (a call runs one client in a thread, a small batch in a Ray task), and each result
is folded into the workflow's streaming mean as soon as it is done and then dropped.

Every client gets the global params as read-only views (``flags.writeable`` is False):
no copy per client, and a client that writes into its input raises ``ValueError``
(``assignment destination is read-only``), which fails the job with that traceback instead
of silently changing what the other clients receive. Copy first (``w = w.copy()``, or
``w + update``) to train in place.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, get_args

import numpy as np
from rich.console import Console

from ..codec import Compression, ResultEncoder, decode_model
from ..errors import (
    ClientFailedError,
    ConfigError,
    InvalidResultError,
    ProtocolError,
    RoundTimeoutError,
)
from ..model import FLModel, MetaKey, ParamsType, ParamTree, Structure, flatten, unflatten
from ..server import (
    ArraysFormat,
    CompressionFilter,
    ErrorPolicy,
    FastPath,
    FedAvg,
    RoundRecord,
    RunInfo,
    RunRecorder,
    RunSettings,
    Strategy,
)
from ._finish import end_run
from ._simulator import _round_line

__all__ = ["ClientFn", "LocalController", "LocalResult", "run_local"]

log = logging.getLogger("fedlift.simulator")

ClientFn = Callable[[str, FLModel], FLModel]
"""``client_fn(site, model) -> FLModel``: one client's work on one task."""

BACKENDS = ("threads", "ray")


# ------------------------------------------------------------------ one task, one client


def _read_only(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False
    return view


@dataclass(frozen=True)
class TaskSpec:
    """One task as its clients receive it. The arrays are shared; each client gets fresh
    containers (dicts, lists, meta) over read-only views of them."""

    name: str
    model: FLModel  # the workflow's model without its trees; only read
    params: tuple[Structure, list[np.ndarray]] | None
    optimizer_params: tuple[Structure, list[np.ndarray]] | None
    params_type: ParamsType | None = None
    """The model's (FLModel refuses a params_type without params, so ``model`` has none)."""

    @classmethod
    def of(cls, name: str, model: FLModel) -> TaskSpec:
        def split(tree: ParamTree | None) -> tuple[Structure, list[np.ndarray]] | None:
            return None if tree is None else flatten(tree)

        bare = replace(model, params_type=None, params=None, optimizer_params=None)
        return cls(
            name, bare, split(model.params), split(model.optimizer_params), model.params_type
        )

    def model_for(self, site: str) -> FLModel:
        """The model ``site`` receives."""

        def tree(part: tuple[Structure, list[np.ndarray]] | None) -> ParamTree | None:
            if part is None:
                return None
            structure, arrays = part
            return unflatten(structure, [_read_only(a) for a in arrays])

        meta = dict(self.model.meta)
        meta[MetaKey.TASK_NAME] = self.name
        meta[MetaKey.SITE_NAME] = site
        return FLModel(
            params_type=self.params_type,
            params=tree(self.params),
            optimizer_params=tree(self.optimizer_params),
            start_round=self.model.start_round,
            current_round=self.model.current_round,
            total_rounds=self.model.total_rounds,
            meta=meta,
        )


@dataclass
class Outcome:
    """What one client call produced: a model, or the text of its failure. ``site`` is None
    when a whole batch failed (e.g. its Ray worker died)."""

    site: str | None
    model: FLModel | None = None
    error: str | None = None


def call_clients(client_fn: ClientFn, sites: list[str], task: TaskSpec) -> list[Outcome]:
    """Run ``client_fn`` for each of ``sites`` in turn, up to the first failure. Never
    raises: a failure comes back as its traceback text, so it crosses threads and processes
    alike."""
    outcomes = []
    for site in sites:
        try:
            result = client_fn(site, task.model_for(site))
        except BaseException:  # the client's failure, whatever it is, fails the job
            outcomes.append(Outcome(site, error=traceback.format_exc()))
            break
        if not isinstance(result, FLModel):
            outcomes.append(
                Outcome(
                    site,
                    error=f"client_fn returned a {type(result).__name__} for task "
                    f"{task.name!r}; it must return an FLModel, e.g. "
                    "FLModel(params=..., metrics={...}).",
                )
            )
            break
        outcomes.append(Outcome(site, model=result))
    return outcomes


# ------------------------------------------------------------------ where clients run


class Pool(Protocol):
    """Runs client calls somewhere: a thread pool here, Ray tasks in :mod:`._ray`.

    A handle runs a batch of clients one after the other (threads: one client; Ray: a few,
    which spreads Ray's per-task cost over them)."""

    workers: int

    def start_task(self, task: TaskSpec) -> Any:
        """Per-task state shared by its clients (e.g. the model put in Ray's object store)."""
        ...

    def batch_size(self, task: TaskSpec, n_sites: int) -> int:
        """How many clients one handle runs."""
        ...

    def submit(self, shared: Any, sites: list[str]) -> Any:
        """Start running ``sites``; returns a handle."""
        ...

    def wait(self, handles: list[Any], timeout: float) -> list[Any]:
        """The handles among ``handles`` that are done (waits up to ``timeout`` for one)."""
        ...

    def outcomes(self, handle: Any) -> list[Outcome]:
        """One outcome per site of the batch, up to the first failure."""
        ...

    def cancel(self, handles: list[Any]) -> None:
        """Give up on calls: the ones not started never run; results are dropped."""
        ...

    def close(self) -> None: ...


class ThreadPool:
    """Client calls in a :class:`concurrent.futures.ThreadPoolExecutor`."""

    def __init__(self, client_fn: ClientFn, workers: int) -> None:
        self.workers = workers
        self._client_fn = client_fn
        self._executor = cf.ThreadPoolExecutor(workers, thread_name_prefix="fedlift-client")

    def start_task(self, task: TaskSpec) -> TaskSpec:
        return task

    def batch_size(self, task: TaskSpec, n_sites: int) -> int:
        return 1

    def submit(self, shared: TaskSpec, sites: list[str]) -> cf.Future[list[Outcome]]:
        return self._executor.submit(call_clients, self._client_fn, sites, shared)

    def wait(
        self, handles: list[cf.Future[list[Outcome]]], timeout: float
    ) -> list[cf.Future[list[Outcome]]]:
        done, _ = cf.wait(handles, timeout=timeout, return_when=cf.FIRST_COMPLETED)
        return list(done)

    def outcomes(self, handle: cf.Future[list[Outcome]]) -> list[Outcome]:
        return handle.result()

    def cancel(self, handles: list[cf.Future[list[Outcome]]]) -> None:
        for handle in handles:
            handle.cancel()

    def close(self) -> None:
        # A client still running (it outlived round_timeout) keeps its thread until it
        # returns; the job does not wait for it.
        self._executor.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------ the controller


def _names(sites: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(sites[:limit])
    return shown if len(sites) <= limit else f"{shown} and {len(sites) - limit} more"


class LocalController:
    """The :class:`~fedlift.server.Controller` of clients that are function calls.

    ``run_task`` keeps at most ``2 * pool.workers`` batches of clients in flight, hands
    each result to ``on_result`` as it completes (in the calling thread) and forgets it; a
    client that raises (or whose result ``on_result`` refuses with
    :class:`~fedlift.errors.InvalidResultError`) fails the task with
    :class:`~fedlift.errors.ClientFailedError` and its traceback under
    ``on_client_error="fail"``, and is left out of the round under ``"exclude"`` (failing
    at once when ``min_responses`` is out of reach); it raises
    :class:`~fedlift.errors.RoundTimeoutError` when fewer than ``min_responses`` answered
    within ``timeout`` seconds -- the semantics of
    :meth:`fedlift.server.ServerRuntime.run_task`.
    """

    def __init__(self, pool: Pool, sites: Sequence[str]) -> None:
        if not sites:
            raise ConfigError("a job needs at least one client; received: sites=[].")
        self._pool = pool
        self._sites = list(sites)
        self.window = 2 * pool.workers
        self.client_updates = 0
        """Results handed to ``on_result`` so far (all tasks)."""

    @property
    def fast_path(self) -> FastPath:
        """Clients are functions in this process: their results are their own arrays."""
        return FastPath()

    def wait_for_clients(self, count: int, timeout: float, grace: float = 10.0) -> list[str]:
        if count > len(self._sites):
            raise ConfigError(
                f"min_clients={count} but the job has only {len(self._sites)} clients."
            )
        return list(self._sites)

    def registered_sites(self) -> list[str]:
        return list(self._sites)

    def run_task(
        self,
        task_name: str,
        model: FLModel,
        sites: Sequence[str],
        *,
        on_result: Callable[[str, FLModel], None],
        timeout: float,
        min_responses: int,
        lazy_results: bool = False,  # results here are always plain arrays
        on_results: Callable[[list[tuple[str, FLModel]]], None] | None = None,
        on_client_error: ErrorPolicy = "fail",
        on_left_out: Callable[[str, str], None] | None = None,
    ) -> list[str]:
        if on_client_error not in get_args(ErrorPolicy):
            raise ConfigError(
                "run_task(on_client_error=...) must be 'fail' or 'exclude'; "
                f"received: {on_client_error!r}."
            )
        exclude = on_client_error == "exclude"
        if on_results is not None:
            on_result = lambda site, model: on_results([(site, model)])  # noqa: E731
        deadline = time.monotonic() + timeout
        task = TaskSpec.of(task_name, model)
        size = max(1, self._pool.batch_size(task, len(sites)))
        batches = (list(sites[i : i + size]) for i in range(0, len(sites), size))
        shared = self._pool.start_task(task)
        in_flight: dict[Any, list[str]] = {}
        answered: list[str] = []
        left_out: list[str] = []

        def leave_out(site: str, error: str) -> None:
            left_out.append(site)
            if on_left_out is not None:
                on_left_out(site, error)
            possible = len(sites) - len(left_out)
            if possible < min_responses:
                raise ClientFailedError(
                    f"{site} failed:\n{error}\nTask {task_name!r} cannot reach "
                    f"min_clients={min_responses} any more ({len(left_out)} of {len(sites)} "
                    f"clients left out: {_names(left_out)}).",
                    site=site,
                )
            log.error("%s is left out of task %r:\n%s", site, task_name, error)

        try:
            while True:
                while len(in_flight) < self.window:
                    batch = next(batches, None)
                    if batch is None:
                        break
                    in_flight[self._pool.submit(shared, batch)] = batch
                remaining = deadline - time.monotonic()
                if not in_flight or remaining <= 0:
                    break
                for handle in self._pool.wait(list(in_flight), remaining):
                    batch = in_flight.pop(handle)
                    outcomes = self._pool.outcomes(handle)
                    for site, outcome in zip(batch, outcomes, strict=False):
                        if outcome.error is not None:
                            who = outcome.site or _names(batch)
                            if not exclude:
                                raise ClientFailedError(
                                    f"{who} failed:\n{outcome.error}", site=outcome.site
                                )
                            done = {*answered, *left_out}
                            for gone in [outcome.site] if outcome.site else batch:
                                if gone not in done:
                                    leave_out(gone, outcome.error)
                            continue
                        if outcome.model is not None:
                            try:
                                on_result(site, outcome.model)
                            except InvalidResultError as exc:
                                if not exclude:
                                    raise
                                leave_out(site, str(exc))
                                continue
                            answered.append(site)
                            self.client_updates += 1
                    if exclude:  # a failure ends its batch: the rest of it did not run
                        done = {*answered, *left_out}
                        for site in batch[len(outcomes) :]:
                            if site not in done:
                                leave_out(site, "its batch stopped at an earlier failure")
                    del outcomes  # folded: let the results go now
        finally:
            self._pool.cancel(list(in_flight))
            del shared
        if len(answered) < len(sites):
            missing = sorted(set(sites) - set(answered))
            if len(answered) < min_responses:
                raise RoundTimeoutError(
                    f"task {task_name!r}: {len(answered)} of {len(sites)} clients answered "
                    f"within {timeout:g} s, fewer than min_clients={min_responses} (no answer "
                    f"from: {_names(missing)}). Raise round_timeout if clients take longer."
                )
            if on_left_out is not None:
                for site in sorted(set(missing) - set(left_out)):
                    on_left_out(site, f"no answer within the round timeout ({timeout:g} s)")
            log.warning(
                "task %r: going on with %d of %d clients (no answer from %s)",
                task_name,
                len(answered),
                len(sites),
                _names(missing),
            )
        return answered

    def close(self) -> None:
        self._pool.close()


# ------------------------------------------------------------------ run_local


@dataclass
class LocalResult:
    """What a finished :func:`run_local` produced."""

    params: ParamTree
    rounds: list[RoundRecord]
    final_metrics: dict[str, float]
    best_round: int | None
    best_value: float | None
    workspace: Path | None
    """``WORKSPACE/server`` with models, metrics.jsonl and TensorBoard events; None when
    ``run_local`` ran without a workspace (nothing was kept)."""
    global_model: Path | None
    best_model: Path | None
    seconds: float
    client_updates: int
    """Client results folded into the global model, over every round and task."""

    @property
    def updates_per_second(self) -> float:
        return self.client_updates / self.seconds if self.seconds > 0 else 0.0


def _check_int(name: str, value: object, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}; received: {value!r}.")
    return value


def _compressing(client_fn: ClientFn, sites: Sequence[str]) -> ClientFn:
    """``client_fn`` with a site worker's half of compression around it: the model decoded
    before the call, the result encoded after (one :class:`ResultEncoder` per site)."""
    encoders = {site: ResultEncoder() for site in sites}

    def call(site: str, model: FLModel) -> FLModel:
        model = decode_model(model, who="the server", error=ProtocolError)
        request = (
            encoders[site].request(model) if model.meta.get(MetaKey.TASK_NAME) == "train" else None
        )
        result = client_fn(site, model)
        if not isinstance(result, FLModel):
            return result  # the controller says what is wrong with it
        return encoders[site].encode(result, model, request)

    return call


def run_local(
    client_fn: ClientFn,
    initial_model: ParamTree,
    n_clients: int,
    num_rounds: int,
    *,
    min_clients: int | None = None,
    threads: int | None = None,
    workspace: str | Path | None = None,
    round_timeout: float = 3600.0,
    final_evaluation: bool = False,
    key_metric: str = "accuracy",
    higher_is_better: bool = True,
    backend: str = "threads",
    address: str | None = None,
    quiet: bool = False,
    on_client_error: ErrorPolicy = "fail",
    strategy: Strategy | None = None,
    compression: Compression | str | None = None,
) -> LocalResult:
    """Run ``strategy`` (default FedAvg) with ``n_clients`` clients that are calls of
    ``client_fn(site, model)``.

    Clients are named ``site-1`` ... ``site-N``; ``model.meta["task_name"]`` is ``"train"``
    (or ``"validate"`` for the final evaluation) and ``model.meta["site_name"]`` the site.
    ``model.params`` are read-only views of the global model (see the module docstring).
    ``threads`` clients run at once (default: the CPU count; with Ray, the cluster's CPUs).
    ``backend="ray"`` runs each client call as a Ray task, on the cluster at ``address``
    (or ``$RAY_ADDRESS``), else on a local Ray instance started for the run.

    With ``workspace``, outputs go to ``WORKSPACE/server`` as in the simulator (global and
    best models in the array format, ``metrics.jsonl``, TensorBoard events); without, they
    go to a temporary directory that is removed, and only the returned result remains.

    ``compression``: how models travel (:class:`~fedlift.codec.Compression`, or a scheme's
    name for the results): each client's result is encoded as a site's worker would encode
    it (top-k keeps its error feedback per site) and decoded by the server's filter, so the
    run shows what compression costs in accuracy; each round's record has the bytes.

    ``on_client_error``: a client that raises, or whose result cannot be aggregated (NaN
    or Inf, wrong keys, shapes or dtypes, a weight that is not a finite number > 0), fails
    the job (``"fail"``, default) or is left out of the round, logged with its traceback,
    while ``min_clients`` still answer (``"exclude"``).
    """
    started = time.monotonic()
    if not callable(client_fn):
        raise ConfigError(f"client_fn must be callable; received: {client_fn!r:.80}.")
    n = _check_int("n_clients", n_clients)
    needed = n if min_clients is None else min_clients
    if isinstance(needed, int) and needed > n:
        raise ConfigError(f"min_clients={needed} is more than n_clients={n}.")
    if threads is not None:
        _check_int("threads", threads)
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}; received: {backend!r}.")
    flatten(initial_model)  # a clear ConfigError now for anything that is not a params tree
    sites = [f"site-{i + 1}" for i in range(n)]
    console = Console(file=sys.stdout, highlight=False, quiet=quiet, soft_wrap=True)

    if strategy is None:
        strategy = FedAvg()
    if not isinstance(strategy, Strategy):
        raise ConfigError(
            "run_local(strategy=...) must be a fedlift.server.Strategy such as FedAvg() or "
            f"FedAdam(eta=1e-2); received: strategy={strategy!r:.80}."
        )
    if isinstance(compression, str):
        compression = Compression(results=compression, owner="run_local(compression=...)")
    if compression is not None and not isinstance(compression, Compression):
        raise ConfigError(
            "run_local(compression=...) must be a fedlift.codec.Compression, a scheme's name "
            f"or None; received: compression={compression!r:.80}."
        )
    filters: tuple[CompressionFilter, ...] = ()
    if compression is not None and compression.enabled:
        if backend == "ray" and compression.results == "topk":
            raise ConfigError(
                "run_local(compression=...) with results='topk' keeps each site's error "
                "feedback between rounds, which Ray tasks cannot; use backend='threads' or "
                "another scheme."
            )
        filters = (CompressionFilter(compression),)
        client_fn = _compressing(client_fn, sites)
    settings = RunSettings(
        filters=filters,
        num_rounds=num_rounds,
        min_clients=needed,
        round_timeout=round_timeout,
        register_timeout=0.0,
        final_evaluation=final_evaluation,
        on_round=lambda r: console.print(_round_line(r, num_rounds)),
        on_client_error=on_client_error,
        owner="run_local",
    )
    pool: Pool
    if backend == "ray":
        from ._ray import RayPool

        pool = RayPool(client_fn, threads, address)
    else:
        pool = ThreadPool(client_fn, threads or os.cpu_count() or 1)
    controller = LocalController(pool, sites)
    console.print(
        f"[bold]fedlift run_local[/]: {n} clients, {pool.workers} at a time ({backend}), "
        f"{num_rounds} rounds"
    )
    scratch = None
    try:
        if workspace is None:
            scratch = tempfile.TemporaryDirectory(prefix="fedlift-local-")
            directory = Path(scratch.name)
        else:
            directory = Path(workspace).resolve() / "server"
            directory.mkdir(parents=True, exist_ok=True)
        recorder = RunRecorder(directory, ArraysFormat(), key_metric, higher_is_better)
        info = None
        if scratch is None:  # a run kept on disk says what it was, and gets its report
            info = RunInfo(
                directory,
                job="run_local",
                job_id=f"run_local-{uuid.uuid4().hex[:8]}",
                runner="run_local",
                strategy=strategy,
                num_rounds=num_rounds,
                sites=sites,
                config={
                    "n_clients": n_clients,
                    "num_rounds": num_rounds,
                    "min_clients": needed,
                    "threads": threads,
                    "backend": backend,
                    "round_timeout": round_timeout,
                    "final_evaluation": final_evaluation,
                    "key_metric": key_metric,
                    "higher_is_better": higher_is_better,
                    "on_client_error": on_client_error,
                    "compression": None if compression is None else repr(compression),
                },
            )
            info.start()
        error: BaseException | None = None
        try:
            handoff = [initial_model]
            del initial_model  # freed once round 1 replaced it (see Strategy.run)
            result = strategy.run(controller, handoff.pop(), recorder, settings)
        except BaseException as exc:
            error = exc
            raise
        finally:
            try:
                recorder.close()
            finally:
                if info is not None:
                    end_run(info, error, None)
    finally:
        controller.close()
        if scratch is not None:
            scratch.cleanup()
    elapsed = time.monotonic() - started
    console.print(
        f"fedlift run_local: {controller.client_updates} client updates in {elapsed:.1f} s "
        f"({controller.client_updates / max(elapsed, 1e-9):,.0f}/s)"
    )
    kept = scratch is None
    return LocalResult(
        params=result.params,
        rounds=result.rounds,
        final_metrics=result.final_metrics,
        best_round=result.best_round,
        best_value=result.best_value,
        workspace=directory if kept else None,
        global_model=recorder.global_model_path if kept else None,
        best_model=recorder.best_model_path if kept and result.best_round is not None else None,
        seconds=elapsed,
        client_updates=controller.client_updates,
    )
