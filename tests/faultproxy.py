"""A TCP proxy for fault tests: forwards a local port to a target and, on command, cuts every
live connection, refuses new ones, restores them, or cuts once a byte count has passed.

It works below TLS (it only copies bytes), so a kit whose server address is the proxy's port
still passes mutual-TLS host checks on 127.0.0.1.

    with FaultProxy(("127.0.0.1", server_port)) as proxy:
        proxy.cut_after(3_000_000, direction="down")   # mid-transfer of a server reply
        proxy.refuse(); proxy.cut(); ...; proxy.restore()
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedlift import FedAvgJob, ScriptRunner
from fedlift.codec import Message
from fedlift.deploy import channel_credentials, provision
from fedlift.errors import ConnectionLostError, TransportTimeoutError
from fedlift.job import zip_dir
from fedlift.server._store import load_params
from fedlift.transport import GrpcTransport

SCRIPTS = Path(__file__).resolve().parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
from exact_client import expected_model  # noqa: E402  (a script: beside the tests)

UP, DOWN = "up", "down"  # client -> target, target -> client


@dataclass
class _Link:
    client: socket.socket
    target: socket.socket
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
        for sock in (self.client, self.target):
            with contextlib.suppress(OSError):
                # RST, not FIN: the peers see the link die, as when a cable is pulled.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()


@dataclass
class _Trigger:
    direction: str
    at: int  # cut when this direction's byte count passes this
    refuse_for: float  # then refuse new connections this long (0: not at all)
    action: Callable[[], object] | None = None  # run instead of the cut
    fired: threading.Event = field(default_factory=threading.Event)
    dropped: int = 0
    """Bytes already read from the sender and never forwarded: > 0 means the cut landed
    mid-transfer (inside a burst of data), not between two messages."""


class FaultProxy:
    """Forwards ``127.0.0.1:port`` (port 0 picks one) to ``target``; see the module docstring."""

    def __init__(self, target: tuple[str, int], port: int = 0) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", port), backlog=64)
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._links: list[_Link] = []
        self._threads: list[threading.Thread] = []
        self._refusing = False
        self._triggers: list[_Trigger] = []
        self._closed = False
        self.bytes = {UP: 0, DOWN: 0}
        self.accepted = 0
        self.refused = 0
        self.cuts = 0
        """Connections cut while live (each counts once)."""
        self._acceptor = threading.Thread(target=self._accept, name="faultproxy", daemon=True)
        self._acceptor.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ faults
    def cut(self) -> int:
        """Cut every live connection now (RST both ways); returns how many were cut."""
        with self._lock:
            links, self._links = self._links, []
        live = [link for link in links if not link.closed]
        for link in live:
            link.close()
        with self._lock:
            self.cuts += len(live)
        return len(live)

    def refuse(self) -> None:
        """New connections are accepted and reset at once (the server looks down)."""
        with self._lock:
            self._refusing = True

    def restore(self) -> None:
        """New connections are forwarded again."""
        with self._lock:
            self._refusing = False

    def cut_after(
        self,
        nbytes: int,
        direction: str = DOWN,
        refuse_for: float = 0.0,
        action: Callable[[], object] | None = None,
    ) -> _Trigger:
        """Cut every live connection once ``direction`` has carried ``nbytes`` more bytes
        (mid-transfer of a large message), then refuse new ones for ``refuse_for`` s; with
        ``action``, call it there instead of cutting (e.g. kill the server mid-transfer)."""
        if direction not in (UP, DOWN):
            raise ValueError(f"direction must be {UP!r} or {DOWN!r}; received: {direction!r}")
        with self._lock:
            at = self.bytes[direction] + nbytes
            trigger = _Trigger(direction, at, refuse_for, action)
            self._triggers.append(trigger)
        return trigger

    def live(self) -> int:
        with self._lock:
            return sum(not link.closed for link in self._links)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            link.close()
        self._acceptor.join(5)
        for thread in list(self._threads):
            thread.join(5)

    # ------------------------------------------------------------------ forwarding
    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                refusing = self._refusing
            if refusing:
                with self._lock:
                    self.refused += 1
                _Link(client, socket.socket()).close()
                continue
            try:
                target = socket.create_connection(self.target, timeout=10)
                target.settimeout(None)
            except OSError:
                _Link(client, socket.socket()).close()
                continue
            for sock in (client, target):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(client, target)
            with self._lock:
                self.accepted += 1
                self._links.append(link)
                self._threads = [t for t in self._threads if t.is_alive()]
                for source, sink, direction in ((client, target, UP), (target, client, DOWN)):
                    thread = threading.Thread(
                        target=self._pump, args=(link, source, sink, direction), daemon=True
                    )
                    self._threads.append(thread)
                    thread.start()

    def _pump(
        self, link: _Link, source: socket.socket, sink: socket.socket, direction: str
    ) -> None:
        try:
            while not link.closed:
                data = source.recv(64 * 1024)
                if not data:
                    break
                fire = self._count(direction, len(data))
                if fire is not None:
                    # Forward only the part up to the trigger point: the cut lands there.
                    sink.sendall(data[: fire[0]])
                    dropped = len(data) - fire[0]
                    if dropped == 0:
                        # The read ended exactly at the trigger point: whether the cut
                        # lands inside a transfer shows in what the sender sends next.
                        source.settimeout(1.0)
                        with contextlib.suppress(OSError):
                            dropped = len(source.recv(64 * 1024))
                    fire[1].dropped = dropped
                    self._fire(fire[1])
                    return
                sink.sendall(data)
        except OSError:
            pass
        link.close()

    def _count(self, direction: str, size: int) -> tuple[int, _Trigger] | None:
        with self._lock:
            before = self.bytes[direction]
            self.bytes[direction] = before + size
            for trigger in self._triggers:
                if trigger.direction == direction and before + size >= trigger.at:
                    self._triggers.remove(trigger)
                    return max(0, trigger.at - before), trigger
        return None

    def _fire(self, trigger: _Trigger) -> None:
        if trigger.action is not None:
            trigger.action()
            trigger.fired.set()
            return
        if trigger.refuse_for > 0:
            self.refuse()
            timer = threading.Timer(trigger.refuse_for, self.restore)
            timer.daemon = True
            timer.start()
        self.cut()
        trigger.fired.set()


# ---------------------------------------------------------------------------------------
# A deployment of real processes (``fedlift server start``, ``fedlift client start``) whose
# sites reach the server through a FaultProxy; the admin talks to the server directly.

ADMIN = "alice@org"
ENDED = ("finished", "failed", "aborted")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _start(args: list[str], log: Path, session: str) -> subprocess.Popen[bytes]:
    with open(log, "ab") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "fedlift", *args],
            stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", FEDLIFT_SHM_SESSION=session),
        )  # fmt: skip


def stop_process(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)  # polling real processes from a test


class Deployment:
    """A server process and site daemons on loopback; ``proxy`` sits between sites and server."""

    def __init__(
        self,
        root: Path,
        sites: list[str],
        *,
        proxy: bool = True,
        start_sites: bool = True,
        workspace: Path | None = None,
        server_args: tuple[str, ...] = (),
    ) -> None:
        self.server_args = server_args
        self.root = root
        self.session = secrets.token_hex(6)
        """Shared-memory session of every process started here (``shm_segments``)."""
        self.server_port = free_port()
        self.proxy = FaultProxy(("127.0.0.1", self.server_port)) if proxy else None
        port = self.proxy.port if self.proxy is not None else self.server_port
        self.kits = provision("faults", f"127.0.0.1:{port}", sites, [ADMIN], root / "kits")
        self.workspace = workspace or root / "server-ws"
        self.logs = root / "logs"
        self.logs.mkdir(exist_ok=True)
        self._credentials = channel_credentials(self.kits[ADMIN])
        self._admin = self._transport()
        self.server = self.start_server()
        self.started: list[subprocess.Popen[bytes]] = [self.server]
        self.sites: dict[str, subprocess.Popen[bytes]] = {}
        if start_sites:
            self.start_sites(sites)
        self.call("job_list", retry_for=60.0)

    def _transport(self) -> GrpcTransport:
        return GrpcTransport(f"127.0.0.1:{self.server_port}", credentials=self._credentials)

    def start_server(self) -> subprocess.Popen[bytes]:
        args = ["server", "start", str(self.kits["server"]), "--workspace", str(self.workspace),
                "--address", f"127.0.0.1:{self.server_port}", *self.server_args]  # fmt: skip
        process = _start(args, self.logs / "server.log", self.session)
        if hasattr(self, "started"):
            self.started.append(process)
        return process

    def start_sites(self, sites: list[str]) -> None:
        for site in sites:
            workspace = self.root / f"{site}-ws"
            args = ["client", "start", str(self.kits[site]), "--workspace", str(workspace)]
            self.sites[site] = _start(args, self.logs / f"{site}.log", self.session)
            self.started.append(self.sites[site])

    def kill_server(self) -> None:
        """SIGKILL the server process (no chance to save anything)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.server.pid, signal.SIGKILL)

    def restart_server(self, sig: int = signal.SIGKILL) -> None:
        stop_process(self.server, sig)
        self.server = self.start_server()
        self.call("job_list", retry_for=60.0)

    def call(
        self,
        op: str,
        fields: dict[str, Any] | None = None,
        arrays: list[np.ndarray] | None = None,
        *,
        retry_for: float = 30.0,
    ) -> Message:
        """An admin call straight to the server, retried while it is (re)starting."""
        deadline = time.monotonic() + retry_for
        while True:
            try:
                return self._admin.call(Message(op, fields or {}, arrays or []), 30.0)
            except (ConnectionLostError, TransportTimeoutError):
                if time.monotonic() > deadline:
                    raise
                self._admin.close()
                self._admin = self._transport()  # a fresh channel: no reconnect back-off
                time.sleep(0.2)

    def submit(self, job: Path) -> str:
        reply = self.call("job_submit", arrays=[np.frombuffer(zip_dir(job), np.uint8)])
        return str(reply.fields["job_id"])

    def status(self, job_id: str) -> dict[str, Any]:
        return dict(self.call("job_status", {"job_id": job_id}).fields)

    def wait(self, job_id: str, timeout: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(job_id)
            if status.get("state") in ENDED:
                return status
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"job {job_id} did not end in {timeout:g} s: {status}\n{self.log_tail()}"
                )
            time.sleep(0.2)  # polling a real server

    def wait_round(self, job_id: str, round_done: int, timeout: float = 90.0) -> None:
        def reached() -> bool:
            done = self.status(job_id).get("round_done")
            return isinstance(done, int) and done >= round_done

        wait_until(reached, timeout, f"round {round_done} of {job_id}\n{self.log_tail()}")

    def job_dir(self, job_id: str) -> Path:
        return self.workspace / "jobs" / job_id

    def metrics(self, job_id: str) -> list[dict[str, Any]]:
        path = self.job_dir(job_id) / "server" / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line]

    def log_tail(self, chars: int = 3000) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-chars:]}"
            for path in sorted(self.logs.glob("*.log"))
        )

    def close(self) -> None:
        for process in [*self.sites.values(), self.server]:
            stop_process(process)
        for process in self.started:
            stop_process(process, signal.SIGKILL)
        self._admin.close()
        if self.proxy is not None:
            self.proxy.close()


