"""FedAvg (McMahan et al. 2017) and FedProx (Li et al. 2020) as strategies.

FedAvg is the :class:`~fedlift.server.Strategy` defaults plus what users ask of it:
seeded client sampling, early stopping on the key metric, and an aggregation of one's own.
FedProx is FedAvg whose tasks carry ``mu``; the proximal term is the client's (see
``fedlift.client.keras``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

from ..errors import ConfigError
from ..model import ParamTree
from ._mean import Mean
from ._seam import AggregatorFactory, Ask
from ._store import RoundRecord
from ._strategy import Strategy, StrategyState

__all__ = ["FEDPROX_MU", "FedAvg", "FedProx", "all_clients", "sample_sites"]

FEDPROX_MU = "fedprox_mu"
"""The task-config key that carries FedProx's ``mu`` to the clients."""

Sampler = Callable[[Sequence[str], int], list[str]]


def all_clients(sites: Sequence[str], round_number: int) -> list[str]:
    """Every available client, every round."""
    return list(sites)


def sample_sites(
    sites: Sequence[str],
    round_number: int,
    *,
    fraction: float = 1.0,
    clients_per_round: int | None = None,
    min_clients: int = 1,
    seed: int = 0,
) -> list[str]:
    """The sites a round asks: ``clients_per_round`` of them, or ``ceil(fraction * n)``
    but at least ``min_clients``; chosen uniformly without replacement by a generator
    seeded with ``(seed, round_number)``, so a round's choice does not depend on the
    rounds before it (a resumed run chooses exactly as an uninterrupted one). The chosen
    sites keep their order."""
    n = len(sites)
    k = clients_per_round if clients_per_round is not None else math.ceil(fraction * n)
    k = min(n, max(k, min_clients, 1))
    if k >= n:
        return list(sites)
    rng = np.random.default_rng([seed, round_number])
    chosen = np.sort(rng.choice(n, size=k, replace=False))
    return [sites[int(i)] for i in chosen]


def _check_number(owner: str, name: str, value: object, lo: float, hi: float | None = None,
                  *, lo_open: bool = False, integer: bool = False) -> None:  # fmt: skip
    kind = int if integer else (int, float)
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if ok:
        number = float(value)  # type: ignore[arg-type]
        ok = math.isfinite(number) and (number > lo if lo_open else number >= lo)
        ok = ok and (hi is None or number <= hi)
    if not ok:
        bound = f"{'>' if lo_open else '>='} {lo:g}" + ("" if hi is None else f" and <= {hi:g}")
        what = "an int" if integer else "a number"
        raise ConfigError(
            f"{owner}({name}=...) must be {what} {bound}; received: {name}={value!r}."
        )


