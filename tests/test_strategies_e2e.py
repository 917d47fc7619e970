"""Strategies end to end through the simulator: the job folder names them, the server
builds them from it, and a strategy of the user's own runs from the app folder."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from fedlift import FedJob, ScriptRunner, run_simulator
from fedlift.errors import ConfigError
from fedlift.job import load_job
from fedlift.server import FedProx, Scaffold, Strategy
from fedlift.server._store import load_params

APP = Path(__file__).parent / "scripts" / "strategy_app"


def export(tmp_path: Path, strategy: Strategy, rounds: int = 2, **kw: object) -> Path:
    job = FedJob("s", 2, rounds, {"w": np.zeros(3, np.float32)}, strategy=strategy,
                 final_evaluation=False, **kw)  # type: ignore[arg-type]  # fmt: skip
    job.to_clients(ScriptRunner(APP / "train.py", framework="numpy"))
    return job.export_job(tmp_path / "jobs")


def final(ws: Path) -> np.ndarray:
    return load_params(ws / "server" / "models" / "global_model.safetensors")["w"]


def test_a_users_strategy_in_the_app_runs_in_the_simulator(tmp_path: Path) -> None:
    import sys

    sys.path.insert(0, str(APP))
    try:
        from my_strategy import HalfStep  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(APP))
    folder = export(tmp_path, HalfStep(factor=0.25))
    workflow = json.loads((folder / "job.json").read_text())["workflow"]
    assert workflow["type"] == "my_strategy:HalfStep" and workflow["factor"] == 0.25
    run_simulator(folder, tmp_path / "ws", quiet=True)
    # targets 1 and 2: the clients' mean is x + 0.5 * (1.5 - x); the server moves a quarter
    # of the way there: x1 = 0.25 * 0.5 * 1.5 = 0.1875, x2 = x1 + 0.125 * (1.5 - x1).
    x1 = 0.125 * 1.5
    np.testing.assert_allclose(final(tmp_path / "ws"), [x1 + 0.125 * (1.5 - x1)] * 3, rtol=1e-6)


def test_scaffold_and_cross_site_evaluation_in_the_simulator(tmp_path: Path) -> None:
    folder = export(tmp_path, Scaffold(eta_g=1.0), cross_site_eval=True)
    run_simulator(folder, tmp_path / "ws", quiet=True)
    # eta_g = 1: x moves to the clients' mean, as FedAvg: 0.75 then 0.75 + 0.5 * 0.75.
    np.testing.assert_allclose(final(tmp_path / "ws"), [1.125] * 3, rtol=1e-6)
    server = tmp_path / "ws" / "server"
    matrix = json.loads((server / "cross_site_val.json").read_text())
    assert sorted(matrix) == ["server", "site-1", "site-2"]
    # site-1's local model is its last result: x1 + 0.5 * (1 - x1) with x1 = 0.75.
    local_1 = 0.75 + 0.5 * (1 - 0.75)
    assert matrix["site-1"]["site-1"]["closeness"] == pytest.approx(-abs(local_1 - 1))
    assert matrix["site-1"]["site-2"]["closeness"] == pytest.approx(-abs(local_1 - 2))
    assert matrix["server"]["site-2"]["closeness"] == pytest.approx(-abs(1.125 - 2))
    rows = list(csv.reader((server / "cross_site_val.csv").open()))
    assert rows[0] == ["model_owner", "site", "closeness"] and len(rows) == 1 + 3 * 2


def test_fedprox_mu_reaches_the_script(tmp_path: Path) -> None:
    result = run_simulator(export(tmp_path, FedProx(mu=0.3), rounds=1), tmp_path / "ws",
                           quiet=True)  # fmt: skip
    assert result.rounds[0].metrics["mu"] == pytest.approx(0.3)


def test_a_job_json_with_a_bad_strategy_is_refused_with_the_options(tmp_path: Path) -> None:
    folder = export(tmp_path, FedProx(mu=0.3), rounds=1)
    config = json.loads((folder / "job.json").read_text())
    config["workflow"]["mu"] = "big"
    (folder / "job.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"option 'mu' takes a number; received: 'big'"):
        load_job(folder)
    config["workflow"].update(type="my_strategy:Nope", mu=0.1)
    (folder / "job.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="the app's module 'my_strategy' has no 'Nope'"):
        load_job(folder)
    config["workflow"].update(type="../../etc:passwd")
    (folder / "job.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="must name 'module:Name'"):
        load_job(folder)


def test_fedadam_fedmedian_and_cyclic_in_the_simulator(tmp_path: Path) -> None:
    import math

    from fedlift.server import Cyclic, FedAdam, FedAvg, FedMedian, cyclic_order

    def run(strategy: Strategy, n: int, name: str) -> np.ndarray:
        job = FedJob(name, n, 1, {"w": np.zeros(2, np.float32)}, strategy=strategy,
                     final_evaluation=False)  # fmt: skip
        job.to_clients(ScriptRunner(APP / "train.py", framework="numpy"))
        folder = job.export_job(tmp_path / "jobs")
        run_simulator(folder, tmp_path / name, quiet=True)
        return final(tmp_path / name)

    # Site i's result is x + 0.5 * (i + 1 - x); from x = 0: 0.5 * (i + 1).
    # FedAdam, 2 sites: delta = mean = 0.75; m = 0.1 * 0.75; v = 0.99 tau^2 + 0.01 * 0.75^2.
    tau, eta = 1e-3, 0.1
    v = 0.99 * tau * tau + 0.01 * 0.75**2
    expected = eta * 0.075 / (math.sqrt(v) + tau)
    np.testing.assert_allclose(run(FedAdam(eta=eta, tau=tau), 2, "adam"), [expected] * 2,
                               rtol=1e-6)  # fmt: skip
    # FedMedian, 3 sites: the median of 0.5, 1.0, 1.5.
    np.testing.assert_allclose(run(FedAvg(aggregator=FedMedian()), 3, "median"), [1.0] * 2)
    # Cyclic, 3 sites: each pulls the model half-way to its target, in the seeded order.
    x = 0.0
    for site in cyclic_order(["site-1", "site-2", "site-3"], 0, seed=3, shuffle_each_round=False):
        x = x + 0.5 * (int(site[-1]) - x)
    np.testing.assert_allclose(run(Cyclic(seed=3), 3, "cyclic"), [x] * 2, rtol=1e-6)
