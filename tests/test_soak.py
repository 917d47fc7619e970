"""Soak: many rounds of a small NumPy job, in the simulator (8 client processes) and deployed
(a real server process and two site daemons). The server's RSS, open file descriptors and
threads stay flat after warm-up (< 5% growth), nothing is left behind (processes,
/dev/shm/fedlift-* segments, temporary files), and the model is FedAvg done by hand, bit for
bit. Full forms (200 simulator rounds, 50 deployed) run under ``reliability.full``."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from conftest import worker_pids
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
)
from fedlift.server._store import load_params

GROWTH_LIMIT = 0.05
WARMUP = 0.4
"""The simulator's first 40% of rounds are warm-up (its thread count steps up to a plateau
as the gRPC server's pool starts workers lazily: 44 -> 50 threads by round 35 of 200, then
flat)."""
DEPLOYED_WARMUP = 20
"""The deployed server's RSS climbs for its first ~20 rounds (malloc arenas of the threads
that serve calls fill up) and is flat after that: in 50 rounds of a 1 MiB model, 84 MB at
round 0, 102 MB at round 10, 104-110 MB from round 20 on."""


def process_figures(pid: int) -> tuple[int, int, int] | None:
    """(RSS bytes, threads, open fds) of ``pid`` from /proc; None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    rss = int(fields["VmRSS"].split()[0]) * 1024
    return rss, int(fields["Threads"]), fds


