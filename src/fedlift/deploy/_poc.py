"""Proof of concept on one machine: ``fedlift poc start -n 2`` / ``fedlift poc stop``.

Provisions a project into ``WORKSPACE/kits`` (server on 127.0.0.1 and a free port, sites
``site-1..N``, admin ``admin@poc``), starts ``fedlift server start`` and one
``fedlift client start`` per site as background processes over mutual TLS on loopback, and
records them in ``WORKSPACE/poc.json`` so ``fedlift poc stop`` ends them all.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .._atomic import atomic_write_text
from ..errors import ConfigError
from ._provision import provision

__all__ = ["DEFAULT_POC_WORKSPACE", "poc_start", "poc_stop"]

DEFAULT_POC_WORKSPACE = Path("/tmp/fedlift/poc")
ADMIN = "admin@poc"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _launch(args: list[str], log_path: Path) -> int:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "fedlift", *args],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives this command; `poc stop` ends its group
        )
    return process.pid


def poc_start(n_sites: int, workspace: Path = DEFAULT_POC_WORKSPACE) -> dict[str, object]:
    """Provision and start a server and ``n_sites`` clients; returns what poc.json holds."""
    if not isinstance(n_sites, int) or not 1 <= n_sites <= 64:
        raise ConfigError(f"poc start -n takes 1 to 64 sites; received: {n_sites!r}.")
    state_path = workspace / "poc.json"
    if state_path.is_file():
        state = json.loads(state_path.read_text())
        if any(_alive(int(p)) for p in state.get("pids", {}).values()):
            raise ConfigError(
                f"a POC is already running from {workspace} ({state_path}); stop it first "
                "with `fedlift poc stop`."
            )
    shutil.rmtree(workspace, ignore_errors=True)
    workspace.mkdir(parents=True)
    port = _free_port()
    sites = [f"site-{i + 1}" for i in range(n_sites)]
    kits = provision("poc", f"127.0.0.1:{port}", sites, [ADMIN], workspace / "kits")
    pids = {"server": _launch(
        ["server", "start", str(kits["server"]), "--workspace", str(workspace / "server")],
        workspace / "logs" / "server.log",
    )}  # fmt: skip
    for site in sites:
        pids[site] = _launch(
            ["client", "start", str(kits[site]), "--workspace", str(workspace / site)],
            workspace / "logs" / f"{site}.log",
        )
    state = {
        "server": f"127.0.0.1:{port}",
        "pids": pids,
        "admin_kit": str(kits[ADMIN]),
        "kits": {name: str(path) for name, path in kits.items()},
        "started_at": time.time(),
    }
    atomic_write_text(state_path, json.dumps(state, indent=2) + "\n")
    return state


def poc_stop(workspace: Path = DEFAULT_POC_WORKSPACE, grace: float = 10.0) -> list[str]:
    """Stop every process ``poc start`` started; returns their names."""
    state_path = workspace / "poc.json"
    if not state_path.is_file():
        raise ConfigError(f"no POC is recorded in {workspace} (no poc.json); nothing to stop.")
    pids = {name: int(pid) for name, pid in json.loads(state_path.read_text())["pids"].items()}
    for pid in pids.values():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(_alive(p) for p in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.1)  # waiting for processes of another session to exit
    for pid in pids.values():
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
    state_path.unlink()
    return sorted(pids)
