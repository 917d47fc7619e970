"""gRPC transport: one bidirectional-streaming method carries every message in chunks.

Messages are encoded by :mod:`fedlift.codec` and cut into chunks of ``chunk_bytes``
(1 MiB by default), so models far beyond gRPC's 2 GB message limit travel; the receiver
learns the total size from the first chunk and fills one preallocated buffer.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from ..codec import (
    DEFAULT_MAX_MESSAGE_BYTES,
    PREFIX_BYTES,
    Frame,
    Message,
    decode,
    decode_frame,
    encode,
    frame_length,
)
from ..errors import (
    ConfigError,
    ConnectionLostError,
    FedliftError,
    ProtocolError,
    TransportError,
    TransportTimeoutError,
    error_from_name,
)
from ._base import Handler, describe_error

__all__ = ["DEFAULT_CHUNK_BYTES", "DEFAULT_SHM_MIN_BYTES", "GrpcListener", "GrpcTransport"]

_METHOD = "/fedlift.v1.Exchange/Call"
_SMALL_METHOD = "/fedlift.v1.Exchange/Small"  # one message each way: ~3x less gRPC overhead
DEFAULT_CHUNK_BYTES = 1 << 20
DEFAULT_SHM_MIN_BYTES = 1 << 20
_MAX_DETAIL = 8000


def _channel_limit(chunk_bytes: int) -> int:
    return max(4 * chunk_bytes, 8 << 20)


def _channel_options(chunk_bytes: int) -> list[tuple[str, Any]]:
    limit = _channel_limit(chunk_bytes)
    return [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # The server side: accept the clients' 30 s keepalive pings on idle connections
        # (gRPC's default answers them with GOAWAY "too_many_pings" after a few).
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 0),
    ]


def _assemble(chunks: Iterable[bytes], max_bytes: int) -> bytearray:
    iterator = iter(chunks)
    first = next(iterator, None)
    if first is None:
        raise ProtocolError("the peer sent an empty message (no chunks).")
    if len(first) < PREFIX_BYTES:
        raise ProtocolError(f"first chunk is {len(first)} bytes; need at least {PREFIX_BYTES}.")
    total = frame_length(first)
    if total > max_bytes:
        raise ProtocolError(
            f"the peer announced a {total:,}-byte message; the limit is {max_bytes:,}."
        )
    buffer = bytearray(total)
    position = 0
    for chunk in _chain(first, iterator):
        end = position + len(chunk)
        if end > total:
            raise ProtocolError(f"the peer sent more than the {total:,} bytes it announced.")
        buffer[position:end] = chunk
        position = end
    if position != total:
        raise ProtocolError(f"the peer announced {total:,} bytes but sent {position:,}.")
    return buffer


def _chain(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield first
    yield from rest


def _error_details(exc: BaseException) -> str:
    name, text = describe_error(exc)
    return json.dumps({"fedlift_error": name, "message": text[:_MAX_DETAIL]})


def _translate(exc: grpc.RpcError, op: str, target: str, timeout: float | None) -> FedliftError:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else None
    if details:
        try:
            payload = json.loads(details)
        except ValueError:
            payload = None
        if isinstance(payload, dict) and "fedlift_error" in payload:
            return error_from_name(str(payload["fedlift_error"]), str(payload.get("message")))
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return TransportTimeoutError(f"no reply to {op!r} from {target} within {timeout} s.")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return ConnectionLostError(
            f"cannot reach {target} for {op!r} ({code.name}: {details}). "
            "Is the server running and the address right?"
        )
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ProtocolError(f"{op!r} to {target} was refused as too large: {details}")
    name = code.name if code is not None else "UNKNOWN"
    return TransportError(f"{op!r} to {target} failed ({name}): {details}")


def _with_peer(request: Message, context: grpc.ServicerContext) -> Message:
    """``request`` with the identity of the client's verified certificate (not from the wire)."""
    certificates = context.auth_context().get("x509_pem_cert")
    if not certificates:
        return request
    from ..deploy._identity import identity_from_pem  # needs cryptography: only with TLS

    identity = identity_from_pem(bytes(certificates[0]))
    return dataclasses.replace(request, peer=identity.name, peer_role=identity.role)


