"""The deployment server over real gRPC + mutual TLS: admin operations, sites that poll for
jobs, permissions by certificate, abort, a FIFO of jobs, checkpoints and resume after SIGKILL.

Sites are small in-test clients that speak the protocol directly (not the client daemon).
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedlift.codec import Message, model_from_wire, model_to_wire
from fedlift.deploy import DeployServer, channel_credentials, provision
from fedlift.errors import (
    ConfigError,
    ConnectionLostError,
    PermissionDeniedError,
    TransportTimeoutError,
)
from fedlift.job import JobConfig, RunnerConfig, WorkflowConfig, zip_dir
from fedlift.model import FLModel
from fedlift.model._safetensors import save_safetensors
from fedlift.server import ArraysFormat, RunRecorder
from fedlift.server._store import load_params, read_checkpoint
from fedlift.simulator import run_local
from fedlift.transport import GrpcTransport

SITES = ["site-1", "site-2", "site-3"]
ADMIN = "admin@org"
INITIAL = np.arange(4, dtype=np.float32)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("kits") / "kits"
    provision("demo", f"localhost:{free_port()}", SITES, [ADMIN], out)
    return out


def make_job(
    folder: Path,
    name: str = "numpy-job",
    *,
    n_clients: int = 2,
    num_rounds: int = 2,
    final_evaluation: bool = False,
) -> Path:
    (folder / "app").mkdir(parents=True)
    (folder / "app" / "train.py").write_text("print('not run by the in-test sites')\n")
    save_safetensors({"w": INITIAL}, folder / "initial_model.safetensors")
    JobConfig(
        name=name,
        n_clients=n_clients,
        workflow=WorkflowConfig(
            num_rounds=num_rounds,
            min_clients=n_clients,
            round_timeout=60.0,
            register_timeout=60.0,
            final_evaluation=final_evaluation,
        ),
        runner=RunnerConfig(script="train.py", framework="numpy"),
        initial_model="initial_model.safetensors",
    ).write(folder)
    return folder


class Party:
    """A site or admin calling the server with its own kit (reconnects after a loss)."""

    def __init__(
        self, kits: Path, name: str, address: str, quit: threading.Event | None = None
    ) -> None:
        self.name = name
        self._quit = quit or threading.Event()
        self._credentials = channel_credentials(kits / name)
        self._address = address
        self._transport = GrpcTransport(address, credentials=self._credentials)

    def call(
        self,
        op: str,
        fields: dict[str, Any] | None = None,
        arrays: list[np.ndarray] | None = None,
        *,
        retry_for: float = 0.0,
        timeout: float = 40.0,
    ) -> Message:
        deadline = time.monotonic() + retry_for
        while True:
            try:
                return self._transport.call(Message(op, fields or {}, arrays or []), timeout)
            except (ConnectionLostError, TransportTimeoutError):
                if time.monotonic() >= deadline or self._quit.is_set():
                    raise
                self._transport.close()  # a fresh channel: no reconnect back-off
                self._transport = GrpcTransport(self._address, credentials=self._credentials)
                time.sleep(0.1)

    def close(self) -> None:
        self._transport.close()


class Site(threading.Thread):
    """A deterministic site: site-i returns the global model plus i (weight 1)."""

    def __init__(self, kits: Path, name: str, address: str, hold_round: int | None = None):
        super().__init__(name=f"test-{name}", daemon=True)
        self.quit = threading.Event()
        self.party = Party(kits, name, address, self.quit)
        self.index = int(name.split("-")[1])
        self.hold_round = hold_round
        self.gate = threading.Event()
        self.holding = threading.Event()
        self.stops: list[tuple[str, dict[str, Any]]] = []
        self.rounds: list[tuple[str, int]] = []
        self.errors: list[BaseException] = []

    def call(self, op: str, fields: dict[str, Any], arrays: list[np.ndarray] | None = None) -> Any:
        return self.party.call(op, fields, arrays, retry_for=60.0)

    def run(self) -> None:
        try:
            while not self.quit.is_set():
                reply = self.call("next_job", {"wait": 0.5})
                if reply.op == "job":
                    self.run_job(reply.fields["job_id"])
        except BaseException as exc:
            if not self.quit.is_set():
                self.errors.append(exc)

    def run_job(self, job_id: str) -> None:
        base = {"job_id": job_id, "site": self.party.name}
        welcome = self.call("register", base)
        assert welcome.op == "welcome" and welcome.fields["job_id"] == job_id
        while not self.quit.is_set():
            reply = self.call("get_task", {**base, "wait": 1.0})
            if reply.op == "stop":
                self.stops.append((job_id, reply.fields))
                return
            if reply.op != "task":
                continue
            model = model_from_wire(reply.fields["model"], list(reply.arrays))
            if reply.fields["task_name"] == "validate":
                result = FLModel(metrics={"accuracy": 1.0})
            else:
                round_number = int(model.current_round or 0)
                if round_number == self.hold_round and not self.gate.is_set():
                    self.holding.set()
                    self.gate.wait()
                self.rounds.append((job_id, round_number))
                result = FLModel(
                    params={"w": model.params["w"] + np.float32(self.index)},
                    metrics={"accuracy": float(round_number)},
                )
            fields, arrays = model_to_wire(result)
            self.call(
                "submit", {**base, "task_id": reply.fields["task_id"], "model": fields}, arrays
            )
            self.call("site_log", {"job_id": job_id, "text": f"round done by {self.name}\n"})

    def finish(self) -> None:
        self.quit.set()
        self.gate.set()
        self.join(10)
        self.party.close()


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def job_zip(folder: Path) -> list[np.ndarray]:
    return [np.frombuffer(zip_dir(folder), np.uint8)]


def expected_params(num_rounds: int, n_clients: int = 2) -> np.ndarray:
    """The same job without any interruption, run by fedlift's local backend."""

    def client_fn(site: str, model: FLModel) -> FLModel:
        index = int(site.split("-")[1])
        return FLModel(params={"w": model.params["w"] + np.float32(index)})

    result = run_local(client_fn, {"w": INITIAL}, n_clients, num_rounds, quiet=True)
    params = result.params
    assert isinstance(params, dict)
    return np.asarray(params["w"])


