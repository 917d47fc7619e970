"""One conformance suite for every transport (in the spirit of trio's stream checks).

Call :func:`check_transport` with a factory that serves a handler and returns the listener
and a connected transport; it runs every check and raises :class:`ConformanceError` naming
the first property that does not hold. fedlift's own tests run it against the in-memory
and the gRPC transport.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np

from ..codec import ALLOWED_DTYPES, Message, wire_dtype
from ..errors import (
    ClientAPIError,
    ConfigError,
    ConnectionLostError,
    FedliftError,
    RemoteError,
    TransportTimeoutError,
)
from ._base import Handler, Listener, Transport

__all__ = ["CHECKS", "ConformanceError", "Factory", "check_transport"]

Factory = Callable[[Handler], tuple[Listener, Transport]]


class ConformanceError(FedliftError):
    """A transport broke one of the properties every transport must have."""


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise ConformanceError(what)


def _echo(request: Message) -> Message:
    if request.op == "sleep":
        time.sleep(float(request.fields["seconds"]))
    return Message("echo:" + request.op, dict(request.fields), list(request.arrays))


def _sample_arrays() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = [
        (rng.standard_normal((3, 5)) * 100).astype(wire_dtype(code))
        for code in sorted(ALLOWED_DTYPES)
    ]
    arrays += [np.array(3.5), np.zeros((0, 7), np.float32), np.arange(10, dtype=np.int64)[::2]]
    return arrays


def check_round_trip(factory: Factory) -> None:
    """Op, fields and arrays (every allowed dtype, 0-d, empty, strided) survive both ways."""
    seen: list[Message] = []

    def handler(request: Message) -> Message:
        seen.append(request)
        return _echo(request)

    listener, transport = factory(handler)
    try:
        fields = {"text": "héllo ✓", "n": 2**53, "x": 0.1, "nested": {"l": [1, None, True]}}
        arrays = _sample_arrays()
        reply = transport.call(Message("ping", fields, arrays), timeout=30)
        _require(len(seen) == 1 and seen[0].op == "ping", "the handler did not see op 'ping'")
        _require(reply.op == "echo:ping", f"reply op is {reply.op!r}, expected 'echo:ping'")
        _require(reply.fields == fields, f"fields changed in transit: {reply.fields!r}")
        _require(len(reply.arrays) == len(arrays), "the number of arrays changed in transit")
        for sent, got in zip(arrays, reply.arrays, strict=True):
            _require(got.dtype == sent.dtype and got.shape == sent.shape, f"{sent.dtype} changed")
            _require(bool(np.array_equal(got, sent)), f"values of a {sent.dtype} array changed")
    finally:
        transport.close()
        listener.stop(0)


def check_large_message(factory: Factory) -> None:
    """A message of several MiB (more than one gRPC chunk) arrives intact."""
    listener, transport = factory(_echo)
    try:
        big = np.random.default_rng(1).standard_normal(1_500_000).astype(np.float32)
        reply = transport.call(Message("big", {}, [big, big[:3]]), timeout=60)
        _require(bool(np.array_equal(reply.arrays[0], big)), "a 6 MB array changed in transit")
        _require(bool(np.array_equal(reply.arrays[1], big[:3])), "an array after it changed")
    finally:
        transport.close()
        listener.stop(0)


def check_received_arrays_are_private(factory: Factory) -> None:
    """Received arrays are writable and share no memory with the sender's arrays."""
    received: list[np.ndarray] = []

    def handler(request: Message) -> Message:
        received.append(request.arrays[0])
        request.arrays[0][0] = -1.0  # must not touch the caller's array
        return Message("ok", {}, [request.arrays[0]])

    listener, transport = factory(handler)
    try:
        sent = np.ones(16, np.float32)
        reply = transport.call(Message("write", {}, [sent]), timeout=30)
        _require(sent[0] == 1.0, "the handler's write reached the caller's array")
        _require(reply.arrays[0][0] == -1.0, "the handler's write did not travel back")
        reply.arrays[0][1] = 5.0
        _require(received[0][1] == 1.0, "the reply shares memory with the handler's array")
    finally:
        transport.close()
        listener.stop(0)


