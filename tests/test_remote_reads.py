"""Results read straight out of a client's memory (process_vm_readv) on one host."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import SCRIPTS
from fedlift import FedAvgJob, ScriptRunner
from fedlift.codec import Message, _remote, _wire, decode, encode, model_to_wire
from fedlift.errors import ClientFailedError, ProtocolError
from fedlift.model import FLModel
from fedlift.server import ServerRuntime, StreamingMean

pytestmark = pytest.mark.skipif(not _remote.available(), reason="no process_vm_readv here")

CHILD = (
    "import sys, numpy as np\n"
    "a = np.arange(1_000_000, dtype=np.float32) * 0.5\n"
    "print(a.__array_interface__['data'][0], flush=True)\n"
    "sys.stdin.read()\n"
)


@pytest.fixture
def child() -> object:
    process = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert process.stdout is not None
    address = int(process.stdout.readline())
    yield process, address
    process.kill()
    process.wait()


def small_remote_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_wire, "REMOTE_MIN_BYTES", 1)


def test_arrays_are_read_from_another_process(child: tuple[subprocess.Popen[bytes], int]) -> None:
    process, address = child
    remote = _remote.RemoteArray(process.pid, address, (1000, 1000), np.dtype(np.float32))
    expected = np.arange(1_000_000, dtype=np.float32).reshape(1000, 1000) * 0.5
    np.testing.assert_array_equal(np.asarray(remote), expected)
    block = np.empty(70_000, np.float32)
    remote.read_into(block, 123_456)
    np.testing.assert_array_equal(block, expected.reshape(-1)[123_456 : 123_456 + 70_000])
    with pytest.raises(ProtocolError, match="outside"):
        remote.read_into(block, 999_999)
    process.kill()
    process.wait()
    with pytest.raises(ProtocolError, match=f"in process {process.pid}"):
        remote.read_into(block)


def test_a_message_names_its_arrays_and_the_receiver_reads_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    small_remote_threshold(monkeypatch)
    arrays = [np.arange(12, dtype=np.float64).reshape(3, 4), np.ones(5, np.int8)]
    frame = encode(Message("submit", {"k": 1}, arrays), shm_min_bytes=1, remote_pid=os.getpid())
    assert frame.shm_name is None and len(frame.keep) == 2
    raw = frame.tobytearray()
    assert len(raw) < 400  # a header only: no payload travels
    got = decode(raw, allow_shm=True)
    assert [type(a) for a in got.arrays] == [_remote.RemoteArray] * 2
    for remote, original in zip(got.arrays, arrays, strict=True):
        np.testing.assert_array_equal(np.asarray(remote), original)
    with pytest.raises(ProtocolError, match="does not accept"):
        decode(raw, allow_shm=False)  # only for endpoints on one host


def test_small_payloads_still_go_through_shared_memory() -> None:
    frame = encode(Message("m", {}, [np.ones(1000)]), shm_min_bytes=1, remote_pid=os.getpid())
    try:
        assert frame.shm_name is not None and frame.keep == ()
    finally:
        frame.discard()


def _forged(remote: object, specs: list[object]) -> bytearray:
    header = json.dumps({"op": "x", "fields": {}, "arrays": specs, "remote": remote}).encode()
    total = (16 + len(header) + 63) // 64 * 64
    out = bytearray(total)
    out[:4] = encode(Message("x")).tobytes()[:4]
    out[4:8] = len(header).to_bytes(4, "little")
    out[8:16] = total.to_bytes(8, "little")
    out[16 : 16 + len(header)] = header
    return out


@pytest.mark.parametrize(
    "remote, specs, message",
    [
        ({"pid": 0, "regions": [[4096, 4]]}, [["<f4", [1], 0]], "bad remote-memory"),
        ({"pid": 1, "regions": []}, [["<f4", [1], 0]], "bad remote-memory"),
        ({"pid": 1, "regions": [[4096, 4]], "x": 1}, [["<f4", [1], 0]], "bad remote-memory"),
        ({"pid": 1, "regions": [[-1, 4]]}, [["<f4", [1], 0]], "bad remote region"),
        ({"pid": 1, "regions": [[4096, 8]]}, [["<f4", [1], 0]], "8 bytes named for"),
        ({"pid": 1, "regions": [[4096, 4]]}, [["|O", [1], 0]], "not allowed"),
        (
            {"pid": 1, "regions": [[4096, 4]]},
            [["<f4", ["1"], 0]],
            "not a list of non-negative ints",
        ),
    ],
)
def test_bad_remote_references_are_refused(
    remote: object, specs: list[object], message: str
) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode(_forged(remote, specs), allow_shm=True)


def test_the_probe_tells_whether_the_server_may_read_a_site(
    child: tuple[subprocess.Popen[bytes], int],
) -> None:
    probe = _remote.make_probe()
    assert _remote.check_probe(probe)
    assert not _remote.check_probe({**probe, "token": "0" * 64})  # not what is there
    assert not _remote.check_probe({**probe, "pid": child[0].pid})  # not there at all
    assert not _remote.check_probe({"pid": "1"})
    assert not _remote.check_probe(None)


def test_streaming_mean_folds_remote_results_like_local_ones() -> None:
    rng = np.random.default_rng(3)
    results = [
        FLModel(params={"w": rng.normal(size=(300_000,)).astype(np.float32), "n": np.arange(3)},
                meta={"NUM_STEPS_CURRENT_ROUND": w})
        for w in (1, 2, 5)
    ]  # fmt: skip
    local, remote = StreamingMean(results[0].params), StreamingMean(results[0].params)
    for model in results:
        local.add(model)
        pid = os.getpid()
        lazy = {
            k: _remote.RemoteArray(pid, int(v.__array_interface__["data"][0]), v.shape, v.dtype)
            for k, v in model.params.items()
        }
        remote.add(FLModel(params=lazy, meta=model.meta))
    got, want = remote.params(), local.params()
    np.testing.assert_array_equal(got["w"], want["w"])
    np.testing.assert_array_equal(got["n"], want["n"])


def test_a_held_submit_is_let_go_when_its_round_is_over(monkeypatch: pytest.MonkeyPatch) -> None:
    small_remote_threshold(monkeypatch)
    runtime = ServerRuntime("job", ["site-1"], {})
    runtime.handle(Message("register", {"site": "site-1"}))
    fields, arrays = model_to_wire(FLModel(params={"w": np.ones(100, np.float32)}))
    frame = encode(
        Message("submit", {"site": "site-1", "task_id": "gone", "model": fields}, arrays),
        shm_min_bytes=1,
        remote_pid=os.getpid(),
    )
    request = decode(frame.tobytearray(), allow_shm=True)
    replies: list[Message] = []
    thread = threading.Thread(target=lambda: replies.append(runtime.handle(request)))
    started = time.monotonic()
    thread.start()
    thread.join(10)
    # No task is running: nobody will read it, so the site is not kept waiting.
    assert replies and replies[0].op == "ok"
    assert time.monotonic() - started < 3


def big_model() -> dict[str, np.ndarray]:
    # 72 MB: above REMOTE_MIN_BYTES, so results go the remote-read way.
    return {"big": np.linspace(0, 1, 18_000_000, dtype=np.float32), "bias": np.zeros(10)}


@pytest.mark.parametrize("remote_reads", ["1", "0"], ids=["remote-reads", "shared-memory"])
def test_large_results_are_aggregated_exactly_and_send_returns_only_once_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, remote_reads: str
) -> None:
    monkeypatch.setenv("FEDLIFT_REMOTE_READS", remote_reads)
    assert big_model()["big"].nbytes > _wire.REMOTE_MIN_BYTES
    job = FedAvgJob("big", 2, 2, big_model(), final_evaluation=False)
    # --scribble overwrites the sent arrays with -1e9 as soon as send() returns.
    job.to_clients(ScriptRunner(SCRIPTS / "numpy_client.py", script_args="--scribble"))
    result = job.simulator_run(tmp_path / "ws")
    shift = 2 * (1 * 1 + 2 * 2) / 3  # 2 rounds; site i adds i + 1 with weight i + 1
    np.testing.assert_allclose(result.params["big"], big_model()["big"] + shift, rtol=1e-6)
    np.testing.assert_allclose(result.params["bias"], shift)
    log = (result.workspace / "server" / "log.txt").read_text()
    assert ("read from its memory" in log) == (remote_reads == "1")


def test_a_result_whose_process_died_before_it_was_read_fails_the_round(
    child: tuple[subprocess.Popen[bytes], int],
) -> None:
    process, address = child
    runtime = ServerRuntime("job", ["site-1"], {})
    runtime.handle(Message("register", {"site": "site-1"}))
    mean = StreamingMean({"w": np.zeros(1000, np.float32)})
    errors: list[BaseException] = []

    def run() -> None:
        try:
            runtime.run_task(
                "train", FLModel(params={"w": np.zeros(1000, np.float32)}), ["site-1"],
                on_result=lambda site, model: mean.add(model, site), timeout=20,
                min_responses=1, lazy_results=True,
            )  # fmt: skip
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    task = runtime.handle(Message("get_task", {"site": "site-1", "wait": 10}))
    assert task.op == "task"
    fields, _ = model_to_wire(FLModel(params={"w": np.zeros(1000, np.float32)}))
    lost = _remote.RemoteArray(process.pid, address, (1000,), np.dtype(np.float32))
    process.kill()
    process.wait()
    reply = runtime.handle(
        Message("submit", {"site": "site-1", "task_id": task.fields["task_id"], "model": fields},
                [lost])  # type: ignore[list-item]
    )  # fmt: skip
    thread.join(20)
    assert reply.op == "ok"
    # run_task names the site whose result is lost; FedAvg runs the round again without it.
    assert len(errors) == 1 and isinstance(errors[0], ClientFailedError)
    assert getattr(errors[0], "sites", None) == ["site-1"]
    assert "site-1 failed: its result could not be read" in str(errors[0])


def test_results_that_queue_up_reach_the_workflow_together() -> None:
    sites = ["site-1", "site-2", "site-3"]
    runtime = ServerRuntime("job", sites, {})
    for site in sites:
        runtime.handle(Message("register", {"site": site}))
    batches: list[list[str]] = []

    def on_results(results: list[tuple[str, FLModel]]) -> None:
        batches.append([site for site, _ in results])
        if len(batches) == 1:
            time.sleep(0.5)  # the others arrive meanwhile

    thread = threading.Thread(
        target=runtime.run_task,
        args=("train", FLModel(params={"w": np.zeros(3)}), sites),
        kwargs={"on_result": None, "on_results": on_results, "timeout": 20,
                "min_responses": 3},
    )  # fmt: skip
    thread.start()
    tasks = {s: runtime.handle(Message("get_task", {"site": s, "wait": 10})) for s in sites}
    fields, arrays = model_to_wire(FLModel(params={"w": np.ones(3)}))
    for site in sites:
        task_id = tasks[site].fields["task_id"]
        runtime.handle(
            Message("submit", {"site": site, "task_id": task_id, "model": fields}, arrays)
        )
        if site == "site-1":
            time.sleep(0.2)  # the first is being handled when the others come
    thread.join(20)
    assert batches == [["site-1"], ["site-2", "site-3"]]
