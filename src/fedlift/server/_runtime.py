"""The server's side of the client protocol: registration, tasks, results and failures.

Client workers (a simulator's processes or long-running sites) connect out to the server
and speak five operations over any :mod:`fedlift.transport`:

``register``     -> ``welcome`` (job id, site index, client config, the job's app archive)
``get_task``     -> ``task`` (a model to work on), ``wait`` (nothing yet, ask again) or ``stop``
``submit``       -> ``ok`` (the result of a task)
``client_error`` -> ``ok`` (the site's script failed: traceback attached; by the task's error
                 policy the job stops, or the site is left out of the round)
``log``          -> ``ok`` (a metric the script logged with ``flare.log``)

A site that is not registered yet (a worker that outlived a server restart) is registered
implicitly by its first ``get_task``/``submit``/``client_error``/``log``; a site that
registers again while it holds an unanswered task (its client restarted) gets that task again.

Workflows drive it with :meth:`ServerRuntime.run_task`, which dispatches a task to sites (at
most ``max_concurrent`` at once), feeds each result to a callback as it arrives and, by the
task's error policy, raises at once when a site fails or leaves that site out of the round.
A site whose process is gone (:meth:`ServerRuntime.report_lost`, e.g. the simulator saw its
worker die) is left out of the round under either policy while ``min_responses`` can still be
met; the task fails at once when it cannot.
"""

from __future__ import annotations

import collections
import functools
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..codec import (
    LazyArray,
    Message,
    check_log_record,
    check_remote_probe,
    materialize_lazy,
    model_from_wire,
    model_to_wire,
    prefetch_shm,
)
from ..errors import (
    ClientFailedError,
    ConfigError,
    InvalidResultError,
    JobAbortedError,
    ProtocolError,
    RoundTimeoutError,
)
from ..model import FLModel
from ._aggregate import ErrorPolicy, _ResultLost, check_error_policy
from ._seam import Allocator, FastPath

__all__ = ["LogRecord", "ServerRuntime"]

log = logging.getLogger("fedlift.server")

_MAX_POLL_SECONDS = 30.0
_MAX_BATCH = 16  # results handed to on_results at once
_READ_CHECK_SECONDS = 0.5  # a held submit re-checks that its round still runs
_OPS = frozenset({"get_task", "submit", "client_error", "log"})


@dataclass(frozen=True)
class LogRecord:
    """What a site's script logged with ``flare.log`` or a tracking writer, checked
    (:func:`fedlift.codec.check_log_record`): ``value`` is a float (SCALAR, METRIC), a dict
    of floats (SCALARS, METRICS), a str (PARAMETER, TAG, TEXT) or a dict of str
    (PARAMETERS, TAGS); ``path`` names a TEXT record's artifact file."""

    site: str
    key: str
    value: float | str | dict[str, float] | dict[str, str]
    data_type: str
    step: int | None
    writer: str = "TORCH_TB"
    path: str | None = None

    def numbers(self) -> list[tuple[str, float]]:
        """The record's numbers by name: ``key`` (SCALAR, METRIC), ``key/name`` (SCALARS,
        as TensorBoard's ``add_scalars``), ``name`` (METRICS, as ``mlflow.log_metrics``)."""
        value = self.value
        if isinstance(value, float):
            return [(self.key, value)]
        if self.data_type == "SCALARS" and isinstance(value, dict):
            return [(f"{self.key}/{name}", float(v)) for name, v in value.items()]
        if self.data_type == "METRICS" and isinstance(value, dict):
            return [(name, float(v)) for name, v in value.items()]
        return []

    def strings(self) -> dict[str, str]:
        """The params (PARAMETER, PARAMETERS) or tags (TAG, TAGS) of the record by name."""
        value = self.value
        if self.data_type in ("PARAMETER", "TAG") and isinstance(value, str):
            return {self.key: value}
        if self.data_type in ("PARAMETERS", "TAGS") and isinstance(value, dict):
            return {name: str(v) for name, v in value.items()}
        return {}


@dataclass
class _Task:
    task_id: str
    name: str
    message_fields: dict[str, Any]
    arrays: list[np.ndarray]


