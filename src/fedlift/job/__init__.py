"""The job API: :class:`FedAvgJob`, :class:`ScriptRunner` and the exported job folder."""

from ._config import CONFIG_NAME, JobConfig, RunnerConfig, WorkflowConfig, load_job, zip_dir
from ._fedjob import FedAvgJob, FedJob, ScriptRunner
from ._framework import FrameworkType
from ._simulate import SimulationOutcome

__all__ = [
    "CONFIG_NAME",
    "FedAvgJob",
    "FedJob",
    "FrameworkType",
    "JobConfig",
    "RunnerConfig",
    "ScriptRunner",
    "SimulationOutcome",
    "WorkflowConfig",
    "load_job",
    "zip_dir",
]
