"""The per-job report (fedlift.report): known answers from hand-written run files."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from fedlift import cli
from fedlift.errors import StorageError
from fedlift.report import REPORT_NAME, compare_report, find_run, write_report
from report_checks import check_line, read_page

HOSTILE = "<script>alert(1)</script>"
WHY = "timed out: site-2 sent nothing within round_timeout=30 s\nlast heard 31 s ago"
TRACEBACK = 'Traceback (most recent call last):\n  File "client.py", line 9\nZeroDivisionError: x'


def _round(number: int, task: str, metrics: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "round": number,
        "task": task,
        "clients": sorted(extra.get("sites", {})),
        "metrics": metrics,
        "seconds": 0.5 + number,
        "is_best": False,
        "extra": extra,
        "ended_at": 1_800_000_000.0 + 10 * number,
    }


def _trained(
    number: int, metrics: dict[str, float], weights: dict[str, float], **extra: Any
) -> dict[str, Any]:
    """A train round: the sites' weights, accuracies 0.1 apart, fixed bytes and memory."""
    sites = {
        site: {"metrics": {"accuracy": metrics["accuracy"] + (0.1 if k else -0.1)}, "weight": w}
        for k, (site, w) in enumerate(weights.items())
    }
    sent = {"bytes_sent": 2000, "bytes_received": 950 * len(weights) - 100 * number + 100}
    memory = {"server_rss": 50e6 + 1e6 * number, "server_peak_rss": 51e6 + 1e6 * min(number, 2)}
    return _round(
        number,
        "train",
        metrics,
        total_weight=sum(weights.values()),
        sites=sites,
        strategy={"eta": 0.1 / 2**number},
        **sent,
        **memory,
        **extra,
    )


ROUNDS = [
    _trained(0, {"accuracy": 0.5, "loss": 1.25}, {"site-1": 100.0, "site-2": 300.0}),
    _trained(1, {"accuracy": 0.75, "loss": math.nan}, {"site-1": 200.0, "site-2": 200.0}),
    _trained(2, {"accuracy": 0.8, "loss": 0.5}, {"site-1": 250.0}, left_out={"site-2": WHY}),
    _round(3, "validate", {"accuracy": 0.82}),
]

RUN = {
    "format": "fedlift.run/1",
    "job": "known-answer",
    "job_id": "known-answer-1234",
    "runner": "simulator",
    "strategy": {"type": "fedprox", "mu": 0.01},
    "num_rounds": 3,
    "sites": ["site-1", "site-2"],
    "config": {"name": "known-answer", "workflow": {"num_rounds": 3}},
    "seed": 7,
    "versions": {"fedlift": "0.1.0", "python": "3.11"},
    "machine": {"hostname": "box", "cpus": 2, "memory_bytes": 2**33},
    "started_at": 1_799_999_990.0,
    "ended_at": 1_800_000_045.0,
    "state": "failed",
    "failure": {
        "site": "site-2",
        "exception": "ClientFailedError",
        "message": "site-2's script raised ZeroDivisionError",
        "traceback_tail": TRACEBACK,
    },
}