@pytest.fixture
def server(kits: Path, tmp_path: Path) -> Iterator[DeployServer]:
    with DeployServer(kits / "server", tmp_path / "ws", address="127.0.0.1:0") as running:
        yield running


@pytest.fixture
def admin(kits: Path, server: DeployServer) -> Iterator[Party]:
    party = Party(kits, ADMIN, server.address)
    yield party
    party.close()


@pytest.fixture
def sites(kits: Path, server: DeployServer) -> Iterator[Callable[..., Site]]:
    started: list[Site] = []

    def start(name: str, hold_round: int | None = None) -> Site:
        site = Site(kits, name, server.address, hold_round)
        site.start()
        started.append(site)
        return site

    yield start
    for site in started:
        site.finish()


def status(admin: Party, job_id: str) -> dict[str, Any]:
    reply = admin.call("job_status", {"job_id": job_id}, retry_for=30)
    assert reply.op == "job"
    return dict(reply.fields)


def wait_state(admin: Party, job_id: str, state: str, timeout: float = 30.0) -> dict[str, Any]:
    wait_for(lambda: status(admin, job_id)["state"] == state, timeout, f"{job_id} {state}")
    return status(admin, job_id)


# ------------------------------------------------------------------------------ admin side


def test_submit_list_status_and_refusals(
    server: DeployServer, admin: Party, kits: Path, tmp_path: Path
) -> None:
    reply = admin.call("job_submit", arrays=job_zip(make_job(tmp_path / "job")))
    job_id = reply.fields["job_id"]
    stored = server.jobs_dir / job_id
    assert (stored / "job" / "job.json").is_file()
    meta = json.loads((stored / "meta.json").read_text())
    assert meta["state"] == "submitted" and meta["submitted_by"] == ADMIN
    jobs = admin.call("job_list").fields["jobs"]
    assert [j["job_id"] for j in jobs] == [job_id]
    summary = status(admin, job_id)
    assert summary["name"] == "numpy-job" and summary["num_rounds"] == 2
    assert summary["state"] == "submitted" and summary["sites"] == []

    with pytest.raises(ConfigError, match="no job 'nope'"):
        admin.call("job_status", {"job_id": "nope"})
    bad = io.BytesIO()
    with zipfile.ZipFile(bad, "w") as bundle:
        bundle.writestr("../evil.txt", "x")
    with pytest.raises(ConfigError, match="unsafe path"):
        admin.call("job_submit", arrays=[np.frombuffer(bad.getvalue(), np.uint8)])
    empty = io.BytesIO()
    with zipfile.ZipFile(empty, "w") as bundle:
        bundle.writestr("readme.txt", "no job here")
    with pytest.raises(ConfigError, match="job.json is missing"):
        admin.call("job_submit", arrays=[np.frombuffer(empty.getvalue(), np.uint8)])
    assert sorted(p.name for p in server.jobs_dir.iterdir()) == [job_id]  # refused: removed


