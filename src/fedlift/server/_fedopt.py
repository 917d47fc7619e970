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

The step runs in place, block by block (cache-sized) on the fold's threads, and writes the
new model into the round's aggregate buffer, which is already where the model is published:
no model-sized temporary and no extra copy. Moments are kept in the leaf's float type
(float32 for float32 and narrower leaves). Only float leaves move by the rule; integer
leaves (step counters) take the mean as FedAvg would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np

from ..errors import ConfigError
from ..model import ParamsType, ParamTree, flatten, is_float_dtype, unflatten
from ._aggregate import _on_threads
from ._fedavg import FedAvg, _check_number
from ._seam import Aggregate
from ._strategy import StrategyState

__all__ = ["FedAdagrad", "FedAdam", "FedAvgM", "FedOpt", "FedYogi", "fedopt_step", "new_moments"]

Rule = Literal["adam", "yogi", "adagrad", "momentum"]


_BLOCK = 1 << 17  # elements per block: temporaries stay in the cache, few numpy calls


def fedopt_step(
    rule: Rule,
    x: list[np.ndarray],
    mean: list[np.ndarray],
    m: list[np.ndarray],
    v: list[np.ndarray] | None,
    out: list[np.ndarray],
    *,
    eta: float,
    beta_1: float,
    beta_2: float,
    tau: float,
    diff: bool = False,
) -> None:
    """One server step (see the module docstring) on flat lists of float arrays, in place:
    ``m`` and ``v`` (None for momentum) are updated, the new model is written to ``out``,
    which may be ``mean`` itself (the round's aggregate buffer, already where the model is
    published). ``diff``: ``mean`` is the mean change (DIFF results), not the mean model.

    Runs in cache-sized blocks on the fold's threads: each block's temporaries stay in the
    cache, so the step crosses memory about once per array instead of once per operation.
    """

    def run(i: int, lo: int, hi: int) -> None:
        xs, ys, os_ = x[i].reshape(-1), mean[i].reshape(-1), out[i].reshape(-1)
        ms = m[i].reshape(-1)
        vs = None if v is None else v[i].reshape(-1)
        size = min(_BLOCK, hi - lo)
        d = np.empty(size, ms.dtype)
        t = np.empty(size, ms.dtype)
        u = np.empty(size, ms.dtype) if rule == "yogi" else t
        for start in range(lo, hi, _BLOCK):
            stop = min(start + _BLOCK, hi)
            n = stop - start
            db, tb, ub = d[:n], t[:n], u[:n]
            mb = ms[start:stop]
            if diff:
                np.copyto(db, ys[start:stop], casting="unsafe")
            else:
                np.subtract(ys[start:stop], xs[start:stop], out=db, casting="unsafe")
            mb *= beta_1
            if rule == "momentum":
                mb += db
                np.multiply(mb, eta, out=tb)
            else:
                if vs is None:
                    raise ConfigError(f"fedopt_step({rule!r}) needs v")
                vb = vs[start:stop]
                np.multiply(db, 1.0 - beta_1, out=tb)
                mb += tb
                np.multiply(db, db, out=tb)  # delta^2
                if rule == "adagrad":
                    vb += tb
                elif rule == "yogi":
                    np.subtract(vb, tb, out=ub)
                    np.sign(ub, out=ub)
                    ub *= tb
                    ub *= 1.0 - beta_2
                    vb -= ub
                else:
                    vb *= beta_2
                    tb *= 1.0 - beta_2
                    vb += tb
                np.sqrt(vb, out=tb)
                tb += tau
                np.divide(mb, tb, out=tb)
                tb *= eta
            np.add(xs[start:stop], tb, out=os_[start:stop], casting="unsafe")

    _on_threads(x, run)


def new_moments(
    rule: Rule, x: list[np.ndarray], tau: float
) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """The moments before the first step: ``m = 0`` and ``v = tau^2`` (float64 for leaves
    of float64, float32 for narrower ones)."""
    dtypes = [np.float64 if a.dtype == np.float64 else np.float32 for a in x]
    m = [np.zeros(a.shape, dt) for a, dt in zip(x, dtypes, strict=True)]
    v = (
        None
        if rule == "momentum"
        else [np.full(a.shape, tau * tau, dt) for a, dt in zip(x, dtypes, strict=True)]
    )
    return m, v


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
        moving = [i for i, a in enumerate(x) if is_float_dtype(a.dtype)]
        xs = [x[i] for i in moving]
        if self._m is None:
            self._m, self._v = new_moments(self.rule, xs, self.tau)
        # The new model goes where the aggregate is (its buffers are this round's own and
        # already where models are published); a leaf that cannot take it gets a new array.
        outs = [
            mean[i]
            if mean[i].flags.writeable and mean[i].dtype == x[i].dtype
            else np.empty_like(x[i])
            for i in moving
        ]
        fedopt_step(
            self.rule,
            xs,
            [mean[i] for i in moving],
            self._m,
            self._v,
            outs,
            eta=self.eta,
            beta_1=self.beta_1,
            beta_2=self.beta_2,
            tau=self.tau,
            diff=aggregate.params_type == ParamsType.DIFF,
        )
        # Leaves that do not move by the rule (integers) take FedAvg's update.
        result = list(mean)
        if aggregate.params_type == ParamsType.DIFF:
            for i in set(range(len(x))) - set(moving):
                result[i] = np.add(x[i], mean[i], dtype=x[i].dtype, casting="unsafe")
        for i, value in zip(moving, outs, strict=True):
            result[i] = value
        return unflatten(structure, result)

    def summary(self) -> dict[str, float]:
        """The server learning rate ``eta`` and the norm of the first moment (the step's
        direction), with FedAvg's scalars."""
        out = super().summary()
        out["eta"] = float(self.eta)
        if self._m is not None:
            flat = [np.ravel(m) for m in self._m if np.issubdtype(m.dtype, np.floating)]
            out["momentum_norm"] = math.sqrt(math.fsum(float(np.dot(m, m)) for m in flat))
        return out

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
        self._m = [np.array(a) for a in m] if isinstance(m, list) else None
        self._v = [np.array(a) for a in v] if isinstance(v, list) else None


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
