"""A site's worker process: ``python -m fedlift.client.worker``, and what launches one needs.

The simulator and ``fedlift client start`` (deploy) start workers; they use the names here
(the environment a worker reads, ``unpack_app`` for a job's app archive, the parent-death
signal) rather than the client's private modules. Kept apart from ``fedlift.client``, whose
import a training script pays for: this one loads the transport and gRPC.
"""

from ._service import _parent_death_signal as parent_death_signal
from ._worker import SERVER_TOKEN_ENV, SHARED_MEMORY_ENV, main, run_worker, unpack_app

__all__ = [
    "SERVER_TOKEN_ENV",
    "SHARED_MEMORY_ENV",
    "main",
    "parent_death_signal",
    "run_worker",
    "unpack_app",
]

if __name__ == "__main__":
    main()