def test_roles_and_names_come_from_certificates(
    server: DeployServer, admin: Party, kits: Path, tmp_path: Path
) -> None:
    site = Party(kits, "site-1", server.address)
    try:
        with pytest.raises(PermissionDeniedError, match="needs an admin kit"):
            site.call("job_submit", arrays=job_zip(make_job(tmp_path / "job")))
        with pytest.raises(PermissionDeniedError, match="needs a site kit"):
            admin.call("next_job", {"wait": 0})
        with pytest.raises(PermissionDeniedError, match="needs an admin kit"):
            site.call("job_list")
    finally:
        site.close()


def test_a_job_runs_to_the_end_and_its_results_download(
    server: DeployServer, admin: Party, sites: Callable[..., Site], kits: Path, tmp_path: Path
) -> None:
    job_id = admin.call(
        "job_submit", arrays=job_zip(make_job(tmp_path / "job", final_evaluation=True))
    ).fields["job_id"]
    first, second = sites("site-1", hold_round=1), sites("site-2")
    first.holding.wait(30)
    # While the job runs: site-1 may not speak for site-2, site-3 is not part of the job.
    summary = status(admin, job_id)
    assert summary["state"] == "running" and summary["sites"] == ["site-1", "site-2"]
    intruder = Party(kits, "site-1", server.address)
    outsider = Party(kits, "site-3", server.address)
    try:
        with pytest.raises(PermissionDeniedError, match="site-1 cannot act as site-2"):
            intruder.call("get_task", {"job_id": job_id, "site": "site-2"})
        with pytest.raises(PermissionDeniedError, match="site-3 is not a site of job"):
            outsider.call("get_task", {"job_id": job_id, "site": "site-3"})
        assert outsider.call("next_job", {"wait": 0.2}).op == "none"
    finally:
        intruder.close()
        outsider.close()
    first.gate.set()
    summary = wait_state(admin, job_id, "finished")
    assert summary["round_done"] == 1 and summary["error"] is None
    assert first.stops and second.stops and not first.errors and not second.errors

    data = admin.call("job_download", {"job_id": job_id}).arrays[0].tobytes()
    out = tmp_path / "results"
    with zipfile.ZipFile(io.BytesIO(data)) as bundle:
        names = set(bundle.namelist())
        bundle.extractall(out)
    assert {"metrics.jsonl", "state.json", "log.txt", "models/global_model.safetensors"} <= names
    # The report and run.json are written before the job is marked finished.
    assert {"report.html", "run.json"} <= names
    run = json.loads((out / "run.json").read_text())
    assert run["runner"] == "deploy" and run["state"] == "finished" and run["job_id"] == job_id
    assert run["sites"] == ["site-1", "site-2"] and run["failure"] is None
    assert not any(name.startswith("checkpoint") for name in names)
    params = load_params(out / "models" / "global_model.safetensors")
    assert isinstance(params, dict)
    np.testing.assert_array_equal(params["w"], expected_params(2))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["task"]) for r in lines] == [(0, "train"), (1, "train"), (2, "validate")]
    assert "finished" in admin.call("job_logs", {"job_id": job_id}).fields["text"]
    site_log = admin.call("job_logs", {"job_id": job_id, "site": "site-2"}).fields["text"]
    assert "round done by test-site-2" in site_log


