"""One job, three places: ``job.run(env)`` with SimEnv, PocEnv and ProdEnv, and the same
assertions on the run object in each.

SimEnv runs the simulator in this process; PocEnv starts a real POC (a server and two
sites as processes over mutual TLS) and must stop it; ProdEnv submits to a real
deployment server started here (provisioned kits, mutual TLS) whose sites are the real
site daemons (``DeployClient``, each job in a worker process of its own).
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import SCRIPTS, worker_pids
from fedlift import FedAvgJob, FedJob, PocEnv, ProdEnv, ScriptRunner, SimEnv
from fedlift.deploy import DeployServer, provision
from fedlift.deploy._client import DeployClient
from fedlift.errors import ConfigError, JobAbortedError, JobFailedError
from fedlift.job import Env, JobRun, RunStatus, read_rounds
from fedlift.model import load_safetensors

ROUNDS = 2
# The numpy test client: site i (0-based) returns the model plus (i + 1) with weight i + 1
# and reports accuracy i + 1 + round. With two sites, by hand:
STEP = (1 * 1 + 2 * 2) / 3  # each round adds the weighted mean of +1 and +2: 5/3
GLOBAL_AFTER = [STEP, 2 * STEP]  # the global model after rounds 0 and 1
ACCURACY = [(1 * 1 + 2 * 2) / 3, (1 * 2 + 2 * 3) / 3]  # 5/3 and 8/3: round 1 is the best


def numpy_job(script_args: str = "", rounds: int = ROUNDS, name: str = "envs-numpy") -> FedAvgJob:
    job = FedAvgJob(name, 2, rounds, {"w": np.zeros(4, np.float32)}, final_evaluation=False,
                    save_interval=0.0, round_timeout=120.0)  # fmt: skip
    job.to_clients(
        ScriptRunner(SCRIPTS / "numpy_client.py", script_args=script_args, framework="numpy")
    )
    return job


def check_run(run: JobRun, out: Path) -> None:
    """What every env's run must do, the same in each."""
    first = run.status()
    assert isinstance(first, RunStatus)
    assert first.job_id == run.job_id and first.num_rounds == ROUNDS
    assert first.state in ("submitted", "running", "finished"), first
    final = run.wait(timeout=180)
    assert final.ended and final.state == "finished", final
    assert (final.rounds_done, final.num_rounds, final.error) == (ROUNDS, ROUNDS, None)
    assert run.status() == final

    result = run.result()
    assert result.job_id == run.job_id
    np.testing.assert_allclose(result.global_model["w"], np.full(4, GLOBAL_AFTER[-1]), rtol=1e-6)
    # The best model is the one the clients evaluated in the best round: round 1 received
    # the global model of round 0.
    assert result.best_round == 1
    assert result.best_model is not None
    np.testing.assert_allclose(result.best_model["w"], np.full(4, GLOBAL_AFTER[0]), rtol=1e-6)
    assert result.best_value == pytest.approx(ACCURACY[1])
    assert [r.task for r in result.rounds] == ["train"] * ROUNDS
    assert [m["accuracy"] for m in result.metrics] == pytest.approx(ACCURACY)
    assert sorted(result.rounds[-1].clients) == ["site-1", "site-2"]
    assert result.final_metrics == {}

    folder = run.download(out)
    assert folder == out / run.job_id
    saved = load_safetensors(folder / "models" / "global_model.safetensors")
    np.testing.assert_allclose(saved["w"], np.full(4, GLOBAL_AFTER[-1]), rtol=1e-6)
    assert [r.round for r in read_rounds(folder / "metrics.jsonl")] == [0, 1]
    assert (folder / "log.txt").is_file() and (folder / "state.json").is_file()
    assert not (folder / "checkpoint").exists()  # resume state is not a result
    run.abort()  # a run that ended: nothing to stop
    assert run.status() == final


