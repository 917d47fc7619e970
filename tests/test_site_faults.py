"""Sites that die or hang, in every phase, with real worker processes and real SIGKILLs.

A site whose process is gone is left out of the round while ``min_clients`` still holds
(under either error policy), its worker is started again (at most 3 times a job) and it
takes part in later rounds; when too few sites are left the job fails at once with the
reason. Every test computes the final model by hand from the sites that took part in each
round, and checks that no worker process and no shared-memory segment of the run is left.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from conftest import SCRIPTS, worker_pids
from fedlift import FedAvgJob, ScriptRunner
from fedlift.codec import _remote
from fedlift.errors import ClientFailedError
from fedlift.simulator import SimulationResult, _simulator

pytestmark = pytest.mark.reliability

SHM = Path("/dev/shm")
ALL3 = ["site-1", "site-2", "site-3"]


def initial_model() -> dict[str, np.ndarray]:
    # 'w' is over 1 MiB: results are read straight from the clients' memory.
    return {"w": np.zeros(400_000, np.float32), "b": np.zeros(4, np.float32)}


def make_job(
    n: int,
    args: str,
    rounds: int = 3,
    min_clients: int | None = None,
    policy: str = "fail",
    round_timeout: float = 120.0,
) -> FedAvgJob:
    job = FedAvgJob(
        "faults",
        n_clients=n,
        num_rounds=rounds,
        initial_model=initial_model(),
        min_clients=min_clients,
        final_evaluation=False,
        on_client_error=policy,  # type: ignore[arg-type]
        round_timeout=round_timeout,
        register_timeout=120,
    )
    job.to_clients(ScriptRunner(SCRIPTS / "numpy_client.py", script_args=args, framework="numpy"))
    return job


def by_hand(rounds: list[list[str]]) -> float:
    """numpy_client: site i adds i with weight i; a round adds the weighted mean of the
    shifts of the sites that answered it."""
    total = 0.0
    for clients in rounds:
        ids = [int(site.split("-")[1]) for site in clients]
        total += sum(i * i for i in ids) / sum(ids)
    return total


def session_spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records the simulator's (real) shared-memory session ids."""
    seen: list[str] = []
    real = _simulator.secrets.token_hex

    def token_hex(n: int) -> str:
        seen.append(real(n))
        return seen[-1]

    monkeypatch.setattr(_simulator, "secrets", SimpleNamespace(token_hex=token_hex))
    return seen


def leaks(ws: Path, sessions: list[str]) -> int:
    segments = [p for s in sessions for p in SHM.glob(f"fedlift-{s}-*")]
    return len(worker_pids(ws)) + len(segments)


def check_run(
    reliability: Any, result: SimulationResult, ws: Path, sessions: list[str], rounds: int
) -> list[list[str]]:
    """Measure and assert: every round done, the model as computed by hand, no leaks."""
    clients = [sorted(r.clients) for r in result.rounds]
    expected = by_hand(clients)
    corrupted = sum(
        int(np.sum(~np.isclose(v, expected, rtol=1e-6))) * v.itemsize
        for v in result.params.values()
    )
    leaked = leaks(ws, sessions)
    lost = rounds - len(result.rounds)
    reliability.measure(rounds_lost=lost, bytes_corrupted=corrupted, leaks=leaked)
    assert (lost, corrupted, leaked) == (0, 0, 0)
    return clients


