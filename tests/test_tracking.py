"""Experiment tracking as NVFlare's scripts write it: ``fedlift.client.tracking``'s writers
stream records to the server, which writes them per site to TensorBoard (always), MLflow
(``tracking="mlflow"``) and W&B (``tracking="wandb"``, when installed).

Everything written is read back with the backends' own readers (TensorBoard's
``EventAccumulator``, ``MlflowClient``, W&B's record protobufs), and every expected value is
worked out by hand from what ``tests/scripts/tracking_client.py`` logs.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedlift.client as flare
from conftest import SCRIPTS, worker_pids
from fedlift import FedAvgJob, ScriptRunner
from fedlift.client._api import _reset_for_tests
from fedlift.client._link import ClientContext, LocalLink, set_current_link
from fedlift.client.tracking import MLflowWriter, SummaryWriter, WandBWriter
from fedlift.codec import Message, check_log_record, model_from_wire, model_to_wire
from fedlift.deploy import DeployServer, channel_credentials, provision
from fedlift.errors import ClientAPIError, ConfigError, ProtocolError
from fedlift.job import load_job, zip_dir
from fedlift.model import FLModel
from fedlift.server import LogRecord, ServerRuntime, Tracking, check_tracking
from fedlift.transport import GrpcTransport

SITES = ("site-1", "site-2")
N_ROUNDS = 2
TB = {"writer": "TORCH_TB", "path": None}


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard run in ``folder``, by tag, read by TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


def approx(pairs: list[tuple[int, float]]) -> list[tuple[int, Any]]:
    return [(step, pytest.approx(value, rel=1e-6)) for step, value in pairs]


# ---------------------------------------------------------------- the record on the wire


def test_records_are_normalised_to_six_fields() -> None:
    assert check_log_record({"key": "loss", "value": 2, "site": "x", "job_id": "y"}) == {
        "key": "loss", "value": 2.0, "data_type": "SCALAR", "step": None, **TB,
    }  # fmt: skip
    record = check_log_record(
        {"key": "text", "value": "hi", "data_type": "TEXT", "path": "notes/a.txt",
         "writer": "MLFLOW", "step": 3}
    )  # fmt: skip
    assert record == {
        "key": "text", "value": "hi", "data_type": "TEXT", "step": 3, "writer": "MLFLOW",
        "path": "notes/a.txt",
    }  # fmt: skip
    nan = check_log_record({"key": "loss", "value": float("nan")})  # a diverged loss is kept
    assert np.isnan(nan["value"])


HOSTILE: list[tuple[dict[str, Any], str]] = [
    ({"key": "loss", "value": "NaN!"}, "must be a number"),
    ({"key": "loss", "value": True}, "must be a number"),
    ({"key": "loss", "value": 10**400}, "too large for a float"),
    ({"key": "loss", "value": 1.0, "step": float("nan")}, "step must be an int"),
    ({"key": "loss", "value": 1.0, "step": -1}, "step must be an int"),
    ({"key": "loss", "value": 1.0, "step": 2**63}, "step must be an int"),
    ({"key": "loss", "value": 1.0, "step": "1"}, "step must be an int"),
    ({"key": "k" * 251, "value": 1.0}, "at most 250 characters"),
    ({"key": "", "value": 1.0}, "non-empty string"),
    ({"key": None, "value": 1.0}, "non-empty string"),
    ({"key": "a\nb", "value": 1.0}, "letters, digits"),
    ({"key": "naïve", "value": 1.0}, "letters, digits"),
    ({"key": "../up", "value": 1.0}, "another path"),
    ({"key": "/abs", "value": 1.0}, "another path"),
    ({"key": "a//b", "value": 1.0}, "another path"),
    ({"key": "p", "value": "x" * 6001, "data_type": "PARAMETER"}, "6,001 characters"),
    ({"key": "t", "value": "x" * 8001, "data_type": "TAG"}, "8,001 characters"),
    ({"key": "p", "value": 5, "data_type": "PARAMETER"}, "must be a string"),
    ({"key": "text", "value": "y" * 1_000_001, "data_type": "TEXT", "path": "a.txt"},
     "1,000,001 characters"),
    ({"key": "text", "value": "z", "data_type": "TEXT"}, "path must be a non-empty string"),
    ({"key": "text", "value": "z", "data_type": "TEXT", "path": "../../etc/x"}, "another path"),
    ({"key": "text", "value": "z", "data_type": "TEXT", "path": "dir/"}, "another path"),
    ({"key": "loss", "value": 1.0, "path": "a.txt"}, "only TEXT records name a path"),
    ({"key": "m", "value": {str(i): 1.0 for i in range(1001)}, "data_type": "METRICS"},
     "at most 1000 entries"),
    ({"key": "m", "value": {}, "data_type": "METRICS"}, "non-empty dict"),
    ({"key": "m", "value": [1.0], "data_type": "METRICS"}, "non-empty dict"),
    ({"key": "m", "value": {"a": [1, 2]}, "data_type": "METRICS"}, "must be a number"),
    ({"key": "m", "value": {"a/../b": 1.0}, "data_type": "METRICS"}, "another path"),
    ({"key": "k" * 200, "value": {"n" * 60: 1.0}, "data_type": "SCALARS"}, "key/name"),
    ({"key": "p", "value": {str(i): "v" for i in range(101)}, "data_type": "PARAMETERS"},
     "at most 100 entries"),
    ({"key": "p", "value": {"a": 1}, "data_type": "PARAMETERS"}, "must be a string"),
    ({"key": "loss", "value": 1.0, "data_type": "IMAGE"}, "supports data_type"),
    ({"key": "loss", "value": 1.0, "data_type": ["SCALAR"]}, "supports data_type"),
    ({"key": "loss", "value": 1.0, "writer": "EVIL"}, "writer must be one of"),
]  # fmt: skip


@pytest.mark.parametrize(("fields", "phrase"), HOSTILE, ids=[p for _, p in HOSTILE])
def test_hostile_records_are_refused(fields: dict[str, Any], phrase: str) -> None:
    with pytest.raises(ProtocolError, match="Received") as info:
        check_log_record(fields)
    assert phrase in str(info.value)


# ---------------------------------------------------------------- the writers, on a site


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """The records a script's writers hand its site (a LocalLink, no server)."""
    monkeypatch.delenv("RANK", raising=False)
    _reset_for_tests()
    seen: list[dict[str, Any]] = []
    link = LocalLink(ClientContext("job-1", "site-1", 0, 2, {}), on_log=seen.append)
    set_current_link(link)
    flare.init()
    yield seen
    link.stop()
    set_current_link(None)
    _reset_for_tests()


