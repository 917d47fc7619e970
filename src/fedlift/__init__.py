"""fedlift: federated learning for existing training scripts.

* ``import fedlift.client as flare`` in the training script (the Client API),
* :class:`FedAvgJob` + :class:`ScriptRunner` in the job script,
* ``fedlift simulator`` (or ``job.simulator_run``) to run it.
"""

__version__ = "0.1.0"

from .errors import FedliftError
from .job import FedAvgJob, ScriptRunner
from .model import FLModel, MetaKey, ParamsType
from .simulator import SimulationResult, run_simulator

__all__ = [
    "FLModel",
    "FedAvgJob",
    "FedliftError",
    "MetaKey",
    "ParamsType",
    "ScriptRunner",
    "SimulationResult",
    "__version__",
    "run_simulator",
]
