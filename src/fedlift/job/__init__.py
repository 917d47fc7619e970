"""The job API: :class:`FedAvgJob`, :class:`ScriptRunner`, the exported job folder, and
``job.run(env)``'s :class:`Env` and :class:`JobRun`."""

from ._config import CONFIG_NAME, JobConfig, RunnerConfig, WorkflowConfig, load_job, zip_dir
from ._fedjob import FedAvgJob, FedJob, ScriptRunner
from ._framework import FrameworkType
from ._run import RUN_STATES, Env, JobResult, JobRun, RunStatus, read_rounds
from ._simulate import SimulationOutcome

__all__ = [
    "CONFIG_NAME",
    "RUN_STATES",
    "Env",
    "FedAvgJob",
    "FedJob",
    "FrameworkType",
    "JobConfig",
    "JobResult",
    "JobRun",
    "RunStatus",
    "RunnerConfig",
    "ScriptRunner",
    "SimulationOutcome",
    "WorkflowConfig",
    "load_job",
    "read_rounds",
    "zip_dir",
]
