"""The in-memory twin of the gRPC transport: same encoding, same errors, no sockets."""

from __future__ import annotations

import threading
from concurrent.futures import Future

from ..codec import DEFAULT_MAX_MESSAGE_BYTES, Message, decode, encode
from ..errors import ConnectionLostError, TransportTimeoutError, error_from_name
from ._base import Handler, describe_error

__all__ = ["MemoryListener", "MemoryTransport"]


class MemoryListener:
    """Holds a handler that :class:`MemoryTransport` instances call directly."""

    def __init__(self, handler: Handler, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self._handler = handler
        self._max = max_message_bytes
        self._stopped = threading.Event()

    @property
    def address(self) -> str:
        return f"memory:{id(self):x}"

    def stop(self, grace: float | None = None) -> None:
        self._stopped.set()

    def connect(self) -> MemoryTransport:
        return MemoryTransport(self)

    def _serve(self, request: Message) -> Message:
        # Encode and decode both ways so that what the handler sees and what the caller gets
        # back are exactly what the wire would give (validation, dtypes, read-only views).
        if self._stopped.is_set():
            raise ConnectionLostError(f"the listener at {self.address} is stopped.")
        incoming = decode(encode(request).tobytearray(), self._max)
        try:
            reply = self._handler(incoming)
        except Exception as exc:  # the boundary: every error is translated, none escapes raw
            name, text = describe_error(exc)
            raise error_from_name(name, text) from None
        return decode(encode(reply).tobytearray(), self._max)


class MemoryTransport:
    """Calls a :class:`MemoryListener`'s handler in a helper thread (so timeouts hold)."""

    def __init__(self, listener: MemoryListener):
        self._listener = listener
        self._closed = False

    def call(self, request: Message, timeout: float | None = None) -> Message:
        if self._closed:
            raise ConnectionLostError("this transport is closed.")
        future: Future[Message] = Future()

        def run() -> None:
            try:
                future.set_result(self._listener._serve(request))
            except BaseException as exc:  # handed to the caller
                future.set_exception(exc)

        threading.Thread(target=run, name="fedlift-memory-call", daemon=True).start()
        try:
            return future.result(timeout)
        except TimeoutError:
            raise TransportTimeoutError(f"no reply to {request.op!r} within {timeout} s.") from None

    def enable_remote_reads(self) -> bool:
        return False  # one process: nothing to read from another one

    def close(self) -> None:
        self._closed = True