@dataclass
class FedAvg(Strategy):
    """Federated averaging (McMahan et al. 2017).

    Each round the sampled sites train the global model (task ``train``); their results
    are folded into a weighted mean as they arrive (weights: ``meta[NUM_STEPS_CURRENT_ROUND]``)
    that replaces the model (FULL results) or is added to it (DIFF).

    Sampling: ``clients_per_round`` sites, or ``fraction`` of the available ones (at least
    the run's ``min_clients``), chosen by ``seed`` and the round (see :func:`sample_sites`);
    ``sample`` replaces that with a function ``(sites, round) -> sites``.
    ``evaluate_every=k``: every site evaluates the new model after every k-th round (task
    ``validate``, recorded beside the round). Early stopping: with ``patience`` the run ends
    when ``monitor`` (a metric of the round's results) has not improved by more than
    ``min_delta`` for ``patience`` rounds (``mode``: ``"max"`` or ``"min"``), as Keras'
    ``EarlyStopping`` does with epochs.
    ``aggregator``: how results combine (default: :class:`~fedlift.server.Mean`; e.g.
    :class:`~fedlift.server.FedMedian`, or :class:`~fedlift.server.Custom` for a function
    of one's own).
    """

    name: ClassVar[str] = "fedavg"

    fraction: float = 1.0
    clients_per_round: int | None = None
    seed: int = 0
    sample: Sampler | None = field(default=None, repr=False)
    patience: int | None = None
    min_delta: float = 0.0
    monitor: str = "accuracy"
    mode: Literal["max", "min"] = "max"
    evaluate_every: int | None = None
    aggregator: AggregatorFactory = field(default_factory=Mean)
    _best: float | None = field(default=None, init=False, repr=False)
    _wait: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        owner = type(self).__name__
        _check_number(owner, "fraction", self.fraction, 0.0, 1.0, lo_open=True)
        if self.clients_per_round is not None:
            _check_number(owner, "clients_per_round", self.clients_per_round, 1, integer=True)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(
                f"{owner}(seed=...) must be an int >= 0; received: seed={self.seed!r}."
            )
        if self.sample is not None and not callable(self.sample):
            raise ConfigError(
                f"{owner}(sample=...) must be a function (sites, round) -> sites; "
                f"received: sample={self.sample!r:.80}."
            )
        if self.patience is not None:
            _check_number(owner, "patience", self.patience, 1, integer=True)
        _check_number(owner, "min_delta", self.min_delta, 0.0)
        if self.evaluate_every is not None:
            _check_number(owner, "evaluate_every", self.evaluate_every, 1, integer=True)
        if not isinstance(self.monitor, str) or not self.monitor:
            raise ConfigError(
                f"{owner}(monitor=...) is the name of a metric; received: monitor={self.monitor!r}."
            )
        if self.mode not in ("max", "min"):
            raise ConfigError(
                f"{owner}(mode=...) must be 'max' or 'min'; received: mode={self.mode!r}."
            )
        if not callable(self.aggregator):
            raise ConfigError(
                f"{owner}(aggregator=...) must be an aggregator factory such as Mean() or "
                f"FedMedian(); received: aggregator={self.aggregator!r:.80}."
            )

    def configure_train(self, round_number: int, sites: Sequence[str], min_clients: int) -> Ask:
        if self.sample is not None:
            chosen = list(self.sample(list(sites), round_number))
        else:
            chosen = sample_sites(
                sites,
                round_number,
                fraction=self.fraction,
                clients_per_round=self.clients_per_round,
                min_clients=min_clients,
                seed=self.seed,
            )
        return Ask(chosen, self.task_config(round_number))

    def configure_evaluate(self, round_number: int, sites: Sequence[str]) -> Ask | None:
        """With ``evaluate_every=k``: every site evaluates the new global model after every
        k-th round (task ``validate``)."""
        if self.evaluate_every is None or (round_number + 1) % self.evaluate_every:
            return None
        return Ask(list(sites))

    def task_config(self, round_number: int) -> dict[str, Any]:
        """The config every training task of the round carries (FedAvg: none)."""
        return {}

    def after_round(self, record: RoundRecord) -> bool:
        if self.patience is None:
            return False
        value = record.metrics.get(self.monitor)
        if value is None or not math.isfinite(value):
            self._wait += 1
        else:
            sign = 1.0 if self.mode == "max" else -1.0
            if self._best is None or sign * (value - self._best) > self.min_delta:
                self._best, self._wait = float(value), 0
            else:
                self._wait += 1
        return self._wait >= self.patience

    def state(self) -> StrategyState:
        return {"early_stopping": {"best": self._best, "wait": self._wait}}

    def load_state(self, state: StrategyState) -> None:
        stopping = state.get("early_stopping") or {}
        best = stopping.get("best")
        self._best = float(best) if isinstance(best, int | float) else None
        wait = stopping.get("wait", 0)
        self._wait = int(wait) if isinstance(wait, int) else 0


@dataclass
class FedProx(FedAvg):
    """FedProx (Li et al. 2020): FedAvg whose clients minimise their loss plus
    ``mu / 2 * ||w - w_global||^2``. The server's part is to send ``mu`` with every task
    (``flare.get_config()["fedprox_mu"]``); ``fedlift.client.keras``'s FedProx helpers add
    the term in the script."""

    name: ClassVar[str] = "fedprox"

    mu: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_number(type(self).__name__, "mu", self.mu, 0.0)

    def task_config(self, round_number: int) -> dict[str, Any]:
        return {FEDPROX_MU: float(self.mu)}


def zeros_like(params: ParamTree) -> ParamTree:
    """A tree of float zeros with ``params``' layout (non-float leaves: float32)."""
    from ..model import flatten, unflatten

    structure, arrays = flatten(params)
    return unflatten(
        structure,
        [np.zeros(a.shape, a.dtype if a.dtype.kind == "f" else np.float32) for a in arrays],
    )
