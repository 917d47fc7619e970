"""GPU placement: what each client's environment gets from -gpu, checked without GPUs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import SCRIPTS
from fedlift import FedAvgJob, ScriptRunner
from fedlift.errors import ConfigError
from fedlift.simulator import _gpu, check_gpu_ids, site_environment


def test_site_environment_sets_the_group_and_tf_memory_growth() -> None:
    env = site_environment(["0", "1"], base={"PATH": "/bin"})
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert env["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"
    assert env["PATH"] == "/bin"


def test_site_environment_keeps_the_users_choices() -> None:
    env = site_environment(
        None, base={"TF_FORCE_GPU_ALLOW_GROWTH": "false", "CUDA_VISIBLE_DEVICES": "3"}
    )
    assert env["TF_FORCE_GPU_ALLOW_GROWTH"] == "false"
    assert env["CUDA_VISIBLE_DEVICES"] == "3"  # no -gpu: the user's own setting stays


def test_unknown_gpu_ids_are_refused_with_the_ids_that_exist() -> None:
    with pytest.raises(ConfigError, match=r"GPU 2, 7 but this machine has GPU ids 0,1"):
        check_gpu_ids([["0", "2"], ["7"]], ["0", "1"])
    check_gpu_ids([["0"], ["0"]], ["0"])  # two clients on one GPU is fine
    check_gpu_ids([["5"]], None)  # no nvidia-smi: cannot check, passes through


def make_job(n: int, launch: bool) -> FedAvgJob:
    job = FedAvgJob("gpu", n, 1, {"w": np.zeros(2)}, final_evaluation=False)
    job.to_clients(
        ScriptRunner(
            SCRIPTS / "numpy_client.py",
            script_args="--record",
            launch_external_process=launch,
            framework="numpy",
        )
    )
    return job


@pytest.mark.parametrize("launch", [False, True], ids=["in-process", "external"])
def test_each_client_and_its_script_see_their_gpu_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, launch: bool
) -> None:
    monkeypatch.setattr(_gpu, "available_gpus", lambda: ["0", "1", "2"])
    ws = tmp_path / "ws"
    make_job(3, launch).simulator_run(ws, gpu="[0,1],[2]")
    seen = {
        site: (ws / site / "rounds.txt").read_text().split()[4]
        for site in ("site-1", "site-2", "site-3")
    }
    assert seen == {"site-1": "0,1", "site-2": "2", "site-3": "0,1"}


def test_simulator_refuses_bad_gpu_specs_before_starting_clients(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_gpu, "available_gpus", lambda: ["0"])
    job = make_job(2, False)
    with pytest.raises(ConfigError, match="GPU 1 but this machine has GPU ids 0"):
        job.simulator_run(tmp_path / "a", gpu="0,1")
    with pytest.raises(ConfigError, match="3 GPU groups but the job has only 2 clients"):
        job.simulator_run(tmp_path / "b", gpu="0,0,0")
    with pytest.raises(ConfigError, match="malformed"):
        job.simulator_run(tmp_path / "c", gpu="[0,1")
    assert not (tmp_path / "a" / "site-1").exists()
