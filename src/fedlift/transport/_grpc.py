"""gRPC transport: one bidirectional-streaming method carries every message in chunks.

Messages are encoded by :mod:`fedlift.codec` and cut into chunks of ``chunk_bytes``
(1 MiB by default), so models far beyond gRPC's 2 GB message limit travel. The receiver
learns the total size from the first chunk, but trusts it with nothing: memory grows only
as bytes arrive (:mod:`._buffer`), within ``max_message_bytes``.

What a listener checks on every call, in this order, before it reads a chunk:

1. ``token`` (a per-run secret, sent as call metadata; compared in constant time): a wrong
   or missing one is refused as UNAUTHENTICATED, which the caller sees as
   :class:`~fedlift.errors.PermissionDeniedError`;
2. the peer: the identity of its verified TLS certificate (else its connection), which may
   have at most ``max_calls_per_peer`` calls in progress (one more:
   :class:`~fedlift.errors.ResourceLimitError`);

then, once the first chunk shows the op and the announced size, ``admit(peer, op, size)``
(raises to refuse) before any buffer for the rest exists. A message of an op in
``stream_ops`` (from ``stream_min_bytes`` on) is handed to the handler as soon as its
header is in, its arrays still arriving (:mod:`._inflow`): a server folds results while
they come in instead of holding each whole first. A stream that moves no chunk for
``idle_timeout`` seconds is cancelled (:mod:`._limits`), and the listener's threads exit
when idle (:mod:`._executor`).
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import os
import threading
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import Future
from typing import Any

import grpc

from ..codec import (
    DEFAULT_MAX_MESSAGE_BYTES,
    PREFIX_BYTES,
    Frame,
    Message,
    decode,
    decode_frame,
    decode_header,
    encode,
    frame_length,
    frame_op,
)
from ..errors import (
    ConfigError,
    ConnectionLostError,
    FedliftError,
    PermissionDeniedError,
    ProtocolError,
    ResourceLimitError,
    TransportError,
    TransportTimeoutError,
    error_from_name,
)
from ._base import Handler, describe_error
from ._buffer import receive_buffer
from ._executor import ElasticExecutor
from ._inflow import Inflow
from ._limits import PeerSlots, Progress, Watchdog

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_CALLS_PER_PEER",
    "DEFAULT_SHM_MIN_BYTES",
    "DEFAULT_STREAM_MIN_BYTES",
    "Admit",
    "GrpcListener",
    "GrpcTransport",
]

_METHOD = "/fedlift.v1.Exchange/Call"
_SMALL_METHOD = "/fedlift.v1.Exchange/Small"  # one message each way: ~3x less gRPC overhead
_TOKEN_KEY = "fedlift-token"
DEFAULT_CHUNK_BYTES = 1 << 20
DEFAULT_SHM_MIN_BYTES = 1 << 20
DEFAULT_IDLE_TIMEOUT = 60.0
"""Seconds a call may go with nothing moving, on either side (the one deadline there is)."""
DEFAULT_MAX_CALLS_PER_PEER = 16
DEFAULT_STREAM_MIN_BYTES = 4 << 20
"""Messages of a streamed op from this size on reach the handler while they arrive."""
_THREAD_IDLE_SECONDS = 5.0
_ADMIT_PEEK_BYTES = 1 << 20
_MAX_DETAIL = 8000

Admit = Callable[[Any, str, int], None]
"""``admit(peer, op, claimed_bytes)``: ``peer`` is the verified
:class:`~fedlift.transport._identity.Identity` (None without TLS); raise
:class:`~fedlift.errors.PermissionDeniedError` or :class:`~fedlift.errors.ResourceLimitError`
to refuse the message before anything is allocated for it."""


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


_NO_PROGRESS = Progress()  # a sink for the per-chunk count where nobody watches
_WATCH_INTERVAL = 0.25
"""Seconds between a transport's checks of its calls' progress."""


def _assemble(
    chunks: Iterator[bytes],
    max_bytes: int,
    progress: Progress = _NO_PROGRESS,
    admit: Callable[[str, int], None] | None = None,
) -> bytearray | memoryview:
    """One message from its chunks. Nothing is allocated for the announced size before
    ``admit`` accepted it, and then memory grows only as bytes arrive (``_buffer``)."""
    head, total = _read_head(chunks, max_bytes, progress, admit, whole_header=False)
    return _assemble_rest(head, total, chunks, progress)


def _read_head(
    chunks: Iterator[bytes],
    max_bytes: int,
    progress: Progress,
    admit: Callable[[str, int], None] | None,
    *,
    whole_header: bool,
) -> tuple[bytes | bytearray, int]:
    """A message's first chunks and its announced size: at least the prefix, and its
    whole header when ``admit`` is to judge it or ``whole_header``."""
    first = next(chunks, None)
    if first is None:
        raise ProtocolError("the peer sent an empty message (no chunks).")
    if len(first) < PREFIX_BYTES:
        raise ProtocolError(f"first chunk is {len(first)} bytes; need at least {PREFIX_BYTES}.")
    total = frame_length(first)
    if total > max_bytes:
        raise ResourceLimitError(
            f"the peer announced a {total:,}-byte message; the limit is {max_bytes:,} "
            f"(max_message_bytes). Received: total={total}."
        )
    head: bytes | bytearray = first
    if admit is not None or whole_header:
        head = _admitted_head(first, chunks, total, admit, progress)
    if total < len(head):
        raise ProtocolError(f"the peer sent more than the {total:,} bytes it announced.")
    return head, total


def _assemble_rest(
    head: bytes | bytearray, total: int, chunks: Iterator[bytes], progress: Progress
) -> bytearray | memoryview:
    """The whole message, from its ``head`` (:func:`_read_head`) and the chunks after it."""
    if total == len(head):
        if next(chunks, None) is not None:
            raise ProtocolError(f"the peer sent more than the {total:,} bytes it announced.")
        return head if isinstance(head, bytearray) else bytearray(head)
    buffer = receive_buffer(total)
    position = len(head)
    buffer[:position] = head
    del head
    for chunk in chunks:
        end = position + len(chunk)
        if end > total:
            raise ProtocolError(f"the peer sent more than the {total:,} bytes it announced.")
        buffer[position:end] = chunk
        position = end
        progress.chunks += 1
    if position != total:
        raise ProtocolError(f"the peer announced {total:,} bytes but sent {position:,}.")
    return buffer


def _admitted_head(
    first: bytes,
    chunks: Iterator[bytes],
    total: int,
    admit: Callable[[str, int], None] | None,
    progress: Progress,
) -> bytes | bytearray:
    """The first chunks, up to the end of the header (within :data:`_ADMIT_PEEK_BYTES`),
    once ``admit`` (if any) has accepted the op and the size they announce."""
    head: bytes | bytearray = first
    op = frame_op(head)
    while op is None:
        if len(head) >= min(total, _ADMIT_PEEK_BYTES):
            raise ProtocolError(
                f"the message's header is not within its first {len(head):,} bytes; it must "
                f"be within {_ADMIT_PEEK_BYTES:,} (put large data in arrays). "
                f"Received: total={total}."
            )
        more = next(chunks, None)
        if more is None:
            raise ProtocolError(f"the peer announced {total:,} bytes but sent {len(head):,}.")
        progress.chunks += 1
        head = (bytearray(head) if isinstance(head, bytes) else head) + more
        op = frame_op(head)
    if admit is not None:
        admit(op, total)
    return head


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
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return PermissionDeniedError(f"{target} refused {op!r} ({code.name}): {details}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceLimitError(f"{op!r} to {target} was refused as too large: {details}")
    name = code.name if code is not None else "UNKNOWN"
    return TransportError(f"{op!r} to {target} failed ({name}): {details}")


def _abort_code(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, ResourceLimitError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, ProtocolError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, PermissionDeniedError):
        return grpc.StatusCode.PERMISSION_DENIED
    return grpc.StatusCode.FAILED_PRECONDITION


def _abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    context.abort(_abort_code(exc), _error_details(exc))


class _Caller:
    """Who is calling (checked before a chunk is read): identity, slot key, progress."""

    __slots__ = ("identity", "key", "progress")

    def __init__(self, identity: Any, key: str, progress: Progress) -> None:
        self.identity = identity
        self.key = key
        self.progress = progress


class GrpcListener:
    """Serves ``handler`` over gRPC at ``address`` (``host:port``, port 0 picks a free one).

    ``token``: callers must present it (see :class:`GrpcTransport`); ``admit``: decides on
    each message from its op and announced size before it is received;
    ``max_calls_per_peer``: calls in progress per peer; ``idle_timeout``: seconds a call's
    stream may move nothing before it is cancelled (see the module docstring).
    ``stream_ops``: ops whose messages (of at least ``stream_min_bytes``) reach ``handler``
    as soon as their header is in, with :class:`~fedlift.transport._inflow.StreamedArray`
    arrays (read once, in order, as they arrive); once the handler returns they are let go,
    unless it kept them (``keep()``, then ``let_go()`` when done) to read later. Its reply
    is sent once the whole message is in.
    """

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
        token: str | None = None,
        admit: Admit | None = None,
        max_calls_per_peer: int = DEFAULT_MAX_CALLS_PER_PEER,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        thread_idle_seconds: float = _THREAD_IDLE_SECONDS,
        stream_ops: Collection[str] = (),
        stream_min_bytes: int = DEFAULT_STREAM_MIN_BYTES,
    ) -> None:
        if chunk_bytes < 4096:
            raise ConfigError(f"chunk_bytes must be at least 4096; received: {chunk_bytes}.")
        if token is not None and (not isinstance(token, str) or not token):
            raise ConfigError(f"token must be a non-empty str or None; received: {token!r:.20}")
        if not (isinstance(stream_min_bytes, int) and stream_min_bytes >= PREFIX_BYTES):
            raise ConfigError(
                f"stream_min_bytes must be an int >= {PREFIX_BYTES}; received: "
                f"{stream_min_bytes!r}."
            )
        self._handler = handler
        self._stream_ops = frozenset(stream_ops)
        self._stream_min = stream_min_bytes
        self._chunk = chunk_bytes
        self._max = max_message_bytes
        self._shm = shared_memory
        self._tls = credentials is not None
        self._token = token.encode() if token is not None else None
        self._admit = admit
        self._slots = PeerSlots(max_calls_per_peer)
        self._executor = ElasticExecutor(
            max_workers, idle_seconds=thread_idle_seconds, name="fedlift-grpc"
        )
        self._watchdog = Watchdog(idle_timeout)
        self._server = grpc.server(
            self._executor,
            options=_channel_options(chunk_bytes),
            maximum_concurrent_rpcs=None,
        )
        methods = {
            "Call": grpc.stream_stream_rpc_method_handler(self._serve),
            # Served as a stream (the caller sends one message, as unary): the handler runs
            # before the message is in, so a stalled one is counted and timed like any other.
            "Small": grpc.stream_unary_rpc_method_handler(self._serve_small),
        }
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("fedlift.v1.Exchange", methods),)
        )
        try:
            if credentials is None:
                port = self._server.add_insecure_port(address)
            else:
                port = self._server.add_secure_port(address, credentials)
        except RuntimeError:
            port = 0
        if port == 0:
            self._watchdog.stop()
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

    @property
    def threads(self) -> int:
        """How many serving threads are alive now (they exit when idle)."""
        return self._executor.threads

    @property
    def calls_in_progress(self) -> int:
        """How many calls hold a per-peer slot now (all peers together)."""
        return self._slots.total()

    @property
    def idle_cancelled(self) -> int:
        """How many calls were cancelled because their stream went idle."""
        return self._watchdog.cancelled

    def stop(self, grace: float | None = None) -> None:
        self._server.stop(grace).wait()
        self._watchdog.stop()
        self._executor.shutdown(wait=False)

    def _enter(self, context: grpc.ServicerContext) -> _Caller:
        """Check the token, name the peer and take one of its slots (before any chunk)."""
        if self._token is not None:
            presented = b""
            for key, value in context.invocation_metadata() or ():
                if key == _TOKEN_KEY:
                    presented = value.encode() if isinstance(value, str) else bytes(value)
            if not hmac.compare_digest(presented, self._token):
                context.abort(
                    grpc.StatusCode.UNAUTHENTICATED,
                    _error_details(
                        PermissionDeniedError(
                            "this endpoint refused a call with a missing or wrong token: only "
                            "the processes of this run may call it. Received: a token of "
                            f"{len(presented)} bytes."
                        )
                    ),
                )
        identity = None
        if self._tls:
            try:
                identity = _peer_identity(context)
            except ProtocolError as exc:
                _abort(context, exc)
        key = f"peer {identity.name!r}" if identity is not None else f"peer {context.peer()}"
        try:
            self._slots.enter(key)
        except ResourceLimitError as exc:
            _abort(context, exc)
        return _Caller(identity, key, self._watchdog.watch(context, f"from {key}"))

    def _leave(self, caller: _Caller) -> None:
        self._watchdog.done(caller.progress)
        self._slots.leave(caller.key)

    def _admission(self, caller: _Caller) -> Callable[[str, int], None] | None:
        admit = self._admit
        if admit is None:
            return None
        identity = caller.identity
        return lambda op, total: admit(identity, op, total)

    def _reply_frame(self, request_bytes: bytearray | memoryview, caller: _Caller) -> Frame:
        # Lazily mapped: results queued on a server cost no memory until they are read.
        request, peer_accepts_shm = decode_frame(
            request_bytes, self._max, allow_shm=self._shm, populate=False
        )
        identity = caller.identity
        if identity is not None:
            request = dataclasses.replace(request, peer=identity.name, peer_role=identity.role)
        reply = self._handler(request)
        # Do not keep the request (maybe a whole model) alive while the reply streams:
        # gRPC may hold the serving generator for a while after the call.
        del request
        shm = DEFAULT_SHM_MIN_BYTES if (self._shm and peer_accepts_shm) else None
        return encode(reply, shm_min_bytes=shm)

    def _serve(
        self, request_chunks: Iterator[bytes], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        caller = self._enter(context)
        progress = caller.progress
        try:
            try:
                head, total = _read_head(
                    request_chunks,
                    self._max,
                    progress,
                    self._admission(caller),
                    whole_header=bool(self._stream_ops),
                )
                if total >= self._stream_min and frame_op(head) in self._stream_ops:
                    frame = self._streamed_reply(head, request_chunks, caller)
                else:
                    request = _assemble_rest(head, total, request_chunks, progress)
                    del head
                    self._watchdog.pause(progress)
                    frame = self._reply_frame(request, caller)
                    del request
            except Exception as exc:  # the boundary: errors travel as their class name
                _abort(context, exc)
                return
            self._watchdog.resume(progress)
            sent = False
            try:
                for chunk in frame.chunks(self._chunk):
                    yield chunk
                    progress.chunks += 1
                sent = True
            finally:
                if not sent:
                    frame.discard()
        finally:
            self._leave(caller)

    def _streamed_reply(
        self, head: bytes | bytearray, chunks: Iterator[bytes], caller: _Caller
    ) -> Frame:
        """The handler's reply to a message it reads while it arrives: the handler runs on
        a thread of its own with the message's arrays, while this one feeds them chunk by
        chunk; the reply goes once the last chunk is in and the handler is done."""
        header = decode_header(head, self._max)  # every size is checked before a chunk more
        inflow = Inflow(head, header)
        del head
        identity = caller.identity
        request = Message(
            header.op, header.fields, inflow.arrays,  # type: ignore[arg-type]
            peer=identity.name if identity is not None else None,
            peer_role=identity.role if identity is not None else None,
        )  # fmt: skip
        reply: Future[Message] = Future()
        worker = threading.Thread(
            target=_run_handler, args=(self._handler, request, reply, inflow),
            name="fedlift-streamed", daemon=True,
        )  # fmt: skip
        del request
        worker.start()
        progress = caller.progress
        try:
            for chunk in chunks:
                if reply.done() and reply.exception() is not None:
                    break  # the handler refused the message: no need for the rest
                inflow.feed(chunk)
                progress.chunks += 1
        except BaseException as exc:
            inflow.fail(str(exc) or type(exc).__name__)
            raise
        if not inflow.complete and not (reply.done() and reply.exception() is not None):
            inflow.fail("it ended early")
            raise ProtocolError(
                f"the peer announced {header.total:,} bytes but sent {inflow.received:,}."
            )
        self._watchdog.pause(progress)
        answer = reply.result()
        shm = DEFAULT_SHM_MIN_BYTES if (self._shm and header.accept_shm) else None
        return encode(answer, shm_min_bytes=shm)

    def _serve_small(
        self, request_iterator: Iterator[bytes], context: grpc.ServicerContext
    ) -> bytes:
        """One-message calls (used with shared memory, where every message is small)."""
        caller = self._enter(context)
        try:
            try:
                message = next(request_iterator, None)
                if message is None:
                    raise ProtocolError("the peer sent an empty message (no chunks).")
                if len(message) >= PREFIX_BYTES and frame_length(message) != len(message):
                    raise ProtocolError(
                        f"the message announces {frame_length(message):,} bytes but "
                        f"{len(message):,} arrived; a one-message call carries it whole. "
                        f"Received: total={frame_length(message)}."
                    )
                self._watchdog.pause(caller.progress)
                request = _assemble(
                    iter((message,)), self._max, caller.progress, self._admission(caller)
                )
                del message
                frame = self._reply_frame(request, caller)
                del request
                if frame.nbytes > _channel_limit(self._chunk):
                    frame.discard()
                    raise ProtocolError(
                        f"the reply ({frame.nbytes:,} bytes) is too large for a one-message call."
                    )
            except Exception as exc:  # the boundary: errors travel as their class name
                _abort(context, exc)
                raise  # not reached: abort raises
            return frame.tobytes()
        finally:
            self._leave(caller)


def _run_handler(
    handler: Handler, request: Message, reply: Future[Message], inflow: Inflow
) -> None:
    """Run ``handler`` on a streamed ``request``; once it returns, only those who kept
    its arrays (``LazyArray.keep``) read them."""
    try:
        reply.set_result(handler(request))
    except BaseException as exc:  # handed to the listener's thread, which aborts the call
        reply.set_exception(exc)
    finally:
        del request
        inflow.release()  # the arrays go unless the handler kept them (a queued result)


def _peer_identity(context: grpc.ServicerContext) -> Any:
    """The identity of the client's verified certificate (None if it presented none)."""
    certificates = context.auth_context().get("x509_pem_cert")
    if not certificates:
        return None
    from ._identity import identity_from_pem  # needs cryptography: only with TLS

    return identity_from_pem(bytes(certificates[0]))


