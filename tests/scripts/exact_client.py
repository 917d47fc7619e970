"""A deterministic NumPy client whose FedAvg is exact in float32, so a disturbed run must
come out bit-identical to arithmetic done by hand (see ``expected_model``).

Each round, site i of n sends ``global + delta(round, i, n)`` with weight 1:
``base(round) + r_i - r_(i+1 mod n)``, small integers from generators seeded by (seed,
round, i). The r terms cancel in the sum, so every global model stays integer-valued: the
sums and their mean are exact in float32, whatever order the server folds the results in,
for hundreds of rounds. A result lost, or counted twice, changes the mean.

Options: --seed S, --sleep SECONDS (of "training" per round).
"""

import argparse
import time

import numpy as np

import fedlift.client as flare


def _ints(seed: int, rnd: int, key: int, size: int, bound: int) -> np.ndarray:
    rng = np.random.default_rng([seed, rnd, key])
    return rng.integers(-bound, bound + 1, size=size).astype(np.float32)


def delta(seed: int, rnd: int, index: int, n_sites: int, size: int) -> np.ndarray:
    base = _ints(seed, rnd, 1 << 20, size, 4)
    mine, next_ = _ints(seed, rnd, index, size, 8), _ints(seed, rnd, (index + 1) % n_sites, size, 8)
    return base + mine - next_


def control_change(seed: int, rnd: int, index: int, size: int) -> np.ndarray:
    """SCAFFOLD's delta c_i of site ``index`` in round ``rnd`` (small integers)."""
    return _ints(seed, rnd, 5000 + index, size, 3)


def expected_model(initial: np.ndarray, n_sites: int, rounds: int, seed: int) -> np.ndarray:
    """The global model after ``rounds`` rounds of FedAvg over ``n_sites`` (weights equal)."""
    model = initial.astype(np.float64)
    for rnd in range(rounds):
        results = [model + delta(seed, rnd, i, n_sites, model.size) for i in range(n_sites)]
        model = sum(results) / n_sites
    return model.astype(np.float32)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sleep", type=float, default=0.0)
    args = parser.parse_args()
    flare.init()
    info = flare.system_info()
    index, n_sites = info["site_index"], info["num_sites"]
    while flare.is_running():
        model = flare.receive()
        if flare.is_evaluate():
            flare.send(flare.FLModel(metrics={"accuracy": 1.0}))
            continue
        rnd = int(model.current_round or 0)
        time.sleep(args.sleep)
        w = model.params["w"]
        meta = {"NUM_STEPS_CURRENT_ROUND": 1.0}
        if "scaffold_c_global" in model.meta:  # SCAFFOLD: a control-variate change too
            meta["scaffold_c_diff"] = {"w": control_change(args.seed, rnd, index, w.size)}
        flare.send(
            flare.FLModel(
                params={"w": w + delta(args.seed, rnd, index, n_sites, w.size)},
                metrics={"accuracy": float(rnd)},
                meta=meta,
            )
        )