def test_summary_writer_records(logs: list[dict[str, Any]]) -> None:
    writer = SummaryWriter()
    writer.add_scalar("train_loss", np.float32(0.5), global_step=np.int64(3))
    writer.add_scalars("acc", {"train": 1, "val": np.float64(0.25)}, 4)
    writer.flush()
    assert logs == [
        {"key": "train_loss", "value": 0.5, "data_type": "SCALAR", "step": 3, **TB},
        {"key": "acc", "value": {"train": 1.0, "val": 0.25}, "data_type": "SCALARS", "step": 4,
         **TB},
    ]  # fmt: skip
    assert type(logs[0]["value"]) is float and type(logs[0]["step"]) is int


def test_mlflow_and_wandb_writer_records(logs: list[dict[str, Any]]) -> None:
    mlflow, wandb = MLflowWriter(), WandBWriter()
    mlflow.log_metric("acc", 0.75, step=1)
    mlflow.log_metrics({"a": 1, "b": 2.5}, step=2)
    mlflow.log_param("lr", 0.01)
    mlflow.log_params({"epochs": 3, "opt": "sgd"})
    mlflow.set_tag("framework", "numpy")
    mlflow.set_tags({"round": 1})
    mlflow.log_text("hello", "notes/a.txt")
    wandb.log({"loss": 0.5}, step=7)
    ml = {"writer": "MLFLOW", "path": None}
    assert logs == [
        {"key": "acc", "value": 0.75, "data_type": "METRIC", "step": 1, **ml},
        {"key": "metrics", "value": {"a": 1.0, "b": 2.5}, "data_type": "METRICS", "step": 2,
         **ml},
        {"key": "lr", "value": "0.01", "data_type": "PARAMETER", "step": None, **ml},
        {"key": "params", "value": {"epochs": "3", "opt": "sgd"}, "data_type": "PARAMETERS",
         "step": None, **ml},
        {"key": "framework", "value": "numpy", "data_type": "TAG", "step": None, **ml},
        {"key": "tags", "value": {"round": "1"}, "data_type": "TAGS", "step": None, **ml},
        {"key": "text", "value": "hello", "data_type": "TEXT", "step": None, "writer": "MLFLOW",
         "path": "notes/a.txt"},
        {"key": "metrics", "value": {"loss": 0.5}, "data_type": "METRICS", "step": 7,
         "writer": "WANDB", "path": None},
    ]  # fmt: skip


