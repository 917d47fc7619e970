"""examples/cifar10-pt as a user runs it (embedded Fashion-MNIST: CIFAR-10 is offline here),
at smoke size: the job learns, every --algorithm runs with its client-side part, --alpha
skews the sites' labels, the exported job runs under the CLI, and the DDP scripts train
under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "cifar10-pt"
TF_EXAMPLE = ROOT / "examples" / "cifar10-tf"
BIN = Path(sys.executable).parent
TINY = "--max_train 300 --max_test 200"


def run(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, FEDLIFT_DATASET="embedded")
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def job(*options: str, workspace: Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "pt_client_api_job.py", *options, "--workspace", str(workspace)]
    return run(argv, EXAMPLE)


def metrics(workspace: Path) -> list[dict[str, Any]]:
    lines = (workspace / "server" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def site_log(workspace: Path, site: str = "site-1") -> str:
    return (workspace / site / "log.txt").read_text()


def test_the_job_trains_two_clients_and_the_global_model_improves(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    smoke = "--max_train 1500 --max_test 500"
    done = job("--num_rounds", "2", "--script_args", smoke, workspace=ws)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "using the embedded Fashion-MNIST subset" in done.stdout + done.stderr
    records = metrics(ws)
    assert [r["task"] for r in records] == ["train", "train", "validate"]
    round0 = records[0]["metrics"]["accuracy"]  # the untrained initial model
    final = records[-1]["metrics"]["accuracy"]  # the global model after round 2
    assert final > round0 + 0.3, (round0, final)
    assert final > 0.5
    assert (ws / "server/models/global_model.safetensors").is_file()
    for site in ("site-1", "site-2"):
        assert f"{site}: round 1" in site_log(ws, site)
        assert f"{site}: FedProx mu=0, SCAFFOLD: False" in site_log(ws, site)


@pytest.mark.slow  # CI: the exported SCAFFOLD job; PTFedProxLoss: test_pytorch_helpers
def test_fedprox_on_label_skewed_sites_uses_the_servers_mu(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    options = ["--algorithm", "fedprox", "--fedprox_mu", "0.05", "--alpha", "0.5"]
    done = job(*options, "--num_rounds", "1", "--script_args", TINY, workspace=ws)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "site-1: FedProx mu=0.05, SCAFFOLD: False" in site_log(ws)
    config = json.loads((ws / "jobs/cifar10_pt_fedprox/job.json").read_text())
    assert config["workflow"]["type"] == "fedprox"
    assert "--alpha 0.5" in config["runner"]["script_args"]


@pytest.mark.slow  # CI: the job script run and the TF export via the CLI
def test_the_exported_scaffold_job_runs_under_the_fedlift_cli(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    exported = run(
        [
            sys.executable,
            "pt_client_api_job.py",
            "--algorithm",
            "scaffold",
            "--export_config",
            "--job_root",
            str(jobs),
            "--num_rounds",
            "1",
            "--script_args",
            TINY,
        ],
        EXAMPLE,
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    folder = jobs / "cifar10_pt_scaffold"
    config = json.loads((folder / "job.json").read_text())
    assert config["runner"]["script"] == "src/cifar10_pt_fl.py"
    assert config["runner"]["framework"] == "pytorch"
    assert config["workflow"]["type"] == "scaffold"
    assert (folder / "initial_model.safetensors").is_file()
    assert (folder / "app/src/pt_net.py").is_file() and (folder / "app/data").is_dir()

    ws = tmp_path / "ws"
    done = run(["fedlift", "simulator", "-n", "2", "-w", str(ws), str(folder)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["task"] for r in metrics(ws)] == ["train", "validate"]
    assert "site-2: FedProx mu=0, SCAFFOLD: True" in site_log(ws, "site-2")


def test_the_sites_label_skew_follows_alpha() -> None:
    """--alpha 0.1: each site's classes in Dir(0.1) proportions, a partition of the
    training set; the IID split gives every site every class about equally."""
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(EXAMPLE / 'src')!r})\n"
        "from pt_data import site_datasets\n"
        "out = {}\n"
        "for alpha in (0.1, 0.0):\n"
        "    sets = [site_datasets(i, 2, alpha=alpha)[0] for i in range(2)]\n"
        "    out[str(alpha)] = [s.tensors[1].bincount(minlength=10).tolist() for s in sets]\n"
        "print(json.dumps(out))\n"
    )
    done = run([sys.executable, "-c", code], EXAMPLE)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = {k: np.array(v) for k, v in json.loads(done.stdout.splitlines()[-1]).items()}
    for split in counts.values():
        np.testing.assert_array_equal(split.sum(axis=0), np.full(10, 600))  # all, once
    skewed, iid = counts["0.1"] / 600, counts["0.0"] / 600
    assert np.abs(skewed[0] - skewed[1]).max() > 0.8  # some class lies almost all on one site
    assert np.abs(iid[0] - iid[1]).max() < 0.2


def test_the_data_files_are_cifar10_tfs() -> None:
    """The loader and the embedded data are cifar10-tf's, byte for byte (git stores each
    once): a fix to one must reach the other."""
    for name in ("src/cifar10_data.py", "data/fashion_mnist_subset.npz", "prepare_data.sh"):
        assert (EXAMPLE / name).read_bytes() == (TF_EXAMPLE / name).read_bytes(), name


@pytest.mark.slow
@pytest.mark.parametrize(
    "algorithm",
    [
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
    ],
)
def test_every_algorithm_runs(tmp_path: Path, algorithm: str) -> None:
    n = "3" if algorithm == "krum" else "2"
    done = job(
        "--algorithm",
        algorithm,
        "--n_clients",
        n,
        "--num_rounds",
        "2",
        "--script_args",
        TINY,
        workspace=tmp_path / "ws",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["task"] for r in metrics(tmp_path / "ws")] == ["train", "train", "validate"]


@pytest.mark.slow
def test_the_ddp_fl_script_runs_two_torchrun_ranks_per_site(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    done = job(
        "--script",
        "src/cifar10_pt_ddp_fl.py",
        "--command",
        "torchrun --nproc_per_node=2",
        "--algorithm",
        "scaffold",
        "--num_rounds",
        "2",
        "--script_args",
        "--max_train 1000 --max_test 300",
        workspace=ws,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    records = metrics(ws)
    assert [r["task"] for r in records] == ["train", "train", "validate"]
    assert records[-1]["metrics"]["accuracy"] > records[0]["metrics"]["accuracy"] + 0.2
    for site in ("site-1", "site-2"):
        log = site_log(ws, site)
        assert "rank 0 of 2 on cpu" in log and "rank 1 of 2 on cpu" in log


@pytest.mark.slow
def test_the_centralised_scripts_train_and_save_weights(tmp_path: Path) -> None:
    args = ["--epochs", "1", "--max_train", "600", "--max_test", "200"]
    plain = run([sys.executable, str(EXAMPLE / "src/cifar10_pt_original.py"), *args], tmp_path)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert "Test accuracy" in plain.stdout
    assert (tmp_path / "pt_model.safetensors").stat().st_size > 100_000
    ddp_dir = tmp_path / "ddp"
    ddp_dir.mkdir()
    script = str(EXAMPLE / "src/cifar10_pt_ddp_original.py")
    ddp = run(["torchrun", "--nproc_per_node=2", script, *args], ddp_dir)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "Test accuracy" in ddp.stdout and "rank 1 of 2" in ddp.stdout
    assert (ddp_dir / "pt_model.safetensors").is_file()
