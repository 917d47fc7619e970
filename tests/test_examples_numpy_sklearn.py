"""examples/hello-numpy and examples/sklearn, run as a user runs them (the job script), at
smoke size: each learns (the global model after the last round beats the first round's)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedlift.model import load_safetensors

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
HELLO_NUMPY = EXAMPLES / "hello-numpy"
SKLEARN = EXAMPLES / "sklearn"


def run(example: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "job.py", *args],
        cwd=example,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def records(workspace: Path) -> list[dict[str, Any]]:
    lines = (workspace / "server" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def hello_numpy_client() -> Any:
    """The example's client module (its data and evaluate()), loaded without running it."""
    spec = importlib.util.spec_from_file_location("hello_numpy_client", HELLO_NUMPY / "client.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hello_numpy_learns_and_trains_only_the_rounds_asked(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    done = run(HELLO_NUMPY, "--num_rounds", "3", "--workspace", str(ws))
    assert done.returncode == 0, done.stderr[-3000:]
    rounds = records(ws)
    # The client never checks is_evaluate() (as NVFlare's hello-numpy): no final validate task
    assert [r["task"] for r in rounds] == ["train", "train", "train"]
    first = rounds[0]["metrics"]["accuracy"]  # the all-zero initial model
    assert first < 0.6
    assert rounds[-1]["metrics"]["accuracy"] > first + 0.3

    final = load_safetensors(ws / "server" / "models" / "global_model.safetensors")
    assert list(final) == ["numpy_key"] and final["numpy_key"].dtype == np.float32
    client = hello_numpy_client()
    for site_index in (0, 1):
        _, _, x_test, y_test = client.load_data(site_index)
        assert client.evaluate(final["numpy_key"], x_test, y_test)["accuracy"] > first + 0.3


def test_hello_numpy_diff_updates_give_the_same_global_model(tmp_path: Path) -> None:
    """FedAvg of the weights equals the global model plus FedAvg of the changes."""
    models = {}
    for kind in ("full", "diff"):
        ws = tmp_path / kind
        done = run(HELLO_NUMPY, "--num_rounds", "2", "--update_type", kind, "--workspace", str(ws))
        assert done.returncode == 0, done.stderr[-3000:]
        models[kind] = load_safetensors(ws / "server/models/global_model.safetensors")["numpy_key"]
    assert not np.allclose(models["full"], 0.0)
    np.testing.assert_allclose(models["diff"], models["full"], rtol=1e-5, atol=1e-6)


def test_hello_numpy_exports_its_list_initial_model_as_numpy_key(tmp_path: Path) -> None:
    done = run(HELLO_NUMPY, "--export_config", "--job_root", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    job = tmp_path / "hello-numpy"
    initial = load_safetensors(job / "initial_model.safetensors")
    np.testing.assert_array_equal(initial["numpy_key"], np.zeros(9, np.float32))
    assert initial["numpy_key"].dtype == np.float32
    config = json.loads((job / "job.json").read_text())
    assert config["runner"]["framework"] == "numpy"
    assert config["workflow"]["final_evaluation"] is False


def test_sklearn_learns_with_warm_start_and_evaluates_the_final_model(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    ws = tmp_path / "ws"
    done = run(SKLEARN, "--num_rounds", "2", "--workspace", str(ws))
    assert done.returncode == 0, done.stderr[-3000:]
    rounds = records(ws)
    # final_evaluation=True: the client answers the last task with metrics only
    assert [r["task"] for r in rounds] == ["train", "train", "validate"]
    first = rounds[0]["metrics"]["accuracy"]  # all-zero coef_: every digit predicted as 0
    assert first < 0.2
    final = rounds[-1]["metrics"]["accuracy"]  # the global model after the last round
    assert final > first + 0.6
    assert "final accuracy: " in done.stdout
    model = load_safetensors(ws / "server" / "models" / "global_model.safetensors")
    assert model["coef"].shape == (10, 64) and model["intercept"].shape == (10,)
    assert model["coef"].dtype == np.float64  # scikit-learn's own dtype, kept
    config = json.loads((ws / "jobs" / "sklearn-sgd" / "job.json").read_text())
    assert config["runner"]["framework"] == "raw"