def test_bad_writer_calls_raise_in_the_script(logs: list[dict[str, Any]]) -> None:
    writer, mlflow = SummaryWriter(), MLflowWriter()
    with pytest.raises(ClientAPIError, match="must be a number; received: 'high'"):
        writer.add_scalar("loss", "high")  # type: ignore[arg-type]
    with pytest.raises(ClientAPIError, match="takes an int >= 0"):
        writer.add_scalar("loss", 1.0, global_step=-1)
    with pytest.raises(ClientAPIError, match="no extra keyword arguments"):
        writer.add_scalar("loss", 1.0, walltime=3.0)
    with pytest.raises(ClientAPIError, match="takes a dict of numbers"):
        writer.add_scalars("acc", 0.5)  # type: ignore[arg-type]
    with pytest.raises(ClientAPIError, match="letters, digits"):
        mlflow.log_metric("top-1 acc%", 0.5)
    with pytest.raises(ClientAPIError, match="another path"):
        mlflow.log_text("x", "../outside.txt")
    with pytest.raises(ClientAPIError, match="6,001 characters"):
        mlflow.log_param("blob", "x" * 6001)
    assert logs == []


def test_only_rank_0_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    _reset_for_tests()
    seen: list[dict[str, Any]] = []
    link = LocalLink(ClientContext("job-1", "site-1", 0, 2, {}), on_log=seen.append)
    set_current_link(link)
    try:
        flare.init(rank=1)
        SummaryWriter().add_scalar("loss", 1.0)
        with pytest.raises(ClientAPIError):  # still checked on every rank
            SummaryWriter().add_scalar("loss", "x")  # type: ignore[arg-type]
    finally:
        link.stop()
        set_current_link(None)
        _reset_for_tests()
    assert seen == []


def test_importing_the_writers_loads_nothing_heavy() -> None:
    code = (
        "import sys\nfrom fedlift.client.tracking import MLflowWriter, SummaryWriter\n"
        "heavy = ('fedlift.server', 'fedlift.transport', 'grpc', 'mlflow', 'tensorboard', "
        "'wandb', 'torch', 'tensorflow')\nprint([m for m in heavy if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- the server's side


def test_the_runtime_refuses_hostile_records_and_keeps_serving() -> None:
    got: list[LogRecord] = []
    runtime = ServerRuntime("job-1", list(SITES), {}, on_log=got.append)
    for fields, phrase in HOSTILE:
        with pytest.raises(ProtocolError) as info:
            runtime.handle(Message("log", {"site": "site-1", **fields}))
        assert phrase in str(info.value)
    reply = runtime.handle(
        Message("log", {"site": "site-2", "key": "acc", "value": {"a": 1}, "data_type": "METRICS",
                        "step": 2})
    )  # fmt: skip
    assert reply.op == "ok"
    assert got == [LogRecord("site-2", "acc", {"a": 1.0}, "METRICS", 2)]
    assert got[0].numbers() == [("a", 1.0)]
    assert runtime.handle(Message("get_task", {"site": "site-1", "wait": 0})).op == "wait"


def test_a_site_over_its_budget_is_cut_off(tmp_path: Path) -> None:
    tracking = Tracking(tmp_path, max_site_entries=5, max_site_text_chars=10)
    for step in range(4):  # 4 entries each for site-1: within budget
        tracking.record(LogRecord("site-1", "loss", float(step), "SCALAR", step))
    tracking.record(LogRecord("site-1", "acc", {"a": 1.0, "b": 2.0}, "SCALARS", 9))  # 4 + 2 > 5
    tracking.record(LogRecord("site-1", "late", 1.0, "SCALAR", 10))  # 4 + 1: still fits
    tracking.record(LogRecord("site-1", "later", 1.0, "SCALAR", 11))  # 6 > 5
    tracking.record(LogRecord("site-2", "text", "x" * 11, "TEXT", None, "MLFLOW", "a.txt"))
    tracking.record(LogRecord("site-2", "loss", 7.0, "SCALAR", 0))  # site-2's own budget
    tracking.close()
    assert tracking.dropped == {"site-1": 2, "site-2": 1}
    assert scalars(tmp_path / "tensorboard" / "site-1") == {
        "loss": [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0)],
        "late": [(10, 1.0)],
    }
    assert scalars(tmp_path / "tensorboard" / "site-2") == {"loss": [(0, 7.0)]}
    tracking.record(LogRecord("site-2", "loss", 8.0, "SCALAR", 1))  # after close: ignored


