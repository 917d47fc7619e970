"""Results folded as their chunks arrive (``transport._inflow``, ``FoldOrder``).

A server hands a large ``submit`` to its handler as soon as the header is in; the arrays
are read once, in order, while the rest arrives, and each chunk is let go once read. What
is checked here: the values (known answers), that memory held is the chunks not yet read,
that lies about sizes are refused before anything is allocated, that overlapping folds
give exactly the sequential answer, and that a stream cut part-way resumes in the resent
copy without counting anything twice.
"""

from __future__ import annotations

import json
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from fedlift.codec import Message, decode_header, encode
from fedlift.errors import ProtocolError
from fedlift.model import FLModel, MetaKey
from fedlift.server import StreamingMean
from fedlift.server._store import load_params
from fedlift.transport import GrpcListener, GrpcTransport
from fedlift.transport._inflow import Inflow, StreamedArray

MiB = 1 << 20


def frame_of(arrays: list[np.ndarray], op: str = "submit", fields: Any = None) -> bytes:
    return encode(Message(op, fields or {}, arrays)).tobytes()


def chunks_of(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def inflow_of(data: bytes, head_bytes: int) -> Inflow:
    head = data[:head_bytes]
    return Inflow(head, decode_header(head, 1 << 40))


# ------------------------------------------------------------------ the inflow itself
def test_arrays_read_as_chunks_arrive_hold_only_what_was_not_read() -> None:
    a = np.arange(300_000, dtype=np.float32)
    b = (np.arange(50_001, dtype=np.int64) * 3).reshape(1, 50_001)
    data = frame_of([a, b])
    chunks = chunks_of(data, 64 * 1024)
    inflow = inflow_of(chunks[0], len(chunks[0]))
    arrays = inflow.arrays
    assert [x.shape for x in arrays] == [(300_000,), (1, 50_001)]
    assert all(isinstance(x, StreamedArray) and not x.rereadable for x in arrays)
    got_a, got_b = np.empty(a.size, a.dtype), np.empty(b.size, b.dtype)
    fed = 1
    # Read each 1,000-element block as soon as its bytes are in: the inflow then holds
    # about one chunk, never the message.
    for start in range(0, a.size, 1000):
        end_byte = arrays[0]._start + (start + 1000) * 4
        while inflow.received < end_byte:
            inflow.feed(chunks[fed])
            fed += 1
        arrays[0].read_into(got_a[start : start + 1000], start)
    for chunk in chunks[fed:]:
        inflow.feed(chunk)
    arrays[1].read_into(got_b, 0)
    assert inflow.complete
    assert np.array_equal(got_a, a) and np.array_equal(got_b, b.reshape(-1))
    assert inflow.peak_held <= 2 * 64 * 1024 + b.nbytes
    assert inflow._held == 0 and not inflow._chunks  # every chunk let go once read


def test_a_streamed_array_is_read_once_and_in_order() -> None:
    data = frame_of([np.ones(10_000, np.float32)])
    inflow = inflow_of(data, len(data))
    array = inflow.arrays[0]
    out = np.empty(100, np.float32)
    with pytest.raises(ProtocolError, match="read once, in order"):
        array.read_into(out, 100)  # not the next element
    array.read_into(out, 0)
    with pytest.raises(ProtocolError, match="read once, in order"):
        array.read_into(out, 0)  # again
    with pytest.raises(ProtocolError, match="contiguous float32"):
        array.read_into(np.empty(100, np.float64), 100)
    rest = np.empty(9_900, np.float32)
    array.read_into(rest, 100)
    assert rest.sum() == 9_900.0


def test_a_broken_stream_fails_the_read_and_says_the_sender_is_lost() -> None:
    data = frame_of([np.ones(100_000, np.float32)])
    inflow = inflow_of(data[:4096], 4096)
    array = inflow.arrays[0]
    array.resume_wait = 0.05
    inflow.fail("connection reset")
    with pytest.raises(ProtocolError, match="broke after 4,096 of"):
        array.read_into(np.empty(100_000, np.float32), 0)
    assert array.lost()


def test_a_read_goes_on_in_the_resent_copy_and_counts_nothing_twice() -> None:
    values = np.arange(200_000, dtype=np.float32)
    data = frame_of([values])
    chunks = chunks_of(data, 32 * 1024)
    first = inflow_of(chunks[0], len(chunks[0]))
    for chunk in chunks[1:10]:
        first.feed(chunk)
    array = first.arrays[0]
    got = np.empty(values.size, np.float32)
    array.read_into(got[:20_000], 0)  # the first 20,000 elements are folded
    first.fail("connection reset")  # the link drops part-way

    def resend() -> None:
        time.sleep(0.1)
        second = inflow_of(chunks[0], len(chunks[0]))
        assert array.resume_from(second.arrays[0])
        for chunk in chunks[1:]:
            second.feed(chunk)

    thread = threading.Thread(target=resend)
    thread.start()
    array.read_into(got[20_000:], 20_000)  # waits, skips what was read, goes on
    thread.join()
    assert np.array_equal(got, values)
    other = inflow_of(frame_of([np.ones(5, np.float32)]), 4096)
    assert not array.resume_from(other.arrays[0])  # another shape: not a resend


# ------------------------------------------------------------ sizes checked up front
def _raw_frame(header: dict[str, Any], total: int) -> bytes:
    body = json.dumps(header).encode()
    return struct.pack("<4sIQ", b"FLW1", len(body), total) + body


@pytest.mark.parametrize(
    ("header", "total", "text"),
    [
        ({"op": "submit", "fields": {}, "arrays": [["<f4", [1 << 28], 0]]}, 1 << 20, "run past"),
        ({"op": "submit", "fields": {}, "arrays": [["<f4", [4], 64]]}, 1 << 20, "offset 64"),
        ({"op": "submit", "fields": {}, "arrays": [["|O", [4], 0]]}, 1 << 20, "not allowed"),
        ({"op": "submit", "fields": {}, "arrays": [["<f4", [4], 0]]}, 1 << 20, "account for"),
        ({"op": "submit", "fields": {}, "arrays": [], "shm": {}}, 1 << 20, "shared or remote"),
        ({"op": "submit", "fields": {}, "arrays": [["<f4", [-1], 0]]}, 1 << 20, "non-negative"),
    ],
)
def test_a_header_that_lies_about_sizes_is_refused_before_a_payload_byte(
    header: dict[str, Any], total: int, text: str
) -> None:
    with pytest.raises(ProtocolError, match=text):
        decode_header(_raw_frame(header, total), 1 << 40)


# ---------------------------------------------------------------- over real gRPC
class _Folding:
    """A handler that sums each streamed submit block by block as it arrives."""

    def __init__(self) -> None:
        self.sums: list[float] = []
        self.kinds: list[str] = []
        self.errors: list[BaseException] = []
        self.peak = 0

    def __call__(self, request: Message) -> Message:
        if request.op != "submit":
            return Message("ok", {"op": request.op})
        try:
            total = 0.0
            for array in request.arrays:
                self.kinds.append(type(array).__name__)
                if isinstance(array, np.ndarray):  # a small message comes whole
                    total += float(array.sum(dtype=np.float64))
                    continue
                block = np.empty(min(array.size, 65_536), array.dtype)
                for start in range(0, array.size, block.size):
                    part = block[: min(block.size, array.size - start)]
                    array.read_into(part, start)
                    total += float(part.sum(dtype=np.float64))
                inflow = array._inflow
                self.peak = max(self.peak, inflow.peak_held)
            self.sums.append(total)
        except BaseException as exc:
            self.errors.append(exc)
            raise
        return Message("ok", {"sum": total})


def test_a_large_submit_is_folded_while_it_arrives_over_grpc() -> None:
    handler = _Folding()
    listener = GrpcListener(handler, stream_ops=("submit",), stream_min_bytes=MiB)
    transport = GrpcTransport(listener.address)
    try:
        arrays = [np.full(2_500_000, 0.5, np.float32), np.arange(1000, dtype=np.int32)]
        reply = transport.call(Message("submit", {"n": 1}, arrays), 30)
        assert reply.fields == {"sum": 2_500_000 * 0.5 + 999 * 1000 / 2}
        assert handler.kinds == ["StreamedArray", "StreamedArray"]
        # (How much the server holds at once depends on how fast the reader keeps up:
        # see the inflow tests above for the rule, and benchmarks --wire for the PSS.)
        small = transport.call(Message("submit", {}, [np.ones(10, np.float32)]), 30)
        assert small.fields == {"sum": 10.0}
        assert handler.kinds[-1] == "ndarray"  # under stream_min_bytes: whole, as before
    finally:
        transport.close()
        listener.stop(0)


def _stalling(data: bytes, upto: int, release: threading.Event) -> Iterator[bytes]:
    yield from chunks_of(data[:upto], 4096)
    release.wait(30)


def test_a_header_claiming_1_gib_then_a_stall_holds_only_what_came(
    reliability: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(StreamedArray, "resume_wait", 0.2)  # no resend will come
    handler = _Folding()
    listener = GrpcListener(handler, stream_ops=("submit",), stream_min_bytes=MiB)
    header = {"op": "submit", "fields": {}, "arrays": [["<f4", [1 << 28], 0]]}
    body = json.dumps(header).encode()
    start = (16 + len(body) + 63) // 64 * 64
    head = struct.pack("<4sIQ", b"FLW1", len(body), start + (1 << 30)) + body
    data = head + bytes(start - len(head)) + bytes(64 * 1024)
    channel = grpc.insecure_channel(listener.address)
    release = threading.Event()
    try:
        call = channel.stream_stream("/fedlift.v1.Exchange/Call")
        replies = call(_stalling(data, len(data), release), timeout=30)
        deadline = time.monotonic() + 10
        while not handler.kinds and time.monotonic() < deadline:
            time.sleep(0.02)
        assert handler.kinds == ["StreamedArray"]  # the handler is reading, waiting
        release.set()  # the peer goes away without the rest
        with pytest.raises(grpc.RpcError):
            list(replies)
        deadline = time.monotonic() + 5
        while not handler.errors and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        channel.close()
        listener.stop(0)
    reliability.hostile("streamed submit claiming 1 GiB, then the peer leaves", 1)
    assert handler.errors and isinstance(handler.errors[0], ProtocolError)
    assert handler.peak <= 128 * 1024  # what it sent, not what it claimed


def test_a_refused_streamed_submit_fails_at_once_without_reading_the_rest() -> None:
    def refuse(request: Message) -> Message:
        raise ProtocolError("not this one")

    listener = GrpcListener(refuse, stream_ops=("submit",), stream_min_bytes=MiB)
    transport = GrpcTransport(listener.address)
    try:
        with pytest.raises(ProtocolError, match="not this one"):
            transport.call(Message("submit", {}, [np.zeros(4_000_000, np.float32)]), 30)
    finally:
        transport.close()
        listener.stop(0)


# ------------------------------------------------------------------ overlapping folds
def _streamed(values: np.ndarray, chunk: int = 16 * 1024) -> tuple[Inflow, list[bytes]]:
    data = frame_of([values])
    chunks = chunks_of(data, chunk)
    return inflow_of(chunks[0], len(chunks[0])), chunks[1:]


def test_overlapping_folds_give_exactly_the_sequential_mean() -> None:
    """Three results still arriving, folded at once on three threads, weights 1, 3 and 4:
    the mean is (1*x1 + 3*x2 + 4*x3) / 8 element by element, as folding them one after
    the other gives, and the fold order is the order the calls began."""
    n = 300_000
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal(n).astype(np.float32) for _ in range(3)]
    weights = [1, 3, 4]
    reference = {"w": np.zeros(n, np.float32)}
    sequential = StreamingMean(reference, expected=3)
    for i, (x, w) in enumerate(zip(xs, weights, strict=True)):
        sequential.add(FLModel(params={"w": x}, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: w}),
                       f"site-{i}")  # fmt: skip
    expected = sequential.params()["w"]  # type: ignore[index]
    by_hand = (1 * xs[0].astype(np.float64) + 3 * xs[1] + 4 * xs[2]) / 8
    assert np.allclose(expected, by_hand, atol=1e-6)

    mean = StreamingMean(reference, expected=3)
    streams = [_streamed(x) for x in xs]
    errors: list[BaseException] = []

    def fold(i: int) -> None:
        inflow = streams[i][0]
        model = FLModel(params={"w": inflow.arrays[0]},
                        meta={MetaKey.NUM_STEPS_CURRENT_ROUND: weights[i]})  # fmt: skip
        try:
            mean.add(model, f"site-{i}")
        except BaseException as exc:
            errors.append(exc)

    threads = []
    for i in range(3):  # each call begins (takes its ticket) before the next one starts
        threads.append(threading.Thread(target=fold, args=(i,)))
        threads[-1].start()
        deadline = time.monotonic() + 5
        while mean._order._next <= i and time.monotonic() < deadline:
            time.sleep(0.001)
    # The bytes arrive interleaved, the last result's first.
    for i in range(max(len(c) for _, c in streams)):
        for inflow, chunks in reversed(streams):
            if i < len(chunks):
                inflow.feed(chunks[i])
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    assert np.array_equal(mean.params()["w"], expected)  # type: ignore[index]