@dataclass
class _Event:
    kind: str  # "result" | "failure" | "lost" | "stop"
    site: str
    task_id: str = ""
    model: FLModel | None = None
    text: str = ""
    arrays: list[Any] = field(default_factory=list)
    """The result's arrays as they came: numpy arrays, or :class:`LazyArray` leaves."""
    read: threading.Event | None = None
    """Set once a result read from the client's memory has been read (or dropped): only
    then may the client's ``submit`` return (see ``codec._remote``)."""
    fields: Any = None
    """The result's model fields as sent (a resent copy must carry the same)."""

    def release(self) -> None:
        if self.read is not None:
            self.read.set()
        for array in self.arrays:  # a result that was still arriving: its bytes may go
            if isinstance(array, LazyArray):
                array.let_go()


@dataclass
class _Site:
    name: str
    index: int
    registered: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0
    """Registrations so far: a poll made before the latest one is from a gone worker."""
    last_seen: float = 0.0
    gone: str | None = None
    """Why the site's process is gone for good (it will not register again), if it is."""


def _str_field(fields: dict[str, Any], name: str) -> str:
    value = fields.get(name)
    if not isinstance(value, str) or not value or len(value) > 256:
        raise ProtocolError(f"field {name!r} must be a non-empty string; got {value!r:.60}")
    return value