def leaked_processes(started: list[subprocess.Popen[bytes]], root: Path) -> list[int]:
    """Started processes still alive, and worker processes working under ``root``."""
    alive = [p.pid for p in started if p.poll() is None]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = os.readlink(entry / "cwd")
            state = (entry / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except (OSError, IndexError):
            continue
        if "fedlift" in cmdline and cwd.startswith(str(root)) and state != "Z":
            alive.append(int(entry.name))
    return sorted(set(alive))


def shm_segments(session: str) -> list[str]:
    """Shared-memory segments of ``session`` left in /dev/shm (other tests' are not ours)."""
    return sorted(p.name for p in Path("/dev/shm").glob(f"fedlift-{session}-*"))


def temp_files(root: Path) -> list[Path]:
    """Temporary files of atomic writes left anywhere under ``root``."""
    return [p for p in root.rglob("*") if p.is_file() and ".tmp" in p.name]


# ---------------------------------------------------------------------------------------
# The exact job: FedAvg whose result is known bit for bit.

SITES = ["site-1", "site-2"]
SIZE = 1 << 20  # float32: 4 MiB a model, four 1 MiB gRPC chunks each way
SEED = 7


def exact_job(
    root: Path, rounds: int, *, size: int = SIZE, sleep: float = 0.2, n_clients: int = len(SITES)
) -> Path:
    initial = np.random.default_rng(SEED).integers(0, 100, size=size).astype(np.float32)
    job = FedAvgJob("exact", n_clients, rounds, {"w": initial}, final_evaluation=False,
                    round_timeout=90.0)  # fmt: skip
    job.to_clients(ScriptRunner(SCRIPTS / "exact_client.py", framework="numpy",
                                script_args=f"--seed {SEED} --sleep {sleep}"))  # fmt: skip
    return job.export_job(root / "jobs")


def expected_final(job: Path, rounds: int, n_sites: int = len(SITES)) -> np.ndarray:
    """The job's final global model by hand (FedAvg of ``exact_client``)."""
    initial = load_params(job / "initial_model.safetensors")["w"]
    return expected_model(initial, n_sites, rounds, SEED)


def final_model(deployment: Deployment, job_id: str) -> np.ndarray:
    path = deployment.job_dir(job_id) / "server" / "models" / "global_model.safetensors"
    return load_params(path)["w"]


def differing_bytes(a: np.ndarray, b: np.ndarray) -> int:
    if a.shape != b.shape or a.dtype != b.dtype:
        return max(a.nbytes, b.nbytes)
    return int(np.count_nonzero(a.view(np.uint8) != b.view(np.uint8)))


def rounds_lost(
    metrics: list[dict[str, object]], rounds: int, sites: list[str] | None = None
) -> int:
    """Rounds missing from metrics.jsonl, or recorded without every site's result once."""
    train = [m for m in metrics if m["task"] == "train"]
    everyone = sorted(sites or SITES)
    complete = {m["round"] for m in train if sorted(m["clients"]) == everyone}  # type: ignore[arg-type]
    return rounds - len(complete & set(range(rounds)))
