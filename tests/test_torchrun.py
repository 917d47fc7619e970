"""Multi-process launchers (torchrun): every rank trains, rank 0 reports, and no rank outlives
its job, whether the job ends, a rank fails, or the site or the simulator is killed.

torchrun starts each rank in a session (process group) of its own, so neither a signal to
the launcher's group nor the parent-death signal reaches them. The fast tests run that
layout with ``scripts/session_ranks.py`` (torchrun's process tree and signal handling,
without torch's import time); the ``slow`` ones run real ``torchrun`` with a DDP script.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import fedlift.client as flare
from conftest import SCRIPTS, worker_pids
from fedlift import FedAvgJob, ScriptRunner
from fedlift.client._api import _reset_for_tests
from fedlift.client._link import ClientContext, Task, set_current_link
from fedlift.errors import ClientFailedError
from test_external_process import assert_no_leftovers, processes_of

SESSION_RANKS = f"{sys.executable} -u {SCRIPTS / 'session_ranks.py'}"


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def ranks_seen(workspace: Path, site: str = "site-1") -> list[tuple[int, int, str, int]]:
    """(pid, pgid, rank, round) of every rank's every round, from the site's ranks.txt."""
    lines = (workspace / site / "ranks.txt").read_text().splitlines()
    return [(int(p), int(g), r, int(n)) for p, g, r, n, *_ in (line.split() for line in lines)]


def assert_every_rank_gone(workspace: Path) -> None:
    """No process of the job is left: none by command line, no worker, and none of the
    ranks' processes or process groups (each rank led a group of its own)."""
    assert_no_leftovers(workspace)
    seen = [row for site in ("site-1", "site-2") for row in ranks_seen(workspace, site)]
    assert seen
    assert [pid for pid, *_ in seen if alive(pid)] == []
    groups = {pgid for _, pgid, *_ in seen}
    in_groups = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[2]) in groups and fields[0] != "Z":
                in_groups.append(entry.name)
    assert in_groups == []


class QueueLink:
    """A rank's view of its worker: every task in turn, as the worker's script service
    hands them to each rank (it waits for no answer from ranks other than 0)."""

    def __init__(self, rounds: int) -> None:
        self.context = ClientContext("job", "site-1", 0, 1, {})
        self.tasks = [
            Task(f"t{r}", "train", flare.FLModel(params={"w": np.zeros(1)}, current_round=r))
            for r in range(rounds)
        ]
        self.submitted: list[str] = []

    def next_task(self, timeout: float | None) -> Task | None:
        return self.tasks.pop(0) if self.tasks else None

    def submit(self, task_id: str, model: flare.FLModel) -> None:
        self.submitted.append(task_id)

    def log(self, *record: object) -> None:  # (its signature differs between versions)
        pass

    def close(self) -> None:
        pass


@pytest.fixture
def queue_link() -> Iterator[QueueLink]:
    _reset_for_tests()
    link = QueueLink(3)
    set_current_link(link)
    yield link
    set_current_link(None)
    _reset_for_tests()


def rounds_of_a_ddp_loop(rank: int) -> list[int | None]:
    """NVFlare's DDP script loop: every rank receives, only rank 0 sends."""
    flare.init(rank=rank)
    seen = []
    for _ in range(10):  # a loop that never ends would stop here
        if not flare.is_running():
            break
        model = flare.receive()
        assert model is not None
        seen.append(model.current_round)
        if rank == 0:
            flare.send(flare.FLModel(params={"w": np.ones(1)}))
    return seen


def test_a_rank_other_than_0_that_never_sends_moves_on_with_every_round(
    queue_link: QueueLink,
) -> None:
    assert rounds_of_a_ddp_loop(rank=1) == [0, 1, 2]
    assert queue_link.submitted == []
    assert flare.receive() is None


def test_rank_0_sends_every_round(queue_link: QueueLink) -> None:
    assert rounds_of_a_ddp_loop(rank=0) == [0, 1, 2]
    assert queue_link.submitted == ["t0", "t1", "t2"]


