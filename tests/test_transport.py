"""Both transports pass the same conformance suite; gRPC-specific edges on top."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import numpy as np
import pytest

from fedlift.codec import Message, encode
from fedlift.errors import ProtocolError
from fedlift.transport import GrpcListener, GrpcTransport, Handler, MemoryListener
from fedlift.transport.testing import CHECKS, ConformanceError, Factory


def memory_factory(handler: Handler) -> tuple[MemoryListener, object]:
    listener = MemoryListener(handler)
    return listener, listener.connect()


def grpc_factory(handler: Handler) -> tuple[GrpcListener, GrpcTransport]:
    listener = GrpcListener(handler, "127.0.0.1:0", chunk_bytes=1 << 20)
    return listener, GrpcTransport(listener.address)


FACTORIES: dict[str, Callable[..., tuple[object, object]]] = {
    "memory": memory_factory,
    "grpc": grpc_factory,
}


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__ for c in CHECKS])
@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_conformance(kind: str, check: Callable[[Factory], None]) -> None:
    check(FACTORIES[kind])  # type: ignore[arg-type]


def test_suite_catches_a_broken_transport() -> None:
    """The suite can fail: a transport that drops arrays is caught."""

    class Lossy:
        def __init__(self, inner: object) -> None:
            self.inner = inner

        def call(self, request: Message, timeout: float | None = None) -> Message:
            reply = self.inner.call(request, timeout)  # type: ignore[attr-defined]
            return Message(reply.op, reply.fields, reply.arrays[:-1])

        def close(self) -> None:
            self.inner.close()  # type: ignore[attr-defined]

    def lossy_factory(handler: Handler) -> tuple[object, object]:
        listener, transport = memory_factory(handler)
        return listener, Lossy(transport)

    with pytest.raises(ConformanceError, match="number of arrays"):
        CHECKS[0](lossy_factory)  # type: ignore[arg-type]


def _raw_call(address: str, chunks: list[bytes]) -> grpc.RpcError:
    channel = grpc.insecure_channel(address)
    method = channel.stream_stream("/fedlift.v1.Exchange/Call")
    try:
        list(method(iter(chunks), timeout=10))
    except grpc.RpcError as exc:
        return exc
    finally:
        channel.close()
    raise AssertionError("the server accepted a malformed message")


@pytest.mark.parametrize(
    "chunks, detail",
    [
        ([b"garbage that is not a frame"], "magic"),
        ([b""], "at least"),
        ([encode(Message("x", {}, [np.ones(4)])).tobytes()[:-8]], "announced"),
        ([encode(Message("x", {}, [np.ones(4)])).tobytes() + b"extra"], "more than"),
    ],
)
def test_grpc_rejects_malformed_frames_and_keeps_serving(chunks: list[bytes], detail: str) -> None:
    calls: list[str] = []

    def handler(request: Message) -> Message:
        calls.append(request.op)
        return Message("ok")

    listener = GrpcListener(handler)
    try:
        err = _raw_call(listener.address, chunks)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert detail in err.details()
        assert calls == []
        # The server still answers well-formed calls afterwards.
        assert GrpcTransport(listener.address).call(Message("fine"), timeout=10).op == "ok"
        assert calls == ["fine"]
    finally:
        listener.stop(0)


def test_grpc_enforces_the_message_size_limit() -> None:
    listener = GrpcListener(lambda m: Message("ok"), max_message_bytes=10_000)
    try:
        transport = GrpcTransport(listener.address)
        with pytest.raises(ProtocolError, match="limit"):
            transport.call(Message("big", {}, [np.zeros(5000)]), timeout=10)
        assert transport.call(Message("small", {}, [np.zeros(10)]), timeout=10).op == "ok"
    finally:
        listener.stop(0)