def test_a_flood_the_writer_cannot_keep_up_with_is_dropped(tmp_path: Path) -> None:
    tracking = Tracking(tmp_path, max_pending=3)
    with tracking._cond:  # the writer takes its batches under this lock: it waits meanwhile
        for step in range(5):
            tracking.record(LogRecord("site-1", "loss", 1.0, "SCALAR", step))
    tracking.close()
    assert tracking.dropped == {"site-1": 2}
    assert scalars(tmp_path / "tensorboard" / "site-1") == {"loss": [(0, 1.0), (1, 1.0), (2, 1.0)]}


def test_tracking_choices_and_missing_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    assert check_tracking(None) is None
    assert check_tracking("mlflow") == "mlflow"
    with pytest.raises(ConfigError, match=r"Received: tracking='neptune'"):
        check_tracking("neptune")
    with pytest.raises(ConfigError, match="one of 'tensorboard', 'mlflow', 'wandb'"):
        check_tracking(["mlflow"])
    # A package that cannot be imported (None in sys.modules blocks its import).
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)
    with pytest.raises(ConfigError) as info:
        check_tracking("mlflow", "FedAvgJob(tracking=...)")
    assert "sqlalchemy cannot be imported" in str(info.value)
    assert "pip install 'fedlift[mlflow]'" in str(info.value)
    assert check_tracking("mlflow", packages=False) == "mlflow"
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ConfigError, match=r"fedlift\[tensorboard\]"):
        FedAvgJob("j", 1, 1, {"w": np.zeros(2)}, tracking="tensorboard")