def test_rank_0_without_send_keeps_its_round(queue_link: QueueLink) -> None:
    """Rank 0 reports for the site: its round stays open until it sends (as before)."""
    flare.init(rank=0)
    assert flare.is_running() and flare.receive().current_round == 0  # type: ignore[union-attr]
    assert flare.is_running() and flare.receive().current_round == 0  # type: ignore[union-attr]


def rank_job(script_args: str = "", num_rounds: int = 2, **runner: object) -> FedAvgJob:
    job = FedAvgJob("ranks", 2, num_rounds, {"w": np.zeros(3, np.float32)}, final_evaluation=False)
    job.to_clients(
        ScriptRunner(
            SCRIPTS / "rank_client.py",
            script_args=script_args,
            launch_external_process=True,
            command=SESSION_RANKS,
            framework="numpy",
            **runner,  # type: ignore[arg-type]
        )
    )
    return job


def test_ranks_in_sessions_of_their_own_that_ignore_sigterm_are_killed_at_the_end(
    tmp_path: Path,
) -> None:
    """Every rank ignores SIGTERM and rank 1 never returns: the launcher passes SIGTERM on
    and waits 30 s, as torchrun does; fedlift SIGKILLs the whole tree 5 s after its SIGTERM
    (it used to SIGKILL the launcher only, leaving rank 1 alive in its own session)."""
    ws = tmp_path / "ws"
    result = rank_job("--stubborn", stop_timeout=0.5).simulator_run(ws)
    # Each round adds the mean of site_index + 1 over the sites: (1 + 2) / 2, twice.
    np.testing.assert_allclose(result.params["w"], np.full(3, 3.0))
    rows = ranks_seen(ws)
    assert sorted({(rank, rnd) for _, _, rank, rnd in rows}) == [
        ("0", 0),
        ("0", 1),
        ("1", 0),
        ("1", 1),
    ]
    assert all(pid == pgid for pid, pgid, *_ in rows)  # each rank leads its own group
    assert_every_rank_gone(ws)


def test_a_failing_rank_fails_the_job_and_no_rank_is_left(tmp_path: Path) -> None:
    """The site's error holds the rank's own traceback, not only its launcher's summary."""
    ws = tmp_path / "ws"
    with pytest.raises(ClientFailedError) as info:
        rank_job("--fail-round 1").simulator_run(ws)
    assert "rank 1 of the script raised:\nTraceback" in str(info.value)
    assert "ValueError: rank 1 fails in round 1" in str(info.value)
    assert_every_rank_gone(ws)


def test_killing_the_worker_ends_its_ranks_too(tmp_path: Path) -> None:
    """site-1's worker is SIGKILLed while both its ranks train: the parent-death signal
    takes the launcher, and each rank, in a session of its own, sees its worker go (its own
    watch on the worker) and ends. (The job fails: it needs both sites.)"""
    ws = tmp_path / "ws"
    with pytest.raises(ClientFailedError, match="killed by signal 9"):
        rank_job("--kill-worker-round 1").simulator_run(ws)
    assert (ws / "site-1" / "worker-killed-by-0").exists()
    assert_every_rank_gone(ws)


# ------------------------------------------------------------- real torchrun, DDP on gloo

needs_torch = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None, reason="needs torch (pip install 'fedlift[torch]')"
)
TORCHRUN = "torchrun --nproc_per_node=2"


def ddp_job(script_args: str = "", num_rounds: int = 2) -> FedAvgJob:
    job = FedAvgJob(
        "ddp", 2, num_rounds, {"weight": np.zeros((1, 1), np.float32)}, final_evaluation=False
    )
    job.to_clients(
        ScriptRunner(
            SCRIPTS / "ddp_client.py",
            script_args=script_args,
            launch_external_process=True,
            command=TORCHRUN,
            framework="pytorch",
            stop_timeout=10.0,
        )
    )
    return job