class ServerRuntime:
    """Serves client workers for one job (see module docstring)."""

    def __init__(
        self,
        job_id: str,
        sites: Sequence[str],
        client_config: dict[str, Any],
        app_archive: bytes = b"",
        *,
        max_concurrent: int | None = None,
        on_log: Callable[[LogRecord], None] | None = None,
        allocate: Allocator | None = None,
    ) -> None:
        if not sites:
            raise ConfigError("a job needs at least one site; received: sites=[].")
        self.job_id = job_id
        # Results arrive off the wire in buffers nobody else holds (an aggregate may fold
        # into the first in place), and may be read where they lie in a client's memory;
        # ``allocate`` (the simulator: shared memory) is where published models live.
        self._fast_path = FastPath(allocate=allocate, private_results=True, lazy_results=True)
        self._sites = {name: _Site(name, i) for i, name in enumerate(sites)}
        self._client_config = client_config
        self._app = np.frombuffer(app_archive, np.uint8) if app_archive else np.zeros(0, np.uint8)
        self._slots = max_concurrent or len(sites)
        if self._slots < 1:
            raise ConfigError(f"max_concurrent must be at least 1; received: {max_concurrent}.")
        self._on_log = on_log
        self._cond = threading.Condition()
        self._pending: dict[str, _Task] = {}
        self._handed_out: dict[str, _Task] = {}  # sent by get_task, no result yet
        self._events: queue.Queue[_Event] = queue.Queue()
        self._stop_reason: str | None = None
        self._stop_failed = False
        self._failure: _Event | None = None
        self._active_task: str | None = None
        self._active_policy: ErrorPolicy = "fail"
        self._answered: dict[str, collections.deque[str]] = {}  # task ids a site answered
        self._reoffered: set[str] = set()  # sites whose pending task was handed out before
        self._streaming: dict[tuple[str, str], _Event] = {}  # results still arriving

    def progress(self) -> dict[str, dict[str, Any]]:
        """Where each site stands, for a live view: registered or not (or gone, and why),
        seconds since it was last heard from, and the task it is working on (``working``:
        handed out, no result yet; ``queued``: waiting for it to ask) with its round. A
        copy, taken under the lock in a few microseconds a site."""
        now = time.monotonic()
        with self._cond:
            out: dict[str, dict[str, Any]] = {}
            for name, site in self._sites.items():
                held, queued = self._handed_out.get(name), self._pending.get(name)
                task = held or queued
                model = task.message_fields.get("model") if task is not None else None
                round_number = model.get("current_round") if isinstance(model, dict) else None
                out[name] = {
                    "registered": site.registered,
                    "gone": site.gone,
                    "seen_s_ago": None if not site.last_seen else now - site.last_seen,
                    "state": "working" if held else "queued" if queued else "idle",
                    "task": task.name if task is not None else None,
                    "round": round_number if isinstance(round_number, int) else None,
                }
            return out

    # ------------------------------------------------------------------ transport handler
    def handle(self, request: Message) -> Message:
        """The transport handler: validate the request and run its operation."""
        fields = request.fields
        site = self._site(_str_field(fields, "site"))
        site.last_seen = time.monotonic()
        if request.op == "register":
            return self._register(site, fields)
        if request.op not in _OPS:
            raise ProtocolError(
                f"unknown operation {request.op!r}; expected register, get_task, submit, "
                "client_error or log."
            )
        if not site.registered:
            # A worker that outlived a server restart goes on without registering again.
            with self._cond:
                site.registered = True
                self._cond.notify_all()
            log.info("%s is back (implicitly registered by %r)", site.name, request.op)
        if request.op == "get_task":
            return self._get_task(site, fields)
        if request.op == "submit":
            task_id = _str_field(fields, "task_id")
            model = model_from_wire(fields.get("model") or {}, list(request.arrays))
            if self._resumed(site.name, task_id, fields, list(request.arrays)) is not None:
                return Message("ok")  # the fold goes on in this copy
            if not self._take_handed(site, task_id):
                return Message("ok")  # late or repeated: logged, not queued
            # Read from the client's memory, or still arriving: answered once read.
            remote = any(isinstance(a, LazyArray) for a in request.arrays)
            event = _Event(
                "result", site.name, task_id, model, arrays=list(request.arrays),
                read=threading.Event() if remote else None, fields=fields.get("model"),
            )  # fmt: skip
            if _streamed(event):
                # Still arriving: kept for the fold, and answered once all of it is here
                # (the listener replies then), not once it is folded: a fold that waits
                # for another one never keeps its sender waiting for a reply.
                for array in event.arrays:
                    if isinstance(array, LazyArray):
                        array.keep()
                with self._cond:
                    self._streaming[(site.name, task_id)] = event
                self._events.put(event)
                return Message("ok")
            self._events.put(event)
            if event.read is not None:
                self._wait_read(event)
            return Message("ok")
        if request.op == "client_error":
            text = str(fields.get("error", "unknown error"))[:200_000]
            self.report_failure(site.name, text)
            return Message("ok")
        self._log(site, fields)
        return Message("ok")

    def _take_handed(self, site: _Site, task_id: str) -> bool:
        """Whether a ``submit`` for ``task_id`` answers the task handed to ``site`` (it is
        then no longer outstanding). A result for the running task that was never handed to
        this site (not fetched yet, or the site is not in this round) raises ProtocolError; a
        repeated result, or one for a task no longer running (a slow site's answer after the
        round ended, a task from before a server restart), is logged and dropped: the site's
        job goes on and the aggregate never sees it."""
        with self._cond:
            handed = self._handed_out.get(site.name)
            answered = self._answered.setdefault(site.name, collections.deque(maxlen=16))
            if handed is not None and handed.task_id == task_id:
                del self._handed_out[site.name]
                answered.append(task_id)
                return True
            offered = self._pending.get(site.name)
            if offered is not None and offered.task_id == task_id and site.name in self._reoffered:
                # Handed out, then offered again when the site registered anew (a link drop
                # may have lost the task on its way): the result of the first hand-out counts.
                del self._pending[site.name]
                self._reoffered.discard(site.name)
                answered.append(task_id)
                return True
            running = self._active_task is not None and self._stop_reason is None
            if running and task_id == self._active_task and task_id not in answered:
                raise ProtocolError(
                    f"{site.name} sent a result for task {task_id[:40]!r}, which was never "
                    f"handed to it: {site.name} must fetch its task with get_task first, and "
                    "answer only its own tasks. Received: op='submit', "
                    f"task_id={task_id[:40]!r}."
                )
        why = "a repeated result" if task_id in answered else "a result for a task not running"
        log.warning("ignoring %s from %s (task %.40s)", why, site.name, task_id)
        return False

    def _resumed(
        self, site: str, task_id: str, fields: dict[str, Any], arrays: list[Any]
    ) -> _Event | None:
        """The result being received from ``site`` for ``task_id``, if ``arrays`` are its
        resend (the link broke part-way) and its fold now goes on in them; else None."""
        with self._cond:
            event = self._streaming.get((site, task_id))
        if event is None or event.read is None or event.read.is_set():
            return None
        if fields.get("model") != event.fields or len(arrays) != len(event.arrays):
            log.warning("%s resent task %.40s's result with other contents: ignored", site,
                        task_id)  # fmt: skip
            return None
        if not all(old.resume_from(new) for old, new in zip(event.arrays, arrays, strict=True)):
            return None
        log.info("%s resent its result for task %.40s: its fold goes on", site, task_id)
        return event

    def _wait_read(self, event: _Event) -> None:
        """Hold the client's ``submit`` until its result has been read from its memory."""
        read = event.read
        while read is not None and not read.wait(_READ_CHECK_SECONDS):
            with self._cond:
                if self._stop_reason is not None or self._active_task != event.task_id:
                    return  # the round is over: the result will be dropped unread

    def _site(self, name: str) -> _Site:
        site = self._sites.get(name)
        if site is None:
            raise ConfigError(
                f"site {name!r} is not part of job {self.job_id}; expected one of "
                f"{sorted(self._sites)}."
            )
        return site

    def _register(self, site: _Site, fields: dict[str, Any]) -> Message:
        # Can this server read the site's memory (same host, permitted)? Then its results
        # are read where they lie instead of being copied to shared memory first.
        remote_reads = "remote_probe" in fields and check_remote_probe(fields["remote_probe"])
        with self._cond:
            site.registered = True
            site.gone = None
            site.epoch += 1
            site.info = {k: fields.get(k) for k in ("pid", "host") if k in fields}
            lost = self._handed_out.pop(site.name, None)
            if lost is not None and site.name not in self._pending and self._stop_reason is None:
                # The site restarted while it held a task: hand that task out again.
                self._pending[site.name] = lost
                self._reoffered.add(site.name)
                log.info("%s registered again: its unanswered task is sent again", site.name)
            self._cond.notify_all()
        log.info(
            "%s registered (pid %s%s)",
            site.name,
            site.info.get("pid"),
            "; large results are read from its memory" if remote_reads else "",
        )
        return Message(
            "welcome",
            {
                "job_id": self.job_id,
                "site_index": site.index,
                "num_sites": len(self._sites),
                "config": self._client_config,
                "remote_reads": remote_reads,
            },
            [self._app],
        )

    def _get_task(self, site: _Site, fields: dict[str, Any]) -> Message:
        wait = fields.get("wait", 0.0)
        if not isinstance(wait, int | float) or wait < 0:
            raise ProtocolError(f"get_task wait must be a non-negative number; got {wait!r:.40}")
        deadline = time.monotonic() + min(float(wait), _MAX_POLL_SECONDS)
        with self._cond:
            epoch = site.epoch
            while True:
                if site.epoch != epoch:
                    # The site registered again meanwhile (its worker restarted): this poll
                    # may come from the gone worker, so it must not take the task.
                    return Message("wait")
                if self._stop_reason is not None:
                    return Message(
                        "stop", {"reason": self._stop_reason, "failed": self._stop_failed}
                    )
                task = self._pending.pop(site.name, None)
                self._reoffered.discard(site.name)
                if task is not None:
                    self._handed_out[site.name] = task
                    return Message("task", task.message_fields, task.arrays)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return Message("wait")
                self._cond.wait(remaining)

    def _log(self, site: _Site, fields: dict[str, Any]) -> None:
        """A log record from a peer: checked in full (raises ProtocolError), then handed on."""
        record = LogRecord(site.name, **check_log_record(fields))
        if self._on_log is not None:
            self._on_log(record)

    # ------------------------------------------------------------------ workflow side
    @property
    def fast_path(self) -> FastPath:
        return self._fast_path

    @property
    def site_names(self) -> list[str]:
        return list(self._sites)

    def registered_sites(self) -> list[str]:
        with self._cond:
            return [s.name for s in self._sites.values() if s.registered]

    def wait_for_clients(self, count: int, timeout: float, grace: float = 10.0) -> list[str]:
        """Block until every site registered, or at least ``count`` did and ``grace`` seconds
        passed; raise on timeout, on a site's failure, or at once when sites gone for good
        leave fewer than ``count`` that can register."""
        start = time.monotonic()
        deadline = start + timeout
        with self._cond:
            while True:
                self._raise_if_failed()
                ready = [s.name for s in self._sites.values() if s.registered]
                alive = [s for s in self._sites.values() if s.gone is None]
                gone = [s for s in self._sites.values() if s.gone is not None]
                if len(alive) < count:
                    raise ClientFailedError(
                        f"only {len(alive)} of the {count} clients needed can still register: "
                        + "; ".join(f"{s.name}: {s.gone}" for s in gone)
                    )
                now = time.monotonic()
                if len(ready) == len(alive) or (len(ready) >= count and now - start >= grace):
                    return ready
                if now >= deadline:
                    if len(ready) >= count:
                        return ready
                    missing = [s.name for s in alive if not s.registered]
                    raise RoundTimeoutError(
                        f"only {len(ready)} of the {count} clients needed registered within "
                        f"{timeout:.0f} s (missing: {', '.join(missing)}). Check the clients' "
                        "logs and that they reach the server's address."
                    )
                self._cond.wait(min(deadline - now, 0.5))

    def report_failure(self, site: str, text: str) -> None:
        """A site's script failed (``text``: its traceback). Under the running task's
        ``fail`` policy (and outside a task) the job fails at once; under ``exclude`` the
        site is left out of the round."""
        log.error("%s failed:\n%s", site, text)
        with self._cond:
            task_id = self._active_task or ""
            if self._failure is None and not (task_id and self._active_policy == "exclude"):
                self._failure = _Event("failure", site, text=text)
            self._cond.notify_all()
        self._events.put(_Event("failure", site, task_id, text=text))

    def report_lost(self, site: str, text: str, *, returning: bool) -> None:
        """``site``'s process is gone (``text`` says how). A task it had taken is lost: the
        running task goes on without it while ``min_responses`` can still be met (under
        either policy), else fails at once. ``returning``: a new process will register for
        it (a task it had not taken yet waits for that one); otherwise the site is gone
        for good and later tasks are not sent to it."""
        with self._cond:
            entry = self._site(site)
            task_id = self._active_task
            held = self._handed_out.get(site)
            waiting = self._pending.get(site)
            holds = held is not None and held.task_id == task_id
            queued = waiting is not None and waiting.task_id == task_id
            lose = task_id is not None and (holds or (queued and not returning))
            if lose:
                self._handed_out.pop(site, None)
                self._pending.pop(site, None)
            if not returning:
                entry.registered = False
                entry.gone = text.splitlines()[0] if text else "its process is gone"
            self._cond.notify_all()
        log.warning(
            "%s: %s%s", site, text, "; a new process is started for it" if returning else ""
        )
        if lose and task_id is not None:
            self._events.put(_Event("lost", site, task_id, text=text))
        with self._cond:  # a result it was sending will not be resent by that process
            arriving = [e for (s, _), e in self._streaming.items() if s == site]
        for event in arriving:
            for array in event.arrays:
                if isinstance(array, LazyArray):
                    array.give_up()

    @property
    def failed(self) -> bool:
        """Whether the job has failed (a site's failure under ``fail``, or a failed stop)."""
        return self._failure is not None or (self._stop_reason is not None and self._stop_failed)

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise ClientFailedError(
                f"{self._failure.site} failed:\n{self._failure.text}", site=self._failure.site
            )
        if self._stop_reason is not None and self._stop_failed:
            raise JobAbortedError(f"the job was stopped: {self._stop_reason}")

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
        """Send ``model`` as task ``task_name`` to ``sites`` and hand each result to ``on_result``.

        Returns the sites that answered. With ``lazy_results`` a result's params may hold
        :class:`~fedlift.codec._remote.RemoteArray` leaves, valid only during ``on_result``
        (an aggregator reads them block by block); otherwise they are numpy arrays. With
        ``on_results`` the results that have queued up meanwhile arrive together, as
        ``[(site, model), ...]`` (so an aggregator can fold them in one pass).

        A site's failure (its script's error, or an
        :class:`~fedlift.errors.InvalidResultError` that ``on_result`` raises for its
        result) raises :class:`~fedlift.errors.ClientFailedError` at once under
        ``on_client_error="fail"``; under ``"exclude"`` the site is left out of the round,
        logged with the error, results are handed over one at a time (``on_result`` must
        then leave its aggregate as it was when it raises), and the round goes on. A site
        whose process is gone (:meth:`report_lost`) is left out under either policy.
        Raises :class:`ClientFailedError` at once when too few sites are left to reach
        ``min_responses``, and :class:`RoundTimeoutError` when fewer than that answered
        within ``timeout`` seconds. ``on_left_out(site, why)`` is called for each site that is
        not in the task's answers: it failed, its process was lost, or it did not answer in
        time (once the task goes on without it).
        """
        check_error_policy(on_client_error, "run_task(on_client_error=...)")
        exclude = on_client_error == "exclude"
        if exclude and on_results is not None:
            batch_fn = on_results
            on_results = None
            on_result = lambda site, result: batch_fn([(site, result)])  # noqa: E731
        task_id = uuid.uuid4().hex
        fields, arrays = model_to_wire(model)
        message_fields = {"task_id": task_id, "task_name": task_name, "model": fields}
        waiting = list(sites)
        active: set[str] = set()
        answered: list[str] = []
        left_out: dict[str, str] = {}
        deadline = time.monotonic() + timeout

        def leave_out(site: str, why: str) -> None:
            """Go on without ``site``, or fail at once if min_responses is out of reach."""
            active.discard(site)
            left_out[site] = why
            with self._cond:  # a new process of the site must not be handed this task again
                if (held := self._handed_out.get(site)) is not None and held.task_id == task_id:
                    del self._handed_out[site]
                if (queued := self._pending.get(site)) is not None and queued.task_id == task_id:
                    del self._pending[site]
            if on_left_out is not None:
                on_left_out(site, why)
            possible = len(answered) + len(active) + len(waiting) + len(folding)
            if possible < min_responses:
                raise ClientFailedError(
                    f"{site} failed: {why}\nTask {task_name!r} cannot reach "
                    f"min_clients={min_responses} any more: {len(answered)} answered and "
                    f"{possible - len(answered)} still may, of {len(sites)} (left out: "
                    f"{', '.join(sorted(left_out))}).",
                    site=site,
                )
            log.warning(
                "task %r goes on without %s (%d answered, %d still may; min_clients=%d)",
                task_name,
                site,
                len(answered),
                possible - len(answered),
                min_responses,
            )

        def dispatch() -> None:
            gone: list[str] = []
            with self._cond:
                while waiting and len(active) < self._slots:
                    site = waiting.pop(0)
                    active.add(site)
                    reason = self._sites[site].gone if site in self._sites else None
                    if reason is not None:
                        gone.append(site)
                        left_out[site] = reason
                        continue
                    self._pending[site] = _Task(task_id, task_name, message_fields, arrays)
                    self._reoffered.discard(site)
                self._cond.notify_all()
            for site in gone:
                leave_out(site, left_out[site])

        with self._cond:
            self._raise_if_failed()
            self._active_task = task_id
            self._active_policy = on_client_error
        held: _Event | None = None  # taken off the queue while gathering a batch; next
        # Results still arriving are folded as they come in, each batch on its own thread
        # (a fold that waited for another's end would hold all of this one's bytes first).
        folds: list[_Fold] = []
        folding: set[str] = set()
        concurrent = on_results is not None and lazy_results and not exclude
        try:
            dispatch()
            while active or folding:
                if not active:
                    self._join_folds(folds, folding, answered)
                    break
                if held is not None:
                    event, held = held, None
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    try:
                        event = self._events.get(timeout=remaining)
                    except queue.Empty:
                        break
                if event.kind == "stop":
                    raise JobAbortedError(f"the job was stopped: {event.text}")
                if event.kind == "failure" and not exclude:
                    raise ClientFailedError(f"{event.site} failed:\n{event.text}", site=event.site)
                if event.kind in ("failure", "lost"):
                    if event.task_id == task_id and event.site in active:
                        log.error("%s is left out of task %r:\n%s", event.site, task_name,
                                  event.text)  # fmt: skip
                        leave_out(event.site, event.text)
                        dispatch()
                    continue
                if event.task_id != task_id or event.site not in active:
                    event.release()
                    log.warning("ignoring a late or unexpected result from %s", event.site)
                    continue
                active.discard(event.site)
                if event.model is None:
                    continue
                batch = [event]
                while on_results is not None and len(batch) < _MAX_BATCH and not _streamed(event):
                    # Results that queued up while the last ones were folded go together.
                    try:
                        queued = self._events.get_nowait()
                    except queue.Empty:
                        break
                    if not (
                        queued.kind == "result"
                        and queued.task_id == task_id
                        and queued.site in active
                        and queued.model is not None
                        and not _streamed(queued)  # folded on a thread of its own
                    ):
                        held = queued
                        break
                    active.discard(queued.site)
                    batch.append(queued)
                if concurrent and any(_streamed(e) for e in batch):
                    consume = functools.partial(
                        self._consume, batch, on_result, on_results, lazy_results, exclude
                    )
                    folds.append(_Fold(batch, consume))
                    folding.update(e.site for e in batch)
                    dispatch()
                    continue
                try:
                    self._consume(batch, on_result, on_results, lazy_results, exclude)
                except InvalidResultError as exc:
                    if not exclude:
                        raise
                    log.error("%s: its result is left out of task %r: %s",
                              event.site, task_name, exc)  # fmt: skip
                    leave_out(event.site, str(exc))
                else:
                    answered.extend(e.site for e in batch)
                dispatch()
            self._join_folds(folds, folding, answered)
        finally:
            # A fold left running when the task failed ends by itself: once the task is no
            # longer active its results are let go, and its reads fail.
            if held is not None:
                held.release()
            with self._cond:
                self._active_task = None
                self._active_policy = "fail"
                for key in [k for k, e in self._streaming.items() if e.task_id == task_id]:
                    del self._streaming[key]
                for site in list(active) + waiting:
                    self._pending.pop(site, None)
                for site in sites:
                    handed = self._handed_out.get(site)
                    if handed is not None and handed.task_id == task_id:
                        del self._handed_out[site]
        if len(answered) < min_responses:
            missing = sorted(set(sites) - set(answered) - set(left_out))
            raise RoundTimeoutError(
                f"task {task_name!r}: {len(answered)} of {len(sites)} clients answered within "
                f"{timeout:g} s, fewer than min_clients={min_responses} (no answer from: "
                f"{', '.join(missing)}"
                + (f"; left out: {', '.join(sorted(left_out))}" if left_out else "")
                + "). Raise round_timeout if training takes longer, or check those clients' "
                "logs."
            )
        if len(answered) < len(sites):
            if on_left_out is not None:
                for site in sorted(set(sites) - set(answered) - set(left_out)):
                    on_left_out(site, f"no answer within the round timeout ({timeout:g} s)")
            log.warning(
                "task %r: going on with %d of %d clients (no answer from %s)",
                task_name,
                len(answered),
                len(sites),
                ", ".join(sorted(set(sites) - set(answered))),
            )
        return answered

    @staticmethod
    def _join_folds(folds: list[_Fold], folding: set[str], answered: list[str]) -> None:
        """Wait for the folds started so far; raise the first one's error (in the order
        they began), else count their sites as answered."""
        error: BaseException | None = None
        for fold in folds:
            fold.thread.join()
            if fold.error is not None:
                error = error or fold.error
            elif error is None:
                answered.extend(e.site for e in fold.batch)
            folding.difference_update(e.site for e in fold.batch)
        folds.clear()
        if error is not None:
            raise error

    @staticmethod
    def _consume(
        batch: list[_Event],
        on_result: Callable[[str, FLModel], None],
        on_results: Callable[[list[tuple[str, FLModel]]], None] | None,
        lazy_results: bool,
        exclude: bool = False,
    ) -> None:
        """Hand results to the workflow, then let their clients' ``submit`` return.

        Lazy leaves are copied here first unless the workflow takes them (``lazy_results``),
        and leaves that can be read only once (still arriving) also when a refused result
        must leave the aggregate as it was (``exclude``: it is checked before the fold)."""
        try:
            results = []
            for event in batch:
                prefetch_shm(event.arrays)  # queued results were mapped lazily
                model = event.model
                once = any(not a.rereadable for a in event.arrays if isinstance(a, LazyArray))
                if event.read is not None and (not lazy_results or (exclude and once)):
                    model = None if model is None else _materialized(model)
                if model is not None:
                    results.append((event.site, model))
            if on_results is not None:
                on_results(results)
            else:
                for site, model in results:
                    on_result(site, model)
        except ProtocolError as exc:
            remote = [e.site for e in batch if e.read is not None]
            if not remote:
                raise
            # A process went away while its result was being read (killed): the aggregate
            # may hold part of it, so the round starts again without that site.
            lost = _dead(batch)
            raise _ResultLost(
                lost,
                f"{', '.join(lost)} failed: its result could not be read (its process went "
                f"away, or the stream it came on broke) ({exc})",
            ) from None
        finally:
            for event in batch:
                event.release()  # the client's submit returns: its memory is its own again

    def stop(self, reason: str, failed: bool = False) -> None:
        """Tell every client to stop (their next or current ``get_task`` returns ``stop``)."""
        with self._cond:
            if self._stop_reason is None:
                self._stop_reason = reason
                self._stop_failed = failed
            self._pending.clear()
            self._handed_out.clear()
            self._cond.notify_all()
        if failed:
            self._events.put(_Event("stop", "", text=reason))  # wakes a waiting run_task

    @property
    def stopped(self) -> bool:
        return self._stop_reason is not None


