"""How many compute threads each simulated client's frameworks may start.

Why: PyTorch, TensorFlow and the BLAS libraries each size their thread pools to the whole
machine. The simulator runs one process per client, so n clients training at once start
n x cores threads that preempt one another inside every kernel. On this project's 2-core
machine, two PyTorch clients of NVFlare's hello-pt took 10.5 s per local epoch with
torch's default pools against 1.4 s with one thread each (one run, same day). Giving each
client ``cores // clients_at_once`` threads (at least one) removes that loss.

A variable the user has set in the simulator's environment is left as it is: it is passed
to the clients unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = ["THREAD_VARIABLES", "compute_threads", "thread_environment"]

#: What PyTorch/OpenMP, the BLAS libraries and TensorFlow read at start-up.
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "TF_NUM_INTRAOP_THREADS",
)


def compute_threads(clients_at_once: int, cores: int | None = None) -> int:
    """Threads per client when ``clients_at_once`` clients share ``cores`` (default: the
    cores this process may run on)."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
        cores = cores or os.cpu_count() or 1
    return max(1, cores // max(1, clients_at_once))


def thread_environment(
    clients_at_once: int, environ: Mapping[str, str], cores: int | None = None
) -> dict[str, str]:
    """The thread variables to add to a client's environment: every one of
    :data:`THREAD_VARIABLES` that ``environ`` does not set already."""
    threads = str(compute_threads(clients_at_once, cores))
    return {name: threads for name in THREAD_VARIABLES if name not in environ}
