"""Server runtime and workflows: the client protocol, FedAvg, aggregation maths, storage."""

from ._aggregate import (
    ErrorPolicy,
    StreamingMean,
    apply_update,
    check_error_policy,
    weighted_mean,
    weighted_mean_metrics,
)
from ._fedavg import Controller, FedAvg, FedAvgResult, all_clients
from ._runtime import LogRecord, ServerRuntime
from ._store import (
    CHECKPOINT_DIR,
    CHECKPOINT_FILE,
    ArraysFormat,
    KerasWeightsFormat,
    ModelFormat,
    RoundRecord,
    RunRecorder,
    load_initial_model,
)

__all__ = [
    "CHECKPOINT_DIR",
    "CHECKPOINT_FILE",
    "ArraysFormat",
    "Controller",
    "ErrorPolicy",
    "FedAvg",
    "FedAvgResult",
    "KerasWeightsFormat",
    "LogRecord",
    "ModelFormat",
    "RoundRecord",
    "RunRecorder",
    "ServerRuntime",
    "StreamingMean",
    "all_clients",
    "apply_update",
    "check_error_policy",
    "load_initial_model",
    "weighted_mean",
    "weighted_mean_metrics",
]
