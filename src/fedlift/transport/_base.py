"""The transport interface: one method to send a request and get its reply.

A server side is a plain function, a :data:`Handler`, that turns a request
:class:`~fedlift.codec.Message` into a reply. A client side is a :class:`Transport`.
Errors the handler raises on purpose (:class:`~fedlift.errors.FedliftError`) reach the caller
as the same class; anything else arrives as :class:`~fedlift.errors.RemoteError`. Every
implementation passes the suite in :mod:`fedlift.transport.testing`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from ..codec import Message
from ..errors import FedliftError

__all__ = ["Handler", "Listener", "Transport", "describe_error"]

Handler = Callable[[Message], Message]


class Transport(Protocol):
    """The caller's side of a connection."""

    def call(self, request: Message, timeout: float | None = None) -> Message:
        """Send ``request`` and return the reply; ``timeout``: the longest the call may go
        with nothing moving (None: no limit). Over gRPC a transfer that still moves is never
        cut; in memory, where nothing moves but the reply, it is the wait for the reply.

        Raises :class:`~fedlift.errors.TransportTimeoutError` when that silence runs out,
        :class:`~fedlift.errors.ConnectionLostError` when the peer is unreachable, and the
        handler's own :class:`~fedlift.errors.FedliftError` subclasses as they were raised.
        """
        ...

    def enable_remote_reads(self) -> bool:
        """The server said it can read this process's memory (``codec._remote``): from now
        on large payloads stay where they are until the reply comes, if this transport can
        do that. Returns whether it does (the caller then sends them as they lie)."""
        ...

    def close(self) -> None:
        """Release the connection. Calls after close raise ConnectionLostError."""
        ...


class Listener(Protocol):
    """The serving side: runs a handler for every incoming request until stopped."""

    @property
    def address(self) -> str:
        """Where callers connect (e.g. ``127.0.0.1:50123``)."""
        ...

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting requests; wait up to ``grace`` seconds for running ones."""
        ...


def describe_error(exc: BaseException) -> tuple[str, str]:
    """The (class name, message) pair under which an error crosses the boundary."""
    if isinstance(exc, FedliftError):
        return type(exc).__name__, str(exc)
    return "RemoteError", f"{type(exc).__name__}: {exc}"
