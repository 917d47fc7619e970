"""Script side: a launched script ends when the worker that launched it ends.

The worker makes its direct child (the launcher) die with it (``PR_SET_PDEATHSIG``), but
that signal does not reach grandchildren: ``torchrun``'s ranks, each in a session of its
own, would live on, training for nobody, when a worker is SIGKILLed. So every process
that calls ``flare.init()`` in external-process mode watches the worker itself: through a
pidfd, which names that very process (no PID reuse), or, where pidfds are missing, by
polling its PID once a second.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time

__all__ = ["WORKER_PID_ENV", "watch_worker"]

WORKER_PID_ENV = "FEDLIFT_WORKER_PID"
"""The PID of the worker that launched the script (set in the script's environment)."""

_started = threading.Event()


def _end_with_worker(pid: int) -> None:
    # stderr is most likely a pipe to the worker that just died: nobody may read it.
    with contextlib.suppress(OSError):
        os.write(
            2,
            f"fedlift: the site's worker (pid {pid}) that launched this script has ended; "
            f"this process (pid {os.getpid()}) ends with it.\n".encode(),
        )
    if os.getpgrp() == os.getpid():
        # A rank that leads its own process group (torchrun's) takes the processes it
        # started there (data loader workers) along.
        with contextlib.suppress(OSError):
            os.killpg(os.getpid(), signal.SIGKILL)
    os._exit(1)


def _wait_pidfd(fd: int, pid: int) -> None:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while not poller.poll():  # readable once the process has ended
        pass
    _end_with_worker(pid)


def _poll_pid(pid: int) -> None:
    while True:
        time.sleep(1.0)  # no pidfd: there is nothing to block on
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            _end_with_worker(pid)
        except PermissionError:
            continue


def watch_worker() -> None:
    """End this process when the worker named by ``FEDLIFT_WORKER_PID`` ends (once).

    Called after the first call to the worker succeeded, so the worker is alive: a PID
    that does not exist here means the script runs in another PID namespace (a container
    started by ``command``), where the worker cannot be watched by PID; it is then left
    alone.
    """
    raw = os.environ.get(WORKER_PID_ENV, "")
    if not raw.isdigit() or int(raw) in (0, os.getpid()) or _started.is_set():
        return
    pid = int(raw)
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):  # no pidfd_open (not Linux, or a kernel before 5.3)
        fd = -1
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            pass
    _started.set()
    threading.Thread(
        target=(lambda: _wait_pidfd(fd, pid)) if fd >= 0 else (lambda: _poll_pid(pid)),
        name="fedlift-watch-worker",
        daemon=True,
    ).start()
