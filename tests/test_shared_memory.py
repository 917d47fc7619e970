"""Shared-memory payloads: same results as the socket, nothing leaked in /dev/shm."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import SCRIPTS
from fedlift import FedAvgJob, ScriptRunner
from fedlift.codec import Message, _shm, decode, encode
from fedlift.errors import ClientFailedError, ProtocolError
from fedlift.transport import GrpcListener, GrpcTransport, Handler
from fedlift.transport.testing import CHECKS

pytestmark = pytest.mark.skipif(not _shm.available(), reason="no writable /dev/shm here")


def segments() -> set[str]:
    return {p.name for p in _shm.SHM_DIR.glob("fedlift-*")}


def shm_factory(handler: Handler) -> tuple[GrpcListener, GrpcTransport]:
    listener = GrpcListener(handler, shared_memory=True)
    return listener, GrpcTransport(listener.address, shared_memory=True)


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__ for c in CHECKS])
def test_grpc_with_shared_memory_passes_the_conformance_suite(check: object) -> None:
    before = segments()
    check(shm_factory)  # type: ignore[operator]
    gc.collect()
    assert segments() - before == set()


def test_large_payloads_travel_in_shared_memory_and_are_unlinked() -> None:
    seen: list[np.ndarray] = []

    def handler(request: Message) -> Message:
        seen.append(request.arrays[0])
        return Message("ok", {}, [request.arrays[0] * 2])

    listener, transport = shm_factory(handler)
    try:
        before = segments()
        big = np.arange(2_000_000, dtype=np.float32)
        reply = transport.call(Message("big", {}, [big]), timeout=30)
        np.testing.assert_array_equal(reply.arrays[0], big * 2)
        # The handler's array was a mapping of a segment, not bytes off the socket.
        assert isinstance(seen[0].base, memoryview | np.ndarray) or seen[0].base is not None
        assert segments() - before == set()  # both transfer segments were unlinked on receipt
    finally:
        transport.close()
        listener.stop(0)


def test_owned_arrays_go_by_reference_to_every_receiver() -> None:
    pool = _shm.SegmentPool(keep=0)  # keeps no free segment: unlinked once unused
    others = segments()  # other processes' segments (/dev/shm is shared) are not ours
    arrays = pool.allocate([((1000,), np.dtype(np.float32)), ((3, 4), np.dtype(np.float64))])
    arrays[0][:] = 7.0
    arrays[1][:] = 2.5
    before = segments()
    ours = before - others
    assert ours, "allocate() made no segment"
    frame = encode(Message("task", {}, arrays), shm_min_bytes=1)
    assert frame.shm_name is None  # a reference, no new segment
    assert len(frame.tobytes()) < 1000  # the frame is only the header
    first, second = (decode(frame.tobytearray(), allow_shm=True) for _ in range(2))
    assert segments() == before
    first.arrays[0][0] = -1.0  # receivers get private, writable copies-on-write
    assert arrays[0][0] == 7.0 and second.arrays[0][0] == 7.0
    np.testing.assert_array_equal(second.arrays[1], np.full((3, 4), 2.5))
    del arrays, frame, first, second
    gc.collect()
    assert ours & segments() == set()  # unlinked once no array uses it


@pytest.mark.parametrize(
    "ref, message",
    [
        ({"name": "../../etc/passwd", "size": 4, "unlink": False}, "invalid shared-memory"),
        ({"name": "fedlift-x-1-1-0123abcd/../y", "size": 4, "unlink": False}, "invalid"),
        ({"name": "fedlift-nosuch-1-1-0123abcd", "size": 4, "unlink": False}, "cannot open"),
        ({"name": "fedlift-x-1-1-0123abcd", "size": -1, "unlink": False}, "bad shared-memory"),
        ({"name": "fedlift-x-1-1-0123abcd", "size": 4, "unlink": "yes"}, "bad shared-memory"),
        ({"name": "fedlift-x-1-1-0123abcd", "size": 4, "unlink": False, "gen": -1}, "bad shared"),
        ({"name": "fedlift-x-1-1-0123abcd", "size": 4, "unlink": False, "gen": "1"}, "bad shared"),
        ({"name": "fedlift-x-1-1-0123abcd", "size": 4, "unlink": False, "x": 1}, "bad shared"),
    ],
)
def test_bad_segment_references_are_refused(ref: dict[str, object], message: str) -> None:
    header = json.dumps({"op": "x", "fields": {}, "arrays": [["<f4", [1], 0]], "shm": ref})
    frame = encode(Message("x"))  # borrow a valid prefix, then swap in the forged header
    raw = bytearray(frame.tobytes())
    body = header.encode()
    total = (16 + len(body) + 63) // 64 * 64
    forged = bytearray(total)
    forged[:4] = raw[:4]
    forged[4:8] = len(body).to_bytes(4, "little")
    forged[8:16] = total.to_bytes(8, "little")
    forged[16 : 16 + len(body)] = body
    with pytest.raises(ProtocolError, match=message):
        decode(forged, allow_shm=True)


def test_a_segment_larger_than_the_file_is_refused() -> None:
    frame = encode(Message("x", {}, [np.ones(1000)]), shm_min_bytes=1)
    raw = frame.tobytes().replace(b'"size":8000', b'"size":9000')
    try:
        with pytest.raises(ProtocolError, match="holds 8000 bytes, not 9000"):
            decode(bytearray(raw), allow_shm=True)
    finally:
        frame.discard()


def test_a_listener_without_shared_memory_refuses_it_and_nothing_leaks() -> None:
    listener = GrpcListener(lambda m: Message("ok"))  # shared_memory=False
    transport = GrpcTransport(listener.address, shared_memory=True)
    before = segments()
    try:
        with pytest.raises(ProtocolError, match="does not accept"):
            transport.call(Message("big", {}, [np.ones(1_000_000)]), timeout=30)
        assert segments() - before == set()
    finally:
        transport.close()
        listener.stop(0)


def _job(script_args: str, launch: bool = False) -> FedAvgJob:
    job = FedAvgJob("shm", 2, 2, {"w": np.zeros(600_000, np.float32)})
    job.to_clients(
        ScriptRunner(
            SCRIPTS / "numpy_client.py",
            script_args=script_args,
            launch_external_process=launch,
            framework="numpy",
        )
    )
    return job


@pytest.mark.parametrize("launch", [False, True], ids=["in-process", "external"])
def test_simulations_leave_no_segments_behind(tmp_path: Path, launch: bool) -> None:
    before = segments()
    result = _job("", launch).simulator_run(tmp_path / "ok")
    np.testing.assert_allclose(result.params["w"][:3], [10 / 3] * 3, rtol=1e-6)
    with pytest.raises(ClientFailedError):
        _job("--fail-round 1 --only-site 0", launch).simulator_run(tmp_path / "fail")
    with pytest.raises(ClientFailedError):
        _job("--kill-round 1 --only-site 1", launch).simulator_run(tmp_path / "kill")
    del result
    gc.collect()
    assert segments() - before == set()


def test_server_memory_does_not_grow_with_the_number_of_clients(tmp_path: Path) -> None:
    """Streaming aggregation: peak RSS of the server with 8 clients is within 10% of 2.

    The clients let go of each round's model once they have answered it. A script that
    keeps it until the next one arrives makes the server's pool map one more model when
    that client is slow to wake up (the segment the next aggregate would reuse is still
    mapped): one model more, with any number of clients, which on a loaded 2-core machine
    happens more often with 8 busy clients than with 2.
    """
    code = f"""