@pytest.mark.reliability
def test_a_site_killed_while_training_is_left_out_and_rejoins(
    reliability: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reliability.fault("site SIGKILL while training")
    sessions = session_spy(monkeypatch)
    ws = tmp_path / "ws"
    result = make_job(3, "--kill-round 1 --only-site 1", min_clients=2).simulator_run(ws)
    clients = check_run(reliability, result, ws, sessions, 3)
    assert clients == [ALL3, ["site-1", "site-3"], ALL3]  # site-2 back in round 3
    log = (ws / "server" / "log.txt").read_text()
    assert "killed by signal 9" in log and "restarting its client process (1 of 3)" in log


@pytest.mark.reliability
def test_a_site_killed_before_init_rejoins(
    reliability: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reliability.fault("site SIGKILL before flare.init()")
    sessions = session_spy(monkeypatch)
    ws = tmp_path / "ws"
    result = make_job(3, "--kill-before-init --only-site 1", min_clients=2).simulator_run(ws)
    clients = check_run(reliability, result, ws, sessions, 3)
    # Whether site-2 makes round 1 depends on when it died; it is back by the last round.
    assert all({"site-1", "site-3"} <= set(c) for c in clients) and clients[-1] == ALL3
    assert (ws / "site-2" / "killed-before-init").exists()


@pytest.mark.reliability
def test_a_site_killed_between_rounds_rejoins(
    reliability: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reliability.fault("site SIGKILL between rounds (after its send() returned)")
    sessions = session_spy(monkeypatch)
    ws = tmp_path / "ws"
    job = make_job(3, "--kill-after-send-round 0 --only-site 1", min_clients=2)
    result = job.simulator_run(ws)
    clients = check_run(reliability, result, ws, sessions, 3)
    assert clients[0] == ALL3 and clients[-1] == ALL3
    assert "restarting its client process (1 of 3)" in (ws / "server" / "log.txt").read_text()


@pytest.mark.reliability
def test_a_site_killed_while_its_result_is_read_reruns_the_round_without_it(
    reliability: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server is reading site-2's result out of its memory when site-2 is SIGKILLed:
    the part already folded cannot be taken out again, so the round runs again without it."""
    reliability.fault("site SIGKILL while the server reads its result")
    sessions = session_spy(monkeypatch)
    real = _remote.RemoteArray.read_into
    killed: list[int] = []

    def read_into(self: _remote.RemoteArray, out: np.ndarray, start: int = 0) -> None:
        # Once: the second block of a result from site-2's process, in round 2.
        if not killed and start > 0 and self.pid in victims():
            os.kill(self.pid, signal.SIGKILL)
            killed.append(self.pid)
            deadline = time.monotonic() + 20
            while _alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.01)
        real(self, out, start)

    ws = tmp_path / "ws"

    def victims() -> set[int]:
        marker = ws / "site-2" / "rounds.txt"  # --record: pid and round of each task
        if not marker.exists():
            return set()
        rows = [line.split() for line in marker.read_text().splitlines()]
        return {int(row[0]) for row in rows if row[2] == "1"}

    monkeypatch.setattr(_remote.RemoteArray, "read_into", read_into)
    result = make_job(3, "--record", min_clients=2).simulator_run(ws)
    clients = check_run(reliability, result, ws, sessions, 3)
    assert len(killed) == 1
    assert clients == [ALL3, ["site-1", "site-3"], ALL3]
    log = (ws / "server" / "log.txt").read_text()
    assert "round 2: site-2 failed: its result could not be read" in log
    assert "it runs again without site-2" in log


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.reliability
def test_a_hanging_site_is_left_out_after_the_round_timeout(
    reliability: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reliability.fault("site hangs (never answers) in the last round")
    sessions = session_spy(monkeypatch)
    ws = tmp_path / "ws"
    job = make_job(3, "--hang-round 1 --only-site 1", rounds=2, min_clients=2, round_timeout=6)
    result = job.simulator_run(ws)
    clients = check_run(reliability, result, ws, sessions, 2)
    assert clients == [ALL3, ["site-1", "site-3"]]


@pytest.mark.reliability
@pytest.mark.parametrize("policy", ["fail", "exclude"])
def test_a_kill_that_leaves_too_few_sites_fails_the_job_at_once(
    reliability: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, policy: str
) -> None:
    reliability.fault(f"site SIGKILL with min_clients = n (policy {policy})")
    sessions = session_spy(monkeypatch)
    ws = tmp_path / "ws"
    job = make_job(2, "--kill-round 1 --only-site 0", policy=policy, round_timeout=3600)
    started = time.monotonic()
    with pytest.raises(ClientFailedError) as info:
        job.simulator_run(ws)
    elapsed = time.monotonic() - started
    message = str(info.value)
    assert "site-1 failed: the client process was killed by signal 9" in message
    assert "cannot reach min_clients=2" in message
    assert elapsed < 600  # at once: not after the hour of round_timeout
    leaked = leaks(ws, sessions)
    reliability.measure(leaks=leaked)
    assert leaked == 0


@pytest.mark.reliability
def test_a_raising_script_is_left_out_under_exclude_and_rejoins(
    reliability: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reliability.fault("site's script raises in round 2 (policy exclude)")
    sessions = session_spy(monkeypatch)
    ws = tmp_path / "ws"
    job = make_job(3, "--fail-round 1 --only-site 1", rounds=4, min_clients=2, policy="exclude")
    result = job.simulator_run(ws)
    clients = check_run(reliability, result, ws, sessions, 4)
    # Its worker exits after the error, maybe holding round 3's task already (lost with
    # it); the restarted worker takes part by round 4.
    assert clients[:2] == [ALL3, ["site-1", "site-3"]] and clients[-1] == ALL3
    log = (ws / "server" / "log.txt").read_text()
    assert "site-2 is left out of task 'train'" in log
    assert "ValueError: deliberate failure in round 1" in log  # with its traceback


@pytest.mark.reliability
def test_a_site_that_keeps_dying_is_restarted_three_times_then_left_out(
    reliability: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reliability.fault("site SIGKILLed in every round (restarts run out)")
    sessions = session_spy(monkeypatch)
    ws = tmp_path / "ws"
    job = make_job(3, "--die-every-round --only-site 1", rounds=5, min_clients=2)
    result = job.simulator_run(ws)
    clients = check_run(reliability, result, ws, sessions, 5)
    assert all("site-2" not in c for c in clients)
    log = (ws / "server" / "log.txt").read_text()
    assert "restarting its client process (3 of 3)" in log
    assert "no restart left" in log
