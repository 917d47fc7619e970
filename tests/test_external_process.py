"""External-process mode: the script runs as a subprocess of its worker for the whole job."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import SCRIPTS, worker_pids
from fedlift import FedAvgJob, ScriptRunner
from fedlift.errors import ClientFailedError


def processes_of(workspace: Path) -> list[str]:
    """Every live process whose command line mentions the workspace (scripts, launchers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().split(") ", 1)[1][0]
        except (OSError, IndexError):
            continue
        if str(workspace) in cmdline and state != "Z":
            found.append(f"{entry.name}: {cmdline}")
    return found


def assert_no_leftovers(workspace: Path) -> None:
    deadline = time.monotonic() + 10
    while (processes_of(workspace) or worker_pids(workspace)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_of(workspace) == []
    assert worker_pids(workspace) == []


def make_job(script_args: str = "", n_clients: int = 2, num_rounds: int = 3, **runner: object):
    job = FedAvgJob(
        "ext", n_clients, num_rounds, {"w": np.zeros(4, np.float32)}, final_evaluation=True
    )
    job.to_clients(
        ScriptRunner(
            SCRIPTS / "numpy_client.py",
            script_args=script_args,
            launch_external_process=True,
            framework="numpy",
            **runner,  # type: ignore[arg-type]
        )
    )
    return job


def test_same_result_as_in_process_and_one_process_kept_across_rounds(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    result = make_job("--record").simulator_run(ws)
    # weights 1, 2; shifts 1, 2 -> 5/3 per round, 3 rounds
    np.testing.assert_allclose(result.params["w"], np.full(4, 5.0), rtol=1e-6)
    for site in ("site-1", "site-2"):
        lines = (ws / site / "rounds.txt").read_text().split("\n")[:-1]
        pids = {line.split()[0] for line in lines}
        assert [line.split()[2] for line in lines] == ["0", "1", "2", "3"]  # 3 rounds + final
        assert len(pids) == 1, f"{site} relaunched its script: {pids}"
        log = (ws / site / "log.txt").read_text()
        assert "launched" in log and "numpy_client.py" in log
    assert_no_leftovers(ws)


def test_a_raising_script_reports_its_exit_status_and_traceback(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(ClientFailedError) as info:
        make_job("--fail-round 1 --only-site 0").simulator_run(tmp_path / "ws")
    assert time.monotonic() - start < 30
    text = str(info.value)
    assert "site-1 failed" in text
    assert "exited with status 1" in text
    assert "ValueError: deliberate failure in round 1" in text  # from the stderr tail
    assert_no_leftovers(tmp_path / "ws")


def test_a_non_zero_exit_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ClientFailedError, match="exited with status 3"):
        make_job("--exit-round 0 --exit-code 3 --only-site 1").simulator_run(tmp_path / "ws")
    assert_no_leftovers(tmp_path / "ws")


def test_a_script_killed_with_sigkill_is_reported(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(ClientFailedError, match="killed by signal 9"):
        make_job("--kill-round 1 --only-site 0").simulator_run(tmp_path / "ws")
    assert time.monotonic() - start < 30
    assert_no_leftovers(tmp_path / "ws")


def test_a_script_that_never_calls_init_times_out_clearly(tmp_path: Path) -> None:
    with pytest.raises(ClientFailedError, match=r"did not call flare.init\(\) within 2 s"):
        make_job("--no-init --only-site 0", init_timeout=2.0).simulator_run(tmp_path / "ws")
    assert_no_leftovers(tmp_path / "ws")


def test_a_lingering_script_is_terminated_after_the_job(tmp_path: Path) -> None:
    start = time.monotonic()
    result = make_job("--linger", num_rounds=1, stop_timeout=1.0).simulator_run(tmp_path / "ws")
    assert result.params["w"][0] == pytest.approx(5 / 3)
    assert time.monotonic() - start < 30
    assert_no_leftovers(tmp_path / "ws")


def test_killing_the_worker_kills_its_script_too(tmp_path: Path) -> None:
    with pytest.raises(ClientFailedError, match="killed by signal 9"):
        make_job("--kill-parent-round 1 --only-site 1").simulator_run(tmp_path / "ws")
    assert_no_leftovers(tmp_path / "ws")


def test_other_ranks_receive_every_task_and_only_rank_0_reports(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    launcher = f"{sys.executable} -u {SCRIPTS / 'two_ranks.py'}"
    result = make_job("--record --lockstep", num_rounds=2, command=launcher).simulator_run(ws)
    np.testing.assert_allclose(result.params["w"], np.full(4, 10 / 3), rtol=1e-6)
    for site in ("site-1", "site-2"):
        lines = [line.split() for line in (ws / site / "rounds.txt").read_text().splitlines()]
        by_rank = {rank: [x[2] for x in lines if x[1] == rank] for rank in ("0", "1")}
        assert by_rank == {"0": ["0", "1", "2"], "1": ["0", "1", "2"]}
        assert all(x[3] == "True" for x in lines)
    assert_no_leftovers(ws)
