"""The Client API: ``import fedlift.client as flare``.

The seven changes that make a training script federated::

    import fedlift.client as flare                 # 1
    flare.init()                                   # 2
    while flare.is_running():
        input_model = flare.receive()              # 3
        ...load input_model.params...              # 4
        ...evaluate the global model...            # 5
        ...train...
        flare.send(flare.FLModel(params=..., metrics={"accuracy": acc}))   # 6, 7

Keras helpers for FedProx and SCAFFOLD live in :mod:`fedlift.client.keras` (it imports
Keras; this package does not), PyTorch ones in :mod:`fedlift.client.pytorch` (it imports
torch). With ``ScriptRunner(framework="pytorch")`` ``receive()`` gives CPU tensors, and
``send()`` takes a ``state_dict()`` under every framework.
"""

from ..model import AlgorithmConstants, FLModel, MetaKey, ParamsType, tree_add, tree_sub
from ._api import (
    AnalyticsDataType,
    clear,
    get_config,
    get_job_id,
    get_site_name,
    init,
    is_evaluate,
    is_running,
    is_submit_model,
    is_train,
    log,
    receive,
    send,
    shutdown,
    system_info,
)

__all__ = [
    "AlgorithmConstants",
    "AnalyticsDataType",
    "FLModel",
    "MetaKey",
    "ParamsType",
    "clear",
    "get_config",
    "get_job_id",
    "get_site_name",
    "init",
    "is_evaluate",
    "is_running",
    "is_submit_model",
    "is_train",
    "log",
    "receive",
    "send",
    "shutdown",
    "system_info",
    "tree_add",
    "tree_sub",
]