def test_a_nan_in_a_streamed_result_names_its_site() -> None:
    bad = np.ones(100_000, np.float32)
    bad[77_777] = np.nan
    mean = StreamingMean({"w": np.zeros(100_000, np.float32)}, expected=2)
    mean.add(FLModel(params={"w": np.ones(100_000, np.float32)}), "site-1")
    inflow, chunks = _streamed(bad)
    for chunk in chunks:
        inflow.feed(chunk)
    with pytest.raises(Exception, match=r"site-2 sent 'w' \(element 77777: nan\)"):
        mean.add(FLModel(params={"w": inflow.arrays[0]}), "site-2")


# -------------------------------------------------------------- a whole job, streamed
def test_a_job_over_grpc_folds_streamed_results_to_the_known_answer(tmp_path: Path) -> None:
    """2 sites, 3 rounds, no shared memory, a 2M-param model: each site adds its number
    (1 or 2) to what it got, so each round adds 1.5 to every element: 4.5 after 3."""
    from fedlift.job import FedJob, ScriptRunner
    from fedlift.simulator import run_simulator

    script = tmp_path / "add.py"
    script.write_text(
        "import numpy as np\nimport fedlift.client as flare\nflare.init()\n"
        "site = flare.get_site_name()\nk = float(site.split('-')[1])\n"
        "while flare.is_running():\n"
        "    m = flare.receive()\n"
        "    p = {key: v + np.float32(k) for key, v in m.params.items()}\n"
        "    flare.send(flare.FLModel(params=p))\n"
    )
    job = FedJob("streamed", 2, 3, {"a": np.zeros(1_500_000, np.float32),
                                    "b": np.zeros(500_000, np.float32)},
                 final_evaluation=False)  # fmt: skip
    job.to_clients(ScriptRunner(script, framework="numpy"))
    folder = job.export_job(tmp_path / "jobs")
    run_simulator(folder, tmp_path / "ws", quiet=True, shared_memory=False)
    saved = load_params(tmp_path / "ws" / "server" / "models" / "global_model.safetensors")
    for key in ("a", "b"):
        assert np.array_equal(saved[key], np.full(saved[key].shape, 4.5, np.float32)), key


