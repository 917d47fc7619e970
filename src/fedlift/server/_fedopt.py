"""Adaptive server optimisers (Reddi et al. 2021, "Adaptive Federated Optimization") and
server momentum (Hsu et al. 2019): FedAdam, FedYogi, FedAdagrad and FedAvgM.

The round's weighted mean of the results gives the pseudo-gradient
``delta = mean(x_i) - x`` (FULL results; DIFF results are the changes themselves), which
the server applies as an optimiser step (Reddi et al., Algorithm 2, no bias correction):

    m = beta_1 * m + (1 - beta_1) * delta
    FedAdagrad: v = v + delta^2
    FedYogi:    v = v - (1 - beta_2) * delta^2 * sign(v - delta^2)
    FedAdam:    v = beta_2 * v + (1 - beta_2) * delta^2
    x = x + eta * m / (sqrt(v) + tau)

with ``m`` starting at 0 and ``v`` at ``tau^2`` (the paper's ``v_{-1} >= tau^2``).
FedAvgM keeps a momentum buffer instead: ``m = beta * m + delta``, ``x = x + eta * m``
(``beta = 0``, ``eta = 1`` is FedAvg). The moments are strategy state: a checkpoint keeps
them, so a resumed run continues bit for bit.

The maths runs in float64 per array, written back in the model's dtype; only float leaves
move (integer leaves, such as step counters, take the mean as FedAvg would).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np

from ..model import ParamsType, ParamTree, flatten, unflatten
from ._fedavg import FedAvg, _check_number
from ._seam import Aggregate
from ._strategy import StrategyState, apply_in_place

__all__ = ["FedAdagrad", "FedAdam", "FedAvgM", "FedOpt", "FedYogi", "fedopt_step"]

Rule = Literal["adam", "yogi", "adagrad", "momentum"]


def fedopt_step(
    rule: Rule,
    x: list[np.ndarray],
    delta: list[np.ndarray],
    m: list[np.ndarray] | None,
    v: list[np.ndarray] | None,
    *,
    eta: float,
    beta_1: float,
    beta_2: float,
    tau: float,
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray] | None]:
    """One server step (see the module docstring) on flat lists of arrays: returns the new
    ``x`` (fresh arrays, the dtypes of ``x``), ``m`` and ``v`` (float64; None for
    momentum). ``m``/``v`` None: the first step (0 and ``tau^2``)."""
    new_x, new_m, new_v = [], [], []
    for i, (xi, di) in enumerate(zip(x, delta, strict=True)):
        d = np.asarray(di, np.float64)
        mi = np.zeros(d.shape) if m is None else m[i]
        if rule == "momentum":
            mi = beta_1 * mi + d
            step = eta * mi
        else:
            vi = np.full(d.shape, tau * tau) if v is None else v[i]
            mi = beta_1 * mi + (1.0 - beta_1) * d
            d2 = d * d
            if rule == "adagrad":
                vi = vi + d2
            elif rule == "yogi":
                vi = vi - (1.0 - beta_2) * d2 * np.sign(vi - d2)
            else:
                vi = beta_2 * vi + (1.0 - beta_2) * d2
            step = eta * mi / (np.sqrt(vi) + tau)
            new_v.append(vi)
        new_m.append(mi)
        new_x.append((np.asarray(xi, np.float64) + step).astype(xi.dtype))
    return new_x, new_m, (None if rule == "momentum" else new_v)


@dataclass
class FedOpt(FedAvg):
    """The FedOpt family's common part; use :class:`FedAdam`, :class:`FedYogi`,
    :class:`FedAdagrad` or :class:`FedAvgM`. ``eta``: the server learning rate; ``eta_l``:
    the clients' learning rate, sent in the task config as ``"eta_l"`` for scripts that
    read it (None: not sent); ``beta_1``, ``beta_2``, ``tau``: as in Reddi et al."""

    rule: ClassVar[Rule] = "adam"

    eta: float = 1e-1
    eta_l: float | None = None
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-9
    _m: list[np.ndarray] | None = field(default=None, init=False, repr=False)
    _v: list[np.ndarray] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        _check_number(owner, "eta", self.eta, 0.0, lo_open=True)
        if self.eta_l is not None:
            _check_number(owner, "eta_l", self.eta_l, 0.0, lo_open=True)
        _check_number(owner, "beta_1", self.beta_1, 0.0, 1.0)
        _check_number(owner, "beta_2", self.beta_2, 0.0, 1.0)
        _check_number(owner, "tau", self.tau, 0.0, lo_open=self.rule != "momentum")

    def task_config(self, round_number: int) -> dict[str, float]:
        return {} if self.eta_l is None else {"eta_l": float(self.eta_l)}

    def update(self, round_number: int, params: ParamTree, aggregate: Aggregate) -> ParamTree:
        if aggregate.params is None:
            return params
        structure, x = flatten(params)
        _, mean = flatten(aggregate.params)
        moving = [i for i, a in enumerate(x) if a.dtype.kind == "f"]
        if aggregate.params_type == ParamsType.DIFF:
            delta = [np.asarray(mean[i], np.float64) for i in moving]
        else:
            delta = [np.asarray(mean[i], np.float64) - x[i] for i in moving]
        new_x, self._m, self._v = fedopt_step(
            self.rule,
            [x[i] for i in moving],
            delta,
            self._m,
            self._v,
            eta=self.eta,
            beta_1=self.beta_1,
            beta_2=self.beta_2,
            tau=self.tau,
        )
        # Leaves that do not move by the rule (integers) take FedAvg's update.
        out = list(flatten(apply_in_place(params, aggregate.params, aggregate.params_type))[1])
        for i, value in zip(moving, new_x, strict=True):
            out[i] = value
        return unflatten(structure, out)

    def state(self) -> StrategyState:
        state = super().state()
        if self._m is not None:
            state["m"] = list(self._m)
        if self._v is not None:
            state["v"] = list(self._v)
        return state

    def load_state(self, state: StrategyState) -> None:
        super().load_state(state)
        m, v = state.get("m"), state.get("v")
        self._m = [np.asarray(a, np.float64) for a in m] if isinstance(m, list) else None
        self._v = [np.asarray(a, np.float64) for a in v] if isinstance(v, list) else None


@dataclass
class FedAdam(FedOpt):
    """FedAdam (Reddi et al. 2021): Adam on the server's pseudo-gradient."""

    name: ClassVar[str] = "fedadam"
    rule: ClassVar[Rule] = "adam"


@dataclass
class FedYogi(FedOpt):
    """FedYogi (Reddi et al. 2021): Yogi's additive second moment on the server."""

    name: ClassVar[str] = "fedyogi"
    rule: ClassVar[Rule] = "yogi"

    eta: float = 1e-2
    tau: float = 1e-3


@dataclass
class FedAdagrad(FedOpt):
    """FedAdagrad (Reddi et al. 2021): Adagrad's accumulated second moment on the server."""

    name: ClassVar[str] = "fedadagrad"
    rule: ClassVar[Rule] = "adagrad"


@dataclass
class FedAvgM(FedOpt):
    """FedAvgM (Hsu et al. 2019): server momentum ``beta_1`` and learning rate ``eta``
    (``beta_1=0, eta=1`` is FedAvg)."""

    name: ClassVar[str] = "fedavgm"
    rule: ClassVar[Rule] = "momentum"

    eta: float = 1.0
    beta_1: float = 0.9
    tau: float = 0.0