@needs_torch
@pytest.mark.slow
def test_ddp_trains_across_two_torchrun_ranks_and_rank_0_reports(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    result = ddp_job().simulator_run(ws)
    # One SGD step (lr 0.5) a round on 0.5 * (w - y)^2, DDP averaging the ranks' gradients
    # w - y: site s has y = 2 + 4s on rank 0 and 4 + 4s on rank 1, so w' = w - 0.5 (w - 3 - 4s).
    # Round 0 from w = 0: site-1 1.5, site-2 3.5, mean 2.5.
    # Round 1 from 2.5: site-1 1.25 + 1.5 = 2.75, site-2 1.25 + 3.5 = 4.75, mean 3.75.
    # (Rank 0 alone, without DDP, would give 2.0 and then 3.0.)
    np.testing.assert_allclose(result.params["weight"], [[3.75]], rtol=1e-6)
    for site in ("site-1", "site-2"):
        lines = [line.split() for line in (ws / site / "ranks.txt").read_text().splitlines()]
        assert sorted((rank, rnd, world) for _, _, rank, rnd, world in lines) == [
            ("0", "0", "2"),
            ("0", "1", "2"),
            ("1", "0", "2"),
            ("1", "1", "2"),
        ]
        assert all(pid == pgid for pid, pgid, *_ in lines)  # torchrun: a session per rank
    assert_every_rank_gone(ws)


@needs_torch
@pytest.mark.slow
def test_a_torchrun_rank_that_raises_fails_the_job_and_no_rank_is_left(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    with pytest.raises(ClientFailedError) as info:
        ddp_job("--fail-round 1").simulator_run(ws)
    text = str(info.value)
    assert "rank 1 of the script raised:\nTraceback" in text, text
    assert "ValueError: rank 1 fails in round 1" in text
    assert "exited with status 1 (torchrun --nproc_per_node=2" in text
    assert_every_rank_gone(ws)


@needs_torch
@pytest.mark.slow
def test_killing_a_torchrun_site_ends_its_ranks(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    with pytest.raises(ClientFailedError, match="killed by signal 9"):
        ddp_job("--kill-worker-round 1").simulator_run(ws)
    assert (ws / "site-1" / "worker-killed-by-0").exists()
    assert_every_rank_gone(ws)


JOB_SCRIPT = """
import sys
from pathlib import Path
import numpy as np
from fedlift import FedAvgJob, ScriptRunner

job = FedAvgJob("ddp", 2, 3, {"weight": np.zeros((1, 1), np.float32)}, final_evaluation=False)
job.to_clients(ScriptRunner(sys.argv[2], script_args="--ready-file " + sys.argv[3],
                            launch_external_process=True, command=sys.argv[4],
                            framework="pytorch"))
job.simulator_run(Path(sys.argv[1]))
"""


@needs_torch
@pytest.mark.slow
def test_killing_the_simulator_leaves_no_rank_behind(tmp_path: Path) -> None:
    """The simulator (the job script's process) is SIGKILLed while every rank trains: each
    worker loses its server, retries for 30 s (its reconnect window), then ends its
    script's whole tree on the way out."""
    ws, ready = tmp_path / "ws", tmp_path / "ready"
    (tmp_path / "job.py").write_text(JOB_SCRIPT)
    argv = [sys.executable, str(tmp_path / "job.py"), str(ws), str(SCRIPTS / "ddp_client.py")]
    simulator = subprocess.Popen(
        [*argv, str(ready), TORCHRUN],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"),
    )
    try:
        deadline = time.monotonic() + 300
        while not ready.exists() and simulator.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ready.exists(), "round 1 never started"
        assert len(processes_of(ws)) >= 4  # torchrun and 2 ranks a site, at least
        simulator.send_signal(signal.SIGKILL)
        simulator.wait()
        deadline = time.monotonic() + 120
        while (processes_of(ws) or worker_pids(ws)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert processes_of(ws) == [] and worker_pids(ws) == []
        seen = [row for site in ("site-1", "site-2") for row in ranks_seen(ws, site)]
        assert len({pid for pid, *_ in seen}) == 4
        assert [pid for pid, *_ in seen if alive(pid)] == []
    finally:
        if simulator.poll() is None:
            simulator.kill()
