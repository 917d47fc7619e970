"""A NumPy client for tests: adds (site_index + 1) * STEP to every array and reports metrics.

Options (argv): --weight W (NUM_STEPS_CURRENT_ROUND), --diff (send a DIFF), --fail-round R
(raise in round R), --exit-early R (return after round R).
"""

import argparse

import numpy as np

import fedlift.client as flare

parser = argparse.ArgumentParser()
parser.add_argument("--step", type=float, default=1.0)
parser.add_argument("--weight", type=float, default=None)
parser.add_argument("--diff", action="store_true")
parser.add_argument("--fail-round", type=int, default=-1)
parser.add_argument("--exit-early", type=int, default=-1)
args = parser.parse_args()

flare.init()
index = flare.system_info()["site_index"]
while flare.is_running():
    model = flare.receive()
    assert model is not None
    if model.current_round == args.fail_round:
        raise ValueError(f"deliberate failure in round {model.current_round}")
    delta = (index + 1) * args.step
    new = {k: [np.asarray(a) + delta for a in v] if isinstance(v, list) else np.asarray(v) + delta
           for k, v in model.params.items()}
    weight = args.weight if args.weight is not None else float(index + 1)
    out = flare.tree_sub(new, model.params) if args.diff else new
    flare.send(
        flare.FLModel(
            params_type=flare.ParamsType.DIFF if args.diff else flare.ParamsType.FULL,
            params=out,
            metrics={"accuracy": float(index + 1) + (model.current_round or 0), "site": index},
            meta={"NUM_STEPS_CURRENT_ROUND": weight},
        )
    )
    if model.current_round == args.exit_early:
        break
