"""The benchmark's client: no compute. Receive, add a constant, send (as the peers' clients).

``--diff`` (script argument): answer with the change instead of the model
(``params_type=DIFF``): a constant tree of the model's layout, made once, so the client
does less than the FULL one (no add) and the difference is the server's.

A SCAFFOLD task carries ``scaffold_c_global``; the result then carries the change of the
client's control variate, ``scaffold_c_diff``, as SCAFFOLD requires: zeros of the model's
layout, made once (only the transfer costs, which is what SCAFFOLD adds to a round).
"""

import sys

import numpy as np

import fedlift.client as flare

SCAFFOLD_GLOBAL = "scaffold_c_global"  # fedlift.server.SCAFFOLD_CTRL_GLOBAL
SCAFFOLD_DIFF = "scaffold_c_diff"  # fedlift.server.SCAFFOLD_CTRL_DIFF
DIFF = "--diff" in sys.argv[1:]

flare.init()
change: dict[str, np.ndarray] | None = None
controls: dict[str, np.ndarray] | None = None
while flare.is_running():
    model = flare.receive()
    if model is None or not isinstance(model.params, dict):
        raise SystemExit(f"the benchmark sends a dict of arrays; received: {model!r:.200}")
    params: dict[str, np.ndarray] = model.params
    meta = {}
    if SCAFFOLD_GLOBAL in model.meta:
        if controls is None:
            controls = {k: np.zeros_like(v) for k, v in params.items()}
        meta[SCAFFOLD_DIFF] = controls
    if DIFF:
        if change is None:
            change = {k: np.ones_like(v) for k, v in params.items()}
        flare.send(flare.FLModel(params=change, params_type=flare.ParamsType.DIFF, meta=meta))
    else:
        flare.send(flare.FLModel(params={k: v + 1.0 for k, v in params.items()}, meta=meta))
