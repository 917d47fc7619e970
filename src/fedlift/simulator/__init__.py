"""The simulator: run a job's server and clients on one machine."""

from ._gpu import assign_groups, available_gpus, check_gpu_ids, parse_gpu_groups
from ._simulator import SimulationResult, run_simulator, site_environment

__all__ = [
    "SimulationResult",
    "assign_groups",
    "available_gpus",
    "check_gpu_ids",
    "parse_gpu_groups",
    "run_simulator",
    "site_environment",
]
