"""Attacks on the transport, for real: hostile frames over real gRPC (plain and mutual TLS),
a stranger on the simulator's port while a job runs, a flood of stalled streams from one
site's certificate against a DeployServer, slow and stalled senders.

Every figure asserted is measured: the server's resident memory (``/proc/self/status``;
the listeners run in this process), the shared-memory segments still in ``/dev/shm``, the
calls refused and answered, the serving threads alive.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from fedlift import FedAvgJob, ScriptRunner
from fedlift.codec import PREFIX_BYTES, Message, _shm, decode, encode, frame_op
from fedlift.deploy import DeployServer, channel_credentials, provision
from fedlift.errors import (
    ConnectionLostError,
    FedliftError,
    PermissionDeniedError,
    ProtocolError,
    ResourceLimitError,
)
from fedlift.simulator import run_simulator
from fedlift.transport import GrpcListener, GrpcTransport
from fedlift.transport._grpc import _translate
from test_deploy_server import Party, Site, free_port, job_zip, make_job, wait_for

SCRIPTS = Path(__file__).resolve().parent / "scripts"
CALL = "/fedlift.v1.Exchange/Call"
SMALL = "/fedlift.v1.Exchange/Small"
TOKEN_KEY = "fedlift-token"
MiB = 1 << 20
GiB = 1 << 30
RSS_MARGIN = 16 * MiB
_PREFIX = struct.Struct("<4sIQ")

pytestmark = pytest.mark.reliability


# ----------------------------------------------------------------------------- helpers
def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} in /proc/self/status")


def rss() -> int:
    """This process's resident memory in bytes (the listeners under attack run here)."""
    return _status("VmRSS")


def reset_peak() -> int:
    """Restart the peak-RSS count (``VmHWM``) from now; returns the RSS now."""
    Path("/proc/self/clear_refs").write_text("5")
    return rss()


def peak() -> int:
    """The most resident memory since :func:`reset_peak` (a buffer freed at once counts)."""
    return _status("VmHWM")


def claim_frame(op: str, claimed: int, length: int = 57) -> bytes:
    """A ``length``-byte first chunk whose prefix claims a ``claimed``-byte message."""
    header = json.dumps({"op": op}, separators=(",", ":")).encode()
    header += b" " * (length - PREFIX_BYTES - len(header))  # JSON allows the padding
    frame = _PREFIX.pack(b"FLW1", len(header), claimed) + header
    assert len(frame) == length
    return frame


def whole_frame(header: dict[str, Any]) -> bytes:
    """A complete, well-formed frame with ``header`` and no inline payload."""
    body = json.dumps(header, separators=(",", ":")).encode()
    start = (PREFIX_BYTES + len(body) + 63) // 64 * 64
    frame = _PREFIX.pack(b"FLW1", len(body), start) + body
    return frame + bytes(start - len(frame))


def channel(address: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own
    if credentials is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, credentials, options=options)


def send_raw(
    address: str,
    frame: bytes,
    *,
    small: bool,
    token: str | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    timeout: float = 30.0,
) -> None:
    """Send ``frame`` as the whole request of one call; raise what the caller would see."""
    metadata = ((TOKEN_KEY, token),) if token is not None else None
    chan = channel(address, credentials)
    try:
        if small:
            chan.unary_unary(SMALL)(frame, timeout=timeout, metadata=metadata)
        else:
            list(chan.stream_stream(CALL)(iter([frame]), timeout=timeout, metadata=metadata))
    except grpc.RpcError as exc:
        raise _translate(exc, "attack", address, timeout) from None
    finally:
        chan.close()


def grpc_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("fedlift-grpc"))


def echo(request: Message) -> Message:
    return Message("echo", dict(request.fields), list(request.arrays))


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("kits") / "kits"
    provision(
        "demo", f"localhost:{free_port()}", ["site-1", "site-2", "site-3"], ["admin@org"], out
    )
    return out


@pytest.fixture
def server(kits: Path, tmp_path: Path) -> Iterator[DeployServer]:
    with DeployServer(kits / "server", tmp_path / "ws", address="127.0.0.1:0") as running:
        yield running


