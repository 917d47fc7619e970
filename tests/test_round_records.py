"""What a run records for its report: each round's sites with their metrics and weights,
the sites left out and why, bytes moved, server memory, the strategy's scalars, and
``run.json`` (what the run was and how it ended). Known answers, computed here by hand."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedlift import FLModel, MetaKey
from fedlift.errors import ClientFailedError
from fedlift.server import FedAdam, FedAvg, FedMedian, Krum, RoundLog
from fedlift.simulator import run_local


def lines(workspace: Path) -> list[dict[str, Any]]:
    path = workspace / "server" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_json(workspace: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((workspace / "server" / "run.json").read_text())
    return data


def weighted_client(fail_in_round: int | None = None, slow: float = 0.0) -> Any:
    """Site i sends w + i with weight i and accuracy i / 10; site-3 fails in
    ``fail_in_round`` (0-based) or sleeps ``slow`` seconds."""

    def client(site: str, model: FLModel) -> FLModel:
        i = int(site.split("-")[1])
        if site == "site-3" and model.current_round == fail_in_round:
            raise ValueError(f"site-3 broke in round {model.current_round}")
        if site == "site-3" and slow:
            time.sleep(slow)
        return FLModel(
            params={"w": np.asarray(model.params["w"]) + i},
            metrics={"accuracy": i / 10},
            meta={MetaKey.NUM_STEPS_CURRENT_ROUND: i},
        )

    return client


W = np.zeros(250, np.float32)  # 1,000 bytes


def test_each_round_records_its_sites_weights_bytes_and_memory(tmp_path: Path) -> None:
    run_local(weighted_client(), {"w": W}, 3, 2, workspace=tmp_path, quiet=True)
    first, second = lines(tmp_path)
    extra = first["extra"]
    assert extra["sites"] == {
        f"site-{i}": {"metrics": {"accuracy": i / 10}, "weight": float(i)} for i in (1, 2, 3)
    }
    assert "left_out" not in extra
    assert extra["bytes_sent"] == 3 * 1000 and extra["bytes_received"] == 3 * 1000
    assert extra["server_rss"] > 0 and extra["server_peak_rss"] >= extra["server_rss"]
    # The global metric is the weighted mean of the sites' (1*.1 + 2*.2 + 3*.3) / 6.
    assert first["metrics"]["accuracy"] == pytest.approx((0.1 + 0.4 + 0.9) / 6)
    assert second["extra"]["sites"].keys() == {"site-1", "site-2", "site-3"}


def test_a_failed_site_is_left_out_with_its_error(tmp_path: Path) -> None:
    run_local(weighted_client(fail_in_round=1), {"w": W}, 3, 2, workspace=tmp_path,
              quiet=True, on_client_error="exclude", min_clients=2)  # fmt: skip
    first, second = lines(tmp_path)
    assert "left_out" not in first["extra"]
    assert sorted(second["extra"]["sites"]) == ["site-1", "site-2"]
    why = second["extra"]["left_out"]["site-3"]
    assert "ValueError: site-3 broke in round 1" in why
    assert second["extra"]["bytes_received"] == 2 * 1000
    # The in-memory records keep no per-site entries (they would grow with rounds x sites).
    info = run_json(tmp_path)
    assert info["state"] == "finished" and info["failure"] is None


def test_a_site_that_does_not_answer_in_time_is_left_out_as_timed_out(tmp_path: Path) -> None:
    run_local(weighted_client(slow=1.5), {"w": W}, 3, 1, workspace=tmp_path, quiet=True,
              min_clients=2, round_timeout=0.5)  # fmt: skip
    (only,) = lines(tmp_path)
    assert "no answer within the round timeout (0.5 s)" in only["extra"]["left_out"]["site-3"]


def test_robust_aggregators_record_the_weights_they_used(tmp_path: Path) -> None:
    run_local(weighted_client(), {"w": W}, 3, 1, workspace=tmp_path / "median", quiet=True,
              strategy=FedAvg(aggregator=FedMedian()))  # fmt: skip
    (median,) = lines(tmp_path / "median")
    assert {s: e["weight"] for s, e in median["extra"]["sites"].items()} == {
        "site-1": 1.0, "site-2": 1.0, "site-3": 1.0
    }  # fmt: skip

    def client(site: str, model: FLModel) -> FLModel:
        shift = {"site-1": 0.0, "site-2": 1.0, "site-3": 1.5, "site-4": 2.8, "site-5": 100.0}
        return FLModel(params={"w": np.asarray(model.params["w"]) + shift[site]},
                       meta={MetaKey.NUM_STEPS_CURRENT_ROUND: 2})  # fmt: skip

    run_local(client, {"w": W}, 5, 1, workspace=tmp_path / "krum", quiet=True,
              strategy=FedAvg(aggregator=Krum(f=1, m=1)))  # fmt: skip
    (krum,) = lines(tmp_path / "krum")
    weights = {s: e["weight"] for s, e in krum["extra"]["sites"].items()}
    # Krum's score of a site: the squared distances to its n - f - 2 = 2 nearest others,
    # per entry: site-1 1 + 2.25, site-2 0.25 + 1, site-3 0.25 + 1.69, site-4 1.69 + 3.24;
    # site-2's is the lowest, so it alone (m=1) is chosen.
    assert weights == {"site-1": 0.0, "site-2": 2.0, "site-3": 0.0, "site-4": 0.0, "site-5": 0.0}


def test_the_strategy_scalars_follow_fedadam(tmp_path: Path) -> None:
    eta, beta_1 = 0.5, 0.9

    def client(site: str, model: FLModel) -> FLModel:
        return FLModel(params={"w": np.asarray(model.params["w"]) + 2.0})

    run_local(client, {"w": np.zeros(4, np.float32)}, 2, 2, workspace=tmp_path, quiet=True,
              strategy=FedAdam(eta=eta, beta_1=beta_1))  # fmt: skip
    first, second = lines(tmp_path)
    # Round 1: delta = 2 in each of 4 entries, m = (1 - beta_1) * delta = 0.2 each,
    # ||m|| = sqrt(4 * 0.2^2) = 0.4.
    assert first["extra"]["strategy"]["eta"] == eta
    assert first["extra"]["strategy"]["momentum_norm"] == pytest.approx(0.4, rel=1e-6)
    assert second["extra"]["strategy"]["momentum_norm"] > 0.4
    # FedAvg's own scalars: its early-stopping counter.
    run_local(client, {"w": W}, 2, 1, workspace=tmp_path / "avg", quiet=True, strategy=FedAvg())
    assert lines(tmp_path / "avg")[0]["extra"]["strategy"] == {"early_stopping.wait": 0.0}


def test_run_json_says_what_the_run_was_and_why_it_failed(tmp_path: Path) -> None:
    with pytest.raises(ClientFailedError) as caught:
        run_local(weighted_client(fail_in_round=0), {"w": W}, 3, 2, workspace=tmp_path,
                  quiet=True, strategy=FedAvg(seed=7))  # fmt: skip
    assert caught.value.site == "site-3"
    info = run_json(tmp_path)
    assert info["format"] == "fedlift.run/1" and info["runner"] == "run_local"
    assert info["state"] == "failed" and info["ended_at"] >= info["started_at"]
    assert info["seed"] == 7 and info["strategy"]["type"] == "fedavg"
    assert info["sites"] == ["site-1", "site-2", "site-3"] and info["num_rounds"] == 2
    assert info["versions"]["numpy"] == np.__version__ and info["versions"]["fedlift"]
    assert info["machine"]["cpus"] >= 1 and info["machine"]["memory_bytes"] > 0
    failure = info["failure"]
    assert failure["site"] == "site-3" and failure["exception"] == "ClientFailedError"
    assert "ValueError: site-3 broke in round 0" in failure["traceback_tail"]
    assert (tmp_path / "server" / "report.html").is_file()


def test_round_log_is_bounded_and_keeps_the_end_of_a_long_reason() -> None:
    noted = RoundLog()
    noted.left_out("site-1", "x" * 10_000 + "the end")
    noted.took("site-2", FLModel(metrics={"loss": 0.5, "note": "text"},
                                 meta={MetaKey.NUM_STEPS_CURRENT_ROUND: 3}))  # fmt: skip
    extra = noted.extra(["site-2"])
    why = extra["left_out"]["site-1"]
    assert why.endswith("the end") and len(why) <= 4003
    assert extra["sites"] == {"site-2": {"metrics": {"loss": 0.5}, "weight": 3.0}}
    assert math.isfinite(extra["bytes_sent"]) and extra["bytes_received"] == 0