# ---------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: SimEnv(n_clients=0), "n_clients=0"),
        (lambda: SimEnv(threads=True), "threads=True"),
        (lambda: SimEnv(gpu="0,x"), "gpu='0,x'"),
        (lambda: SimEnv(gpu=0), "gpu=0"),  # type: ignore[arg-type]
        (lambda: SimEnv(quiet="no"), "'no'"),  # type: ignore[arg-type]
        (lambda: PocEnv(n_clients=65), "n_clients=65"),
        (lambda: PocEnv(n_clients=2.0), "n_clients=2.0"),  # type: ignore[arg-type]
        (lambda: PocEnv(workspace=""), "workspace=''"),
        (lambda: ProdEnv(kit=7), "kit=7"),  # type: ignore[arg-type]
    ],
)
def test_env_arguments_are_checked_where_they_enter(make: Any, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        make()
    assert "Received:" in str(info.value) and words in str(info.value)


def test_prod_env_needs_an_admin_kit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kits = provision("p", "127.0.0.1:1", ["site-1"], ["alice@org"], tmp_path / "kits")
    with pytest.raises(ConfigError, match="needs an admin's kit"):
        ProdEnv(kit=kits["site-1"])
    monkeypatch.delenv("FEDLIFT_KIT", raising=False)
    with pytest.raises(ConfigError, match="FEDLIFT_KIT"):
        ProdEnv()
    monkeypatch.setenv("FEDLIFT_KIT", str(kits["alice@org"]))
    assert ProdEnv().kit.name == "alice@org"


def test_run_takes_an_env() -> None:
    with pytest.raises(ConfigError, match="SimEnv, PocEnv or ProdEnv"):
        numpy_job().run("simulator")  # type: ignore[arg-type]
    assert isinstance(SimEnv(), Env) and isinstance(PocEnv(), Env)


# ---------------------------------------------------------------------------- SimEnv
def test_sim_env(tmp_path: Path) -> None:
    run = numpy_job().run(SimEnv(n_clients=2, threads=2, workspace=tmp_path / "ws", quiet=True))
    check_run(run, tmp_path / "out")


def test_sim_env_failed_and_aborted_runs(tmp_path: Path) -> None:
    failing = numpy_job("--fail-round 1 --only-site 0")
    run = failing.run(SimEnv(workspace=tmp_path / "ws", quiet=True))
    status = run.wait(timeout=180)
    assert status.state == "failed" and "deliberate failure in round 1" in str(status.error)
    with pytest.raises(JobFailedError, match="deliberate failure in round 1"):
        run.result()

    hanging = numpy_job("--hang-round 0 --only-site 1")
    run = hanging.run(SimEnv(workspace=tmp_path / "ws2", quiet=True))
    with pytest.raises(ConfigError, match="already running in this process"):
        numpy_job().run(SimEnv(workspace=tmp_path / "ws3", quiet=True))
    assert run.status().state == "running"
    run.abort()
    status = run.wait(timeout=180)
    assert status.state == "aborted" and "run.abort()" in str(status.error)
    with pytest.raises(JobAbortedError):
        run.result()


def test_sim_env_ctrl_c_in_wait_stops_the_simulation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    workspace = tmp_path / "ws"
    run = numpy_job("--sleep 0.2", rounds=100).run(SimEnv(workspace=workspace, quiet=True))
    ctrl_c_while_waiting(run, monkeypatch)
    status = run.status()
    assert status.state == "aborted" and "KeyboardInterrupt" in str(status.error)
    assert worker_pids(workspace) == []
    with pytest.raises(JobAbortedError):
        run.result()


def ctrl_c_while_waiting(run: JobRun, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C arrives where a waiting user's does: in wait()'s sleep between two looks."""

    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    assert not run.status().ended
    monkeypatch.setattr(run, "_block", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run.wait()
    monkeypatch.undo()


# ---------------------------------------------------------------------------- PocEnv
def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def processes_in(workspace: Path) -> list[int]:
    """Live processes whose command line names ``workspace`` (a POC's server and sites)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if entry.name.isdigit() and str(workspace) in cmdline and _alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def test_poc_env_starts_a_poc_runs_the_job_and_stops_it(tmp_path: Path) -> None:
    workspace = tmp_path / "poc"
    run = numpy_job().run(PocEnv(n_clients=2, workspace=workspace))
    pids = [int(p) for p in json.loads((workspace / "poc.json").read_text())["pids"].values()]
    assert len(pids) == 3
    check_run(run, tmp_path / "out")
    assert [p for p in pids if _alive(p)] == []  # the run is over: so is its POC
    assert not (workspace / "poc.json").exists()
    assert (workspace / "results" / run.job_id / "metrics.jsonl").is_file()
    created = json.loads((workspace / ".fedlift-poc.json").read_text())["created"]
    assert "results" in created  # so the next POC start may replace it, and only it


def test_poc_env_refuses_a_folder_of_user_files(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "train.csv").write_text("x,y\n1,2\n")
    (folder / "notes.md").write_text("mine\n")
    with pytest.raises(ConfigError, match="not empty and was not made by"):
        numpy_job().run(PocEnv(workspace=folder))
    assert sorted(p.name for p in folder.iterdir()) == ["data", "notes.md"]
    assert (folder / "data" / "train.csv").read_text() == "x,y\n1,2\n"


# ---------------------------------------------------------------------------- ProdEnv
class Deployment:
    """A deployment server in this process and two real site daemons, all over mTLS."""

    def __init__(self, root: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.kits = provision("envs", f"127.0.0.1:{port}", ["site-1", "site-2"], ["alice@org"],
                              root / "kits")  # fmt: skip
        self.server = DeployServer(self.kits["server"], root / "server-ws",
                                   address=f"127.0.0.1:{port}")  # fmt: skip
        self.sites = [
            DeployClient(self.kits[s], root / f"{s}-ws", poll_seconds=5.0, max_backoff=1.0)
            for s in ("site-1", "site-2")
        ]
        self.threads = [threading.Thread(target=s.run, daemon=True) for s in self.sites]
        for thread in self.threads:
            thread.start()

    def close(self) -> None:
        for site in self.sites:
            site.stop()
        for thread in self.threads:
            thread.join(30)
        self.server.stop()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    d = Deployment(tmp_path_factory.mktemp("prod"))
    try:
        yield d
    finally:
        d.close()


def test_prod_env(deployment: Deployment, tmp_path: Path) -> None:
    run = numpy_job().run(ProdEnv(kit=deployment.kits["alice@org"]))
    check_run(run, tmp_path / "out")


def test_prod_env_failed_and_aborted_runs(deployment: Deployment, tmp_path: Path) -> None:
    env = ProdEnv(kit=deployment.kits["alice@org"])
    run = numpy_job("--fail-round 1 --only-site 0").run(env)
    status = run.wait(timeout=180)
    assert status.state == "failed" and "deliberate failure in round 1" in str(status.error)
    with pytest.raises(JobFailedError, match="deliberate failure in round 1"):
        run.result()

    run = numpy_job("--hang-round 0 --only-site 1").run(env)
    run.abort()
    status = run.wait(timeout=180)
    assert status.state == "aborted" and "alice@org" in str(status.error)
    with pytest.raises(JobAbortedError):
        run.result()


def test_poc_env_stops_its_poc_when_the_submit_is_refused(tmp_path: Path) -> None:
    """The POC's server runs no app code (`fedlift server start` without
    --allow-app-code): a job with a strategy from its app folder is refused at submit."""
    app = SCRIPTS / "strategy_app"
    sys.path.insert(0, str(app))
    try:
        from my_strategy import HalfStep  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(app))
    job = FedJob("envs-refused", 2, 1, {"w": np.zeros(3, np.float32)}, strategy=HalfStep())
    job.to_clients(ScriptRunner(app / "train.py", framework="numpy"))
    workspace = tmp_path / "poc"
    with pytest.raises(ConfigError, match="the job was refused"):
        job.run(PocEnv(workspace=workspace))
    assert processes_in(workspace) == [] and not (workspace / "poc.json").exists()


def test_poc_env_ctrl_c_in_wait_stops_the_poc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    workspace = tmp_path / "poc"
    # 100 rounds of at least 0.2 s: far from over when Ctrl-C comes, and no round long.
    run = numpy_job("--sleep 0.2", rounds=100).run(PocEnv(workspace=workspace))
    assert len(processes_in(workspace)) >= 3  # the server and two sites
    ctrl_c_while_waiting(run, monkeypatch)
    assert processes_in(workspace) == []
    status = run.status()
    assert status.state == "aborted" and "KeyboardInterrupt" in str(status.error)
    with pytest.raises(JobAbortedError):
        run.result()
