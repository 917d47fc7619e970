"""SCAFFOLD (Karimireddy et al. 2020, "Stochastic Controlled Averaging for Federated
Learning"), the server's half.

Every task carries the server control variate ``c`` (``meta["scaffold_c_global"]``, the
model's layout); each client corrects its local steps with ``c - c_i`` and answers with its
model and the change of its own control variate ``delta c_i`` (``meta["scaffold_c_diff"]``,
option II of the paper; ``fedlift.client.keras.TFScaffoldHelper`` does the client's half).
The server then moves (Algorithm 1, lines 16-17):

    x = x + eta_g * mean(y_i - x)           (the mean weighted as FedAvg's)
    c = c + |S| / N * mean(delta c_i)

``|S|``: the sites that answered; ``N``: every site of the job. Each result carries twice a
model's data, folded as it arrives like FedAvg's. ``c`` is strategy state: a checkpoint
keeps it, so a resumed run continues bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from ..errors import ConfigError
from ..model import ParamsType, ParamTree, flatten, unflatten
from ._fedavg import FedAvg, _check_number, zeros_like
from ._seam import Aggregate, Ask
from ._strategy import StrategyState

__all__ = ["SCAFFOLD_CTRL_DIFF", "SCAFFOLD_CTRL_GLOBAL", "Scaffold", "scaffold_step"]

SCAFFOLD_CTRL_GLOBAL = "scaffold_c_global"
SCAFFOLD_CTRL_DIFF = "scaffold_c_diff"


def scaffold_step(
    x: list[np.ndarray],
    mean_y: list[np.ndarray],
    c: list[np.ndarray],
    mean_dc: list[np.ndarray],
    *,
    eta_g: float,
    answered: int,
    total: int,
    diff: bool = False,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The server update on flat lists: the new ``x`` and ``c`` (fresh arrays, the dtypes of
    ``x`` and ``c``). ``mean_y``: the mean of the results' models (``diff``: of their
    changes ``y_i - x``)."""
    new_x, new_c = [], []
    for xi, yi, ci, dci in zip(x, mean_y, c, mean_dc, strict=True):
        if xi.dtype.kind != "f":
            new_x.append(np.asarray(yi).astype(xi.dtype) if not diff else xi)
        else:
            step = np.asarray(yi, np.float64) - (0.0 if diff else np.asarray(xi, np.float64))
            new_x.append((np.asarray(xi, np.float64) + eta_g * step).astype(xi.dtype))
        moved = np.asarray(ci, np.float64) + answered / total * np.asarray(dci, np.float64)
        new_c.append(moved.astype(ci.dtype))
    return new_x, new_c


@dataclass
class Scaffold(FedAvg):
    """SCAFFOLD (Karimireddy et al. 2020, option II), with global learning rate ``eta_g``
    (1.0 in the paper's experiments); sampling and early stopping as FedAvg's."""

    name: ClassVar[str] = "scaffold"
    extras: ClassVar[tuple[str, ...]] = (SCAFFOLD_CTRL_DIFF,)

    eta_g: float = 1.0
    _c: ParamTree | None = field(default=None, init=False, repr=False)
    _total: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_number(type(self).__name__, "eta_g", self.eta_g, 0.0, lo_open=True)

    def start(self, params: ParamTree) -> None:
        if self._c is None:  # not loaded from a checkpoint: c starts at zero
            self._c = zeros_like(params)

    def configure_train(self, round_number: int, sites: Sequence[str], min_clients: int) -> Ask:
        ask = super().configure_train(round_number, sites, min_clients)
        self._total = max(self._total, len(sites))
        return Ask(ask.sites, ask.config, {**ask.meta, SCAFFOLD_CTRL_GLOBAL: self._controls})

    @property
    def _controls(self) -> ParamTree:
        if self._c is None:
            raise ConfigError("Scaffold: start(params) must run before the first round.")
        return self._c

    def update(self, round_number: int, params: ParamTree, aggregate: Aggregate) -> ParamTree:
        mean_dc = aggregate.meta.get(SCAFFOLD_CTRL_DIFF)
        if aggregate.params is None or mean_dc is None:
            return params
        structure, x = flatten(params)
        _, mean_y = flatten(aggregate.params)
        c_structure, c = flatten(self._controls)
        _, dc = flatten(mean_dc)
        new_x, new_c = scaffold_step(
            x,
            mean_y,
            c,
            dc,
            eta_g=self.eta_g,
            answered=aggregate.count,
            total=max(self._total, aggregate.count),
            diff=aggregate.params_type == ParamsType.DIFF,
        )
        self._c = unflatten(c_structure, new_c)
        return unflatten(structure, new_x)

    def state(self) -> StrategyState:
        state = super().state()
        state["total_sites"] = self._total
        if self._c is not None:
            state["c"] = self._c
        return state

    def load_state(self, state: StrategyState) -> None:
        super().load_state(state)
        total = state.get("total_sites", 0)
        self._total = total if isinstance(total, int) else 0
        c = state.get("c")
        self._c = c if c is not None else None
