"""A stateful strategy survives the deployed server's SIGKILL: FedAdam's moments and
SCAFFOLD's control variate are in every checkpoint, so a run killed mid-training and
restarted ends bit-identical to the same run uninterrupted (``run_local``, same clients)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from faultproxy import SEED, SITES, Deployment, differing_bytes, final_model, rounds_lost
from fedlift import FedJob, FLModel, ScriptRunner
from fedlift.server import SCAFFOLD_CTRL_DIFF, FedAdam, Scaffold, Strategy
from fedlift.server._store import load_params
from fedlift.simulator import run_local

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
from exact_client import control_change, delta  # noqa: E402

SIZE = 1 << 18


def make_job(root: Path, strategy: Strategy, rounds: int) -> Path:
    initial = np.random.default_rng(SEED).integers(0, 100, size=SIZE).astype(np.float32)
    job = FedJob("stateful", len(SITES), rounds, {"w": initial}, strategy=strategy,
                 final_evaluation=False, round_timeout=90.0)  # fmt: skip
    job.to_clients(ScriptRunner(SCRIPTS / "exact_client.py", framework="numpy",
                                script_args=f"--seed {SEED} --sleep 0.6"))  # fmt: skip
    return job.export_job(root / "jobs")


def uninterrupted(job: Path, strategy: Strategy, rounds: int) -> np.ndarray:
    """The same strategy and clients, run in this process without a fault."""
    initial = load_params(job / "initial_model.safetensors")

    def client(site: str, model: FLModel) -> FLModel:
        index, rnd = SITES.index(site), int(model.current_round or 0)
        w = np.asarray(model.params["w"])
        meta: dict[str, Any] = {"NUM_STEPS_CURRENT_ROUND": 1.0}
        if "scaffold_c_global" in model.meta:
            meta[SCAFFOLD_CTRL_DIFF] = {"w": control_change(SEED, rnd, index, w.size)}
        return FLModel(params={"w": w + delta(SEED, rnd, index, len(SITES), w.size)}, meta=meta)

    result = run_local(client, initial, len(SITES), rounds, strategy=strategy, quiet=True)
    return np.asarray(result.params["w"])


@pytest.mark.reliability
@pytest.mark.parametrize(
    "make",
    [lambda: FedAdam(eta=0.5, tau=1e-2), lambda: Scaffold(eta_g=0.7)],
    ids=["fedadam", "scaffold"],
)
def test_a_stateful_strategy_resumes_bit_identically(
    reliability: Any, tmp_path: Path, make: Any
) -> None:
    rounds = 5
    job = make_job(tmp_path, make(), rounds)
    deployment = Deployment(tmp_path, SITES, proxy=False)
    try:
        job_id = deployment.submit(job)
        deployment.wait_round(job_id, 1)  # two rounds done: the moments are non-trivial
        time.sleep(0.3)  # mid-training of the next round
        deployment.restart_server()
        reliability.fault(f"server SIGKILL mid-job ({type(make()).__name__})")
        status = deployment.wait(job_id, timeout=240)
        metrics = deployment.metrics(job_id)
        model = final_model(deployment, job_id)
    finally:
        deployment.close()
    assert status["state"] == "finished", (status, deployment.log_tail())
    lost = rounds_lost(metrics, rounds)
    corrupted = differing_bytes(model, uninterrupted(job, make(), rounds))
    reliability.measure(rounds_lost=lost, bytes_corrupted=corrupted)
    assert (lost, corrupted) == (0, 0)


def test_a_users_strategy_from_the_app_runs_deployed(tmp_path: Path) -> None:
    app = SCRIPTS / "strategy_app"
    sys.path.insert(0, str(app))
    try:
        from my_strategy import HalfStep  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(app))
    job = FedJob("custom", len(SITES), 2, {"w": np.zeros(3, np.float32)},
                 strategy=HalfStep(factor=0.25), final_evaluation=False)  # fmt: skip
    job.to_clients(ScriptRunner(app / "train.py", framework="numpy"))
    folder = job.export_job(tmp_path / "jobs")
    # By default a deployed server runs no code from a job: the submission is refused.
    refusing = Deployment(tmp_path / "default", SITES, proxy=False, start_sites=False)
    try:
        with pytest.raises(Exception, match="--allow-app-code"):
            refusing.submit(folder)
    finally:
        refusing.close()
    deployment = Deployment(tmp_path, SITES, proxy=False, server_args=("--allow-app-code",))
    try:
        job_id = deployment.submit(folder)
        status = deployment.wait(job_id, timeout=120)
        model = final_model(deployment, job_id)
    finally:
        deployment.close()
    assert status["state"] == "finished", (status, deployment.log_tail())
    x1 = 0.125 * 1.5  # as in the simulator's test: the server moves a quarter of the way
    np.testing.assert_allclose(model, [x1 + 0.125 * (1.5 - x1)] * 3, rtol=1e-6)
