"""``--tf-job --peers`` cannot rot: the peers get fedlift's samples and never import fedlift.

The full comparison takes minutes (``python -m benchmarks --tf-job --peers``); these checks
take seconds. The one that runs the peers' scripts is skipped when their venvs are absent.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from benchmarks import tf_job
from benchmarks.peers.venvs import VENVS, python_of

ROOT = Path(__file__).resolve().parents[1]
PEER_FILES = sorted((ROOT / "benchmarks" / "peers").glob("tf_[nf]*.py"))


def test_exported_sites_are_what_the_federated_script_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))  # export_sites adds the example's src/
    tf_job.export_sites(tmp_path)
    from tf_data import site_data  # on sys.path after export_sites

    with tf_job._embedded():
        for index in range(tf_job.CLIENTS):
            (x_train, y_train), (x_test, y_test) = site_data(
                index, tf_job.CLIENTS, max_train=tf_job.MAX_TRAIN, max_test=tf_job.MAX_TEST
            )
            with np.load(tmp_path / f"site-{index + 1}.npz") as npz:
                assert np.array_equal(npz["x_train"], x_train)
                assert np.array_equal(npz["y_train"], y_train)
                assert np.array_equal(npz["x_test"], x_test)
                assert np.array_equal(npz["y_test"], y_test)
            assert len(x_train) == tf_job.MAX_TRAIN and len(x_test) == tf_job.MAX_TEST
    with np.load(tmp_path / "site-1.npz") as one, np.load(tmp_path / "site-2.npz") as two:
        assert not np.array_equal(one["x_train"], two["x_train"])  # each site its own shard


def test_peer_scripts_never_import_fedlift() -> None:
    assert {p.name for p in PEER_FILES} >= {
        "tf_nvflare_job.py",
        "tf_nvflare_client.py",
        "tf_nvflare_ctl.py",
        "tf_flower_app.py",
        "tf_flower_state.py",
    }
    for path in PEER_FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] in ("fedlift", "benchmarks") for n in names), path


@pytest.mark.parametrize(
    ("venv", "script"), [("nvflare-tf", "tf_nvflare_job.py"), ("flower-tf", "tf_flower_app.py")]
)
def test_peer_scripts_start_in_their_venvs(venv: str, script: str) -> None:
    python = python_of(VENVS / venv)
    if not python.exists():
        pytest.skip(f"{VENVS / venv} absent (python -m benchmarks --tf-job --peers makes it)")
    done = subprocess.run(
        [str(python), str(ROOT / "benchmarks" / "peers" / script), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--data" in done.stdout and "--out" in done.stdout
