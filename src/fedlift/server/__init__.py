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
from ._mean import Mean
from ._robust import (
    FedMedian,
    FedTrimmedAvg,
    Krum,
    coordinate_median,
    krum_scores,
    multikrum,
    trimmed_mean,
)
from ._runtime import LogRecord, ServerRuntime
from ._store import ArraysFormat, KerasWeightsFormat, ModelFormat, RoundRecord, RunRecorder

__all__ = [
    "ArraysFormat",
    "Controller",
    "ErrorPolicy",
    "FedAvg",
    "FedAvgResult",
    "FedMedian",
    "FedTrimmedAvg",
    "KerasWeightsFormat",
    "Krum",
    "LogRecord",
    "Mean",
    "ModelFormat",
    "RoundRecord",
    "RunRecorder",
    "ServerRuntime",
    "StreamingMean",
    "all_clients",
    "apply_update",
    "check_error_policy",
    "coordinate_median",
    "krum_scores",
    "multikrum",
    "trimmed_mean",
    "weighted_mean",
    "weighted_mean_metrics",
]
