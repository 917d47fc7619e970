"""FLModel: what travels between the server's workflow and a client's training script."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from ..errors import ConfigError
from ._tree import ParamTree

__all__ = ["AlgorithmConstants", "FLModel", "MetaKey", "ParamsType"]


class ParamsType(str, Enum):
    """Whether ``FLModel.params`` holds whole weights or a change to add to them."""

    FULL = "FULL"
    DIFF = "DIFF"


class MetaKey:
    """Well-known keys of ``FLModel.meta`` (names as in NVFlare's Client API)."""

    NUM_STEPS_CURRENT_ROUND = "NUM_STEPS_CURRENT_ROUND"
    """Aggregation weight of a client's result (e.g. its number of samples or steps)."""
    INITIAL_METRICS = "initial_metrics"
    CURRENT_ROUND = "current_round"
    TOTAL_ROUNDS = "total_rounds"
    JOB_ID = "job_id"
    SITE_NAME = "site_name"
    TASK_NAME = "task_name"
    CONFIG = "config"
    """The task's config (a JSON object) from the server's strategy, e.g. FedProx's mu;
    ``flare.get_config()`` merges it over the job's client config."""


class AlgorithmConstants:
    """Meta and task-config keys of the federated algorithms (NVFlare's names and values).

    SCAFFOLD's control variates travel as param trees with the model's layout (layer name ->
    list of arrays for Keras): the server's ``c`` in the task's
    ``meta[SCAFFOLD_CTRL_GLOBAL]``, the client's change ``delta c_i`` in its result's
    ``meta[SCAFFOLD_CTRL_DIFF]``. FedProx's ``mu`` is a task-config key (``get_config()``).
    """

    SCAFFOLD_CTRL_GLOBAL = "scaffold_c_global"
    SCAFFOLD_CTRL_DIFF = "scaffold_c_diff"
    FEDPROX_MU = "fedprox_mu"


@dataclass
class FLModel:
    """A model (params tree), its metrics and where it stands in the job.

    The argument order follows NVFlare's ``FLModel`` so positional and keyword calls of
    scripts written for it keep working. ``params_type`` defaults to ``FULL`` when
    ``params`` is given. As strict as NVFlare's: ``FULL`` or ``DIFF`` without ``params`` and
    a negative (or non-integer) ``start_round``/``current_round``/``total_rounds`` raise
    :class:`~fedlift.errors.ConfigError` here, where the script made the mistake, instead of
    reaching the server as a result that says nothing. A metrics-only result (evaluation)
    leaves both ``params`` and ``params_type`` None.
    """

    params_type: ParamsType | None = None
    params: ParamTree | None = None
    optimizer_params: ParamTree | None = None
    metrics: dict[str, Any] | None = None
    start_round: int | None = 0
    current_round: int | None = None
    total_rounds: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.meta is None:
            self.meta = {}
        if not isinstance(self.meta, dict):
            raise ConfigError(
                f"FLModel.meta must be a dict; received: meta={self.meta!r:.80} "
                f"({type(self.meta).__name__})."
            )
        if self.params_type is None and self.params is not None:
            self.params_type = ParamsType.FULL
        elif self.params_type is not None and not isinstance(self.params_type, ParamsType):
            try:
                self.params_type = ParamsType(str(self.params_type).upper())
            except ValueError:
                raise ConfigError(
                    f"FLModel.params_type must be ParamsType.FULL or ParamsType.DIFF; "
                    f"received: params_type={self.params_type!r}."
                ) from None
        if self.params_type is not None and self.params is None:
            kind = self.params_type.value
            raise ConfigError(
                f"FLModel(params_type={kind}) needs params: {kind} describes the params, and "
                "there are none. Pass params=..., or leave params_type out for a result of "
                f"metrics only. Received: params=None, params_type={kind}."
            )
        for name in ("start_round", "current_round", "total_rounds"):
            setattr(self, name, _round_number(name, getattr(self, name)))
        if self.metrics is not None and not isinstance(self.metrics, dict):
            raise ConfigError(
                f"FLModel.metrics must be a dict of str to number; received: "
                f"metrics={self.metrics!r:.80} ({type(self.metrics).__name__})."
            )

    def weight(self) -> float:
        """The aggregation weight: ``meta[NUM_STEPS_CURRENT_ROUND]``, 1 if absent."""
        raw = self.meta.get(MetaKey.NUM_STEPS_CURRENT_ROUND, 1)
        try:
            if isinstance(raw, str | bytes | bool):  # float() would accept "5" and True
                raise TypeError
            value = float(raw)
        except (TypeError, ValueError):
            raise ConfigError(
                f"meta[{MetaKey.NUM_STEPS_CURRENT_ROUND!r}] is the aggregation weight and must "
                f"be a positive number; received: {raw!r}."
            ) from None
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(
                f"meta[{MetaKey.NUM_STEPS_CURRENT_ROUND!r}] is the aggregation weight and must "
                f"be a positive finite number; received: {raw!r}."
            )
        return value

    def summary(self) -> str:
        """One line that describes this model for logs."""
        from ._tree import flatten

        if self.params is None:
            size = "no params"
        else:
            _, arrays = flatten(self.params)
            size = f"{len(arrays)} arrays, {sum(a.size for a in arrays):,} values"
        return (
            f"FLModel(round={self.current_round}/{self.total_rounds}, "
            f"{self.params_type.value if self.params_type else '-'}, {size}, "
            f"metrics={self.metrics})"
        )


def _round_number(name: str, value: Any) -> int | None:
    """``value`` as a round number: None or an int >= 0 (a numpy integer becomes an int)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ConfigError(
            f"FLModel({name}=...) must be an int >= 0 or None; received: {name}={value!r:.60} "
            f"({type(value).__name__})."
        )
    if value < 0:
        raise ConfigError(
            f"FLModel({name}=...) counts rounds from 0 and cannot be negative; received: "
            f"{name}={value!r}."
        )
    return int(value)
