"""The NIID-Bench reproduction's every row runs and learns, on a tiny schedule (the table
itself is a benchmark: ``python -m benchmarks.niid_bench``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed (make data)",
)


def test_every_row_runs_and_learns(tmp_path: Path) -> None:
    pytest.importorskip("torch")  # the table's backend (NIID-Bench's own framework)
    out = tmp_path / "niid.json"
    rows = "fedavg-iid,fedavg-dir0.5,fedprox-dir0.5,scaffold-dir0.5,fedavg-c2"
    subprocess.run(
        [sys.executable, "-m", "benchmarks.niid_bench", "--backend", "torch", "--rows", rows,
         "--rounds", "3", "--epochs", "2", "--subset", "8000", "--clients", "4",
         "--json", str(out)],
        cwd=ROOT, check=True, timeout=600, capture_output=True,
    )  # fmt: skip
    results = json.loads(out.read_text())
    assert [r["row"] for r in results] == rows.split(",")
    for r in results:
        start, end = r["curve"][0], r["curve"][-1]
        # Ten classes: the untrained model is at chance; a few rounds must move it well off.
        assert start < 0.2 and end > start + 0.04, r
        assert r["measured"] == pytest.approx(100 * end, abs=0.01)
