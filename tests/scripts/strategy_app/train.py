"""A NumPy client for the strategy tests: each site pulls the model towards its own target.

train: y = x + 0.5 * (target - x); SCAFFOLD's meta["scaffold_c_diff"] = 0.1 * (index + 1)
when the task carries "scaffold_c_global"; the task config is echoed in the metrics.
validate: metric "closeness" = -|w - target| of the model received (the cross-site matrix).
"""

import numpy as np

import fedlift.client as flare

flare.init()
index = flare.system_info()["site_index"]
target = float(index + 1)
while flare.is_running():
    model = flare.receive()
    w = np.asarray(model.params["w"])
    closeness = -float(np.abs(w - target).mean())
    if flare.is_evaluate():
        flare.send(flare.FLModel(metrics={"closeness": closeness}))
        continue
    meta = {"NUM_STEPS_CURRENT_ROUND": 1.0}
    if "scaffold_c_global" in model.meta:
        meta["scaffold_c_diff"] = {"w": np.full_like(w, 0.1 * (index + 1))}
    config = model.meta.get("config", {})
    metrics = {"closeness": closeness, "mu": float(config.get("fedprox_mu", -1.0))}
    flare.send(flare.FLModel(params={"w": w + 0.5 * (target - w)}, metrics=metrics, meta=meta))