@dataclass(eq=False)
class Sampler(threading.Thread):
    """Samples a process each time ``metrics`` gains a line (a round ended)."""

    pid: int
    metrics: Path
    session: str | None = None
    samples: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)
    """round -> (RSS, threads, fds, shared-memory segments), sampled once it is recorded."""

    def __post_init__(self) -> None:
        super().__init__(daemon=True)
        self.done = threading.Event()

    def run(self) -> None:
        seen = 0
        while not self.done.is_set():
            try:
                lines = self.metrics.read_bytes().count(b"\n")
            except OSError:
                lines = 0
            if lines > seen:
                figures = process_figures(self.pid)
                if figures is None:
                    return
                segments = len(shm_segments(self.session)) if self.session else 0
                self.samples[lines - 1] = (*figures, segments)
                seen = lines
            time.sleep(0.01)  # polling another process's files

    def series(self) -> str:
        return " ".join(
            f"{r}:{v[0] >> 20}M/{v[1]}t/{v[2]}fd/{v[3]}s" for r, v in sorted(self.samples.items())
        )

    def growth(self, warmup: int) -> dict[str, float]:
        """Relative growth of each figure from the first rounds after ``warmup`` to the last
        ones (windows of a fifth of the rest, at least 5 rounds): RSS by its median, the
        counts (threads, fds, segments) by their maximum, which a file or a connection that
        is open for a moment in one sample and not the next does not move; one handle more
        (a connection that happens to be open at the last sample) is not growth, a leak of
        one per round is many."""
        rounds = sorted(r for r in self.samples if r >= warmup)
        if len(rounds) < 4:
            raise AssertionError(f"too few samples after warm-up: {sorted(self.samples)}")
        window = min(max(5, len(rounds) // 5), len(rounds) // 2)
        first, last = rounds[:window], rounds[-window:]
        out = {}
        for i, name in enumerate(("rss", "threads", "fds", "segments")):
            pick = statistics.median if name == "rss" else max
            before = pick(self.samples[r][i] for r in first)
            after = pick(self.samples[r][i] for r in last)
            if name != "rss":
                after = max(before, after - 1)
            out[name] = (after - before) / before if before else float(after > 0)
        return out


def assert_flat(growth: dict[str, float]) -> None:
    for name, value in growth.items():
        assert value < GROWTH_LIMIT, f"{name} grew {value:.1%} after warm-up: {growth}"


def session_of(workspace: Path) -> str | None:
    """The simulator's shared-memory session, from the environment of a worker."""
    for pid in worker_pids(workspace):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for entry in environ:
            if entry.startswith(b"FEDLIFT_SHM_SESSION="):
                return entry.split(b"=", 1)[1].decode()
    return None


@pytest.mark.reliability
def test_simulator_soak_keeps_the_server_flat_and_leaves_nothing(
    reliability: Any, tmp_path: Path
) -> None:
    rounds, n = (200, 8) if reliability.full else (40, 8)
    sites = [f"site-{i + 1}" for i in range(n)]
    job = exact_job(tmp_path, rounds, size=300_000, sleep=0.0, n_clients=n)  # 1.2 MB: /dev/shm
    workspace = tmp_path / "ws"
    with open(tmp_path / "simulator.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "fedlift", "simulator", str(job), "-n", str(n), "-t", str(n),
             "-w", str(workspace), "-q"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    sampler = Sampler(process.pid, workspace / "server" / "metrics.jsonl")
    session = None
    try:
        deadline = time.monotonic() + 60
        while session is None and process.poll() is None and time.monotonic() < deadline:
            session = session_of(workspace)
            time.sleep(0.05)
        sampler.session = session
        sampler.start()
        code = process.wait(timeout=600)
    finally:
        sampler.done.set()
        if process.poll() is None:
            os.killpg(process.pid, 9)
            process.wait(10)
    output = (tmp_path / "simulator.log").read_text(errors="replace")
    assert code == 0, output[-3000:]
    reliability.fault(f"soak: {rounds} simulator rounds with {n} client processes")
    lines = (workspace / "server" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line]
    lost = rounds_lost(records, rounds, sites)
    model = load_params(workspace / "server" / "models" / "global_model.safetensors")["w"]
    corrupted = differing_bytes(model, expected_final(job, rounds, n))
    leaks = len(worker_pids(workspace)) + len(temp_files(workspace))
    leaks += len(shm_segments(session)) if session else 0
    growth = sampler.growth(warmup=int(rounds * WARMUP))
    reliability.measure(rounds_lost=lost, bytes_corrupted=corrupted, leaks=leaks)
    print(f"simulator soak: {rounds} rounds x {n} clients, growth after warm-up "
          + ", ".join(f"{k} {v:+.1%}" for k, v in growth.items())
          + f"; lost {lost}, {corrupted} bytes differ, {leaks} leaks")  # fmt: skip
    print(sampler.series())
    assert session is not None  # the segments were watched
    assert (lost, corrupted, leaks) == (0, 0, 0)
    assert_flat(growth)


@pytest.mark.reliability
def test_deployed_soak_keeps_the_server_flat_and_leaves_nothing(
    reliability: Any, tmp_path: Path
) -> None:
    rounds = 50 if reliability.full else 30
    job = exact_job(tmp_path, rounds, size=1 << 18, sleep=0.0)
    deployment = Deployment(tmp_path, SITES, proxy=False)
    try:
        job_id = deployment.submit(job)
        sampler = Sampler(deployment.server.pid, deployment.job_dir(job_id) / "server"
                          / "metrics.jsonl", session=deployment.session)  # fmt: skip
        sampler.start()
        status = deployment.wait(job_id, timeout=300)
        sampler.done.set()
        metrics = deployment.metrics(job_id)
        model = final_model(deployment, job_id)
    finally:
        deployment.close()
    reliability.fault(f"soak: {rounds} deployed rounds")
    assert status["state"] == "finished", (status, deployment.log_tail())
    lost = rounds_lost(metrics, rounds)
    corrupted = differing_bytes(model, expected_final(job, rounds))
    leaks = len(leaked_processes(deployment.started, tmp_path))
    leaks += len(shm_segments(deployment.session)) + len(temp_files(deployment.workspace))
    growth = sampler.growth(warmup=DEPLOYED_WARMUP)
    reliability.measure(rounds_lost=lost, bytes_corrupted=corrupted, leaks=leaks)
    print(f"deployed soak: {rounds} rounds, growth after warm-up "
          + ", ".join(f"{k} {v:+.1%}" for k, v in growth.items())
          + f"; lost {lost}, {corrupted} bytes differ, {leaks} leaks")  # fmt: skip
    print(sampler.series())
    assert (lost, corrupted, leaks) == (0, 0, 0)
    assert_flat(growth)