def check_errors_keep_their_class(factory: Factory) -> None:
    """FedliftError subclasses keep class and message; other errors become RemoteError."""

    def handler(request: Message) -> Message:
        if request.op == "config":
            raise ConfigError("bad config: n_clients=0")
        if request.op == "api":
            raise ClientAPIError("send() before receive()")
        if request.op == "other":
            raise KeyError("boom")
        return _echo(request)

    listener, transport = factory(handler)
    try:
        for op, cls, text in (
            ("config", ConfigError, "bad config: n_clients=0"),
            ("api", ClientAPIError, "send() before receive()"),
            ("other", RemoteError, "KeyError"),
        ):
            try:
                transport.call(Message(op), timeout=30)
            except FedliftError as exc:
                _require(type(exc) is cls, f"{op}: got {type(exc).__name__}, want {cls.__name__}")
                _require(text in str(exc), f"{op}: message {str(exc)!r} lacks {text!r}")
            else:
                raise ConformanceError(f"{op}: the handler's error was not raised to the caller")
        reply = transport.call(Message("still-alive"), timeout=30)
        _require(reply.op == "echo:still-alive", "the transport broke after errors")
    except KeyError:
        raise ConformanceError("a raw KeyError crossed the boundary untranslated") from None
    finally:
        transport.close()
        listener.stop(0)


def check_timeout(factory: Factory) -> None:
    """A call whose reply is late raises TransportTimeoutError near its timeout."""
    listener, transport = factory(_echo)
    try:
        start = time.monotonic()
        try:
            transport.call(Message("sleep", {"seconds": 2.0}), timeout=0.3)
        except TransportTimeoutError:
            elapsed = time.monotonic() - start
            _require(elapsed < 1.5, f"the timeout of 0.3 s fired only after {elapsed:.2f} s")
        else:
            raise ConformanceError("a 2 s handler answered a call with timeout=0.3")
    finally:
        transport.close()
        listener.stop(0)


def check_concurrent_calls(factory: Factory) -> None:
    """Calls from many threads at once each get their own reply."""
    listener, transport = factory(_echo)
    failures: list[str] = []

    def worker(i: int) -> None:
        try:
            payload = np.full(1000 + i, i, np.int32)
            reply = transport.call(Message(f"c{i}", {"i": i}, [payload]), timeout=30)
            if reply.fields != {"i": i} or not np.array_equal(reply.arrays[0], payload):
                failures.append(f"call {i} got another call's reply")
        except Exception as exc:
            failures.append(f"call {i} raised {exc!r}")

    try:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        _require(not failures, "; ".join(failures))
    finally:
        transport.close()
        listener.stop(0)


def check_closed_and_stopped(factory: Factory) -> None:
    """Calls on a closed transport, or to a stopped listener, raise ConnectionLostError."""
    listener, transport = factory(_echo)
    listener.stop(0)
    try:
        transport.call(Message("late"), timeout=5)
    except ConnectionLostError:
        pass
    else:
        raise ConformanceError("a call to a stopped listener did not raise ConnectionLostError")
    transport.close()
    try:
        transport.call(Message("closed"), timeout=5)
    except ConnectionLostError:
        pass
    else:
        raise ConformanceError("a call on a closed transport did not raise ConnectionLostError")


CHECKS: tuple[Callable[[Factory], None], ...] = (
    check_round_trip,
    check_large_message,
    check_received_arrays_are_private,
    check_errors_keep_their_class,
    check_timeout,
    check_concurrent_calls,
    check_closed_and_stopped,
)


def check_transport(factory: Factory) -> None:
    """Run every check in :data:`CHECKS` against transports made by ``factory``."""
    for check in CHECKS:
        check(factory)