def test_frame_op_reads_the_op_once_the_header_is_in(reliability: Any) -> None:
    frame = encode(Message("submit", {"note": "x" * 300}, [np.arange(4)])).tobytes()
    header_end = PREFIX_BYTES + struct.unpack_from("<I", frame, 4)[0]
    assert [frame_op(frame[:n]) for n in (16, header_end - 1)] == [None, None]
    assert frame_op(frame[:header_end]) == frame_op(frame) == "submit"
    bad = [b"XXXX" + frame[4:], frame[:4] + struct.pack("<I", 1 << 30) + frame[8:]]
    bad.append(_PREFIX.pack(b"FLW1", 5, 21) + b"[1,2]")
    bad.append(_PREFIX.pack(b"FLW1", 8, 24) + b'{"op":1}')
    for data in bad:
        with pytest.raises(ProtocolError):
            frame_op(data)
    reliability.hostile("malformed first chunks given to frame_op", tried=len(bad))


# ------------------------------------------------------------- (a) claims that allocate
def test_a_57_byte_frame_claiming_1_gib_allocates_nothing(reliability: Any) -> None:
    listener = GrpcListener(echo)
    try:
        frame = claim_frame("echo", GiB)
        before = reset_peak()
        refused = 0
        for small in (False, True, False, True):
            with pytest.raises(ProtocolError, match="announce") as caught:
                send_raw(listener.address, frame, small=small)
            assert "1,073,741,824" in str(caught.value)
            refused += 1
        grown = peak() - before
        reliability.hostile("57-byte frame claiming 1 GiB, plain gRPC (Call, Small)", refused)
        leaks = int(grown >= RSS_MARGIN)
        reliability.measure(leaks=leaks)
        assert refused == 4 and leaks == 0, f"server RSS grew {grown / MiB:.1f} MiB"
        # The listener still serves.
        transport = GrpcTransport(listener.address)
        reply = transport.call(Message("ping", {"n": 3}, [np.arange(5)]), 30)
        transport.close()
        assert reply.fields == {"n": 3} and reply.arrays[0].tolist() == [0, 1, 2, 3, 4]
        assert listener.calls_in_progress == 0
    finally:
        listener.stop(0)


def test_a_57_byte_frame_claiming_1_gib_over_mtls(
    reliability: Any, kits: Path, server: DeployServer
) -> None:
    admin = channel_credentials(kits / "admin@org")
    site = channel_credentials(kits / "site-1")
    # (who, op, small, what the caller must get)
    cases: list[tuple[grpc.ChannelCredentials, str, bool, type[FedliftError], str]] = [
        (admin, "job_submit", False, ProtocolError, "announced"),  # large allowed: no bytes
        (admin, "job_submit", True, ProtocolError, "announces"),
        # A large submit is read as it arrives: its header is checked before a byte more.
        (site, "submit", False, ProtocolError, "header must be an object"),
        (site, "submit", True, ProtocolError, "announces"),
        (admin, "job_status", False, ResourceLimitError, "only a site's submit"),  # admission
        (site, "next_job", False, ResourceLimitError, "only a site's submit"),
        (site, "job_submit", False, PermissionDeniedError, "may not call 'job_submit'"),
        (admin, "register", False, PermissionDeniedError, "may not call 'register'"),
    ]
    before = reset_peak()
    refused = 0
    for credentials, op, small, error, text in cases:
        with pytest.raises(error, match=text):
            send_raw(server.address, claim_frame(op, GiB), small=small, credentials=credentials)
        refused += 1
    grown = peak() - before
    reliability.hostile("57-byte frame claiming 1 GiB, mutual TLS (site and admin certs)", refused)
    leaks = int(grown >= RSS_MARGIN)
    reliability.measure(leaks=leaks)
    assert refused == len(cases) and leaks == 0, f"server RSS grew {grown / MiB:.1f} MiB"
    party = Party(kits, "admin@org", server.address)
    try:
        assert party.call("job_list").fields == {"jobs": []}
    finally:
        party.close()


