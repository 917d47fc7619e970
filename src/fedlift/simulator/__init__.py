"""The simulator: run a job's server and clients on one machine."""

from ._gpu import assign_groups, parse_gpu_groups
from ._simulator import SimulationResult, run_simulator

__all__ = ["SimulationResult", "assign_groups", "parse_gpu_groups", "run_simulator"]
