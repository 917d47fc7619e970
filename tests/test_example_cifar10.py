"""The flagship example, as a user runs it (embedded Fashion-MNIST: CIFAR-10 is offline here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tensorflow")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "cifar10-tf"
BIN = Path(sys.executable).parent


def run(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, FEDLIFT_DATASET="embedded", TF_CPP_MIN_LOG_LEVEL="2")
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def metrics(workspace: Path) -> list[dict[str, object]]:
    lines = (workspace / "server" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_job_script_trains_two_clients_and_the_global_model_improves(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    done = run(
        [
            sys.executable,
            "tf_client_api_job.py",
            "--script",
            "src/cifar10_tf_fl.py",
            "--n_clients",
            "2",
            "--num_rounds",
            "2",
            "--workspace",
            str(ws),
        ],
        cwd=EXAMPLE,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "using the embedded Fashion-MNIST subset" in done.stdout + done.stderr
    records = metrics(ws)
    assert [r["task"] for r in records] == ["train", "train", "validate"]
    round0 = records[0]["metrics"]["accuracy"]  # the untrained initial model
    final = records[-1]["metrics"]["accuracy"]  # the global model after round 2
    assert final > round0 + 0.3, (round0, final)
    assert final > 0.6
    assert (ws / "server/models/global_model.weights.h5").is_file()
    assert (ws / "server/models/best_model.weights.h5").is_file()
    assert list((ws / "server/tensorboard").glob("events.out.tfevents.*"))
    # Each site trained on its own half of the data (IID split by site index).
    for site in ("site-1", "site-2"):
        log = (ws / site / "log.txt").read_text()
        assert f"{site}: round 1" in log


def test_exported_job_runs_under_the_fedlift_cli(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    exported = run(
        [
            sys.executable,
            "tf_client_api_job.py",
            "--export_config",
            "--job_root",
            str(jobs),
            "--num_rounds",
            "1",
            "--script_args",
            "--max_train 600 --max_test 200",
        ],
        cwd=EXAMPLE,
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    job = jobs / "cifar10_tf_fedavg"
    config = json.loads((job / "job.json").read_text())
    assert config["runner"]["script"] == "src/cifar10_tf_fl.py"
    assert config["workflow"]["num_rounds"] == 1
    assert (job / "app/src/tf_net.py").is_file() and (job / "app/data").is_dir()
    assert (job / "initial_model.keras").is_file()

    ws = tmp_path / "ws"
    done = run(["fedlift", "simulator", "-n", "2", "-t", "2", "-w", str(ws), str(job)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "round 1/1" in done.stdout
    assert [r["task"] for r in metrics(ws)] == ["train", "validate"]


def test_launch_process_runs_the_script_as_a_subprocess_per_client(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    done = run(
        [
            sys.executable,
            "tf_client_api_job.py",
            "--launch_process",
            "--num_rounds",
            "1",
            "--script_args",
            "--max_train 400 --max_test 100",
            "--workspace",
            str(ws),
        ],
        cwd=EXAMPLE,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["task"] for r in metrics(ws)] == ["train", "validate"]
    for site in ("site-1", "site-2"):
        log = (ws / site / "log.txt").read_text()
        assert "launched" in log and "cifar10_tf_fl.py" in log


def test_the_centralised_script_trains_and_saves_weights(tmp_path: Path) -> None:
    done = run(
        [
            sys.executable,
            str(EXAMPLE / "src/cifar10_tf_original.py"),
            "--epochs",
            "1",
            "--max_train",
            "600",
            "--max_test",
            "200",
        ],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Test accuracy" in done.stdout
    assert (tmp_path / "tf_model.weights.h5").stat().st_size > 100_000
