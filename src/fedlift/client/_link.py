"""The link between a training script's Client API and its site's worker.

In-process mode the worker and the script share a :class:`LocalLink` (a condition-guarded
mailbox); the Client API only ever sees the :class:`Link` protocol, so an external-process
script can use a link that speaks the same operations over a transport instead.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import ReceiveTimeoutError
from ..model import FLModel

__all__ = ["ClientContext", "Link", "LocalLink", "Task", "current_link", "set_current_link"]


@dataclass(frozen=True)
class ClientContext:
    """Who and where a script runs: job, site and the client config sent by the server."""

    job_id: str
    site_name: str
    site_index: int
    num_sites: int
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    """One unit of work from the server: ``train``, ``validate`` or ``submit_model``."""

    task_id: str
    name: str
    model: FLModel


class Link(Protocol):
    """What the Client API needs from its site."""

    context: ClientContext

    def next_task(self, timeout: float | None) -> Task | None:
        """Block until the next task (or None when the job ends); raise
        :class:`~fedlift.errors.ReceiveTimeoutError` after ``timeout`` seconds."""
        ...

    def submit(self, task_id: str, model: FLModel) -> None: ...

    def log(self, record: dict[str, Any]) -> None:
        """Forward a checked log record (:func:`fedlift.codec.check_log_record`)."""
        ...

    def close(self) -> None: ...


class LocalLink:
    """A mailbox shared by the worker (offers tasks, waits for results) and the script."""

    def __init__(
        self,
        context: ClientContext,
        on_log: Callable[[dict[str, Any]], None] | None = None,
        *,
        wait_delivery: bool = False,
    ) -> None:
        self.context = context
        self._on_log = on_log
        self._cond = threading.Condition()
        self._task: Task | None = None
        self._result: tuple[str, FLModel] | None = None
        self._sending: str | None = None  # a result the worker has not delivered yet
        self._wait_delivery = wait_delivery
        self._stopped = False
        self._script_ended = False
        self._script_error: str | None = None
        self._busy = False
        self.on_script_end: Callable[[], None] | None = None

    # ---------------------------------------------------------------- worker side
    def offer(self, task: Task) -> None:
        with self._cond:
            self._task = task
            self._result = None
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def script_ended(self, error: str | None) -> None:
        with self._cond:
            self._script_ended = True
            self._script_error = error
            self._cond.notify_all()
        if self.on_script_end is not None:
            self.on_script_end()

    @property
    def busy(self) -> bool:
        """The script took a task and has not answered it yet."""
        return self._busy

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def script_finished(self) -> bool:
        return self._script_ended

    @property
    def script_error(self) -> str | None:
        return self._script_error

    def wait_result(self, task_id: str) -> FLModel | None:
        """The script's answer to ``task_id``; None if the script ended without one."""
        with self._cond:
            while True:
                if self._result is not None and self._result[0] == task_id:
                    model = self._result[1]
                    self._result = None
                    return model
                if self._script_ended or self._stopped:
                    return None
                self._cond.wait()

    def wait_script(self, timeout: float) -> bool:
        """Wait until the script has ended; False if it still runs after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._script_ended:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    # ---------------------------------------------------------------- script side
    def next_task(self, timeout: float | None) -> Task | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._task is not None:
                    task, self._task = self._task, None
                    self._busy = True
                    return task
                if self._stopped:
                    return None
                if deadline is None:
                    self._cond.wait()
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ReceiveTimeoutError(
                        f"receive(timeout={timeout}) got no model from the server in time. "
                        "Pass a larger timeout, or None to wait until the next round starts."
                    )
                self._cond.wait(remaining)

    def submit(self, task_id: str, model: FLModel) -> None:
        """Hand the result to the worker. With ``wait_delivery`` (the worker's links) it
        returns once the worker has delivered it or the job stopped: until then the result's
        arrays are read where they are, so the script must not change them meanwhile."""
        with self._cond:
            self._result = (task_id, model)
            self._sending = task_id if self._wait_delivery else None
            self._busy = False
            self._cond.notify_all()
            while self._sending == task_id and not self._stopped and not self._script_ended:
                self._cond.wait()

    def delivered(self, task_id: str) -> None:
        """The worker is done with the result of ``task_id`` (sent, or failed to send)."""
        with self._cond:
            if self._sending == task_id:
                self._sending = None
            self._cond.notify_all()

    def log(self, record: dict[str, Any]) -> None:
        if self._on_log is not None:
            self._on_log(record)

    def close(self) -> None:
        """The script called ``shutdown()``: it will take no more tasks."""
        self.stop()


_current: Link | None = None


def set_current_link(link: Link | None) -> None:
    """Install the link ``fedlift.client.init()`` will use in this process (the worker's)."""
    global _current
    _current = link


def current_link() -> Link | None:
    return _current
