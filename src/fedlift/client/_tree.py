"""A launched script's whole process tree: found, signalled and waited for together.

A launcher such as ``torchrun`` starts every rank in a session (and process group) of its
own, so signalling the launcher's process group misses the ranks; and once the launcher
is gone its ranks are re-parented and no longer look like anyone's children. So the
worker takes the tree from ``/proc`` (parent links) while the launcher still lives, and
signals every member by PID. Between that snapshot and the last signal lie a few seconds,
far too few for the kernel to hand a freed PID to a new process (PIDs are reused only
after wrapping around ``pid_max``).

Off Linux (no ``/proc``) the tree is the launcher alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterable

__all__ = ["descendants", "is_alive", "stop_tree"]

log = logging.getLogger("fedlift.client")

_POLL = 0.05


def _parents() -> dict[int, int]:
    """Every visible process's parent PID (``/proc/PID/stat`` field 4)."""
    parents: dict[int, int] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return parents
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as stat:
                text = stat.read()
        except OSError:  # ended meanwhile, or not ours to read
            continue
        # "PID (COMM) STATE PPID ...": COMM may hold spaces and parentheses.
        fields = text.rpartition(b")")[2].split()
        if len(fields) > 1 and fields[1].isdigit():
            parents[int(name)] = int(fields[1])
    return parents


def descendants(root: int) -> list[int]:
    """The PIDs of ``root``'s children, their children and so on (not ``root``)."""
    children: dict[int, list[int]] = {}
    for pid, parent in _parents().items():
        children.setdefault(parent, []).append(pid)
    found: list[int] = []
    seen = {root}
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in seen:
                seen.add(child)
                found.append(child)
                todo.append(child)
    return found


def is_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped, does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            state = stat.read().rpartition(b")")[2].split()[:1]
    except OSError:
        return True  # no /proc: os.kill's answer stands
    return state not in ([b"Z"], [b"X"])


def _signal(pids: Iterable[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _wait_gone(pids: list[int], seconds: float) -> list[int]:
    """Wait up to ``seconds`` for ``pids`` to end; returns the ones still alive."""
    deadline = time.monotonic() + seconds
    while True:
        live = [pid for pid in pids if is_alive(pid)]
        if not live or time.monotonic() >= deadline:
            return live
        time.sleep(_POLL)  # polling other sessions' processes: there is nothing to wait on


def stop_tree(root: int, term_seconds: float = 5.0) -> list[int]:
    """End ``root`` and every process below it: SIGTERM to all, then SIGKILL to what is left
    after ``term_seconds``. Returns the PIDs still alive after the SIGKILL (normally none).

    SIGTERM goes to the ranks as well as to their launcher: ``torchrun`` forwards it to its
    ranks too, but a launcher such as a shell does not. The tree is taken again before the
    SIGKILL, so that a child started during the grace period is not missed. A root that is
    this process's child is reaped by whoever waits for it (a zombie counts as ended).
    """
    tree = [root, *descendants(root)]
    live = [pid for pid in tree if is_alive(pid)]
    if not live:
        return []
    _signal(live, signal.SIGTERM)
    live = _wait_gone(live, term_seconds)
    if not live:
        return []
    if is_alive(root):
        live = list(dict.fromkeys([*live, *descendants(root)]))
    log.warning("%d process(es) of the script ignored SIGTERM; sending SIGKILL", len(live))
    _signal(live, signal.SIGKILL)
    return _wait_gone(live, 5.0)
