"""The simulator: run a job's server and clients on one machine.

:func:`run_simulator` runs an exported job with a worker process per client;
:func:`run_local` runs many clients that are plain functions in threads (or Ray tasks);
``job.run(SimEnv(...))`` runs a job in the simulator in the background.
"""

from ._env import SimEnv
from ._gpu import assign_groups, available_gpus, check_gpu_ids, parse_gpu_groups
from ._local import ClientFn, LocalController, LocalResult, run_local
from ._simulator import SimulationResult, run_simulator, site_environment

__all__ = [
    "ClientFn",
    "LocalController",
    "LocalResult",
    "SimEnv",
    "SimulationResult",
    "assign_groups",
    "available_gpus",
    "check_gpu_ids",
    "parse_gpu_groups",
    "run_local",
    "run_simulator",
    "site_environment",
]
