"""A thread pool whose idle threads exit: the gRPC listener's workers shrink after a flood.

``concurrent.futures.ThreadPoolExecutor`` keeps every thread it ever started until
shutdown, so one burst of calls (300 streams from a misbehaving peer) leaves hundreds of
threads and their stacks behind for the life of the server. Here a thread that finds no
work for ``idle_seconds`` exits; the next burst starts threads again, up to
``max_workers``. Work that finds every thread busy waits in the queue, as with the
standard pool.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

from ..errors import ConfigError

__all__ = ["ElasticExecutor"]

T = TypeVar("T")
_Work = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class ElasticExecutor(Executor):
    """Runs submitted calls on up to ``max_workers`` threads; idle ones exit."""

    def __init__(
        self, max_workers: int, *, idle_seconds: float = 5.0, name: str = "fedlift-pool"
    ) -> None:
        if not isinstance(max_workers, int) or max_workers < 1:
            raise ConfigError(f"max_workers must be an int >= 1; received: {max_workers!r}.")
        if not idle_seconds > 0:
            raise ConfigError(f"idle_seconds must be > 0; received: {idle_seconds!r}.")
        self._max = max_workers
        self._idle_seconds = idle_seconds
        self._name = name
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        self._pending = 0  # queued work not yet taken by a thread
        self._count = 0
        self._shutdown = False

    @property
    def threads(self) -> int:
        """How many worker threads are alive now."""
        with self._lock:
            return self._threads

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot submit work: the executor is shut down.")
            self._pending += 1
            start = self._pending > self._idle and self._threads < self._max
            if start:
                self._threads += 1
                self._count += 1
                number = self._count
        self._queue.put((future, fn, args, kwargs))
        if start:
            thread = threading.Thread(target=self._work, name=f"{self._name}-{number}", daemon=True)
            thread.start()
        return future

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            try:
                item = self._queue.get(timeout=self._idle_seconds)
            except queue.Empty:
                with self._lock:
                    self._idle -= 1
                    if self._pending == 0 or self._shutdown:
                        self._threads -= 1
                        return
                continue  # work arrived just now: take it
            with self._lock:
                self._idle -= 1
                if item is not None:
                    self._pending -= 1
            if item is None:  # shutdown
                with self._lock:
                    self._threads -= 1
                return
            future, fn, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)
            del future, fn, args, kwargs, item  # do not keep a finished call's objects

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            threads = self._threads
        for _ in range(threads):
            self._queue.put(None)