class _Fold:
    """A batch of results still arriving, folded on a thread of its own."""

    def __init__(self, batch: list[_Event], consume: Callable[[], None]) -> None:
        self.batch = batch
        self.error: BaseException | None = None
        self._consume = consume
        self.thread = threading.Thread(target=self._run, name="fedlift-fold-stream", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self._consume()
        except BaseException as exc:  # raised in run_task's thread by _join_folds
            self.error = exc


def _streamed(event: _Event) -> bool:
    """Whether ``event``'s result is still arriving (its arrays can be read only once)."""
    return any(isinstance(a, LazyArray) and not a.rereadable for a in event.arrays)


def _materialized(model: FLModel) -> FLModel:
    """``model`` with every lazy array (read from another process's memory, or still
    arriving) copied here: params, optimizer params and the param trees in its meta (e.g.
    SCAFFOLD's control variates)."""
    meta = {
        key: materialize_lazy(value) if _holds_remote(value) else value
        for key, value in model.meta.items()
    }
    return replace(
        model,
        params=None if model.params is None else materialize_lazy(model.params),
        optimizer_params=(
            None if model.optimizer_params is None else materialize_lazy(model.optimizer_params)
        ),
        meta=meta,
    )


def _holds_remote(value: Any) -> bool:
    if isinstance(value, LazyArray):
        return True
    if isinstance(value, dict):
        return any(_holds_remote(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_holds_remote(v) for v in value)
    return False


def _dead(batch: list[_Event]) -> list[str]:
    """The sites of ``batch`` whose results can no longer be read (their process is gone,
    or their stream broke); all of those with lazy results when none can be told apart."""
    remote = [e for e in batch if e.read is not None]
    dead = [
        e.site
        for e in remote
        if any(a.lost() for a in e.arrays if isinstance(a, LazyArray) and a.size)
    ]
    return dead or [e.site for e in remote]