def test_abort_a_queued_and_a_running_job(
    server: DeployServer, admin: Party, sites: Callable[..., Site], tmp_path: Path
) -> None:
    waiting = admin.call("job_submit", arrays=job_zip(make_job(tmp_path / "a", n_clients=3)))
    queued = admin.call("job_submit", arrays=job_zip(make_job(tmp_path / "b")))
    running = admin.call("job_submit", arrays=job_zip(make_job(tmp_path / "c", num_rounds=5)))
    ids = [r.fields["job_id"] for r in (waiting, queued, running)]
    first = sites("site-1", hold_round=1)
    sites("site-2")
    assert admin.call("job_abort", {"job_id": ids[1]}).fields["state"] == "aborted"
    assert status(admin, ids[0])["state"] == "submitted"  # waits for a third site
    admin.call("job_abort", {"job_id": ids[0]})  # aborted while it waits for its sites
    wait_state(admin, ids[0], "aborted")
    first.holding.wait(30)
    assert status(admin, ids[2])["state"] == "running"
    admin.call("job_abort", {"job_id": ids[2]})
    summary = wait_state(admin, ids[2], "aborted")
    assert summary["error"] == f"aborted by {ADMIN}"
    first.gate.set()
    wait_for(lambda: bool(first.stops), what="site-1 told to stop")
    assert first.stops[0][1]["failed"] is True
    with pytest.raises(ConfigError, match="already aborted"):
        admin.call("job_abort", {"job_id": ids[2]})
    assert [status(admin, i)["round_done"] for i in ids] == [None, None, 0]


def test_jobs_run_one_after_another(
    server: DeployServer, admin: Party, sites: Callable[..., Site], tmp_path: Path
) -> None:
    ids = [
        admin.call("job_submit", arrays=job_zip(make_job(tmp_path / name, name))).fields["job_id"]
        for name in ("one", "two")
    ]
    one, two = sites("site-1"), sites("site-2")
    for job_id in ids:
        wait_state(admin, job_id, "finished")
    first, second = (status(admin, i) for i in ids)
    assert first["finished_at"] <= second["started_at"]
    assert [job for job, _ in one.rounds] == [ids[0], ids[0], ids[1], ids[1]]
    assert not one.errors and not two.errors


# ------------------------------------------------------------------------- checkpoints


def test_a_checkpoint_record_never_names_a_missing_or_partial_model(tmp_path: Path) -> None:
    recorder = RunRecorder(tmp_path, ArraysFormat(), checkpoints=True)
    seen: list[int] = []
    problems: list[str] = []
    stop = threading.Event()
    record = tmp_path / "checkpoint.json"

    def watch() -> None:  # reads the pair while rounds are being written
        while not stop.is_set():
            before = record.read_bytes() if record.is_file() else b""
            try:
                checkpoint = read_checkpoint(tmp_path)  # raises if the model is missing
                if checkpoint is None:
                    continue
                params = load_params(checkpoint.path)
            except (ConfigError, OSError) as exc:
                # Fine only if the writer moved on between our two reads (the next round's
                # record replaced this one, then its model was cleaned up).
                if (record.read_bytes() if record.is_file() else b"") == before:
                    problems.append(f"{exc!r} while the record still said {before!r}")
                continue
            if float(params["w"][0]) != checkpoint.round_done:
                problems.append(f"round {checkpoint.round_done} holds {params['w'][0]}")
            seen.append(checkpoint.round_done)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for k in range(40):
            recorder.save_global({"w": np.full(50_000, k, np.float32)}, k)
            recorder.flush()
    finally:
        stop.set()
        watcher.join()
        recorder.close()
    assert problems == []
    assert seen and seen == sorted(seen)
    assert [p.name for p in (tmp_path / "checkpoint").iterdir()] == ["round-39.safetensors"]
    resumed = RunRecorder(tmp_path, ArraysFormat(), checkpoints=True, resume=True)
    assert resumed.checkpoint is not None and resumed.checkpoint.round_done == 39
    params = resumed.load_checkpoint()
    assert isinstance(params, dict) and float(params["w"][0]) == 39
    resumed.close()


