"""The multi-GPU (MirroredStrategy) cifar10-tf scripts, on logical CPU devices.

No GPU is needed: ``--cpu_replicas N`` splits the CPU into N logical devices, so the
strategy really runs N replicas. GPUs are hidden so the CPU path is tested everywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("tensorflow")

EXAMPLE_SRC = Path(__file__).resolve().parents[1] / "examples" / "cifar10-tf" / "src"


def run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = dict(
        os.environ,
        FEDLIFT_DATASET="embedded",
        TF_CPP_MIN_LOG_LEVEL="2",
        CUDA_VISIBLE_DEVICES="",  # the CPU path even on a GPU machine
        PYTHONPATH=os.pathsep.join(filter(None, [str(EXAMPLE_SRC), os.environ.get("PYTHONPATH")])),
    )
    env.pop("FEDLIFT_CPU_REPLICAS", None)
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_centralised_multi_gpu_script_trains_on_two_cpu_replicas(tmp_path: Path) -> None:
    done = run(
        [
            sys.executable,
            str(EXAMPLE_SRC / "cifar10_tf_multi_gpu_original.py"),
            "--cpu_replicas",
            "2",
            "--epochs",
            "1",
            "--max_train",
            "256",
            "--max_test",
            "64",
        ],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Number of replicas in sync: 2" in done.stdout
    assert "Test accuracy:" in done.stdout
    assert (tmp_path / "tf_model.weights.h5").is_file()


def test_make_strategy_splits_the_cpu_and_refuses_a_late_resplit(tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import os
        from multi_gpu import make_strategy

        strategy = make_strategy(cpu_replicas=3)
        print("replicas", strategy.num_replicas_in_sync)
        os.environ["FEDLIFT_CPU_REPLICAS"] = "3"  # same split again: reused
        print("again", make_strategy().num_replicas_in_sync)
        try:
            make_strategy(cpu_replicas=2)  # TF's devices are fixed by now
        except RuntimeError as exc:
            print("error", exc)
        """
    )
    done = run([sys.executable, "-c", code], cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "replicas 3" in lines
    assert "again 3" in lines
    assert "call make_strategy() before any TensorFlow op" in done.stdout


@pytest.mark.slow  # CI: the centralised 2-replica run and test_external_process
def test_multi_gpu_fl_script_runs_as_an_external_process_with_two_replicas(
    tmp_path: Path,
) -> None:
    """The seed's multi-GPU flow on CPU replicas: --launch_process, 2 clients, 2 rounds."""
    ws = tmp_path / "ws"
    done = run(
        [
            sys.executable,
            str(EXAMPLE_SRC.parent / "tf_client_api_job.py"),
            "--script",
            "src/cifar10_tf_multi_gpu_fl.py",
            "--launch_process",
            "--num_rounds",
            "2",
            "--script_args",
            "--cpu_replicas 2 --max_train 512 --max_test 128",
            "--workspace",
            str(ws),
        ],
        cwd=EXAMPLE_SRC.parent,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (ws / "server" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["task"] for x in lines] == ["train", "train", "validate"]
    for site in ("site-1", "site-2"):
        log = (ws / site / "log.txt").read_text()
        assert "Number of replicas in sync: 2" in log
        assert "launched" in log and "cifar10_tf_multi_gpu_fl.py" in log