def _write_run(folder: Path, rounds: list[dict[str, Any]], run: dict[str, Any] | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in rounds]  # NaN as JSON's NaN, as Python writes it
    (folder / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    if run is not None:
        (folder / "run.json").write_text(json.dumps(run))
    return folder


@pytest.fixture(scope="module")
def known(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    server = _write_run(tmp_path_factory.mktemp("ws") / "server", ROUNDS, RUN)
    started = time.perf_counter()
    path = write_report(server)
    elapsed = time.perf_counter() - started
    assert path == server / REPORT_NAME
    assert elapsed < 5.0  # (1.5 s in a fresh process, matplotlib's import included)
    return server, path.read_text(encoding="utf-8")


def test_the_embedded_series_are_the_numbers_written(known: tuple[Path, str]) -> None:
    series, _ = read_page(known[1])
    assert series["global-train-accuracy"]["x"] == [0, 1, 2]
    assert series["global-train-accuracy"]["y"] == [0.5, 0.75, 0.8]
    assert series["global-train-loss"]["y"] == [1.25, None, 0.5]  # NaN: null, not drawn
    assert series["global-validate-accuracy"] == {"label": "validate", "x": [3], "y": [0.82]}
    site = [[r["extra"]["sites"][s]["metrics"]["accuracy"] for r in ROUNDS[:3] if s in
             r["extra"]["sites"]] for s in ("site-1", "site-2")]  # fmt: skip
    assert series["site-train-accuracy-site-1"]["y"] == site[0]
    assert series["site-train-accuracy-site-2"]["x"] == [0, 1]
    assert series["site-train-accuracy-site-2"]["y"] == site[1]
    assert series["seconds-train"]["y"] == [0.5, 1.5, 2.5]
    assert series["bytes_received-train"]["y"] == [2000, 1900, 850]
    assert series["server_peak_rss"]["y"] == [51e6, 52e6, 53e6]
    assert series["strategy-eta"]["y"] == [0.1, 0.05, 0.025]


def test_each_line_has_a_vertex_per_point_and_its_pixels_map_its_numbers(
    known: tuple[Path, str],
) -> None:
    series, paths = read_page(known[1])
    assert set(paths) == set(series)  # (every series here has a finite point)
    counts = {ident: check_line(series[ident], paths.get(ident, "")) for ident in series}
    assert counts["global-train-loss"] == 2  # the NaN is left out of the line
    assert counts["global-train-accuracy"] == 3


def test_the_failure_comes_first_with_its_traceback(known: tuple[Path, str]) -> None:
    text = known[1]
    failure = text.index('id="failure"')
    assert failure < text.index("<svg")
    assert "ClientFailedError" in text[failure : text.index("<svg")]
    assert "<pre>" + TRACEBACK.replace('"', "&quot;") + "</pre>" in text
    assert "site-2" in text[failure : text.index("<svg")]
    assert text.index("<h1>known-answer</h1>") < failure
    assert 'id="state">failed<' in text
    assert "fedprox(mu=0.01)" in text


class _Table(HTMLParser):
    def __init__(self, ident: str) -> None:
        super().__init__()
        self.ident, self.inside, self.rows = ident, False, []
        self.cell: dict[str, str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "table" and values.get("id") == self.ident:
            self.inside = True
        elif self.inside and tag == "tr":
            self.rows.append([])
        elif self.inside and tag in ("td", "th"):
            self.cell = {"text": "", "title": values.get("title") or ""}

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self.inside = False
        elif self.inside and tag in ("td", "th") and self.cell is not None:
            self.rows[-1].append(self.cell)
            self.cell = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell["text"] += data


def _table(text: str, ident: str) -> list[list[dict[str, str]]]:
    parser = _Table(ident)
    parser.feed(text)
    return parser.rows


def test_participation_says_who_was_left_out_and_why(known: tuple[Path, str]) -> None:
    rows = _table(known[1], "participation")
    assert [c["text"] for c in rows[0]] == ["round", "task", "site-1", "site-2"]
    assert [c["text"] for c in rows[1]] == ["0", "train", "25.0%", "75.0%"]
    assert [c["text"] for c in rows[3]] == ["2", "train", "100.0%", "timed out"]
    assert rows[3][3]["title"] == WHY  # the whole reason, on hover
    assert [c["text"] for c in rows[4]] == ["3", "validate", "-", "-"]


def test_the_page_fetches_nothing_and_is_small(known: tuple[Path, str]) -> None:
    text = known[1]
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", text, re.I)
    assert not re.search(r"url\(\s*['\"]?(?:https?:)?//", text, re.I)
    assert "<link" not in text and "@import" not in text
    assert len(text.encode()) < 300_000
    assert text.count('<script type="application/json" id="fedlift-data">') == 1
    assert "<script>" not in text and "<script " not in text.replace(
        '<script type="application', ""
    )


def test_the_report_is_the_same_for_the_same_run(known: tuple[Path, str], tmp_path: Path) -> None:
    server, text = known
    assert write_report(server, out=tmp_path / "again.html").read_text() == text


def test_hostile_names_are_escaped(tmp_path: Path) -> None:
    rounds = [
        _round(
            0,
            "train",
            {HOSTILE: 0.5, "$\\frac{a$": 1.0},
            sites={HOSTILE: {"metrics": {HOSTILE: 0.25}, "weight": 1.0}},
            left_out={"site-9": f"failed: {HOSTILE}\nmore"},
            strategy={HOSTILE: 1.0},
        )
    ]
    run = {**RUN, "job": HOSTILE, "failure": {**RUN["failure"], "message": HOSTILE}}
    run["versions"] = {HOSTILE: HOSTILE}
    server = _write_run(tmp_path / "server", rounds, run)
    (server / "cross_site_val.json").write_text(
        json.dumps({HOSTILE: {HOSTILE: {HOSTILE: 0.5}}, "server": {"site-1": {HOSTILE: 0.75}}})
    )
    (server / "partition.json").write_text(
        json.dumps(
            {"counts": [[1, 2], [3, 4]], "class_names": [HOSTILE, "b"], "sites": ["a", HOSTILE]}
        )
    )
    text = write_report(server).read_text()
    assert "alert(1)" in text  # shown ...
    assert HOSTILE not in text  # ... as text
    assert "<script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert 'id="notes"' not in text  # every section drew
    series, paths = read_page(text)
    for ident in series:
        assert re.fullmatch(r"[A-Za-z0-9_-]+", ident)
        check_line(series[ident], paths.get(ident, ""))
    assert any(s["label"] == HOSTILE for s in series.values())


def test_corrupt_lines_are_counted_and_skipped(tmp_path: Path) -> None:
    server = _write_run(tmp_path / "server", ROUNDS[:2], None)
    with open(server / "metrics.jsonl", "a") as handle:
        handle.write("not json\n")
        handle.write('{"round": "x", "task": "train"}\n')
        handle.write("[1, 2]\n")
        handle.write('{"round": true, "task": "train"}\n')
        handle.write("[" * 100_000 + "\n")  # deeper than the parser recurses
        handle.write('{"round": 2, "task": "train", "metrics": {"accuracy": "high", "x": 1e999}}\n')
        handle.write('{"round": 3, "task": "train", "metrics": [1], "extra": 5, "seconds": "s"}\n')
    text = write_report(server).read_text()
    assert "5 lines of metrics.jsonl could not be read" in text
    series, paths = read_page(text)
    assert series["global-train-accuracy"]["y"] == [0.5, 0.75]
    assert series["global-train-x"] == {"label": "train", "x": [2], "y": [None]}  # inf: null
    for ident in series:
        check_line(series[ident], paths.get(ident, ""))


def test_a_huge_file_is_read_only_so_far(tmp_path: Path) -> None:
    server = _write_run(tmp_path / "server", ROUNDS, None)
    with open(server / "metrics.jsonl", "r+b") as handle:  # 4 GiB claimed: a sparse file
        handle.truncate(4 * 2**30)
    started = time.perf_counter()
    text = write_report(server).read_text()
    assert time.perf_counter() - started < 10.0
    assert "only its start was read" in text
    assert "1 line of metrics.jsonl could not be read" in text  # the run of zero bytes
    series, _ = read_page(text)
    assert series["global-train-accuracy"]["y"] == [0.5, 0.75, 0.8]


def test_many_lines_are_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedlift.report import _read

    monkeypatch.setattr(_read, "MAX_METRICS_LINES", 50)
    rounds = [_round(i, "train", {"accuracy": i / 100}) for i in range(80)]
    text = write_report(_write_run(tmp_path / "server", rounds, None)).read_text()
    assert "only its start was read" in text
    series, _ = read_page(text)
    assert series["global-train-accuracy"]["x"] == list(range(50))


def test_other_files_that_cannot_be_read_get_a_note(tmp_path: Path) -> None:
    server = tmp_path / "server"
    server.mkdir()
    (server / "run.json").write_text("[1, 2")
    (server / "cross_site_val.json").write_text('"a string"')
    (server / "partition.json").write_text('{"counts": [[1, -2]]}')
    text = write_report(server).read_text()
    assert "run.json could not be read" in text
    assert "partition.json holds no counts" in text
    assert 'id="nothing"' in text


def test_an_empty_or_missing_folder_says_there_is_nothing_yet(tmp_path: Path) -> None:
    for folder in (tmp_path / "empty", tmp_path / "missing" / "server"):
        folder.mkdir(parents=True) if folder.name == "empty" else None
        text = write_report(folder).read_text()
        assert 'id="nothing"' in text and "Nothing recorded yet" in text
        assert read_page(text)[0] == {}


def test_an_unusable_out_path_raises_a_storage_error(tmp_path: Path) -> None:
    server = _write_run(tmp_path / "server", ROUNDS, RUN)
    (tmp_path / "file").write_text("")
    with pytest.raises(StorageError, match="cannot write"):
        write_report(server, out=tmp_path / "file" / "report.html")


def test_cross_site_and_label_distribution_are_drawn(tmp_path: Path) -> None:
    server = _write_run(tmp_path / "ws" / "server", ROUNDS, {**RUN, "state": "finished"})
    matrix = {
        "server": {"site-1": {"accuracy": 0.9}, "site-2": {"accuracy": 0.8}},
        "site-1": {"site-1": {"accuracy": 0.95}, "site-2": {"accuracy": 0.5}},
    }
    (server / "cross_site_val.json").write_text(json.dumps(matrix))
    job = tmp_path / "ws" / "jobs" / "known-answer"
    job.mkdir(parents=True)
    (job / "job.json").write_text(json.dumps({"name": "known-answer"}))
    (job / "partition.json").write_text(
        json.dumps({"format": "fedlift.data.summary/1", "counts": [[5, 1], [0, 7]]})
    )
    text = write_report(server).read_text()
    assert 'id="failure"' in text  # the failure is run.json's, whatever its state says
    assert "<h2>Cross-site evaluation</h2>" in text and ">0.95<" in text
    assert "<h2>Label distribution</h2>" in text and ">site-2<" in text
    assert text.index("Label distribution") < text.index("Cross-site evaluation")
    assert text.index("Cross-site evaluation") < text.index("Strategy state")


def test_compare_report_overlays_the_runs(tmp_path: Path) -> None:
    first = _write_run(tmp_path / "fedavg" / "server", ROUNDS, {**RUN, "job": "a"})
    other = [dict(r, metrics={"accuracy": r["metrics"]["accuracy"] / 2}) for r in ROUNDS]
    second = _write_run(tmp_path / "fedprox" / "server", other, None)
    out = compare_report([first, second], tmp_path / "both.html")
    text = out.read_text()
    series, paths = read_page(text)
    assert series["run1-train-accuracy"]["y"] == [0.5, 0.75, 0.8]
    assert series["run2-train-accuracy"]["y"] == [0.25, 0.375, 0.4]
    assert series["run1-train-accuracy"]["label"] == "a (fedavg) (train)"
    assert series["run2-train-accuracy"]["label"] == "fedprox (fedprox) (train)"
    for ident in series:
        check_line(series[ident], paths.get(ident, ""))
    assert [c["text"] for c in _table(text, "runs")[1]][:2] == ["a (fedavg)", "a"]
    labelled = compare_report([first, second], tmp_path / "l.html", labels=["FedAvg", "FedProx"])
    assert read_page(labelled.read_text())[0]["run2-train-accuracy"]["label"] == "FedProx (train)"
    with pytest.raises(Exception, match="labels must name each of the 2 runs"):
        compare_report([first, second], tmp_path / "x.html", labels=["one"])
    with pytest.raises(Exception, match="at least one server folder"):
        compare_report([], tmp_path / "x.html")


def test_find_run_takes_a_workspace_a_server_folder_or_a_deployed_job(tmp_path: Path) -> None:
    server = _write_run(tmp_path / "ws" / "server", ROUNDS, RUN)
    assert find_run(tmp_path / "ws") == (server, None)
    assert find_run(server) == (server, None)
    deployed = tmp_path / "store" / "jobs" / "abc"
    _write_run(deployed / "server", ROUNDS, None)
    (deployed / "job").mkdir()
    (deployed / "job" / "job.json").write_text("{}")
    assert find_run(deployed) == (deployed / "server", deployed / "job")


def test_the_cli_writes_a_workspace_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = _write_run(tmp_path / "ws" / "server", ROUNDS, RUN)
    assert cli.main(["report", str(tmp_path / "ws")]) == 0
    assert capsys.readouterr().out.strip() == f"report: {server / REPORT_NAME}"
    assert read_page((server / REPORT_NAME).read_text())[0]["global-train-accuracy"]
    out = tmp_path / "both.html"
    assert cli.main(["report", str(tmp_path / "ws"), str(server), "-o", str(out)]) == 0
    assert "run2-train-accuracy" in read_page(out.read_text())[0]


def test_the_cli_refuses_bad_input_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    assert cli.main(["report", str(tmp_path / "empty")]) == 2
    assert "holds no run's files" in capsys.readouterr().err


def _python(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_the_command_runs_as_a_process(tmp_path: Path) -> None:
    """As users run it: fast, and the parser does not import the report's matplotlib."""
    _write_run(tmp_path / "ws" / "server", ROUNDS, RUN)
    started = time.perf_counter()
    done = _python("-m", "fedlift", "report", str(tmp_path / "ws"))
    assert done.returncode == 0, done.stderr
    assert time.perf_counter() - started < 15.0
    missing = _python("-m", "fedlift", "report", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    light = _python("-c", "import sys, fedlift.cli; print('matplotlib' in sys.modules)")
    assert light.stdout.strip() == "False"


def test_a_job_carries_its_label_distribution_into_the_report(tmp_path: Path) -> None:
    import numpy as np

    from fedlift import FedAvgJob, ScriptRunner
    from fedlift.errors import ConfigError

    app = tmp_path / "app"
    app.mkdir()
    (app / "client.py").write_text("")
    job = FedAvgJob("labelled", n_clients=2, num_rounds=1, initial_model={"w": np.zeros(2)})
    job.to_clients(ScriptRunner("client.py", app_dir=app, framework="numpy"))
    labels = np.array([0, 0, 1, 1, 1, 2])
    with pytest.raises(ConfigError, match="one index array per site"):
        job.set_partition_summary(labels, [np.arange(6)])
    with pytest.raises(ConfigError, match="class_names"):
        job.set_partition_summary(labels, [np.arange(3), np.arange(3, 6)], class_names=["a"])
    job.set_partition_summary(labels, [np.arange(3), np.arange(3, 6)], ["cat", "dog", HOSTILE])
    folder = job.export_job(tmp_path / "ws" / "jobs")
    summary = json.loads((folder / "partition.json").read_text())
    assert summary["format"] == "fedlift.data.summary/1"
    assert summary["counts"] == [[2, 1, 0], [0, 2, 1]]
    server = _write_run(tmp_path / "ws" / "server", ROUNDS, None)
    text = write_report(server).read_text()  # finds ws/jobs/labelled
    assert "<h2>Label distribution</h2>" in text and ">dog<" in text
    assert "&quot;name&quot;: &quot;labelled&quot;" in text  # job.json, as the config