_WRITER = """
import sys
from pathlib import Path
import numpy as np
from fedlift.server import ArraysFormat, RunRecorder
recorder = RunRecorder(Path(sys.argv[1]), ArraysFormat(), checkpoints=True)
for k in range(100_000):
    recorder.save_global({"w": np.full(200_000, k, np.float32)}, k)
    recorder.flush()
    if k == 2:
        print("writing", flush=True)
"""


@pytest.mark.parametrize("delay", [0.05, 0.2, 0.4])
def test_a_checkpoint_survives_sigkill_at_any_moment(tmp_path: Path, delay: float) -> None:
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout is not None and writer.stdout.readline() == "writing\n"
    time.sleep(delay)
    writer.send_signal(signal.SIGKILL)
    writer.wait(10)
    checkpoint = read_checkpoint(tmp_path)
    assert checkpoint is not None and checkpoint.round_done >= 2
    params = load_params(checkpoint.path)
    assert isinstance(params, dict)
    np.testing.assert_array_equal(params["w"], np.full(200_000, checkpoint.round_done))


# ------------------------------------------------------------------------------ resume


def start_server(kit: Path, workspace: Path, log_path: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "fedlift", "server", "start", str(kit), "-w", str(workspace)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )


def test_the_server_resumes_a_job_after_sigkill(tmp_path: Path) -> None:
    port = free_port()
    kits = tmp_path / "kits"
    provision("demo", f"localhost:{port}", ["site-1", "site-2"], [ADMIN], kits)
    workspace, log_path = tmp_path / "ws", tmp_path / "server-output.txt"
    address = f"127.0.0.1:{port}"
    server = start_server(kits / "server", workspace, log_path)
    admin = Party(kits, ADMIN, address)
    started: list[Site] = []
    try:
        admin.call("job_list", retry_for=30)
        job_id = admin.call(
            "job_submit", arrays=job_zip(make_job(tmp_path / "job", num_rounds=4))
        ).fields["job_id"]
        started = [Site(kits, name, address, hold_round=2) for name in ("site-1", "site-2")]
        for site in started:
            site.start()
        for site in started:
            assert site.holding.wait(30), "the sites never got round 2"
        server_dir = workspace / "jobs" / job_id / "server"
        wait_for(
            lambda: (c := read_checkpoint(server_dir)) is not None and c.round_done == 1,
            what="the checkpoint of round 1",
        )
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        meta = json.loads((workspace / "jobs" / job_id / "meta.json").read_text())
        assert meta["state"] == "running" and meta["sites"] == ["site-1", "site-2"]

        server = start_server(kits / "server", workspace, log_path)
        for site in started:
            site.gate.set()  # they submit to a dead server, retry, and go on
        summary = wait_state(admin, job_id, "finished", timeout=60)
        assert summary["round_done"] == 3
        for site in started:
            assert not site.errors, site.errors
            # The held round-2 result went to a server that was gone; round 2 came again.
            assert [r for _, r in site.rounds] == [0, 1, 2, 2, 3]
        params = load_params(server_dir / "models" / "global_model.safetensors")
        assert isinstance(params, dict)
        np.testing.assert_array_equal(params["w"], expected_params(4))
        np.testing.assert_array_equal(params["w"], INITIAL + 4 * 1.5)
        rounds = [json.loads(line)["round"] for line in (server_dir / "metrics.jsonl").open()]
        assert rounds == [0, 1, 2, 3]
        assert "resumes on site-1, site-2 (round 3 of 4)" in (workspace / "server.log").read_text()

        server.send_signal(signal.SIGTERM)  # a clean stop
        assert server.wait(20) == 0
    finally:
        for site in started:
            site.finish()
        admin.close()
        if server.poll() is None:
            server.kill()
            server.wait()


