"""fedlift: federated learning for existing training scripts.

* ``import fedlift.client as flare`` in the training script (the Client API),
* :class:`FedAvgJob` + :class:`ScriptRunner` in the job script,
* ``fedlift simulator`` (or ``job.simulator_run``) to run it.
"""

__version__ = "0.1.0"

import os as _os

# fedlift launches processes (workers, external scripts) while gRPC threads run. gRPC's fork
# handlers then touch its event engine in the child between fork and exec and can abort it
# ("epoll_wait error: Bad file descriptor"); fedlift always execs, so it needs no fork
# support. This must be set before grpc is first imported.
_os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from .errors import FedliftError
from .job import FedAvgJob, FedJob, ScriptRunner
from .model import FLModel, MetaKey, ParamsType
from .simulator import SimulationResult, run_simulator

__all__ = [
    "FLModel",
    "FedAvgJob",
    "FedJob",
    "FedliftError",
    "MetaKey",
    "ParamsType",
    "ScriptRunner",
    "SimulationResult",
    "__version__",
    "run_simulator",
]