import resource, sys
import numpy as np
sys.path.insert(0, {str(SCRIPTS.parent.parent)!r})
from fedlift import FedAvgJob, ScriptRunner
job = FedAvgJob("mem", int(sys.argv[1]), 2,
                {{f"l{{i}}": np.zeros(6_000_000, np.float32) for i in range(5)}},
                final_evaluation=False)
job.to_clients(ScriptRunner({str(SCRIPTS / "numpy_client.py")!r}, script_args="--drop-model",
                           framework="numpy"))
from fedlift.simulator import run_simulator
run_simulator(job.export_job(sys.argv[2] + "/jobs"), sys.argv[2], quiet=True)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
    peaks = {}
    for n in (2, 8):
        done = subprocess.run(
            [sys.executable, "-c", code, str(n), str(tmp_path / f"ws{n}")],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        assert done.returncode == 0, done.stderr[-2000:]
        peaks[n] = int(done.stdout.split()[-1]) / 1024  # MB
    model_mb = 5 * 6_000_000 * 4 / 2**20
    assert peaks[2] > model_mb  # the server really held the model
    assert peaks[8] <= peaks[2] * 1.10, peaks


def test_the_one_message_path_rejects_garbage_and_keeps_serving() -> None:
    import grpc

    listener = GrpcListener(lambda m: Message("ok"), shared_memory=True)
    channel = grpc.insecure_channel(listener.address)
    try:
        small = channel.unary_unary("/fedlift.v1.Exchange/Small")
        with pytest.raises(grpc.RpcError) as info:
            small(b"not a fedlift frame at all", timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "magic" in info.value.details()
        transport = GrpcTransport(listener.address, shared_memory=True)
        assert transport.call(Message("fine"), timeout=10).op == "ok"
    finally:
        channel.close()
        listener.stop(0)


# ----------------------------------------------------------------------------- segment pool

SPECS = [((1000,), np.dtype(np.float32)), ((10, 10), np.dtype(np.float64))]


def _send_by_reference(arrays: list[np.ndarray]) -> bytearray:
    frame = encode(Message("m", {}, arrays), shm_min_bytes=1)
    assert frame.shm_name is None  # by reference, not a transfer segment
    assert b'"gen":' in frame.tobytes()
    return frame.tobytearray()


def test_pool_reuses_a_segment_once_its_arrays_are_gone() -> None:
    pool = _shm.SegmentPool(keep=1)
    first = pool.allocate(SPECS)
    name = _shm.locate(first)[0]  # type: ignore[index]
    del first
    gc.collect()
    second = pool.allocate(SPECS)
    assert _shm.locate(second)[0] == name  # type: ignore[index]
    assert pool.segments == 1
    held = second  # still in use: the next allocation needs a second segment
    third = pool.allocate(SPECS)
    assert _shm.locate(third)[0] != name  # type: ignore[index]
    assert pool.segments == 2
    del held, second, third
    gc.collect()
    assert pool.segments == 1  # keep=1: the surplus free segment was removed
    pool.close()
    assert pool.segments == 0


@pytest.mark.parametrize(("spare_bytes", "kept"), [(0, 1), (1 << 20, 3), (12_000, 2)])
def test_pool_keeps_spare_segments_within_its_byte_budget(spare_bytes: int, kept: int) -> None:
    """Beyond ``keep``, free segments stay while they total at most ``spare_bytes`` (SPECS
    take ~5 kB each): a segment a slow reader still maps is not traded for a new one each
    round."""
    pool = _shm.SegmentPool(keep=1, spare_bytes=spare_bytes)
    first, second, third = (pool.allocate(SPECS) for _ in range(3))
    names = {_shm.locate(a)[0] for a in (first, second, third)}  # type: ignore[index]
    assert len(names) == 3 and pool.segments == 3
    del first, second, third
    gc.collect()
    assert pool.segments == kept
    again = [pool.allocate(SPECS) for _ in range(pool.segments)]
    assert {_shm.locate(a)[0] for a in again} <= names  # type: ignore[index]  # all reused
    del again
    pool.close()
    assert pool.segments == 0


def test_pool_does_not_rewrite_a_segment_a_reader_still_maps() -> None:
    pool = _shm.SegmentPool(keep=2)  # both kept: the first is tried first
    before = segments()
    arrays = pool.allocate(SPECS)
    arrays[0][:] = 7.0
    received = decode(_send_by_reference(arrays), allow_shm=True)
    name = _shm.locate(arrays)[0]  # type: ignore[index]
    del arrays
    gc.collect()
    # The owner let go, but the receiver still maps it: the pool must take a new segment.
    again = pool.allocate(SPECS)
    again[0][:] = -1.0
    assert _shm.locate(again)[0] != name  # type: ignore[index]
    np.testing.assert_array_equal(received.arrays[0], np.full(1000, 7.0, np.float32))
    del received, again
    gc.collect()
    # Now nobody maps the first one: it is reused.
    reused = pool.allocate(SPECS)
    assert _shm.locate(reused)[0] == name  # type: ignore[index]
    del reused
    pool.close()
    gc.collect()
    assert segments() - before == set()


def _address(array: np.ndarray) -> int:
    return int(array.__array_interface__["data"][0])


def test_a_receiver_keeps_its_mapping_and_sees_the_segment_as_it_is_now() -> None:
    """Mapping a segment afresh every round costs a receiver more than its work; the kept
    mapping must still show the owner's new contents, also where the last user wrote."""
    pool = _shm.SegmentPool(keep=1)
    arrays = pool.allocate(SPECS)
    arrays[0][:] = 1.0
    arrays[1][:] = 1.0
    name = _shm.locate(arrays)[0]  # type: ignore[index]
    first = decode(_send_by_reference(arrays), allow_shm=True)
    where = _address(first.arrays[0])
    first.arrays[0][:500] = -5.0  # the user writes: private copies of those pages
    first.arrays[1][9, 9] = -7.0
    del first, arrays
    gc.collect()
    # The receiver let go of its lock (the pool reuses the segment) but kept its mapping.
    again = pool.allocate(SPECS)
    assert _shm.locate(again)[0] == name  # type: ignore[index]
    again[0][:] = 2.0
    again[1][:] = 3.0
    second = decode(_send_by_reference(again), allow_shm=True)
    assert _address(second.arrays[0]) == where  # the same mapping, not a new one
    np.testing.assert_array_equal(second.arrays[0], np.full(1000, 2.0, np.float32))
    np.testing.assert_array_equal(second.arrays[1], np.full((10, 10), 3.0))
    second.arrays[0][0] = 9.0  # still private: the owner's data is unchanged
    assert again[0][0] == 2.0
    del second, again
    pool.close()
    gc.collect()


def test_a_kept_mapping_in_use_is_not_lent_twice() -> None:
    pool = _shm.SegmentPool(keep=1)
    arrays = pool.allocate(SPECS)
    arrays[0][:] = 4.0
    frame = _send_by_reference(arrays)
    one, two = decode(frame, allow_shm=True), decode(frame, allow_shm=True)
    assert _address(one.arrays[0]) != _address(two.arrays[0])
    one.arrays[0][:] = -1.0
    np.testing.assert_array_equal(two.arrays[0], np.full(1000, 4.0, np.float32))
    del one, two, arrays
    pool.close()
    gc.collect()


def test_a_kept_mapping_that_cannot_be_cleaned_is_replaced_by_a_fresh_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool = _shm.SegmentPool(keep=1)
    arrays = pool.allocate(SPECS)
    arrays[0][:] = 1.0
    first = decode(_send_by_reference(arrays), allow_shm=True)
    first.arrays[0][:] = -1.0  # private copies that must not show through
    del first
    gc.collect()

    def unreadable(entry: object) -> None:
        raise OSError("pagemap unreadable")

    monkeypatch.setattr(_shm._readers, "restore", unreadable)
    second = decode(_send_by_reference(arrays), allow_shm=True)
    np.testing.assert_array_equal(second.arrays[0], np.full(1000, 1.0, np.float32))
    del second, arrays
    pool.close()
    gc.collect()


def test_a_kept_mapping_of_a_stale_or_removed_segment_is_dropped() -> None:
    pool = _shm.SegmentPool(keep=1)
    arrays = pool.allocate(SPECS)
    stale = _send_by_reference(arrays)
    del decode(stale, allow_shm=True).arrays[:]  # mapped once, then kept
    gc.collect()
    kept = _shm._readers.idle
    del arrays
    gc.collect()
    newer = pool.allocate(SPECS)  # the same segment, next generation
    with pytest.raises(ProtocolError, match="stale"):
        decode(stale, allow_shm=True)
    assert _shm._readers.idle == kept - 1  # the kept mapping went with the refusal
    received = decode(_send_by_reference(newer), allow_shm=True)
    del received
    gc.collect()
    assert _shm._readers.idle == kept
    del newer
    gc.collect()
    pool.close()  # unlinks the segment: a kept mapping would keep its pages alive
    other = _shm.SegmentPool(keep=1)
    more = other.allocate(SPECS)
    del decode(_send_by_reference(more), allow_shm=True).arrays[:]
    gc.collect()
    assert _shm._readers.idle == kept  # the removed one was dropped, the new one kept
    del more
    other.close()
    gc.collect()


def test_a_stale_reference_to_a_rewritten_segment_is_refused() -> None:
    pool = _shm.SegmentPool(keep=1)
    arrays = pool.allocate(SPECS)
    stale = _send_by_reference(arrays)  # sent, but not received before the owner moved on
    del arrays
    gc.collect()
    newer = pool.allocate(SPECS)  # the same segment, next generation
    with pytest.raises(ProtocolError, match="stale"):
        decode(stale, allow_shm=True)
    current = decode(_send_by_reference(newer), allow_shm=True)
    assert current.arrays[1].shape == (10, 10)
    del newer, current
    pool.close()


def test_a_killed_reader_releases_its_hold_on_a_pooled_segment() -> None:
    pool = _shm.SegmentPool(keep=2)
    arrays = pool.allocate(SPECS)
    name = _shm.locate(arrays)[0]  # type: ignore[index]
    frame = _send_by_reference(arrays)
    code = (
        "import sys, time; from fedlift.codec import decode; "
        "m = decode(sys.stdin.buffer.read(), allow_shm=True); "
        "print('mapped', flush=True); time.sleep(60)"
    )
    reader = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert reader.stdin is not None and reader.stdout is not None
        reader.stdin.write(frame)
        reader.stdin.close()
        assert reader.stdout.readline().strip() == b"mapped"
        del arrays
        gc.collect()
        held = pool.allocate(SPECS)  # the reader maps the first: a new one
        assert _shm.locate(held)[0] != name  # type: ignore[index]
        reader.kill()
        reader.wait()
        del held
        gc.collect()
        assert _shm.locate(pool.allocate(SPECS))[0] == name  # type: ignore[index]
    finally:
        reader.kill()
        reader.wait()
        pool.close()


def test_a_pool_shared_by_threads_stays_consistent() -> None:
    """Arrays die in other threads (finalizers trim the free list) while allocations run."""
    import queue
    import threading

    pool = _shm.SegmentPool(keep=1)
    before = segments()
    handoff: queue.Queue[list[np.ndarray] | None] = queue.Queue(maxsize=4)
    errors: list[BaseException] = []

    def consumer() -> None:
        while (arrays := handoff.get()) is not None:
            arrays[0][:3] = 1.0
            del arrays  # the last reference dies here, in this thread

    def producer() -> None:
        try:
            for _ in range(300):
                handoff.put(pool.allocate(SPECS))
        except BaseException as exc:
            errors.append(exc)

    consumers = [threading.Thread(target=consumer) for _ in range(3)]
    producers = [threading.Thread(target=producer) for _ in range(3)]
    for t in consumers + producers:
        t.start()
    for t in producers:
        t.join(60)
    for _ in consumers:
        handoff.put(None)
    for t in consumers:
        t.join(60)
    gc.collect()
    assert errors == []
    assert pool.segments <= 1  # everything was handed back; keep=1 segment remains
    pool.close()
    gc.collect()
    assert segments() - before == set()
