"""The report of a real run, as a browser shows it: the numbers it embeds are the run's
``metrics.jsonl``, and each drawn line's path, as the browser parsed it, is those numbers.

``FEDLIFT_REPORT_SCREENSHOT=docs/report.png pytest tests/test_report_browser.py`` also
saves the screenshot of the representative report (a site left out, a strategy with state,
a label distribution) that the README shows.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from browser import chrome, full_screenshot, non_blank
from fedlift import FedAvgJob, FLModel, FrameworkType, MetaKey, ScriptRunner
from fedlift.data import dirichlet, save_summary_json
from fedlift.report import REPORT_NAME
from fedlift.server import FedAdam
from fedlift.simulator import run_local
from report_checks import check_line

ROOT = Path(__file__).resolve().parent.parent
HELLO = ROOT / "examples" / "hello-numpy"

READ_PAGE = """
const data = JSON.parse(document.getElementById('fedlift-data').textContent).series;
const paths = {};
for (const id of Object.keys(data)) {
  const group = document.getElementById('series-' + id);
  const path = group && group.querySelector(':scope > path');
  paths[id] = path ? path.getAttribute('d') : null;
}
const svgs = Array.from(document.querySelectorAll('svg'));
return {data: data, paths: paths, svgs: svgs.length,
        drawn: svgs.filter(s => s.getBoundingClientRect().height > 50).length,
        title: document.querySelector('h1').textContent};
"""


def _jsonl(server: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (server / "metrics.jsonl").read_text().splitlines()]


def _check(page: dict[str, Any], rounds: list[dict[str, Any]]) -> None:
    series = page["data"]
    train = [r for r in rounds if r["task"] == "train"]
    assert series["global-train-accuracy"]["x"] == [r["round"] for r in train]
    assert series["global-train-accuracy"]["y"] == [r["metrics"]["accuracy"] for r in train]
    for site in {s for r in train for s in r["extra"].get("sites", {})}:
        held = [r for r in train if site in r["extra"]["sites"]]
        expected = [r["extra"]["sites"][site]["metrics"]["accuracy"] for r in held]
        assert series[f"site-train-accuracy-{site}"]["y"] == expected
    assert series["seconds-train"]["y"] == [r["seconds"] for r in train]
    assert series["bytes_sent-train"]["y"] == [r["extra"]["bytes_sent"] for r in train]
    assert series["server_rss"]["y"] == [r["extra"]["server_rss"] for r in rounds]
    for ident, values in series.items():
        assert page["paths"][ident] is not None, ident
        check_line(values, page["paths"][ident])
    assert page["drawn"] == page["svgs"] >= 4


def _hello_numpy(workspace: Path) -> Path:
    job = FedAvgJob("hello-numpy", n_clients=2, num_rounds=3, initial_model=[0.0] * 9)
    job.to_clients(ScriptRunner("client.py", framework=FrameworkType.NUMPY, app_dir=HELLO))
    job.simulator_run(workspace)
    return workspace / "server"


def _client(site: str, model: FLModel) -> FLModel:
    """Site i pulls w towards i, weight 100 * i; site-3 fails in round 2 (left out)."""
    i = int(site.split("-")[1])
    if site == "site-3" and model.current_round == 2:
        raise ValueError("site-3: the data loader ran out of shards")
    w = np.asarray(model.params["w"])
    step = 0.5 * (i - w)
    accuracy = float(0.95 - 0.4 * np.exp(-(model.current_round or 0) / 2) - 0.02 * i)
    return FLModel(
        params={"w": w + step},
        metrics={"accuracy": accuracy, "loss": float(1.0 - accuracy)},
        meta={MetaKey.NUM_STEPS_CURRENT_ROUND: 100 * i},
    )


def _representative(workspace: Path) -> Path:
    run_local(_client, {"w": np.zeros(5000, np.float32)}, 3, 6, workspace=workspace,
              quiet=True, on_client_error="exclude", min_clients=2,
              strategy=FedAdam(eta=0.1))  # fmt: skip
    server = workspace / "server"
    labels = np.random.default_rng(0).integers(0, 10, 6000)
    save_summary_json(labels, dirichlet(labels, 3, alpha=0.5, seed=0), server / "partition.json")
    from fedlift.report import write_report

    write_report(server)
    return server


def test_the_report_of_a_real_run_shows_its_numbers(tmp_path: Path) -> None:
    started = time.perf_counter()
    simulated = _hello_numpy(tmp_path / "sim")
    assert (simulated / REPORT_NAME).is_file()  # the simulator wrote it
    other = _representative(tmp_path / "local")
    assert time.perf_counter() - started < 30
    with chrome() as driver:
        driver.get((simulated / REPORT_NAME).as_uri())
        page = driver.execute_script(READ_PAGE)
        assert page["title"] == "hello-numpy"
        _check(page, _jsonl(simulated))
        png = full_screenshot(driver, tmp_path / "sim.png")
        assert non_blank(png)

        driver.get((other / REPORT_NAME).as_uri())
        page = driver.execute_script(READ_PAGE)
        rounds = _jsonl(other)
        _check(page, rounds)
        assert "site-train-accuracy-site-3" in page["data"]
        assert page["data"]["site-train-accuracy-site-3"]["x"] == [0, 1, 3, 4, 5]  # not 2
        left_out = driver.execute_script(
            "return Array.from(document.querySelectorAll('#participation td.out'))"
            ".map(td => [td.textContent, td.title]);"
        )
        assert left_out and left_out[0][0].startswith("failed: ValueError: site-3: the data")
        assert "ran out of shards" in left_out[0][1]
        assert page["data"]["strategy-eta"]["y"][0] == pytest.approx(0.1)
        png = full_screenshot(driver, tmp_path / "report.png")
        assert non_blank(png)
        target = os.environ.get("FEDLIFT_REPORT_SCREENSHOT")
        if target:
            (ROOT / target).parent.mkdir(parents=True, exist_ok=True)
            (ROOT / target).write_bytes(png)
