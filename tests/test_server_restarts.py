"""The server process SIGKILLed at each phase of a job and started again: while the job
waits for its sites, while the sites train, while results arrive (mid-upload, through the
proxy), while a checkpoint is being written, between rounds, and twice in a row. Every time
it resumes from the last completed round; the final model is bit-identical to FedAvg done
by hand and no round is missing or counted twice."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from faultproxy import (
    SITES,
    Deployment,
    differing_bytes,
    exact_job,
    expected_final,
    final_model,
    leaked_processes,
    rounds_lost,
    shm_segments,
    temp_files,
    wait_until,
)


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


def checkpointed_round(server_dir: Path) -> int:
    done = _json(server_dir / "checkpoint.json").get("round_done")
    return done if isinstance(done, int) else -1


def kill_while_checkpointing(deployment: Deployment, job_id: str, timeout: float = 60) -> bool:
    """Kill the server inside the window between a round's record (its metrics.jsonl line)
    and the checkpoint that names it; True when the kill landed there."""
    server_dir = deployment.job_dir(job_id) / "server"
    metrics = server_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        recorded = _lines(metrics) - 1  # the round whose line is the last one (0-based)
        if recorded >= 0 and checkpointed_round(server_dir) < recorded:
            deployment.kill_server()
            deployment.server.wait(10)
            return checkpointed_round(server_dir) < recorded
        time.sleep(0.0005)  # a tight poll: the window is a few milliseconds
    deployment.kill_server()
    return False


def finish_and_measure(
    reliability: Any,
    deployment: Deployment,
    job: Path,
    job_id: str,
    rounds: int,
    root: Path,
    resumed: bool = True,
) -> tuple[dict[str, Any], int, int, int, list[int]]:
    try:
        status = deployment.wait(job_id, timeout=240)
        metrics = deployment.metrics(job_id)
        model = final_model(deployment, job_id)
        log = (deployment.logs / "server.log").read_text()
    finally:
        deployment.close()
    lost = rounds_lost(metrics, rounds)
    train_rounds = [m["round"] for m in metrics if m["task"] == "train"]
    corrupted = differing_bytes(model, expected_final(job, rounds))
    leaks = len(leaked_processes(deployment.started, root))
    leaks += len(shm_segments(deployment.session)) + len(temp_files(deployment.workspace))
    reliability.measure(rounds_lost=lost, bytes_corrupted=corrupted, leaks=leaks)
    assert status["state"] == "finished", (status, deployment.log_tail())
    assert ("resum" in log) == resumed
    return status, lost, corrupted, leaks, train_rounds


@pytest.mark.reliability
def test_server_killed_while_the_job_waits_for_its_sites(reliability: Any, tmp_path: Path) -> None:
    rounds = 3
    job = exact_job(tmp_path, rounds, sleep=0.0)
    deployment = Deployment(tmp_path, SITES, start_sites=False)
    job_id = deployment.submit(job)
    server_log = deployment.logs / "server.log"
    wait_until(lambda: "waits for 2 sites" in server_log.read_text(), 60, "the job to wait")
    deployment.restart_server()
    reliability.fault("server SIGKILL while a job waits for its sites")
    assert deployment.status(job_id)["state"] == "submitted"  # queued again, not lost
    deployment.start_sites(SITES)
    _, lost, corrupted, leaks, train_rounds = finish_and_measure(
        reliability, deployment, job, job_id, rounds, tmp_path, resumed=False
    )
    assert (lost, corrupted, leaks) == (0, 0, 0)
    assert train_rounds == list(range(rounds))


@pytest.mark.reliability
def test_server_killed_at_each_phase_of_a_round_resumes_bit_identically(
    reliability: Any, tmp_path: Path
) -> None:
    repeats = 2 if reliability.full else 1
    rounds = 4 * repeats + 3
    job = exact_job(tmp_path, rounds, sleep=0.6)
    deployment = Deployment(tmp_path, SITES)
    proxy = deployment.proxy
    assert proxy is not None
    job_id = deployment.submit(job)
    server_dir = deployment.job_dir(job_id) / "server"
    meta = deployment.job_dir(job_id) / "meta.json"
    landed: dict[str, int] = {}
    try:
        target = 0
        for _ in range(repeats):
            # Mid-training: a round ended, the next one's models went out, the sites "train"
            # for 0.6 s; kill 0.3 s into it.
            deployment.wait_round(job_id, target)
            time.sleep(0.3)
            deployment.restart_server()
            reliability.fault("server SIGKILL while the sites train")
            target = checkpointed_round(server_dir) + 1
            # While results arrive: SIGKILL once 2.5 MiB of the next upload went through.
            deployment.wait_round(job_id, target)
            up = proxy.cut_after(5 << 19, direction="up", action=deployment.kill_server)
            assert up.fired.wait(60), deployment.log_tail()
            landed["mid-upload"] = landed.get("mid-upload", 0) + int(up.dropped > 0)
            deployment.restart_server()
            reliability.fault("server SIGKILL while a result is being uploaded")
            # While the checkpoint of a completed round is written.
            hit = kill_while_checkpointing(deployment, job_id)
            landed["checkpointing"] = landed.get("checkpointing", 0) + int(hit)
            deployment.restart_server()
            reliability.fault("server SIGKILL between a round's record and its checkpoint")
            # Between rounds: as soon as meta.json records a newly completed round.
            before = _json(meta).get("round_done")
            wait_until(lambda b=before: _json(meta).get("round_done") not in (None, b), 90,
                       "the next round to complete")  # fmt: skip
            deployment.restart_server()
            reliability.fault("server SIGKILL between rounds")
            target = checkpointed_round(server_dir) + 1
    except BaseException:
        deployment.close()
        raise
    _, lost, corrupted, leaks, train_rounds = finish_and_measure(
        reliability, deployment, job, job_id, rounds, tmp_path
    )
    print(f"server restarts: kills landed {landed}; lost {lost}, {corrupted} bytes differ, "
          f"{leaks} leaks")  # fmt: skip
    assert (lost, corrupted, leaks) == (0, 0, 0)
    assert train_rounds == list(range(rounds))
    assert landed["mid-upload"] == repeats  # the kill cut an upload short


@pytest.mark.reliability
def test_server_killed_twice_in_a_row_resumes_bit_identically(
    reliability: Any, tmp_path: Path
) -> None:
    rounds = 6 if reliability.full else 4
    job = exact_job(tmp_path, rounds, sleep=0.4)
    deployment = Deployment(tmp_path, SITES)
    job_id = deployment.submit(job)
    try:
        deployment.wait_round(job_id, 0)
        deployment.restart_server()
        # Again, as soon as it answers: while the job resumes and the sites come back.
        deployment.restart_server()
        reliability.fault("server SIGKILL twice in a row (the second while resuming)")
    except BaseException:
        deployment.close()
        raise
    _, lost, corrupted, leaks, train_rounds = finish_and_measure(
        reliability, deployment, job, job_id, rounds, tmp_path
    )
    assert (lost, corrupted, leaks) == (0, 0, 0)
    assert train_rounds == list(range(rounds))