class GrpcListener:
    """Serves ``handler`` over gRPC at ``address`` (``host:port``, port 0 picks a free one)."""

    def __init__(
        self,
        handler: Handler,
        address: str = "127.0.0.1:0",
        *,
        max_workers: int = 32,
        credentials: grpc.ServerCredentials | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        shared_memory: bool = False,
    ) -> None:
        if chunk_bytes < 4096:
            raise ConfigError(f"chunk_bytes must be at least 4096; received: {chunk_bytes}.")
        self._handler = handler
        self._chunk = chunk_bytes
        self._max = max_message_bytes
        self._shm = shared_memory
        self._tls = credentials is not None
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="fedlift-grpc"),
            options=_channel_options(chunk_bytes),
            maximum_concurrent_rpcs=None,
        )
        methods = {
            "Call": grpc.stream_stream_rpc_method_handler(self._serve),
            "Small": grpc.unary_unary_rpc_method_handler(self._serve_small),
        }
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("fedlift.v1.Exchange", methods),)
        )
        if credentials is None:
            port = self._server.add_insecure_port(address)
        else:
            port = self._server.add_secure_port(address, credentials)
        if port == 0:
            raise TransportError(
                f"cannot listen on {address!r}: the address is in use or not valid here."
            )
        if address.startswith("unix:"):
            self._address = address
        else:
            host = address.rsplit(":", 1)[0]
            self._address = f"{host}:{port}"
        self._server.start()

    @property
    def address(self) -> str:
        return self._address

    def stop(self, grace: float | None = None) -> None:
        self._server.stop(grace).wait()

    def _reply_frame(self, request_bytes: bytearray, context: grpc.ServicerContext) -> Frame:
        # Lazily mapped: results queued on a server cost no memory until they are read.
        request, peer_accepts_shm = decode_frame(
            request_bytes, self._max, allow_shm=self._shm, populate=False
        )
        if self._tls:
            request = _with_peer(request, context)
        reply = self._handler(request)
        # Do not keep the request (maybe a whole model) alive while the reply streams:
        # gRPC may hold the serving generator for a while after the call.
        del request
        shm = DEFAULT_SHM_MIN_BYTES if (self._shm and peer_accepts_shm) else None
        return encode(reply, shm_min_bytes=shm)

    @staticmethod
    def _abort(context: grpc.ServicerContext, exc: Exception) -> None:
        code = (
            grpc.StatusCode.INVALID_ARGUMENT
            if isinstance(exc, ProtocolError)
            else grpc.StatusCode.FAILED_PRECONDITION
        )
        context.abort(code, _error_details(exc))

    def _serve(
        self, request_chunks: Iterator[bytes], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        try:
            frame = self._reply_frame(_assemble(request_chunks, self._max), context)
        except Exception as exc:  # the boundary: errors travel as their class name
            self._abort(context, exc)
            return
        sent = False
        try:
            yield from frame.chunks(self._chunk)
            sent = True
        finally:
            if not sent:
                frame.discard()

    def _serve_small(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """One-message calls (used with shared memory, where every message is small)."""
        try:
            frame = self._reply_frame(_assemble((request,), self._max), context)
            if frame.nbytes > _channel_limit(self._chunk):
                frame.discard()
                raise ProtocolError(
                    f"the reply ({frame.nbytes:,} bytes) is too large for a one-message call."
                )
        except Exception as exc:  # the boundary: errors travel as their class name
            self._abort(context, exc)
            raise  # not reached: abort raises
        return frame.tobytes()


class GrpcTransport:
    """Calls a :class:`GrpcListener` at ``address``."""

    def __init__(
        self,
        address: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        wait_for_ready: bool = False,
        server_name_override: str | None = None,
        shared_memory: bool = False,
    ) -> None:
        self._address = address
        self._shm = shared_memory
        self._chunk = chunk_bytes
        self._max = max_message_bytes
        self._wait = wait_for_ready
        options = _channel_options(chunk_bytes)
        if server_name_override:
            options.append(("grpc.ssl_target_name_override", server_name_override))
        if credentials is None:
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            self._channel = grpc.secure_channel(address, credentials, options=options)
        self._method = self._channel.stream_stream(_METHOD)
        self._small = self._channel.unary_unary(_SMALL_METHOD)
        self._closed = False
        self.remote_reads = False
        """Set when the server can read this process's memory (see ``codec._remote``):
        large payloads then stay where they are until the reply arrives."""

    def call(self, request: Message, timeout: float | None = None) -> Message:
        if self._closed:
            raise ConnectionLostError("this transport is closed.")
        frame = encode(
            request,
            shm_min_bytes=DEFAULT_SHM_MIN_BYTES if self._shm else None,
            accept_shm=self._shm,
            remote_pid=os.getpid() if (self._shm and self.remote_reads) else None,
        )
        try:
            if self._shm and frame.nbytes <= self._chunk:
                reply = self._small(frame.tobytes(), timeout=timeout, wait_for_ready=self._wait)
                return decode(_assemble((reply,), self._max), self._max, allow_shm=True)
            replies = self._method(
                frame.chunks(self._chunk), timeout=timeout, wait_for_ready=self._wait
            )
            return decode(_assemble(replies, self._max), self._max, allow_shm=self._shm)
        except grpc.RpcError as exc:
            frame.discard()
            raise _translate(exc, request.op, self._address, timeout) from None

    def close(self) -> None:
        self._closed = True
        self._channel.close()
