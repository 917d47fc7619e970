"""A long-running site: ``fedlift client start KIT``.

It connects out to the server with its kit's mutual-TLS certificate, waits for a job that
names this site (``next_job``), runs each job in a worker process of its own
(``python -m fedlift.client.worker --tls-ca ... --job-id ...``: the simulator's worker, so a
job behaves exactly as in the simulator), relays the worker's output to
``WORKSPACE/<job_id>/log.txt``, the terminal and the server's copy of the site log, and goes
back to waiting. When the server is unreachable it retries with backoff, forever; a worker
keeps retrying for ``reconnect_seconds`` so a job survives a server restart.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

from .._atomic import atomic_write_text
from .._malloc import worker_environment
from ..client.worker import parent_death_signal
from ..codec import Message
from ..errors import ConfigError, FedliftError, TransportError
from ..transport import GrpcTransport
from ._tls import Kit, channel_credentials, load_kit

__all__ = ["DeployClient"]

log = logging.getLogger("fedlift.client")

_LOG_BATCH_SECONDS = 1.0
_LOG_BATCH_BYTES = 64 * 1024
_MAX_UPLOAD_BYTES = 512 * 1024


class DeployClient:
    """One site, serving the jobs its server sends until it is stopped."""

    def __init__(
        self,
        kit: Kit | str | os.PathLike[str],
        workspace: str | os.PathLike[str] | None = None,
        *,
        poll_seconds: float = 20.0,
        max_backoff: float = 10.0,
        reconnect_seconds: float = 600.0,
        allow_jobs: list[str] | None = None,
    ) -> None:
        self.kit = kit if isinstance(kit, Kit) else load_kit(kit)
        self.allow_jobs = allow_jobs
        """Job names this site runs (``fnmatch`` patterns); None runs every job it is sent."""
        if self.kit.role != "site":
            raise ConfigError(
                f"{self.kit.folder} is a {self.kit.role} kit; `fedlift client start` needs a "
                "site's kit (made by `fedlift provision --sites ...`)."
            )
        default = self.kit.folder.parent / f"{self.kit.name}-workspace"
        self.workspace = Path(workspace or default).resolve()
        self.workspace.mkdir(parents=True, exist_ok=True)
        self._poll = poll_seconds
        self._max_backoff = max_backoff
        self._reconnect = reconnect_seconds
        self._stop = threading.Event()
        self._worker: subprocess.Popen[bytes] | None = None
        self._done_path = self.workspace / "done.json"
        self._done: set[str] = set(self._read_done())
        self._transport = GrpcTransport(self.kit.server, credentials=channel_credentials(self.kit))

    def _read_done(self) -> list[str]:
        try:
            data = json.loads(self._done_path.read_text())
        except (OSError, ValueError):
            return []
        return [str(x) for x in data] if isinstance(data, list) else []

    def stop(self) -> None:
        """Stop waiting for jobs; a running worker is terminated."""
        self._stop.set()
        worker = self._worker
        if worker is not None and worker.poll() is None:
            worker.terminate()
        self._transport.close()  # cancels a waiting next_job at once

    def _call(self, op: str, fields: dict[str, object], timeout: float) -> Message:
        return self._transport.call(Message(op, {"site": self.kit.name, **fields}), timeout)

    def run(self) -> int:
        """Serve jobs until :meth:`stop` (or SIGTERM via ``fedlift client start``)."""
        log.info("%s: serving jobs from %s (workspace %s)", self.kit.name, self.kit.server,
                 self.workspace)  # fmt: skip
        backoff = 0.5
        while not self._stop.is_set():
            try:
                reply = self._call("next_job", {"wait": self._poll}, timeout=self._poll + 30)
            except TransportError as exc:
                if self._stop.is_set():
                    break
                log.warning("%s: server %s unreachable (%s); retrying in %.1f s",
                            self.kit.name, self.kit.server, exc, backoff)  # fmt: skip
                self._stop.wait(backoff)  # backoff while disconnected
                backoff = min(backoff * 2, self._max_backoff)
                continue
            except FedliftError as exc:
                log.error("%s: the server refused next_job: %s", self.kit.name, exc)
                self._stop.wait(self._max_backoff)
                continue
            backoff = 0.5
            if reply.op != "job":
                continue
            job_id = str(reply.fields.get("job_id"))
            if job_id in self._done:
                # The server still lists a job this site has finished (it is closing it).
                self._stop.wait(1.0)
                continue
            self._run_job(job_id, str(reply.fields.get("name", "")))
        self._transport.close()
        return 0

    def _allowed(self, name: str) -> bool:
        return self.allow_jobs is None or any(fnmatch.fnmatchcase(name, p) for p in self.allow_jobs)

    def _refuse(self, job_id: str, name: str) -> None:
        text = (
            f"{self.kit.name} refuses job {name!r}: it is not in this site's allow-list "
            f"({', '.join(self.allow_jobs or [])}). The site's operator decides which jobs run "
            "there (`fedlift client start --allow-jobs`)."
        )
        log.warning("%s", text)
        try:
            self._call("client_error", {"job_id": job_id, "error": text}, timeout=30)
        except FedliftError as exc:
            log.error("%s: could not tell the server: %s", self.kit.name, exc)
        self._mark_done(job_id)

    def _mark_done(self, job_id: str) -> None:
        self._done.add(job_id)
        atomic_write_text(self._done_path, json.dumps(sorted(self._done)) + "\n")

    def _run_job(self, job_id: str, name: str) -> None:
        if not job_id.replace("-", "").replace("_", "").isalnum():
            log.error("%s: refusing job id %r", self.kit.name, job_id)
            return
        if not self._allowed(name):
            self._refuse(job_id, name)
            return
        folder = self.workspace / job_id
        folder.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-u", "-m", "fedlift.client.worker",
            "--server", self.kit.server, "--site", self.kit.name,
            "--tls-ca", str(self.kit.ca), "--tls-cert", str(self.kit.cert),
            "--tls-key", str(self.kit.key),
            "--job-id", job_id, "--workspace", str(folder),
            "--reconnect-seconds", str(self._reconnect),
        ]  # fmt: skip
        env = worker_environment(dict(os.environ, PYTHONUNBUFFERED="1"))
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        env.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
        log.info("%s: running job %s (%s) in %s", self.kit.name, job_id, name, folder)
        self._worker = subprocess.Popen(
            command,
            cwd=folder,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=parent_death_signal(),  # the worker never outlives this process
        )
        relay = threading.Thread(
            target=self._relay, args=(self._worker.stdout, folder / "log.txt", job_id),
            daemon=True,
        )  # fmt: skip
        relay.start()
        code = self._worker.wait()
        relay.join(10)
        self._worker = None
        log.info("%s: job %s ended (worker exit status %d)", self.kit.name, job_id, code)
        if code == 0:
            self._mark_done(job_id)
        # A worker that failed or was stopped may be asked to rejoin: a job whose server
        # could not record its end (its store says running) resumes after a restart, and
        # the site must then come back; a job that really ended is not offered again.

    def _relay(self, stream: IO[bytes] | None, path: Path, job_id: str) -> None:
        """Copy the worker's output to the job's log, the terminal and the server."""
        if stream is None:
            return
        pending: list[str] = []
        size, last = 0, time.monotonic()
        with open(path, "a", encoding="utf-8") as sink:
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", errors="replace")
                sink.write(line)
                sink.flush()
                sys.stdout.write(f"[{job_id}] {line}")
                sys.stdout.flush()
                pending.append(line)
                size += len(line)
                if size >= _LOG_BATCH_BYTES or time.monotonic() - last >= _LOG_BATCH_SECONDS:
                    self._upload(job_id, pending)
                    pending, size, last = [], 0, time.monotonic()
        self._upload(job_id, pending)

    def _upload(self, job_id: str, lines: list[str]) -> None:
        if not lines:
            return
        data = "".join(lines).encode("utf-8")
        if len(data) > _MAX_UPLOAD_BYTES:  # the server admits small calls only (1 MiB)
            data = data[:_MAX_UPLOAD_BYTES] + b"\n[log lines cut: upload size limit]\n"
        text = data.decode("utf-8", errors="ignore")
        try:
            self._call("site_log", {"job_id": job_id, "text": text}, timeout=30)
        except FedliftError as exc:  # the log stays on this site; the job goes on
            log.debug("could not upload log lines: %s", exc)


def serve_forever(kit: Path, workspace: Path | None, allow_jobs: list[str] | None = None) -> int:
    """``fedlift client start``: serve until SIGTERM/SIGINT."""
    client = DeployClient(kit, workspace, allow_jobs=allow_jobs)

    def stop(signum: int, frame: object) -> None:
        client.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return client.run()
