"""What the peers' deployment drivers share (``flower_deploy``, ``nvflare_poc``). Stdlib only.

A deployment benchmark is timed like the simulators (``common.measure``), but the process
that ``measure`` launches is a driver: it starts the peer's long-running services, submits
the run with the peer's own CLI, waits for it, stops the services and exits only when every
process below it has ended. The driver is a child subreaper, so services that daemonize stay
in its tree (and in ``measure``'s memory poll); ``phases`` records when each step returned.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.peers.common import ROOT, kill_descendants, measure, process_tree

PHASES = "phases.json"


def free_port() -> int:
    """A loopback TCP port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, timeout: float, alive: subprocess.Popen[bytes] | None = None) -> None:
    """Until something accepts on ``127.0.0.1:port`` (``alive`` exiting first is an error)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and alive.poll() is not None:
            raise RuntimeError(f"{alive.args[0]} exited with {alive.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listened on 127.0.0.1:{port} within {timeout:.0f} s")


def run_logged(
    command: Sequence[str], env: dict[str, str], log: Path, timeout: float, cwd: Path | None = None
) -> str:
    """Run one CLI command to its end; its output goes to ``log`` (appended) and is returned.

    A non-zero exit raises ``RuntimeError`` with the output.
    """
    started = time.time()
    done = subprocess.run(
        list(command),
        env=env,
        cwd=cwd or log.parent,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    took = time.time() - started
    text = f"$ {' '.join(command)}  # {took:.2f} s, exit {done.returncode}\n"
    text += f"{done.stdout}{done.stderr}\n"
    with open(log, "a") as f:
        f.write(text)
    if done.returncode != 0:
        raise RuntimeError(f"{Path(command[0]).name} exited with {done.returncode}:\n{text}")
    return done.stdout + done.stderr


def mark(work: Path, phase: str) -> None:
    """Record that ``phase`` ended now, in ``work/phases.json`` (read by the outer process)."""
    path = work / PHASES
    phases = json.loads(path.read_text()) if path.is_file() else {}
    phases[phase] = time.time()
    path.write_text(json.dumps(phases))


def read_phases(work: Path, since: float) -> dict[str, float]:
    """The driver's phases, as seconds after ``since`` (e.g. the last round's last send)."""
    path = work / PHASES
    phases: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}
    return {k: round(v - since, 3) for k, v in phases.items()}


def last_send(times: Path, rounds: int) -> float:
    """The last site's send of the last round (where ``summarize``'s teardown starts)."""
    from benchmarks.peers.common import read_events

    sends = [e["send"].get(rounds - 1) for e in read_events(times).values()]
    return max((t for t in sends if t is not None), default=float("nan"))


def wait_for_tree(grace: float = 30.0) -> list[int]:
    """Reap children until nothing is left below this process, at most ``grace`` seconds;
    then kill what is left (returned: the lingering pids)."""
    me = os.getpid()
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and [p for p in process_tree(me) if p != me]:
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            pass
        time.sleep(0.05)
    return kill_descendants()


def save_lingering(work: Path, pids: list[int]) -> None:
    """The driver's leftovers (what ``wait_for_tree`` had to kill), for the outer process."""
    (work / "lingering.json").write_text(json.dumps(pids))


def load_lingering(work: Path) -> list[int]:
    path = work / "lingering.json"
    return list(json.loads(path.read_text())) if path.is_file() else []


def time_driver(
    command: list[str], work: Path, times: Path, rounds: int, timeout: float, memory: bool
) -> dict[str, object]:
    """Run a peer's driver (``command``) under ``measure`` and add, to its timing, each
    step's end after the last send and what the driver found left over."""
    timing = measure(
        command,
        times,
        rounds,
        timeout + 180,  # the driver's own bound is ``timeout``; this one is its teardown
        cwd=ROOT,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        log=work / "log.txt",
        memory=memory,
    )
    # Each step's end, in seconds after the last send (negative: before it).
    timing["phases_after_last_send"] = read_phases(work, last_send(times, rounds))
    timing["driver_lingering_pids"] = load_lingering(work)
    return timing