# ------------------------------------------------------------------- runtime protocol


def runtime_for_test() -> Any:
    from fedlift.server import ServerRuntime

    return ServerRuntime("job-1", ["site-1", "site-2"], {"job_name": "t"})


def run_task_in_thread(runtime: Any, results: list[str], errors: list[BaseException]) -> Any:
    def run() -> None:
        try:
            answered = runtime.run_task(
                "train",
                FLModel(params={"w": INITIAL}),
                ["site-1"],
                on_result=lambda site, model: results.append(site),
                timeout=30,
                min_responses=1,
            )
            results.append(f"answered:{answered}")
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_worker_back_after_a_server_restart_needs_no_new_registration() -> None:
    runtime = runtime_for_test()
    results: list[str] = []
    errors: list[BaseException] = []
    thread = run_task_in_thread(runtime, results, errors)
    task = runtime.handle(Message("get_task", {"site": "site-1", "wait": 5}))
    assert task.op == "task" and runtime.registered_sites() == ["site-1"]
    fields, arrays = model_to_wire(FLModel(params={"w": INITIAL}))
    runtime.handle(
        Message(
            "submit", {"site": "site-1", "task_id": task.fields["task_id"], "model": fields}, arrays
        )
    )
    thread.join(10)
    assert results == ["site-1", "answered:['site-1']"] and not errors


def test_a_site_that_registers_again_gets_its_unanswered_task_again() -> None:
    runtime = runtime_for_test()
    results: list[str] = []
    errors: list[BaseException] = []
    runtime.handle(Message("register", {"site": "site-1"}))
    thread = run_task_in_thread(runtime, results, errors)
    first = runtime.handle(Message("get_task", {"site": "site-1", "wait": 5}))
    assert first.op == "task"
    assert runtime.handle(Message("get_task", {"site": "site-1", "wait": 0})).op == "wait"
    runtime.handle(Message("register", {"site": "site-1"}))  # its client restarted
    again = runtime.handle(Message("get_task", {"site": "site-1", "wait": 0}))
    assert again.op == "task" and again.fields["task_id"] == first.fields["task_id"]
    runtime.stop("aborted by test", failed=True)  # wakes run_task at once
    thread.join(10)
    assert not thread.is_alive() and type(errors[0]).__name__ == "JobAbortedError"
    stop = runtime.handle(Message("get_task", {"site": "site-1", "wait": 0}))
    assert stop.op == "stop" and stop.fields["failed"] is True


