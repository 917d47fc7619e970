"""A stand-in for torchrun's process layout, without torch: ``python session_ranks.py
SCRIPT ARGS`` runs ``SCRIPT ARGS`` as 2 ranks (RANK=0 and RANK=1), each in a session of its
own, as torchrun does. Like torchrun, it passes SIGTERM on to the ranks and waits 30 s for
them before SIGKILL, and when a rank fails it sends SIGTERM to the others and fails too."""

import os
import signal
import subprocess
import sys
import time

procs = [
    subprocess.Popen(
        [sys.executable, "-u", *sys.argv[1:]],
        env=dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2"),
        start_new_session=True,
    )
    for rank in range(2)
]


def shut_down(sig: int) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, sig)
    deadline = time.monotonic() + 30
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)


def on_term(signum: int, frame: object) -> None:
    shut_down(signal.SIGTERM)
    sys.exit(128 + signum)


signal.signal(signal.SIGTERM, on_term)
while True:
    codes = [p.poll() for p in procs]
    failed = [c for c in codes if c not in (None, 0)]
    if failed:
        shut_down(signal.SIGTERM)
        sys.exit(1)
    if all(c == 0 for c in codes):
        sys.exit(0)
    time.sleep(0.05)
