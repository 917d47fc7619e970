"""The simulator's client worker processes: start, relay their output, watch, stop."""

from __future__ import annotations

import collections
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol, TextIO

from .._malloc import worker_environment

__all__ = ["WorkerProcess", "start_worker"]

log = logging.getLogger("fedlift.simulator")

_TAIL_LINES = 40
_print_lock = threading.Lock()


@dataclass
class WorkerProcess:
    site: str
    process: subprocess.Popen[bytes]
    log_path: Path
    stderr_tail: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=_TAIL_LINES)
    )
    threads: list[threading.Thread] = field(default_factory=list)

    def tail(self) -> str:
        return "".join(self.stderr_tail)

    def stop(self, grace: float) -> None:
        """Wait up to ``grace`` s for the process to end, then terminate, then kill."""
        deadline = time.monotonic() + grace
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None and self.process.poll() is None:
                log.warning("%s did not exit; sending %s", self.site, signal.Signals(sig).name)
                try:
                    os.killpg(self.process.pid, sig)
                except ProcessLookupError:
                    pass
                deadline = time.monotonic() + 5
            try:
                self.process.wait(max(deadline - time.monotonic(), 0.01))
                break
            except subprocess.TimeoutExpired:
                continue
        for thread in self.threads:
            thread.join(5)


class _Sink(Protocol):
    def write(self, text: str) -> None: ...

    def flush(self) -> None: ...


def _relay(
    stream: IO[bytes],
    site: str,
    sink: _Sink,
    terminal: TextIO | None,
    tail: collections.deque[str] | None,
) -> None:
    prefix = f"[{site}] "
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", errors="replace")
        sink.write(line)
        sink.flush()
        if tail is not None:
            tail.append(line)
        if terminal is not None:
            with _print_lock:
                terminal.write(prefix + line if line.endswith("\n") else prefix + line + "\n")
                terminal.flush()
    stream.close()


def start_worker(
    site: str,
    server_address: str,
    site_dir: Path,
    env: dict[str, str],
    terminal: TextIO | None,
    on_exit: Callable[[WorkerProcess, int], None],
) -> WorkerProcess:
    """Start ``python -m fedlift.client.worker`` for ``site`` in ``site_dir``."""
    site_dir.mkdir(parents=True, exist_ok=True)
    log_path = site_dir / "log.txt"
    command = [
        sys.executable,
        "-u",
        "-m",
        "fedlift.client.worker",
        "--server",
        server_address,
        "--site",
        site,
    ]
    process = subprocess.Popen(
        command,
        cwd=site_dir,
        env=worker_environment(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: stop() can signal the whole tree
    )
    worker = WorkerProcess(site, process, log_path)
    sink = open(log_path, "a", encoding="utf-8")
    sink_lock = threading.Lock()

    class _LockedSink:
        def write(self, text: str) -> None:
            with sink_lock:
                sink.write(text)

        def flush(self) -> None:
            with sink_lock:
                sink.flush()

    locked = _LockedSink()
    streams: tuple[IO[bytes], IO[bytes]] = (process.stdout, process.stderr)  # type: ignore[assignment]
    out_thread = threading.Thread(
        target=_relay,
        args=(streams[0], site, locked, terminal, None),
        name=f"relay-{site}-out",
        daemon=True,
    )
    err_thread = threading.Thread(
        target=_relay,
        args=(streams[1], site, locked, terminal, worker.stderr_tail),
        name=f"relay-{site}-err",
        daemon=True,
    )

    def watch() -> None:
        code = process.wait()
        out_thread.join(10)
        err_thread.join(10)
        sink.close()
        on_exit(worker, code)

    watcher = threading.Thread(target=watch, name=f"watch-{site}", daemon=True)
    worker.threads = [out_thread, err_thread]
    out_thread.start()
    err_thread.start()
    watcher.start()
    return worker