def test_keras_checkpoints_load_back(tmp_path: Path) -> None:
    keras = pytest.importorskip("keras")
    from fedlift.server import KerasWeightsFormat

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="dense")])
    model.save(tmp_path / "initial.keras")
    model_format, params = KerasWeightsFormat.from_file(tmp_path / "initial.keras")
    assert isinstance(params, dict)
    changed = {"dense": [w + 1.0 for w in params["dense"]]}
    recorder = RunRecorder(tmp_path / "server", model_format, checkpoints=True)
    recorder.save_global(changed, 0)
    recorder.close()
    resumed = RunRecorder(tmp_path / "server", model_format, checkpoints=True, resume=True)
    loaded = resumed.load_checkpoint()
    resumed.close()
    assert isinstance(loaded, dict)
    for got, want in zip(loaded["dense"], changed["dense"], strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_client_error_fails_the_job_with_its_text(
    server: DeployServer, admin: Party, sites: Callable[..., Site], kits: Path, tmp_path: Path
) -> None:
    job_id = admin.call("job_submit", arrays=job_zip(make_job(tmp_path / "job"))).fields["job_id"]
    sites("site-2")
    failing = Party(kits, "site-1", server.address)
    try:
        while failing.call("next_job", {"wait": 1.0}).op != "job":
            pass
        base = {"job_id": job_id, "site": "site-1"}
        failing.call("register", base)
        failing.call("client_error", {**base, "error": "Traceback: ZeroDivisionError"})
        summary = wait_state(admin, job_id, "failed")
    finally:
        failing.close()
    assert "site-1 failed" in summary["error"] and "ZeroDivisionError" in summary["error"]
    server_dir = server.workspace / "jobs" / job_id / "server"
    run = json.loads((server_dir / "run.json").read_text())
    assert run["state"] == "failed" and run["failure"]["site"] == "site-1"
    assert "ZeroDivisionError" in run["failure"]["traceback_tail"]
    report = (server_dir / "report.html").read_text()
    assert "ZeroDivisionError" in report and "site-1" in report


def test_a_restarted_server_runs_queued_jobs_and_resumes_a_stopped_one(
    kits: Path, tmp_path: Path
) -> None:
    workspace, port = tmp_path / "ws", free_port()
    address = f"127.0.0.1:{port}"
    first = DeployServer(kits / "server", workspace, address=address)
    admin = Party(kits, ADMIN, address)
    started: list[Site] = []
    try:
        running = admin.call("job_submit", arrays=job_zip(make_job(tmp_path / "a", num_rounds=3)))
        queued = admin.call("job_submit", arrays=job_zip(make_job(tmp_path / "b")))
        ids = [running.fields["job_id"], queued.fields["job_id"]]
        started = [Site(kits, name, address, hold_round=1) for name in ("site-1", "site-2")]
        for site in started:
            site.start()
        for site in started:
            assert site.holding.wait(30)
        first.stop()  # a clean stop: the running job stays running, the queued one queued
        states = [json.loads((workspace / "jobs" / i / "meta.json").read_text()) for i in ids]
        assert [m["state"] for m in states] == ["running", "submitted"]

        with DeployServer(kits / "server", workspace, address=address):
            for site in started:
                site.gate.set()
            for job_id in ids:
                wait_state(admin, job_id, "finished")
            server_dir = workspace / "jobs" / ids[0] / "server"
            params = load_params(server_dir / "models" / "global_model.safetensors")
            assert isinstance(params, dict)
            np.testing.assert_array_equal(params["w"], expected_params(3))
            for site in started:
                assert not site.errors, site.errors
    finally:
        first.stop()
        for site in started:
            site.finish()
        admin.close()


def test_cli_server_start_refuses_a_kit_that_is_not_the_servers(
    kits: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedlift.cli import main

    assert main(["server", "start", str(kits / "site-1"), "-w", str(tmp_path / "ws")]) == 1
    assert "needs the server kit" in capsys.readouterr().err


def test_a_poll_from_before_a_new_registration_does_not_take_the_task() -> None:
    runtime = runtime_for_test()
    results: list[str] = []
    errors: list[BaseException] = []
    runtime.handle(Message("register", {"site": "site-1"}))
    thread = run_task_in_thread(runtime, results, errors)
    first = runtime.handle(Message("get_task", {"site": "site-1", "wait": 5}))
    assert first.op == "task"
    old_poll: list[Message] = []  # the killed worker's poll, still waiting on the server
    poller = threading.Thread(
        target=lambda: old_poll.append(
            runtime.handle(Message("get_task", {"site": "site-1", "wait": 5}))
        )
    )
    poller.start()
    time.sleep(0.2)  # let the old poll start waiting
    runtime.handle(Message("register", {"site": "site-1"}))  # the restarted worker
    poller.join(10)
    assert old_poll[0].op == "wait"
    again = runtime.handle(Message("get_task", {"site": "site-1", "wait": 1}))
    assert again.op == "task" and again.fields["task_id"] == first.fields["task_id"]
    runtime.stop("done", failed=True)
    thread.join(10)