def test_a_job_asks_for_its_tracking_and_job_json_carries_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"FedAvgJob\(tracking=...\) must be None"):
        FedAvgJob("j", 1, 1, {"w": np.zeros(2)}, tracking="mlfow")
    if "wandb" not in sys.modules and not _installed("wandb"):
        with pytest.raises(ConfigError, match=r"pip install 'fedlift\[wandb\]'"):
            FedAvgJob("j", 1, 1, {"w": np.zeros(2)}, tracking="wandb")
    job = FedAvgJob("j", 1, 1, {"w": np.zeros(2)}, tracking="mlflow")
    job.to_clients(ScriptRunner(SCRIPTS / "tracking_client.py", framework="numpy"))
    folder = job.export_job(tmp_path)
    data = json.loads((folder / "job.json").read_text())
    assert data["tracking"] == "mlflow"
    assert load_job(folder)[0].tracking == "mlflow"
    data["tracking"] = "MLflow"
    (folder / "job.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"job.json: 'tracking' must be None"):
        load_job(folder)
    del data["tracking"]  # a job exported before tracking existed
    (folder / "job.json").write_text(json.dumps(data))
    assert load_job(folder)[0].tracking is None


def test_a_server_without_the_package_refuses_the_job_at_its_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedlift.simulator import run_simulator

    folder = tracking_job("mlflow").export_job(tmp_path / "jobs")
    monkeypatch.setitem(sys.modules, "alembic", None)  # this "server" lacks Alembic
    with pytest.raises(ConfigError, match=r"alembic cannot be imported.*fedlift\[mlflow\]"):
        run_simulator(folder, tmp_path / "ws", quiet=True)
    assert not (tmp_path / "ws" / "site-1").exists()  # refused before any site started


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# ---------------------------------------------------------------- a simulator run, end to end


def tracking_job(tracking: str | None, script_args: str = "", **runner: Any) -> FedAvgJob:
    job = FedAvgJob(
        "tracking-job",
        n_clients=len(SITES),
        num_rounds=N_ROUNDS,
        initial_model={"w": np.zeros(3, np.float32)},
        final_evaluation=False,
        tracking=tracking,
    )
    job.to_clients(
        ScriptRunner(
            SCRIPTS / "tracking_client.py", script_args=script_args, framework="numpy", **runner
        )
    )
    return job


@pytest.fixture(scope="module")
def mlflow_run(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One 2-site simulator run with tracking="mlflow"; site-1 also sends hostile records."""
    workspace = tmp_path_factory.mktemp("mlflow") / "ws"
    return tracking_job("mlflow", "--hostile").simulator_run(workspace)


def test_tensorboard_gets_each_sites_numbers(mlflow_run: Any) -> None:
    root = mlflow_run.workspace / "server" / "tensorboard"
    for i, site in enumerate(SITES):
        got = scalars(root / site)
        # site index i in round r logs (i + 1) / (r + 1), ... (see tracking_client.py)
        assert got["train_loss"] == approx([(0, i + 1.0), (1, (i + 1) / 2)])
        assert got["acc/train"] == approx([(0, 0.5), (1, 0.6)])
        assert got["acc/val"] == approx([(0, 0.25), (1, 0.35)])
        assert got["local_accuracy"] == approx([(0, 0.1 * (i + 1)), (1, 0.1 * (i + 1) + 0.2)])
        assert got["m2"] == [(0, 10.0 * i), (1, 10.0 * i)]
        assert got["wandb_loss"] == [(0, float(i)), (1, i + 1.0)]
    # The server's own round metrics stay in their own run, beside the sites'.
    assert scalars(root)["global/accuracy"] == approx([(0, 0.5), (1, 0.6)])
    assert worker_pids(mlflow_run.workspace) == []


def test_mlflow_holds_one_run_per_site(mlflow_run: Any) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{mlflow_run.workspace}/server/mlflow.db")
    experiment = client.get_experiment_by_name("tracking-job")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    by_site = {run.data.tags["site"]: run for run in runs}
    assert sorted(by_site) == list(SITES)
    for i, site in enumerate(SITES):
        run = by_site[site]
        assert run.info.run_name == site and run.info.status == "FINISHED"
        assert run.data.tags["job_id"] == mlflow_run.job_id
        assert run.data.params == {"lr": "0.01", "batch_size": "32", "optimizer": "sgd"}
        assert run.data.tags["framework"] == "numpy" and run.data.tags["site_index"] == str(i)
        run_id = run.info.run_id

        def history(key: str, run_id: str = run_id) -> list[tuple[int, float]]:
            return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]

        assert history("train_loss") == approx([(0, i + 1.0), (1, (i + 1) / 2)])
        assert history("local_accuracy") == approx([(0, 0.1 * (i + 1)), (1, 0.1 * (i + 1) + 0.2)])
        assert history("m1") == [(0, 0.0), (1, 1.0)]
        assert history("acc/val") == approx([(0, 0.25), (1, 0.35)])
        text = Path(client.download_artifacts(run_id, "notes/summary.txt")).read_text()
        assert text == f"site {i}"


def test_a_resumed_job_goes_on_in_the_same_runs(mlflow_run: Any) -> None:
    """A restarted deployed server resumes the job: its sites' MLflow runs go on."""
    from mlflow.tracking import MlflowClient

    server_dir = mlflow_run.workspace / "server"
    again = Tracking(server_dir, tracking="mlflow", experiment="tracking-job",
                     job_id=mlflow_run.job_id, resume=True)  # fmt: skip
    again.record(LogRecord("site-1", "train_loss", 0.25, "SCALAR", 2))
    again.record(LogRecord("site-1", "lr", "0.5", "PARAMETER", None))  # params keep their first
    again.record(LogRecord("site-1", "site", "site-2", "TAG", None))  # whose run it is: kept
    again.close()
    client = MlflowClient(tracking_uri=f"sqlite:///{server_dir}/mlflow.db")
    experiment = client.get_experiment_by_name("tracking-job")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], "tags.site = 'site-1'")
    assert len(runs) == 1
    run = runs[0]
    history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert history == approx([(0, 1.0), (1, 0.5), (2, 0.25)])
    assert run.data.params["lr"] == "0.01" and run.data.tags["site"] == "site-1"


def test_hostile_records_are_refused_and_the_job_goes_on(mlflow_run: Any) -> None:
    lines = (mlflow_run.workspace / "site-1" / "hostile.txt").read_text().splitlines()
    assert len(lines) == 18 and set(lines) == {"refused ProtocolError"}
    assert [r.round for r in mlflow_run.rounds] == [0, 1]  # every round ran: the server stayed up
    assert "escape" not in {p.name for p in mlflow_run.workspace.rglob("*")}


def test_an_external_process_script_streams_its_records(tmp_path: Path) -> None:
    result = tracking_job(None, launch_external_process=True).simulator_run(tmp_path / "ws")
    got = scalars(result.workspace / "server" / "tensorboard" / "site-2")
    assert got["train_loss"] == approx([(0, 2.0), (1, 1.0)])
    assert not (result.workspace / "server" / "mlflow.db").exists()