class GrpcTransport:
    """Calls a :class:`GrpcListener` at ``address``; ``token``: the listener's, if it has one.

    ``call(request, timeout)``: ``timeout`` is the longest the call may go with no chunk
    moving either way (sent, or received), not a deadline for the whole call. A transfer
    that still moves, however slowly and for however long, is never cut; a peer that stops
    reading or answering is given up on ``timeout`` seconds after the last chunk moved
    (:class:`~fedlift.errors.TransportTimeoutError`), whether it still holds the connection
    open or is gone without a word. Progress is seen per chunk (``chunk_bytes``), so a
    link slower than one chunk per ``timeout`` counts as stalled.
    """

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
        token: str | None = None,
    ) -> None:
        if token is not None and (not isinstance(token, str) or not token):
            raise ConfigError(f"token must be a non-empty str or None; received: {token!r:.20}")
        self._address = address
        self._shm = shared_memory
        self._chunk = chunk_bytes
        self._max = max_message_bytes
        self._wait = wait_for_ready
        self._metadata = ((_TOKEN_KEY, token),) if token is not None else None
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
        self._watchdog: Watchdog | None = None
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
        progress = _NO_PROGRESS
        try:
            if self._shm and frame.nbytes <= self._chunk:
                reply = self._small(
                    frame.tobytes(),
                    timeout=timeout,
                    wait_for_ready=self._wait,
                    metadata=self._metadata,
                )
                return decode(_assemble(iter((reply,)), self._max), self._max, allow_shm=True)
            if timeout is None:
                chunks = frame.chunks(self._chunk)
            else:
                progress = self._watch(request.op, timeout)
                chunks = _counted(frame.chunks(self._chunk), progress)
            replies = self._method(
                chunks, timeout=None, wait_for_ready=self._wait, metadata=self._metadata
            )
            if progress is not _NO_PROGRESS:
                progress.context = replies
                if progress.expired:  # expired before it could be cancelled
                    replies.cancel()
            try:
                return decode(_assemble(replies, self._max, progress), self._max,
                              allow_shm=self._shm)  # fmt: skip
            finally:
                if self._watchdog is not None and progress is not _NO_PROGRESS:
                    self._watchdog.done(progress)
        except grpc.RpcError as exc:
            frame.discard()
            if progress.expired:
                raise TransportTimeoutError(
                    f"{request.op!r} to {self._address}: nothing moved for {timeout} s (the "
                    "peer stopped reading or answering, or the link is down). A transfer "
                    "that moves is never cut: pass a larger timeout only for a longer "
                    "silence."
                ) from None
            raise _translate(exc, request.op, self._address, timeout) from None

    def enable_remote_reads(self) -> bool:
        if self._shm:
            self.remote_reads = True
        return self.remote_reads

    def _watch(self, op: str, timeout: float) -> Progress:
        if self._watchdog is None:
            self._watchdog = Watchdog(DEFAULT_IDLE_TIMEOUT, interval=_WATCH_INTERVAL)
        return self._watchdog.watch(None, f"{op!r} to {self._address}", limit=max(timeout, 1e-3))

    def close(self) -> None:
        self._closed = True
        self._channel.close()
        if self._watchdog is not None:
            self._watchdog.stop()


def _counted(chunks: Iterator[memoryview | bytes], progress: Progress) -> Iterator[Any]:
    """``chunks``, counting each one gRPC takes into ``progress``; none after the call
    expired (gRPC would go on taking them, each one slowly, while the call closes)."""
    for chunk in chunks:
        if progress.expired:
            return
        yield chunk
        progress.chunks += 1