# ------------------------------------------------ a cut mid-upload, then the resend
def _cut_after(data: bytes, upto: int) -> Iterator[bytes]:
    yield from chunks_of(data[:upto], 256 * 1024)
    raise ConnectionResetError("the link dropped")  # gRPC cancels the call


def test_a_result_cut_mid_upload_resumes_in_its_resend_and_counts_once(
    reliability: Any,
) -> None:
    """Site 1's upload breaks after 3 MiB of 8; it sends the result again, whole. The
    server's fold, which had taken those 3 MiB, goes on in the resent copy where it
    stopped: the mean is exactly (w + 1 + w + 2) / 2, and the round has both sites."""
    from fedlift.codec import model_from_wire, model_to_wire
    from fedlift.server import Mean, Memory, ServerRuntime

    n = 2_000_000
    w = np.random.default_rng(3).standard_normal(n).astype(np.float32)
    runtime = ServerRuntime("job", ["site-1", "site-2"], {})
    listener = GrpcListener(runtime.handle, stream_ops=("submit",), stream_min_bytes=MiB)
    aggregator = Mean()({"w": w}, expected=2, memory=Memory(), strict=False)
    outcome: dict[str, Any] = {}

    def server() -> None:
        try:
            outcome["answered"] = runtime.run_task(
                "train", FLModel(params={"w": w}), ["site-1", "site-2"],
                on_result=lambda site, result: aggregator.add([(site, result)]),
                on_results=aggregator.add, lazy_results=True, timeout=60, min_responses=2,
            )  # fmt: skip
        except BaseException as exc:
            outcome["error"] = exc

    def site(name: str, cut: bool) -> None:
        transport = GrpcTransport(listener.address)
        try:
            transport.call(Message("register", {"site": name}), 30)
            reply = transport.call(Message("get_task", {"site": name, "wait": 10.0}), 30)
            model = model_from_wire(reply.fields["model"], list(reply.arrays))
            k = np.float32(name.split("-")[1])
            fields, arrays = model_to_wire(FLModel(params={"w": model.params["w"] + k}))
            submit = Message("submit", {"site": name, "task_id": reply.fields["task_id"],
                                        "model": fields}, arrays)  # fmt: skip
            if cut:
                channel = grpc.insecure_channel(listener.address)
                call = channel.stream_stream("/fedlift.v1.Exchange/Call")
                with pytest.raises(grpc.RpcError):
                    list(call(_cut_after(encode(submit).tobytes(), 3 * MiB), timeout=30))
                channel.close()
                time.sleep(0.3)  # the client's backoff before it resends
            assert transport.call(submit, 30).op == "ok"
        except BaseException as exc:
            outcome[name] = exc
        finally:
            transport.close()

    threads = [threading.Thread(target=server)]
    threads += [threading.Thread(target=site, args=(f"site-{i}", i == 1)) for i in (1, 2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        listener.stop(0)
    reliability.fault("link cut 3 MiB into an 8 MB streamed result upload, then resent")
    assert "error" not in outcome and "site-1" not in outcome and "site-2" not in outcome, outcome
    assert sorted(outcome["answered"]) == ["site-1", "site-2"]
    mean = aggregator.result().params["w"]  # type: ignore[index]
    expected = ((w + np.float32(1)) + (w + np.float32(2)) * np.float32(1.0)) * np.float32(0.5)
    assert np.array_equal(mean, expected)


def test_a_streamed_result_is_answered_once_in_not_once_folded() -> None:
    """The fold of a site's result may wait (behind a slower site's, block by block): the
    site's submit is answered as soon as all of its bytes are in, so a short idle timeout
    (1 s here) never makes it send its result again while the fold waits."""
    from fedlift.codec import model_from_wire, model_to_wire
    from fedlift.server import Mean, Memory, ServerRuntime

    n = 2_000_000
    w = np.arange(n, dtype=np.float32)
    runtime = ServerRuntime("job", ["site-1"], {})
    listener = GrpcListener(runtime.handle, stream_ops=("submit",), stream_min_bytes=MiB)
    aggregator = Mean()({"w": w}, expected=1, memory=Memory(), strict=False)
    go = threading.Event()
    outcome: dict[str, Any] = {}

    def fold_later(results: list[tuple[str, FLModel]]) -> None:
        go.wait(30)
        aggregator.add(results)

    def server() -> None:
        outcome["answered"] = runtime.run_task(
            "train", FLModel(params={"w": w}), ["site-1"],
            on_result=lambda site, result: fold_later([(site, result)]),
            on_results=fold_later, lazy_results=True, timeout=60, min_responses=1,
        )  # fmt: skip

    thread = threading.Thread(target=server)
    thread.start()
    transport = GrpcTransport(listener.address)
    try:
        transport.call(Message("register", {"site": "site-1"}), 30)
        reply = transport.call(Message("get_task", {"site": "site-1", "wait": 10.0}), 30)
        model = model_from_wire(reply.fields["model"], list(reply.arrays))
        fields, arrays = model_to_wire(FLModel(params={"w": model.params["w"] * 2}))
        submit = {"site": "site-1", "task_id": reply.fields["task_id"], "model": fields}
        # Answered within the 1 s of silence the call allows, the fold not begun: had the
        # reply waited for the fold, this would raise TransportTimeoutError.
        assert transport.call(Message("submit", submit, arrays), 1.0).op == "ok"
        assert not go.is_set() and "answered" not in outcome
        time.sleep(0.5)
        go.set()
        thread.join(30)
    finally:
        go.set()
        transport.close()
        listener.stop(0)
    assert outcome["answered"] == ["site-1"]
    assert np.array_equal(aggregator.result().params["w"], w * 2)  # type: ignore[index]


def test_a_site_that_resends_again_and_again_holds_one_copy(reliability: Any) -> None:
    """Each resend replaces the copy before it, whose chunks go at once: five partial
    resends of a 4 MB result leave only the last one's bytes held."""
    values = np.ones(1_000_000, np.float32)
    data = frame_of([values])
    chunks = chunks_of(data, 64 * 1024)
    first = inflow_of(chunks[0], len(chunks[0]))
    array = first.arrays[0]
    array.keep()
    copies = [first]
    for _ in range(5):
        for chunk in chunks[1:40]:  # 2.5 MB of it, then the link drops again
            copies[-1].feed(chunk)
        resent = inflow_of(chunks[0], len(chunks[0]))
        assert array.resume_from(resent.arrays[0])
        copies.append(resent)
    reliability.hostile("a site resending the same streamed result 5 times part-way", 5)
    assert [c._held for c in copies[:-1]] == [0] * 5  # every replaced copy let go
    for chunk in chunks[1:]:
        copies[-1].feed(chunk)
    got = np.empty(values.size, np.float32)
    array.read_into(got, 0)
    assert np.array_equal(got, values)
    array.let_go()  # the fold is done with it
    copies[-1].release()  # and its handler returned (the listener's hold)
    assert copies[-1]._held == 0 and copies[-1]._abandoned
