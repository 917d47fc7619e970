"""Proof of concept on one machine: ``fedlift poc start -n 2`` / ``fedlift poc stop``.

Provisions a project into ``WORKSPACE/kits`` (server on 127.0.0.1 and a free port, sites
``site-1..N``, admin ``admin@poc``), starts ``fedlift server start`` and one
``fedlift client start`` per site as background processes over mutual TLS on loopback, and
records them in ``WORKSPACE/poc.json`` so ``fedlift poc stop`` ends them all.

The user's files are never deleted. ``poc start`` uses a workspace that does not exist yet
or is empty, or one a previous ``poc start`` made: such a folder holds the marker
``.fedlift-poc.json``, which lists every entry fedlift created in it (written before the
entry is made). A new start replaces only the entries the marker lists; anything else in
the folder stays. A non-empty folder without the marker is refused.
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
from ._names import ADMIN, DEFAULT_POC_WORKSPACE
from ._provision import provision

__all__ = ["DEFAULT_POC_WORKSPACE", "poc_start", "poc_stop"]

MARKER = ".fedlift-poc.json"
_MARKER_FORMAT = "fedlift-poc/1"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        # A POC that PocEnv started from this process is this process's children: one that
        # exited is a zombie until reaped, and a zombie still answers kill(pid, 0).
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass  # not a child of this process (`fedlift poc start` started it): kill(pid, 0)
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


def poc_start(
    n_sites: int, workspace: Path = DEFAULT_POC_WORKSPACE, *, web: bool = False
) -> dict[str, object]:
    """Provision and start a server and ``n_sites`` clients; returns what poc.json holds.
    ``web``: the server serves its live view too, on 127.0.0.1 and a free port
    (``state["web"]`` is its URL)."""
    if not isinstance(n_sites, int) or not 1 <= n_sites <= 64:
        raise ConfigError(f"poc start -n takes 1 to 64 sites; received: {n_sites!r}.")
    state_path = workspace / "poc.json"
    if state_path.is_file():
        try:
            state = json.loads(state_path.read_text())
            recorded = [int(p) for p in dict(state.get("pids", {})).values()]
        except (ValueError, TypeError, AttributeError):
            recorded = []  # an unreadable record: nothing of it can be running
        if any(_alive(p) for p in recorded):
            raise ConfigError(
                f"a POC is already running from {workspace} ({state_path}); stop it first "
                "with `fedlift poc stop`."
            )
    _claim_workspace(workspace)
    port = _free_port()
    sites = [f"site-{i + 1}" for i in range(n_sites)]
    _record(workspace, ["kits", "logs", "server", *sites, "poc.json"])
    kits = provision("poc", f"127.0.0.1:{port}", sites, [ADMIN], workspace / "kits")
    server_args = ["server", "start", str(kits["server"]), "--workspace", str(workspace / "server")]
    web_url = None
    if web:
        web_port = _free_port()
        server_args += ["--web", f"127.0.0.1:{web_port}"]
        web_url = f"https://127.0.0.1:{web_port}/"
    pids = {"server": _launch(server_args, workspace / "logs" / "server.log")}
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
    if web_url is not None:
        state["web"] = web_url
    atomic_write_text(state_path, json.dumps(state, indent=2) + "\n")
    return state


def _read_marker(workspace: Path) -> list[str] | None:
    """The entries the marker vouches for, or None when there is no (valid) marker."""
    try:
        data = json.loads((workspace / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != _MARKER_FORMAT:
        return None
    entries = data.get("created")
    if not isinstance(entries, list):
        return None
    # Only plain names of entries directly in the workspace: never a path elsewhere.
    return [
        e for e in entries if isinstance(e, str) and e not in ("", ".", "..", MARKER)
        and "/" not in e and "\\" not in e and "\x00" not in e
    ]  # fmt: skip


def _record(workspace: Path, entries: list[str]) -> None:
    """Add ``entries`` to the marker (before they are created, so a crash leaves none
    behind that the next start would not dare to replace)."""
    known = _read_marker(workspace) or []
    created = known + [e for e in entries if e not in known]
    marker = {"format": _MARKER_FORMAT, "created": created}
    atomic_write_text(workspace / MARKER, json.dumps(marker, indent=2) + "\n")


def _claim_workspace(workspace: Path) -> None:
    """Make ``workspace`` ready for a new POC without deleting anything fedlift did not
    create; raises ConfigError for a folder that holds other things and no marker."""
    if workspace.is_symlink() or (workspace.exists() and not workspace.is_dir()):
        raise ConfigError(
            f"the POC workspace {workspace} is not a folder (a file or a symlink); pass a "
            "new or empty folder with --workspace."
        )
    if not workspace.exists():
        workspace.mkdir(parents=True)
        _record(workspace, [])
        return
    entries = _read_marker(workspace)
    if entries is None:
        present = sorted(p.name for p in workspace.iterdir())
        if present:
            shown = ", ".join(present[:5]) + (", ..." if len(present) > 5 else "")
            raise ConfigError(
                f"the POC workspace {workspace} is not empty and was not made by `fedlift poc "
                f"start` (no {MARKER} in it); it holds: {shown}. fedlift does not delete "
                "files it did not create: pass a new or empty folder with --workspace, or "
                "empty this one yourself."
            )
        _record(workspace, [])
        return
    for name in entries:  # only what an earlier start created; other files stay
        path = workspace / name
        if path.is_symlink() or path.is_file():
            path.unlink()  # a symlink itself, never what it points to
        elif path.is_dir():
            shutil.rmtree(path)
    atomic_write_text(
        workspace / MARKER,
        json.dumps({"format": _MARKER_FORMAT, "created": []}, indent=2) + "\n",
    )


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
