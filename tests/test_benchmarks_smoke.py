"""The benchmark cannot rot: every scenario runs at tiny sizes (no timing asserted)."""

from __future__ import annotations

import json
import os
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


def test_strategy_and_diff_modes_run_at_smoke_size(tmp_path: Path) -> None:
    """``--strategy all --diff``: every strategy against FedAvg, DIFF against FULL.

    A robust aggregator that is not registered in this tree is skipped with its reason;
    SCAFFOLD may fail only because the wire cannot yet carry its meta arrays (any other
    failure, or a missing strategy, fails the test).
    """
    from fedlift.server import AGGREGATORS

    out = tmp_path / "modes.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--strategy", "all", "--diff",
         "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    ran = {r["strategy"]: r for r in report["results"] if r["mode"] == "strategy"}
    skipped = {s["strategy"]: s["why"] for s in report["skipped"]}
    robust = ["fedmedian", "fedtrimmedavg", "krum"]
    always = ["fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm", "cyclic"]
    assert sorted(ran) == sorted(
        always
        + [n for n in robust if n in AGGREGATORS]
        + (["scaffold"] if "scaffold" in ran else [])
    ), (ran, skipped)
    for name in robust:
        if name not in AGGREGATORS:
            assert "not registered" in skipped[name]
    if "scaffold" not in ran:
        assert "not JSON-serialisable" in skipped["scaffold"], skipped["scaffold"][-500:]
    assert ran["fedavg"]["ratio_s"] == 1.0 and ran["fedadam"]["target_ratio_s"] == 1.3
    for r in ran.values():
        assert r["clients"] == 5 and r["median_s"] > 0 and r["peak_pss_mb"] > 0
    diff = [r for r in report["results"] if r["mode"] == "diff"]
    assert [(r["params_type"], r["clients"]) for r in diff] == [("FULL", 2), ("DIFF", 2)]
    assert diff[1]["target_ratio_s"] == 1.1 and diff[1]["median_s"] > 0
    assert "ratios to fedavg" in done.stdout and "ratios to FULL" in done.stdout


def test_the_compression_benchmark_runs_at_smoke_size(tmp_path: Path) -> None:
    """``python -m benchmarks.compression --smoke``: the Keras example, int8 results, 1 round."""
    out = tmp_path / "compression.json"
    done = _bench("benchmarks.compression", "--smoke", "--json", str(out))
    (row,) = json.loads(out.read_text())
    assert row["setting"] == "int8" and 10 < row["accuracy"] <= 100
    assert 3.8 < row["result_ratio"] < 4.0  # 1 + 4/256 bytes a value instead of 4
    assert "vs none" in done.stdout


def test_the_wire_benchmark_runs_at_smoke_size(tmp_path: Path) -> None:
    """``python -m benchmarks --wire --smoke``: the three floors, both gRPC variants, and
    (as root) the mTLS deployment across two network namespaces."""
    out = tmp_path / "wire.json"
    done = _bench("benchmarks", "--wire", "--smoke", "--json", str(out))
    rows = json.loads(out.read_text())["wire"]
    deployed = ["mTLS deployment, netns"] if os.geteuid() == 0 else []
    assert [r["variant"] for r in rows] == ["gRPC", "gRPC, int8 results", *deployed]
    for r in rows:
        assert r["s_per_round"] > 0 and r["tcp_floor_s"] > 0 and r["tls_floor_s"] > 0
        assert r["grpc_floor_s"] > 0
    assert all(r["server_peak_pss_mb"] > 0 for r in rows[:2])
    assert "x TCP" in done.stdout and "x gRPC" in done.stdout


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m MODULE ARGS`` from the repository root; fails the test if it fails."""
    done = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_the_slow_link_benchmark_runs_at_smoke_size(tmp_path: Path) -> None:
    """``python -m benchmarks.slow_link --smoke``: a deployment across two namespaces."""
    import os

    import pytest

    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    out = tmp_path / "slow.json"
    done = _bench("benchmarks.slow_link", "--smoke", "--json", str(out))
    (row,) = json.loads(out.read_text())
    assert len(row["rounds"]) == 2 and all(s > 0 for s in row["rounds"])
    assert row["floor_s"] > 0 and "x floor" in done.stdout
