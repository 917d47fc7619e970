"""The one progress-aware deadline of a gRPC call: a transfer that moves is never cut, a
peer that stops is given up on within seconds of the last chunk.

The link is a TCP proxy written here that forwards at a set rate, or stops forwarding
(the connection stays open, as when a peer hangs or a route goes dark)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from fedlift.codec import Message
from fedlift.errors import TransportTimeoutError
from fedlift.transport import GrpcListener, GrpcTransport

MB = 1 << 20


class ShapedLink:
    """Forwards 127.0.0.1:port to ``target`` at ``rate`` bytes/s each way; after
    ``stall_after`` bytes upstream it stops forwarding (and reading) for good."""

    def __init__(self, target: str, rate: float, stall_after: int | None = None) -> None:
        host, port = target.rsplit(":", 1)
        self._target = (host, int(port))
        self._rate = rate
        self._stall_after = stall_after
        self._listener = socket.socket()
        # A small receive buffer: the bytes the client has handed over are the ones that
        # moved, not megabytes parked in this proxy's kernel buffer.
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen()
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._stop = threading.Event()
        self._dark = threading.Event()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._target)
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, up: bool) -> None:
        moved, started = 0, time.monotonic()
        try:
            while not self._stop.is_set():
                stalled = up and self._stall_after is not None and moved >= self._stall_after
                if stalled or self._dark.is_set():
                    self._stop.wait()  # hold the connection open, move nothing
                    return
                data = source.recv(64 * 1024)
                if not data:
                    return
                sink.sendall(data)
                moved += len(data)
                ahead = moved / self._rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
        except OSError:
            return

    def go_dark(self) -> None:
        """From now on nothing passes either way; the connections stay open."""
        self._dark.set()

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        for s in self._sockets:
            s.close()


@pytest.fixture
def listener() -> Iterator[GrpcListener]:
    def handler(request: Message) -> Message:
        pause = float(request.fields.get("pause", 0.0))
        time.sleep(pause)
        return Message("ok", {"bytes": sum(a.nbytes for a in request.arrays)})

    server = GrpcListener(handler)
    yield server
    server.stop()


def test_a_slow_transfer_that_keeps_moving_is_never_cut(listener: GrpcListener) -> None:
    link = ShapedLink(listener.address, rate=16 * MB)
    transport = GrpcTransport(link.address)
    try:
        payload = np.ones(64 * MB // 4, np.float32)  # 64 MiB at 16 MiB/s: about 4 s
        started = time.monotonic()
        reply = transport.call(Message("put", {}, [payload]), timeout=2.0)
        elapsed = time.monotonic() - started
    finally:
        link.close()  # first: a channel with writes stuck in a dark link closes slowly
        transport.close()
    assert reply.fields["bytes"] == 64 * MB
    assert elapsed > 3.0, f"the link was not slow enough to prove anything ({elapsed:.1f} s)"


def test_a_peer_that_stops_reading_is_given_up_on_within_the_timeout(
    listener: GrpcListener,
) -> None:
    link = ShapedLink(listener.address, rate=64 * MB, stall_after=8 * MB)
    transport = GrpcTransport(link.address)
    try:
        payload = np.ones(64 * MB // 4, np.float32)
        started = time.monotonic()
        with pytest.raises(TransportTimeoutError, match=r"nothing moved for 1\.5 s"):
            transport.call(Message("put", {}, [payload]), timeout=1.5)
        elapsed = time.monotonic() - started
    finally:
        link.close()  # first: a channel with writes stuck in a dark link closes slowly
        transport.close()
    # 8 MiB at 64 MiB/s, then 1.5 s of silence (plus what the buffers held, and a check
    # every 0.25 s): well before a whole-call deadline would have said anything
    assert elapsed < 5.0, f"the stalled call took {elapsed:.1f} s to fail"


def test_the_silence_of_a_long_answer_counts_against_the_timeout(
    listener: GrpcListener,
) -> None:
    transport = GrpcTransport(listener.address)
    try:
        assert transport.call(Message("put", {"pause": 0.3}), timeout=2.0).op == "ok"
        started = time.monotonic()
        with pytest.raises(TransportTimeoutError, match="nothing moved for 0.5 s"):
            transport.call(Message("put", {"pause": 3.0}), timeout=0.5)
        assert time.monotonic() - started < 2.5
    finally:
        transport.close()


def test_a_link_gone_dark_mid_transfer_fails_the_call_within_the_timeout(
    listener: GrpcListener,
) -> None:
    """Nothing passes either way any more, the connection stays open (a route gone dark, a
    host gone without a FIN): the call fails ``timeout`` after the last chunk moved."""
    link = ShapedLink(listener.address, rate=16 * MB)
    transport = GrpcTransport(link.address)
    try:
        threading.Timer(0.5, link.go_dark).start()
        started = time.monotonic()
        with pytest.raises(TransportTimeoutError, match="nothing moved for 2.0 s"):
            transport.call(Message("put", {}, [np.ones(64 * MB // 4, np.float32)]), timeout=2.0)
        elapsed = time.monotonic() - started
    finally:
        link.close()  # first: a channel with writes stuck in a dark link closes slowly
        transport.close()
    assert 2.0 < elapsed < 5.0, f"the dark link failed the call after {elapsed:.1f} s"
