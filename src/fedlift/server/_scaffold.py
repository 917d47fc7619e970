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
from ..model import ParamsType, ParamTree, flatten, is_float_dtype, unflatten
from ._aggregate import _on_threads
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
    out_x: list[np.ndarray],
    out_c: list[np.ndarray],
    *,
    eta_g: float,
    answered: int,
    total: int,
    diff: bool = False,
) -> None:
    """The server update on flat lists of float arrays, written to ``out_x`` (may be
    ``mean_y``: the round's aggregate buffer) and ``out_c``. ``mean_y``: the mean of the
    results' models (``diff``: of their changes ``y_i - x``). Block by block on the fold's
    threads, like FedOpt's step."""
    share = answered / total

    def run(i: int, lo: int, hi: int) -> None:
        xs, ys, cs, ds = (a[i].reshape(-1) for a in (x, mean_y, c, mean_dc))
        ox, oc = out_x[i].reshape(-1), out_c[i].reshape(-1)
        tmp = np.empty(min(_BLOCK, hi - lo), np.result_type(xs.dtype, np.float32))
        for start in range(lo, hi, _BLOCK):
            stop = min(start + _BLOCK, hi)
            t = tmp[: stop - start]
            if diff:
                np.multiply(ys[start:stop], eta_g, out=t, casting="unsafe")
            else:
                np.subtract(ys[start:stop], xs[start:stop], out=t, casting="unsafe")
                t *= eta_g
            np.add(xs[start:stop], t, out=ox[start:stop], casting="unsafe")
            np.multiply(ds[start:stop], share, out=t, casting="unsafe")
            np.add(cs[start:stop], t, out=oc[start:stop], casting="unsafe")

    _on_threads(x, run)


_BLOCK = 1 << 17


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
        moving = [i for i, a in enumerate(x) if is_float_dtype(a.dtype)]
        diff = aggregate.params_type == ParamsType.DIFF
        result = list(mean_y)  # integer leaves: FedAvg's update
        if diff:
            for i in set(range(len(x))) - set(moving):
                result[i] = np.add(x[i], mean_y[i], dtype=x[i].dtype, casting="unsafe")
        out_x = [
            mean_y[i]
            if mean_y[i].flags.writeable and mean_y[i].dtype == x[i].dtype
            else np.empty_like(x[i])
            for i in moving
        ]
        # c gets new arrays: the last tasks' messages may still reference the old ones.
        new_c = [np.empty_like(a) if i in set(moving) else np.array(a) for i, a in enumerate(c)]
        scaffold_step(
            [x[i] for i in moving],
            [mean_y[i] for i in moving],
            [c[i] for i in moving],
            [dc[i] for i in moving],
            out_x,
            [new_c[i] for i in moving],
            eta_g=self.eta_g,
            answered=aggregate.count,
            total=max(self._total, aggregate.count),
            diff=diff,
        )
        for i, value in zip(moving, out_x, strict=True):
            result[i] = value
        self._c = unflatten(c_structure, new_c)
        return unflatten(structure, result)

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
