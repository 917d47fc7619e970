"""External-process mode, script side: the Client API's link to its worker over gRPC."""

from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
from types import TracebackType
from typing import Any

from ..codec import Message, model_from_wire, model_to_wire, shm_available
from ..errors import ClientAPIError, ConnectionLostError, ReceiveTimeoutError
from ..model import FLModel
from ..transport import DEFAULT_IDLE_TIMEOUT, GrpcTransport
from ._link import ClientContext, Task
from ._service import ENV_ADDRESS, ENV_TOKEN
from ._watchdog import watch_worker

__all__ = ["RemoteLink", "connect_from_env"]


class RemoteLink:
    """Speaks the worker's Client API operations (see ``_service.py``)."""

    def __init__(self, address: str, token: str, rank: str) -> None:
        self._transport = GrpcTransport(address, shared_memory=shm_available(), token=token)
        self._rank = rank
        self._after = 0
        reply = self._call("hello", {}, timeout=60)
        f = reply.fields
        self.context = ClientContext(
            job_id=str(f.get("job_id")),
            site_name=str(f.get("site_name")),
            site_index=int(f.get("site_index", 0)),
            num_sites=int(f.get("num_sites", 1)),
            config=dict(f.get("config") or {}),
        )

    def _call(
        self,
        op: str,
        fields: dict[str, object],
        arrays: list[object] | None = None,
        timeout: float = 60.0,
    ) -> Message:
        request = Message(op, {"rank": self._rank, **fields}, arrays or [])  # type: ignore[arg-type]
        try:
            return self._transport.call(request, timeout)
        except ConnectionLostError as exc:
            raise ConnectionLostError(
                f"the fedlift worker that launched this script is gone ({exc}); the job has "
                "ended or failed."
            ) from None

    def next_task(self, timeout: float | None) -> Task | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = 30.0 if deadline is None else max(0.0, min(30.0, deadline - time.monotonic()))
            reply = self._call("next_task", {"after": self._after, "wait": wait}, timeout=wait + 60)
            if reply.op == "stop":
                return None
            if reply.op == "task":
                f = reply.fields
                self._after = int(f["seq"])
                model = model_from_wire(f.get("model") or {}, list(reply.arrays))
                return Task(str(f["task_id"]), str(f["task_name"]), model)
            if deadline is not None and time.monotonic() >= deadline:
                raise ReceiveTimeoutError(
                    f"receive(timeout={timeout}) got no model from the server in time. Pass a "
                    "larger timeout, or None to wait until the next round starts."
                )

    def submit(self, task_id: str, model: FLModel) -> None:
        fields, arrays = model_to_wire(model)
        self._call("submit", {"task_id": task_id, "model": fields}, list(arrays),
                   timeout=DEFAULT_IDLE_TIMEOUT)  # fmt: skip

    def log(self, record: dict[str, Any]) -> None:
        self._call("log", record)

    def report_error(self, text: str) -> None:
        """Tell the worker this rank is failing (best effort: it may be gone already)."""
        with contextlib.suppress(Exception):
            self._call("error", {"error": text}, timeout=10)

    def close(self) -> None:
        try:
            self._call("bye", {}, timeout=10)
        except ConnectionLostError:
            pass
        self._transport.close()


def connect_from_env(rank: str) -> RemoteLink | None:
    """The link for a script launched by a worker (None when not launched by one). From
    then on this process ends when that worker does (:func:`watch_worker`)."""
    address = os.environ.get(ENV_ADDRESS)
    if not address:
        return None
    token = os.environ.get(ENV_TOKEN)
    if not token:
        raise ClientAPIError(f"{ENV_ADDRESS} is set but {ENV_TOKEN} is not; relaunch via the job.")
    link = RemoteLink(address, token, rank)
    watch_worker()
    _report_uncaught(link)
    return link


def _report_uncaught(link: RemoteLink) -> None:
    """An exception that ends the script goes to its worker with its traceback first.

    Under a launcher such as torchrun the script's exit status reaches the worker only
    after the launcher has stopped the other ranks (up to 30 s), and the last lines of its
    stderr are the launcher's summary, not the rank's traceback.
    """
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        if not issubclass(kind, KeyboardInterrupt):
            link.report_error("".join(traceback.format_exception(kind, value, tb)))
        previous(kind, value, tb)

    sys.excepthook = hook