def wandb_records(path: Path) -> list[Any]:
    """The protobuf records of an offline W&B run file (LevelDB log framing: 32 KiB blocks
    of chunks with a 7-byte header: crc32, length, kind FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending, chunks = 7, b"", []
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:
            pos += room
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            chunks.append(pending + chunk)
        else:
            break
    return [wandb_internal_pb2.Record.FromString(chunk) for chunk in chunks]


def test_wandb_offline_runs_per_site(tmp_path: Path) -> None:
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'fedlift[wandb]')")
    result = tracking_job("wandb").simulator_run(tmp_path / "ws")
    files = sorted((result.workspace / "server" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2
    seen: dict[str, dict[int, dict[str, float]]] = {}
    for path in files:
        records = wandb_records(path)
        runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        site = runs[0].display_name
        assert runs[0].project == "tracking-job" and runs[0].run_group == result.job_id
        rows = seen.setdefault(site, {})
        for r in records:
            if r.WhichOneof("record_type") == "history":
                items = {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in r.history.item
                }
                rows.setdefault(r.history.step.num, {}).update(
                    {k: v for k, v in items.items() if not k.startswith("_")}
                )
    assert sorted(seen) == list(SITES)
    for i, site in enumerate(SITES):
        assert seen[site][0]["train_loss"] == pytest.approx(i + 1.0)
        assert seen[site][1]["train_loss"] == pytest.approx((i + 1) / 2)
        assert seen[site][1]["wandb_loss"] == pytest.approx(i + 1.0)


# ---------------------------------------------------------------- a deployed server


def test_a_deployed_server_writes_under_the_jobs_folder(tmp_path: Path) -> None:
    """In-test sites speak the protocol (as in test_deploy_server.py) and log one value each,
    and one record with a NaN step, which is refused; the job runs to its end."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    kits = tmp_path / "kits"
    provision("demo", f"localhost:{port}", list(SITES), ["admin@org"], kits)
    folder = tracking_job("tensorboard").export_job(tmp_path / "jobs")
    errors: list[BaseException] = []

    def site(name: str, address: str) -> None:
        transport = GrpcTransport(address, credentials=channel_credentials(kits / name))
        try:
            job_id = ""
            while not job_id:
                reply = transport.call(Message("next_job", {"wait": 0.5}), 30)
                job_id = reply.fields["job_id"] if reply.op == "job" else ""
            base = {"job_id": job_id, "site": name}
            transport.call(Message("register", base), 30)
            while True:
                reply = transport.call(Message("get_task", {**base, "wait": 1.0}), 30)
                if reply.op == "stop":
                    return
                if reply.op != "task":
                    continue
                model = model_from_wire(reply.fields["model"], list(reply.arrays))
                log = {**base, "key": "loss", "value": float(name[-1])}
                step = model.current_round
                transport.call(Message("log", {**log, "data_type": "METRIC", "step": step}), 30)
                with pytest.raises(ProtocolError, match="step must be an int"):
                    transport.call(Message("log", {**log, "step": float("nan")}), 30)
                fields, arrays = model_to_wire(FLModel(params=model.params))
                body = {**base, "task_id": reply.fields["task_id"], "model": fields}
                transport.call(Message("submit", body, arrays), 30)
        except BaseException as exc:
            errors.append(exc)
        finally:
            transport.close()

    with DeployServer(kits / "server", tmp_path / "ws", address="127.0.0.1:0") as server:
        admin = GrpcTransport(server.address, credentials=channel_credentials(kits / "admin@org"))
        zipped = np.frombuffer(zip_dir(folder), np.uint8)
        job_id = admin.call(Message("job_submit", {}, [zipped]), 30).fields["job_id"]
        threads = [threading.Thread(target=site, args=(n, server.address)) for n in SITES]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        deadline = time.monotonic() + 30
        while admin.call(Message("job_status", {"job_id": job_id}), 30).fields["state"] not in (
            "finished", "failed",
        ) and time.monotonic() < deadline:  # fmt: skip
            time.sleep(0.05)
        state = admin.call(Message("job_status", {"job_id": job_id}), 30).fields
        admin.close()
        server_dir = server.jobs_dir / job_id / "server"
    assert errors == [] and state["state"] == "finished", (errors, state)
    for site_name in SITES:  # site-N logged N each round, and a NaN step that was refused
        n = float(site_name[-1])
        assert scalars(server_dir / "tensorboard" / site_name) == {"loss": [(0, n), (1, n)]}
