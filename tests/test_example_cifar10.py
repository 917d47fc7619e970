"""The flagship example, as a user runs it (embedded Fashion-MNIST: CIFAR-10 is offline here):
FedAvg learns, FedProx and SCAFFOLD run on label-skewed sites, --algorithm builds every
strategy, --alpha skews the sites' labels."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from fedlift.errors import ConfigError
from fedlift.server import (
    Cyclic,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Mean,
    Scaffold,
)

pytest.importorskip("tensorflow")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "cifar10-tf"
BIN = Path(sys.executable).parent
TINY = "--max_train 200 --max_test 100"


def run(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, FEDLIFT_DATASET="embedded", TF_CPP_MIN_LOG_LEVEL="2")
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def metrics(workspace: Path) -> list[dict[str, Any]]:
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


@pytest.mark.slow  # CI: test_simulator runs exported jobs under the CLI
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


@pytest.mark.slow  # CI: test_external_process and the multi-GPU example launch scripts
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


def site_log(workspace: Path, site: str) -> str:
    return (workspace / site / "log.txt").read_text()


@pytest.mark.slow  # CI: SCAFFOLD covers the helper path; FedProx: test_keras_algorithms
def test_fedprox_on_label_skewed_sites_trains_with_the_servers_mu(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    options = ["--algorithm", "fedprox", "--fedprox_mu", "0.05", "--alpha", "0.5"]
    done = run(
        [sys.executable, "tf_client_api_job.py", *options, "--num_rounds", "2"]
        + ["--script_args", TINY, "--workspace", str(ws)],
        cwd=EXAMPLE,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["task"] for r in metrics(ws)] == ["train", "train", "validate"]
    config = json.loads((ws / "jobs/cifar10_tf_fedprox/job.json").read_text())
    assert config["workflow"]["type"] == "fedprox"
    assert config["workflow"]["mu"] == 0.05
    assert config["runner"]["script_args"] == f"{TINY} --alpha 0.5"
    for site in ("site-1", "site-2"):  # the mu the server sent, in both rounds
        assert site_log(ws, site).count(f"{site}: FedProx mu=0.05, SCAFFOLD: False") == 2


def test_scaffold_on_label_skewed_sites_sends_control_variates(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    done = run(
        [sys.executable, "tf_client_api_job.py", "--algorithm", "scaffold", "--alpha", "0.5"]
        + ["--num_rounds", "2", "--script_args", TINY, "--workspace", str(ws)],
        cwd=EXAMPLE,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["task"] for r in metrics(ws)] == ["train", "train", "validate"]
    config = json.loads((ws / "jobs/cifar10_tf_scaffold/job.json").read_text())
    assert config["workflow"]["type"] == "scaffold"
    # Each round's task carried the server's controls, and the script trained with the
    # correction and sent delta c_i (result_meta() raises when no corrected step ran).
    for site in ("site-1", "site-2"):
        assert site_log(ws, site).count(f"{site}: FedProx mu=0, SCAFFOLD: True") == 2


@pytest.fixture(scope="module")
def job_module() -> Iterator[ModuleType]:
    """tf_client_api_job.py imported in-process: without TensorFlow (TFNet is imported in
    main()), so make_strategy() is tested in milliseconds. sys.path and the environment
    are put back afterwards."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "path", list(sys.path))
        patch.setenv("TF_CPP_MIN_LOG_LEVEL", os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
        spec = importlib.util.spec_from_file_location(
            "tf_client_api_job", EXAMPLE / "tf_client_api_job.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module


def test_make_strategy_builds_every_algorithm(job_module: ModuleType) -> None:
    make = job_module.make_strategy
    assert job_module.ALGORITHMS == (
        "fedavg",
        "fedprox",
        "scaffold",
        "fedopt",
        "fedavgm",
        "fedadam",
        "fedyogi",
        "fedadagrad",
        "cyclic",
        "fedmedian",
        "fedtrimmedavg",
        "krum",
    )
    expected = {
        "fedavg": FedAvg,
        "fedprox": FedProx,
        "scaffold": Scaffold,
        "fedopt": FedAvgM,
        "fedavgm": FedAvgM,
        "fedadam": FedAdam,
        "fedyogi": FedYogi,
        "fedadagrad": FedAdagrad,
        "cyclic": Cyclic,
        "fedmedian": FedAvg,
        "fedtrimmedavg": FedAvg,
        "krum": FedAvg,
    }
    built = {name: make(name, 3, 0.05, None) for name in job_module.ALGORITHMS}
    assert {name: type(s) for name, s in built.items()} == expected
    aggregators = {"fedavg": Mean, "fedmedian": FedMedian, "fedtrimmedavg": FedTrimmedAvg}
    for name, kind in {**aggregators, "krum": Krum}.items():
        assert type(built[name].aggregator) is kind, name
    assert built["fedprox"].mu == 0.05
    assert (built["fedopt"].eta, built["fedopt"].beta_1) == (1.0, 0.6)  # NVFlare's FedOpt
    assert built["fedavgm"].beta_1 == 0.9  # FedAvgM's own default
    assert built["krum"].aggregator.f == 0  # 3 clients tolerate no attacker
    assert make("krum", 5, 0.01, None).aggregator.f == 1


def test_make_strategy_server_lr_sets_eta_of_the_fedopt_family_only(
    job_module: ModuleType,
) -> None:
    make = job_module.make_strategy
    for name in ("fedavgm", "fedadam", "fedyogi", "fedadagrad"):
        assert make(name, 2, 0.01, 0.5).eta == 0.5, name
    fedopt = make("fedopt", 2, 0.01, 0.5)
    assert (fedopt.eta, fedopt.beta_1) == (0.5, 0.6)
    assert type(make("fedprox", 2, 0.01, 0.5)) is FedProx  # no eta: the flag is ignored


def test_make_strategy_refuses_krum_with_two_clients_and_unknown_names(
    job_module: ModuleType,
) -> None:
    with pytest.raises(ConfigError, match="n_clients=2"):
        job_module.make_strategy("krum", 2, 0.01, None)
    with pytest.raises(ConfigError, match="algorithm='fedsgd'"):
        job_module.make_strategy("fedsgd", 2, 0.01, None)


def test_alpha_skews_the_sites_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    """src/tf_data.py: alpha 0.1 gives each site its classes in Dir(0.1) proportions, a
    partition of the training set that every site computes alike; alpha 0 is the IID
    split by site index."""
    monkeypatch.setenv("FEDLIFT_DATASET", "embedded")
    monkeypatch.setattr(sys, "path", [str(EXAMPLE / "src"), *sys.path])
    monkeypatch.delitem(sys.modules, "tf_data", raising=False)
    monkeypatch.delitem(sys.modules, "cifar10_data", raising=False)
    site_data = importlib.import_module("tf_data").site_data

    counts = {}
    for alpha in (0.1, 0.0):
        labels = [site_data(i, 2, alpha=alpha)[0][1].reshape(-1) for i in range(2)]
        counts[alpha] = np.array([np.bincount(y, minlength=10) for y in labels])
        # The same call again (another site's process) gives the same part.
        np.testing.assert_array_equal(site_data(1, 2, alpha=alpha)[0][1].reshape(-1), labels[1])
    for split in counts.values():  # the embedded subset: 600 images of each class
        np.testing.assert_array_equal(split.sum(axis=0), np.full(10, 600))
    skewed, iid = counts[0.1] / 600, counts[0.0] / 600
    assert np.abs(skewed[0] - skewed[1]).max() > 0.8  # some class lies almost all on one site
    assert np.abs(iid[0] - iid[1]).max() < 0.2
    (x, y), (x_test, _) = site_data(0, 2, alpha=0.1, max_train=50, max_test=20)
    assert x.shape == (50, 32, 32, 3) and y.shape == (50, 1) and x_test.shape[0] == 20