# ---------------------------------------------------------- (b) stalled claims hold nothing
def test_six_stalled_claims_hold_no_memory(reliability: Any) -> None:
    admitted: list[tuple[str, int]] = []
    lock = threading.Lock()

    def admit(peer: object, op: str, claimed: int) -> None:
        with lock:
            admitted.append((op, claimed))

    listener = GrpcListener(echo, admit=admit, max_workers=16)
    release = threading.Event()
    chans: list[grpc.Channel] = []
    calls = []

    def stalled(first: bytes) -> Iterator[bytes]:
        yield first
        release.wait(60)

    try:
        for _ in range(6):  # connected first: the peak below is the server's doing
            chans.append(channel(listener.address))
            grpc.channel_ready_future(chans[-1]).result(timeout=30)
        before = reset_peak()
        for chan in chans:
            calls.append(chan.stream_stream(CALL)(stalled(claim_frame("echo", 256 * MiB))))
        wait_for(lambda: len(admitted) == 6, 30, "6 claims admitted")
        time.sleep(0.5)  # a server that allocated on the claim has done so by now
        held = peak() - before
        assert listener.calls_in_progress == 6
        release.set()
        codes = [call.code() for call in calls]
        assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * 6, codes
        assert all("268,435,456" in (call.details() or "") for call in calls)
        wait_for(lambda: listener.calls_in_progress == 0, 30, "calls to end")
        reliability.fault("6 streams stalled after claiming 256 MiB each")
        reliability.hostile("stalled 256 MiB claims", tried=6)
        leaks = int(held >= RSS_MARGIN)
        reliability.measure(leaks=leaks)
        assert admitted == [("echo", 256 * MiB)] * 6
        assert leaks == 0, f"6 stalled claims hold {held / MiB:.1f} MiB"
    finally:
        release.set()
        for chan in chans:
            chan.close()
        listener.stop(0)


# ----------------------------------------------------- (c) a stranger without the token
def pooled_segment() -> tuple[_shm.SegmentPool, list[np.ndarray], str]:
    pool = _shm.SegmentPool(keep=1)
    arrays = pool.allocate([((1024,), np.dtype(np.float32))])
    arrays[0][:] = 7.0
    placed = _shm.locate(arrays)
    assert placed is not None
    return pool, arrays, placed[0]


def hostile_frames(segment: str, site: str = "site-1") -> list[tuple[str, bytes]]:
    unlink = whole_frame(
        {
            "op": "submit",
            "fields": {"site": site, "task_id": "t"},
            "arrays": [],
            "shm": {"name": segment, "size": 0, "unlink": True},
        }
    )
    error = whole_frame(
        {
            "op": "client_error",
            "fields": {"site": site, "error": "a stranger's text"},
            "arrays": [],
        }
    )
    return [("shm unlink of a pooled segment", unlink), ("client_error for a site", error)]


@pytest.mark.parametrize("where", ["tcp", "unix"])
def test_calls_without_the_token_are_refused_before_decoding(
    reliability: Any, tmp_path: Path, where: str
) -> None:
    handled: list[str] = []

    def handler(request: Message) -> Message:
        handled.append(request.op)
        return Message("ok")

    secret = "s" * 64
    address = "127.0.0.1:0" if where == "tcp" else f"unix:{tmp_path / 'client.sock'}"
    listener = GrpcListener(handler, address, shared_memory=True, token=secret)
    pool, arrays, segment = pooled_segment()
    try:
        refused = 0
        for _, frame in hostile_frames(segment):
            for token in (None, "", "x" * 64, secret[:-1] + "t"):
                for small in (False, True):
                    with pytest.raises(PermissionDeniedError, match="token"):
                        send_raw(listener.address, frame, small=small, token=token)
                    refused += 1
        survived = (_shm.SHM_DIR / segment).exists()
        reliability.hostile(
            f"shm-unlink and client_error frames without the token ({where})", refused
        )
        reliability.measure(leaks=int(not survived))
        assert refused == 16 and handled == [] and survived
        assert float(arrays[0][3]) == 7.0
        # The right token gets through (so the refusals above were the token's doing).
        transport = GrpcTransport(listener.address, token=secret)
        assert transport.call(Message("ping"), 30).op == "ok"
        transport.close()
        with pytest.raises(PermissionDeniedError):
            GrpcTransport(listener.address).call(Message("ping"), 30)
        assert handled == ["ping"]
    finally:
        listener.stop(0)
        del arrays
        pool.close()


def test_a_message_may_not_unlink_a_pooled_segment(reliability: Any) -> None:
    pool, arrays, segment = pooled_segment()
    try:
        frame, tried = hostile_frames(segment)[0][1], 0
        for _ in range(3):
            with pytest.raises(ProtocolError, match="only ask to unlink a transfer segment"):
                decode(bytearray(frame), allow_shm=True)
            tried += 1
        with pytest.raises(ProtocolError, match="transfer segment"):
            _shm.unlink(segment)
        tried += 1
        survived = (_shm.SHM_DIR / segment).exists()
        reliability.hostile("decoded message asking to unlink a pooled segment", tried)
        reliability.measure(leaks=int(not survived))
        assert survived and tried == 4
    finally:
        del arrays
        pool.close()


