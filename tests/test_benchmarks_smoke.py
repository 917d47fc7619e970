"""The benchmark cannot rot: every scenario runs at tiny sizes (no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_benchmark_scenario_runs_at_smoke_size(tmp_path: Path) -> None:
    out = tmp_path / "smoke.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert [r["clients"] for r in results] == [2, 2, 8, 2]
    for r in results:
        assert r["median_s"] > 0 and r["peak_rss_mb"] > 0 and r["startup_s"] > 0
    assert "median s" in done.stdout and "floor" in done.stdout
