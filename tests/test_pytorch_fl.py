"""PyTorch jobs end to end in the simulator: a script in the style of NVFlare's hello-pt,
``FedAvgJob(initial_model=nn.Module)`` and ``ScriptRunner(framework="pytorch")``; FULL,
DIFF and bfloat16 models learn. The server needs neither PyTorch nor TensorFlow: jobs run
with those imports blocked in the server's process (its clients import what they use).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")

import ml_dtypes
import torch

from conftest import SCRIPTS
from fedlift import FedAvgJob, ScriptRunner
from fedlift.model import load_safetensors

sys.path.insert(0, str(SCRIPTS))
from torch_common import Net, write_digits

BLOCKED = ("torch", "tensorflow", "keras")

SERVER_WITHOUT_FRAMEWORKS = f"""
import json, sys
BLOCKED = {BLOCKED!r}
for name in BLOCKED:
    sys.modules[name] = None  # `import torch` (and torch.*) raises ImportError here
from fedlift.simulator import run_simulator
result = run_simulator(sys.argv[1], sys.argv[2], quiet=True)
loaded = [m for m, v in sys.modules.items() if v is not None and m.split(".")[0] in BLOCKED]
accuracy = [r.metrics.get("accuracy") for r in result.rounds]
final = str(result.global_model)
print(json.dumps({{"loaded": loaded, "accuracy": accuracy, "global_model": final}}))
"""


@pytest.fixture
def digits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """scikit-learn's digits on disk; the clients (worker processes) find them by env."""
    path = tmp_path / "digits.npz"
    write_digits(path)
    monkeypatch.setenv("FEDLIFT_TEST_DIGITS", str(path))
    return path


def pytorch_job(
    name: str, rounds: int, *, bf16: bool = False, diff: bool = False, external: bool = False
) -> FedAvgJob:
    torch.manual_seed(0)
    net = Net().to(torch.bfloat16) if bf16 else Net()
    job = FedAvgJob(name, n_clients=2, num_rounds=rounds, initial_model=net)
    runner = ScriptRunner(  # framework: "pytorch", the nn.Module's (NVFlare's default)
        SCRIPTS / "torch_client.py",
        script_args="--diff" if diff else "",
        launch_external_process=external,
    )
    job.to_clients(runner)
    return job


def run_without_frameworks(job_dir: Path, workspace: Path) -> dict[str, Any]:
    """The simulator (the server) in a process where torch, tensorflow and keras cannot be
    imported; its clients are worker processes of their own."""
    done = subprocess.run(
        [sys.executable, "-c", SERVER_WITHOUT_FRAMEWORKS, str(job_dir), str(workspace)],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def learned(accuracy: list[float]) -> None:
    """Round 0 evaluates the untrained model; the final evaluation the trained one."""
    assert accuracy[0] < 0.2, accuracy
    assert accuracy[-1] > 0.8, accuracy


def test_pytorch_job_learns_on_a_server_without_pytorch_or_tensorflow(
    tmp_path: Path, digits: Path
) -> None:
    job_dir = pytorch_job("hello-pt", rounds=2).export_job(tmp_path / "jobs")
    out = run_without_frameworks(job_dir, tmp_path / "ws")
    assert out["loaded"] == []
    learned(out["accuracy"])
    assert len(out["accuracy"]) == 3  # two rounds and the final evaluation
    final = load_safetensors(Path(out["global_model"]))
    assert list(final) == list(Net().state_dict())  # what load_state_dict takes back
    assert final["bn.num_batches_tracked"].dtype == np.int64
    assert int(final["bn.num_batches_tracked"]) > 0  # BatchNorm's counter was averaged
    model = Net()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in final.items()})


CASES = [(False, True), (True, False), (True, True)]


@pytest.mark.slow
@pytest.mark.parametrize(("bf16", "diff"), CASES, ids=["DIFF", "bf16", "bf16-DIFF"])
def test_diff_and_bfloat16_jobs_learn(tmp_path: Path, digits: Path, bf16: bool, diff: bool) -> None:
    """In CI their parts run without processes (test_pytorch_params.py: DIFFs of tensors,
    bfloat16 on the wire, its mean and its DIFF update)."""
    result = pytorch_job("pt-case", rounds=2, bf16=bf16, diff=diff).simulator_run(tmp_path / "ws")
    accuracy = [r.metrics["accuracy"] for r in result.rounds]
    learned(accuracy)
    assert accuracy[1] > 0.8  # after one round already
    expected = np.dtype(ml_dtypes.bfloat16) if bf16 else np.dtype(np.float32)
    assert result.params["fc2.weight"].dtype == expected
    assert result.params["bn.num_batches_tracked"].dtype == np.int64


@pytest.mark.slow
def test_an_external_process_script_receives_tensors_too(tmp_path: Path, digits: Path) -> None:
    """The script's own process learns the framework from the worker (``hello``)."""
    result = pytorch_job("pt-external", rounds=1, external=True).simulator_run(tmp_path / "ws")
    learned([r.metrics["accuracy"] for r in result.rounds])


@pytest.mark.slow
def test_keras_job_runs_on_a_server_without_tensorflow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Keras job's server runs from the params tree exported beside the .keras file
    and writes .safetensors global models (layer name -> weights)."""
    pytest.importorskip("tensorflow")
    from keras_common import DATA, build_model

    monkeypatch.setenv("FEDLIFT_TEST_FASHION", str(DATA))  # the clients' copy finds it

    job = FedAvgJob("keras-no-tf", n_clients=2, num_rounds=1, initial_model=build_model())
    job.to_clients(ScriptRunner(SCRIPTS / "keras_client.py"))
    out = run_without_frameworks(job.export_job(tmp_path / "jobs"), tmp_path / "ws")
    assert out["loaded"] == []
    accuracy = out["accuracy"]
    assert accuracy[0] < 0.3 < accuracy[-1], accuracy
    final = load_safetensors(Path(out["global_model"]))
    assert sorted(final) == ["conv", "flat", "out", "pool"]
    assert final["out"][0].shape == (1352, 10)


def test_a_keras_job_folder_loads_on_a_server_without_keras(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reduced form of the test above: what the server reads of a Keras job when Keras
    cannot be imported (the same weights, by layer), and the error when that file is gone."""
    pytest.importorskip("tensorflow")
    from keras_common import build_model

    from fedlift.errors import ConfigError
    from fedlift.server import ArraysFormat, load_initial_model

    model = build_model()
    job = FedAvgJob("keras-folder", n_clients=1, num_rounds=1, initial_model=model)
    job.to_clients(ScriptRunner(SCRIPTS / "keras_client.py"))
    folder = job.export_job(tmp_path / "jobs")
    monkeypatch.setitem(sys.modules, "keras", None)  # `import keras` raises ImportError
    model_format, params = load_initial_model(folder / "initial_model.keras")
    assert isinstance(model_format, ArraysFormat)
    assert list(params) == [layer.name for layer in model.layers]
    for got, want in zip(params["out"], model.get_layer("out").get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)
    (folder / "initial_model.params.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"Keras cannot be imported.*export the job again"):
        load_initial_model(folder / "initial_model.keras")