def _worker_server_addresses() -> list[str]:
    """What any local user can read: the simulator's port, from its workers' argv."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == os.getpid() and b"fedlift.client.worker" in argv:
            found.append(argv[argv.index(b"--server") + 1].decode())
            assert not any(b"FEDLIFT_SERVER_TOKEN" in a for a in argv)
    return found


def _server_pooled_segments() -> list[str]:
    return [
        p.name for p in _shm.SHM_DIR.glob(f"fedlift-*-{os.getpid()}-*") if not p.name.endswith("-t")
    ]


def test_a_stranger_on_the_simulators_port_cannot_fail_the_job(
    reliability: Any, tmp_path: Path
) -> None:
    rounds = 6 if reliability.full else 4
    initial = {"w": np.zeros(400_000, np.float32)}  # 1.6 MB: the model travels in shm
    job = FedAvgJob("attacked", n_clients=2, num_rounds=rounds, initial_model=initial)
    job.to_clients(
        ScriptRunner(SCRIPTS / "numpy_client.py", script_args="--sleep 0.4", framework="numpy")
    )
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            job_dir = job.export_job(tmp_path / "jobs")
            outcome["result"] = run_simulator(job_dir, tmp_path / "ws", quiet=True)
        except BaseException as exc:
            outcome["error"] = exc

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    wait_for(lambda: bool(_worker_server_addresses()) or not runner.is_alive(), 60, "workers")
    wait_for(lambda: bool(_server_pooled_segments()) or not runner.is_alive(), 60, "a segment")
    assert runner.is_alive(), f"the job ended before the attack: {outcome}"
    address = _worker_server_addresses()[0]
    segments = _server_pooled_segments()
    refused = 0
    for segment in segments[:2]:
        for _, frame in hostile_frames(segment):
            for token in (None, "0" * 64):
                for small in (False, True):
                    with pytest.raises(PermissionDeniedError):
                        send_raw(address, frame, small=small, token=token)
                    refused += 1
    alive = [s for s in segments if (_shm.SHM_DIR / s).exists()]
    runner.join(120)
    assert not runner.is_alive(), "the job did not end"
    reliability.hostile(
        "stranger's shm-unlink / client_error frames on the simulator's port", refused
    )
    error = outcome.get("error")
    assert error is None, f"the job failed: {error}"
    result = outcome["result"]
    trained = sum(1 for r in result.rounds if r.task == "train")
    reliability.measure(rounds_lost=rounds - trained, leaks=len(segments) - len(alive))
    assert trained == rounds and alive == segments and refused == 8 * min(2, len(segments))
    # Client i adds i + 1 per round with weight i + 1: the weighted mean is 5/3 a round.
    np.testing.assert_allclose(result.params["w"], np.full(400_000, rounds * 5 / 3), rtol=1e-5)


# ----------------------------------- (d, f) a flood of stalled streams from one certificate
def test_a_flood_from_one_site_does_not_starve_the_others(
    reliability: Any, kits: Path, server: DeployServer, tmp_path: Path
) -> None:
    flood = 300
    admin = Party(kits, "admin@org", server.address)
    baseline = grpc_threads()
    credentials = channel_credentials(kits / "site-1")
    release = threading.Event()
    refused: list[grpc.Future] = []
    done = threading.Lock()

    def stalled() -> Iterator[bytes]:
        release.wait(120)
        return
        yield b""  # a generator that sends nothing

    def finished(call: Any) -> None:
        if call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            with done:
                refused.append(call)

    chans = [channel(server.address, credentials) for _ in range(3)]
    calls = []
    sites: list[Site] = []
    try:
        for i in range(flood):
            call = chans[i % 3].stream_stream(CALL)(stalled(), timeout=120)
            call.add_done_callback(finished)
            calls.append(call)
        limit = 16
        wait_for(lambda: len(refused) == flood - limit, 60, "the flood to be refused")
        details = refused[0].details() or ""
        assert "max_calls_per_peer=16" in details and "site-1" in details
        # While 16 stalled streams hold their slots: an admin and two other sites get through.
        started = time.monotonic()
        job_id = admin.call("job_submit", arrays=job_zip(make_job(tmp_path / "job"))).fields[
            "job_id"
        ]
        assert admin.call("job_status", {"job_id": job_id}, timeout=10).op == "job"
        answered_in = time.monotonic() - started
        sites = [Site(kits, name, server.address) for name in ("site-2", "site-3")]
        for site in sites:
            site.start()
        wait_for(
            lambda: (
                admin.call("job_status", {"job_id": job_id}, timeout=10).fields["state"]
                in ("finished", "failed")
            ),
            90,
            "the job to end",
        )
        summary = admin.call("job_status", {"job_id": job_id}, timeout=10).fields
        still_held = sum(1 for call in calls if not call.done())
        for site in sites:
            site.finish()
            assert not site.errors, site.errors
    finally:
        release.set()
        for call in calls:
            call.cancel()
        for chan in chans:
            chan.close()
        admin.close()
    # After the flood the serving threads go back to about what they were.
    wait_for(lambda: grpc_threads() <= baseline + 4, 60, "the server's threads to shrink")
    reliability.fault(f"{flood} stalled streams from one site certificate")
    reliability.hostile("stalled streams past the per-peer limit", tried=len(refused))
    rounds_done = (summary["round_done"] + 1) if summary["round_done"] is not None else 0
    reliability.measure(rounds_lost=summary["num_rounds"] - rounds_done)
    assert summary["state"] == "finished" and summary["error"] is None
    assert summary["sites"] == ["site-2", "site-3"] and rounds_done == summary["num_rounds"] == 2
    assert still_held == limit and len(refused) == flood - limit
    assert answered_in < 30, f"job_submit + job_status took {answered_in:.1f} s under the flood"


# ------------------------------------------------------------ (e) slow versus stalled
def test_a_slow_sender_is_not_cut_and_a_stalled_one_is(reliability: Any) -> None:
    listener = GrpcListener(echo, chunk_bytes=4096, idle_timeout=2.0)
    try:
        payload = np.arange(10 * 1024, dtype=np.float32)  # 40 KiB: 11 chunks of 4 KiB
        chunks = list(encode(Message("slow", {"k": 1}, [payload])).chunks(4096))
        assert len(chunks) >= 10

        def slowly() -> Iterator[bytes]:
            for chunk in chunks:
                yield chunk
                time.sleep(0.5)  # 11 chunks, 0.5 s apart: ~5.5 s in all, idle_timeout 2 s

        release = threading.Event()

        def stalls() -> Iterator[bytes]:
            yield chunks[0]
            release.wait(60)

        chan = channel(listener.address)
        started = time.monotonic()
        stalled_call = chan.stream_stream(CALL)(stalls(), timeout=60)
        replies = list(chan.stream_stream(CALL)(slowly(), timeout=60))
        slow_seconds = time.monotonic() - started
        reply = decode(b"".join(replies))
        np.testing.assert_array_equal(reply.arrays[0], payload)
        assert reply.fields == {"k": 1} and slow_seconds > 2.0  # it outlived idle_timeout
        with pytest.raises(grpc.RpcError) as caught:
            list(stalled_call)
        with pytest.raises(ConnectionLostError):
            raise _translate(caught.value, "stalled", listener.address, 60)
        release.set()
        chan.close()
        wait_for(lambda: listener.calls_in_progress == 0, 30, "the stalled call to end")
        reliability.fault("a sender stalled after its first chunk (idle_timeout 2 s)")
        reliability.fault("a slow sender: a chunk every 0.5 s for 5 s")
        cut_wrongly = 1 - (reply.arrays[0].size == payload.size)
        reliability.measure(bytes_corrupted=int(cut_wrongly))
        assert listener.idle_cancelled == 1 and cut_wrongly == 0
    finally:
        listener.stop(0)


def test_a_caller_that_stops_reading_its_reply_is_cut(reliability: Any) -> None:
    big = np.ones(16 * MiB, np.float32)  # a 64 MiB reply: far past gRPC's windows
    listener = GrpcListener(lambda request: Message("big", {}, [big]), idle_timeout=2.0)
    chan = channel(listener.address)
    try:
        call = chan.stream_stream(CALL)(iter(encode(Message("x")).chunks(MiB)), timeout=60)
        assert len(next(call)) == MiB  # reads one chunk of the reply, then no more
        wait_for(lambda: listener.idle_cancelled == 1, 30, "the non-reader to be cut")
        wait_for(lambda: listener.calls_in_progress == 0, 30, "its slot to be freed")
        reliability.fault("a caller stopped reading a 64 MiB reply (idle_timeout 2 s)")
        held = listener.calls_in_progress
        reliability.measure(leaks=held)
        assert held == 0
        with pytest.raises(grpc.RpcError):
            list(call)
    finally:
        chan.close()
        listener.stop(0)
