"""End to end through the simulator: real worker processes, gRPC, the FedAvg loop."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import SCRIPTS, worker_pids
from fedlift import FedAvgJob, ScriptRunner
from fedlift.errors import ClientFailedError, RoundTimeoutError
from fedlift.server._store import load_params

N_ROUNDS = 2


def keras_like_params() -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(7)
    return {
        "conv": [rng.standard_normal((3, 3, 1, 4)).astype(np.float32), np.zeros(4, np.float32)],
        "pool": [],
        "dense": [rng.standard_normal((16, 10)).astype(np.float32), np.ones(10, np.float32)],
    }


def make_job(
    n_clients: int = 3, script_args: str = "", num_rounds: int = N_ROUNDS, **kwargs: object
) -> FedAvgJob:
    job = FedAvgJob(
        "numpy-job",
        n_clients=n_clients,
        num_rounds=num_rounds,
        initial_model=keras_like_params(),
        **kwargs,  # type: ignore[arg-type]
    )
    job.to_clients(
        ScriptRunner(SCRIPTS / "numpy_client.py", script_args=script_args, framework="numpy")
    )
    return job


def expected_shift(n_clients: int, weights: list[float], rounds: int) -> float:
    # Client i adds (i + 1); the weighted mean of the shifts is added once per round.
    per_round = sum(w * (i + 1) for i, w in enumerate(weights)) / sum(weights)
    return per_round * rounds


@pytest.mark.parametrize("diff", [False, True], ids=["FULL", "DIFF"])
def test_fedavg_aggregates_the_hand_computed_weighted_mean(tmp_path: Path, diff: bool) -> None:
    job = make_job(3, "--diff" if diff else "", final_evaluation=True)
    result = job.simulator_run(tmp_path / "ws")

    shift = expected_shift(3, [1.0, 2.0, 3.0], N_ROUNDS)  # weights: site_index + 1
    initial = keras_like_params()
    assert list(result.params) == ["conv", "pool", "dense"]
    assert result.params["pool"] == []
    for name in ("conv", "dense"):
        for got, start in zip(result.params[name], initial[name], strict=True):
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, start + shift, rtol=1e-6, atol=1e-6)

    saved = load_params(result.global_model)
    np.testing.assert_array_equal(saved["dense"][0], result.params["dense"][0])

    lines = [
        json.loads(x) for x in (result.workspace / "server/metrics.jsonl").read_text().splitlines()
    ]
    assert [x["task"] for x in lines] == ["train", "train", "validate"]
    for record in lines:
        # accuracy of site i in round r is (i + 1) + r; weighted mean with weights 1, 2, 3
        expected = (1 * 1 + 2 * 2 + 3 * 3) / 6 + record["round"]
        assert record["metrics"]["accuracy"] == pytest.approx(expected)
        assert sorted(record["clients"]) == ["site-1", "site-2", "site-3"]
    assert result.final_metrics["accuracy"] == pytest.approx(14 / 6 + N_ROUNDS)
    assert result.best_round == N_ROUNDS  # accuracy grows each round: the final model is best
    assert result.best_model is not None and result.best_model.is_file()
    events = list((result.workspace / "server/tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 100
    for site in ("site-1", "site-2", "site-3"):
        assert (result.workspace / site / "app" / "numpy_client.py").is_file()
        assert (result.workspace / site / "log.txt").is_file()
    assert worker_pids(result.workspace) == []


def test_fewer_threads_than_clients_gives_the_same_result(tmp_path: Path) -> None:
    result = make_job(3, "--weight 2").simulator_run(tmp_path / "ws", threads=1)
    shift = expected_shift(3, [2.0, 2.0, 2.0], N_ROUNDS)
    np.testing.assert_allclose(
        result.params["dense"][1], np.ones(10, np.float32) + shift, rtol=1e-6
    )


def test_n_clients_override(tmp_path: Path) -> None:
    result = make_job(3).simulator_run(tmp_path / "ws", n_clients=1)
    np.testing.assert_array_equal(
        result.params["dense"][1], np.ones(10, np.float32) + 1.0 * N_ROUNDS
    )
    assert not (result.workspace / "site-2").exists()


def test_a_raising_script_fails_the_job_fast_with_its_traceback(tmp_path: Path) -> None:
    job = make_job(2, "--fail-round 1 --only-site 1", num_rounds=5)
    start = time.monotonic()
    with pytest.raises(ClientFailedError) as info:
        job.simulator_run(tmp_path / "ws")
    elapsed = time.monotonic() - start
    text = str(info.value)
    assert "site-2 failed" in text
    assert "ValueError: deliberate failure in round 1" in text
    assert 'numpy_client.py", line' in text
    assert "runpy" not in text  # the worker's own frames are trimmed
    assert elapsed < 30, f"the failure took {elapsed:.1f} s to stop the job"
    ws = tmp_path / "ws"
    assert "deliberate failure in round 1" in (ws / "server/log.txt").read_text()
    assert "deliberate failure in round 1" in (ws / "site-2/log.txt").read_text()
    assert worker_pids(ws) == []


def test_a_killed_client_process_fails_the_job_fast(tmp_path: Path) -> None:
    job = make_job(2, "--kill-round 0 --only-site 0", num_rounds=3)
    start = time.monotonic()
    with pytest.raises(ClientFailedError, match="killed by signal 9"):
        job.simulator_run(tmp_path / "ws")
    assert time.monotonic() - start < 30
    assert worker_pids(tmp_path / "ws") == []


def test_a_script_that_returns_early_fails_the_job(tmp_path: Path) -> None:
    job = make_job(2, "--exit-early 0 --only-site 1", num_rounds=3)
    with pytest.raises(ClientFailedError, match="ended before the job did"):
        job.simulator_run(tmp_path / "ws")
    assert worker_pids(tmp_path / "ws") == []


def test_a_silent_client_is_bounded_by_the_round_timeout(tmp_path: Path) -> None:
    job = make_job(2, "--hang-round 0 --only-site 1", num_rounds=2, round_timeout=3.0)
    start = time.monotonic()
    with pytest.raises(RoundTimeoutError) as info:
        job.simulator_run(tmp_path / "ws")
    assert 3.0 <= time.monotonic() - start < 30
    assert "no answer from: site-2" in str(info.value)
    assert "round_timeout" in str(info.value)
    assert worker_pids(tmp_path / "ws") == []


def test_min_clients_lets_the_round_go_on_without_a_silent_client(tmp_path: Path) -> None:
    job = make_job(
        2,
        "--hang-round 1 --only-site 1",
        num_rounds=2,
        min_clients=1,
        round_timeout=3.0,
        final_evaluation=False,
    )
    result = job.simulator_run(tmp_path / "ws")
    # round 0: both clients (weights 1, 2); round 1: only site-1 (shift 1)
    shift = expected_shift(2, [1.0, 2.0], 1) + 1.0
    np.testing.assert_allclose(result.params["dense"][1], np.ones(10) + shift, rtol=1e-6)
    assert [len(r.clients) for r in result.rounds] == [2, 1]


def test_cli_runs_an_exported_job_and_reports_a_failure(tmp_path: Path) -> None:
    good = make_job(2, final_evaluation=True).export_job(tmp_path / "jobs")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedlift",
            "simulator",
            "-n",
            "2",
            "-t",
            "2",
            "-w",
            str(tmp_path / "ws"),
            str(good),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "round 2/2" in run.stdout and "final model" in run.stdout
    assert "[site-1]" in run.stdout + run.stderr

    bad_job = make_job(2, "--fail-round 0 --only-site 0")
    bad_job.name = "failing-job"
    bad = bad_job.export_job(tmp_path / "jobs")
    run = subprocess.run(
        [sys.executable, "-m", "fedlift", "simulator", "-w", str(tmp_path / "ws2"), str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1
    assert "the job failed because a client failed" in run.stderr
    assert "ValueError: deliberate failure in round 0" in run.stderr
    assert worker_pids(tmp_path / "ws2") == []


def test_cli_rejects_a_folder_that_is_not_a_job(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "fedlift", "simulator", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1
    assert "job.json is missing" in run.stderr
    assert "--export_config" in run.stderr


def test_a_script_run_outside_a_job_says_how_to_run_it() -> None:
    run = subprocess.run(
        [sys.executable, str(SCRIPTS / "numpy_client.py")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0
    assert "found no fedlift job" in run.stderr
    assert "fedlift simulator" in run.stderr


def test_an_in_process_script_runs_in_the_main_thread_and_may_install_signal_handlers(
    tmp_path: Path,
) -> None:
    result = make_job(1, "--signal-handler", num_rounds=1, final_evaluation=True).simulator_run(
        tmp_path / "ws"
    )
    assert result.final_metrics["accuracy"] == pytest.approx(1.0 + 1)
