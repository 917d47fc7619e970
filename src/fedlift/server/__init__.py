"""Server runtime and workflows: the client protocol, the strategies and their one round
loop, aggregation maths, storage."""

from ._aggregate import (
    ErrorPolicy,
    StreamingMean,
    apply_update,
    check_error_policy,
    weighted_mean,
    weighted_mean_metrics,
)
from ._crosssite import MODEL_OWNER, SERVER_MODEL, CrossSiteResult, cross_site_evaluate
from ._cyclic import Cyclic, cyclic_order
from ._fedavg import FEDPROX_MU, FedAvg, FedProx, all_clients, sample_sites
from ._fedopt import FedAdagrad, FedAdam, FedAvgM, FedOpt, FedYogi, fedopt_step
from ._mean import Mean
from ._registry import (
    AGGREGATORS,
    STRATEGIES,
    options_of,
    register_aggregator,
    strategy_from_spec,
    strategy_to_spec,
)
from ._runtime import LogRecord, ServerRuntime
from ._scaffold import SCAFFOLD_CTRL_DIFF, SCAFFOLD_CTRL_GLOBAL, Scaffold, scaffold_step
from ._seam import (
    Aggregate,
    Aggregator,
    AggregatorFactory,
    Allocator,
    Ask,
    FastPath,
    Filter,
    Memory,
)
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
from ._strategy import (
    Controller,
    RunResult,
    RunSettings,
    Strategy,
    StrategyState,
    apply_in_place,
    run_rounds,
)

__all__ = [
    "AGGREGATORS",
    "CHECKPOINT_DIR",
    "CHECKPOINT_FILE",
    "FEDPROX_MU",
    "MODEL_OWNER",
    "SCAFFOLD_CTRL_DIFF",
    "SCAFFOLD_CTRL_GLOBAL",
    "SERVER_MODEL",
    "STRATEGIES",
    "Aggregate",
    "Aggregator",
    "AggregatorFactory",
    "Allocator",
    "ArraysFormat",
    "Ask",
    "Controller",
    "CrossSiteResult",
    "Cyclic",
    "ErrorPolicy",
    "FastPath",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedOpt",
    "FedProx",
    "FedYogi",
    "Filter",
    "KerasWeightsFormat",
    "LogRecord",
    "Mean",
    "Memory",
    "ModelFormat",
    "RoundRecord",
    "RunRecorder",
    "RunResult",
    "RunSettings",
    "Scaffold",
    "ServerRuntime",
    "Strategy",
    "StrategyState",
    "StreamingMean",
    "all_clients",
    "apply_in_place",
    "apply_update",
    "check_error_policy",
    "cross_site_evaluate",
    "cyclic_order",
    "fedopt_step",
    "load_initial_model",
    "options_of",
    "register_aggregator",
    "run_rounds",
    "sample_sites",
    "scaffold_step",
    "strategy_from_spec",
    "strategy_to_spec",
    "weighted_mean",
    "weighted_mean_metrics",
]
