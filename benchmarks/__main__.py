"""fedlift's round-overhead benchmark: ``python -m benchmarks`` (or ``make bench``).

Clients do no compute (receive, add a constant, send), so what is measured is what fedlift
itself costs per round: encoding, gRPC, the worker, aggregation, persistence. Prints a table
and writes ``benchmarks/results/latest.json``. ``--smoke`` runs every scenario at tiny sizes
(no numbers worth reading; it only proves the benchmark still runs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fedlift import FedAvgJob, ScriptRunner

HERE = Path(__file__).resolve().parent


@dataclass
class Scenario:
    name: str
    params: int
    clients: int
    rounds: int = 6


@dataclass
class Outcome:
    scenario: str
    params: int
    clients: int
    median_s: float
    min_s: float
    max_s: float
    startup_s: float
    teardown_s: float
    peak_rss_mb: float
    peak_pss_mb: float


SCENARIOS = [
    Scenario("1M params, 2 clients", 1_000_000, 2),
    Scenario("10M params, 2 clients", 10_000_000, 2),
    Scenario("10M params, 8 clients", 10_000_000, 8),
    Scenario("100M params, 2 clients", 100_000_000, 2, rounds=4),
]


def model_of(n_params: int, n_arrays: int = 10) -> dict[str, np.ndarray]:
    sizes = [n_params // n_arrays] * n_arrays
    sizes[-1] += n_params - sum(sizes)
    return {f"layer{i}": np.zeros(size, np.float32) for i, size in enumerate(sizes)}


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _memory(pids: list[int]) -> tuple[float, float]:
    rss = pss = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            continue
    return rss / 1024, pss / 1024


class MemoryPoller:
    """Peak RSS and PSS summed over this process and all its descendants."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak_rss = self.peak_pss = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, pss = _memory(_tree(os.getpid()))
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self._stop.wait(self.interval)

    def __enter__(self) -> MemoryPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run(scenario: Scenario, workdir: Path) -> Outcome:
    job = FedAvgJob(
        "bench",
        scenario.clients,
        scenario.rounds,
        model_of(scenario.params),
        final_evaluation=False,
    )
    job.to_clients(ScriptRunner(HERE / "noop_client.py", framework="numpy"))
    folder = job.export_job(workdir / "jobs")
    from fedlift.simulator import run_simulator

    with MemoryPoller() as memory:
        start = time.time()
        result = run_simulator(folder, workdir / "ws", quiet=True)
        end = time.time()
    times = [r.seconds for r in result.rounds[1:]] or [result.rounds[0].seconds]
    return Outcome(
        scenario.name,
        scenario.params,
        scenario.clients,
        statistics.median(times),
        min(times),
        max(times),
        result.rounds[0].ended_at - start,
        end - result.rounds[-1].ended_at,
        memory.peak_rss,
        memory.peak_pss,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check it runs")
    parser.add_argument("--only", default=None, help="run scenarios whose name contains this")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "latest.json")
    args = parser.parse_args(argv)
    scenarios = SCENARIOS
    if args.only:
        scenarios = [s for s in scenarios if args.only in s.name]
    if args.smoke:
        scenarios = [Scenario(s.name + " (smoke)", 1000, s.clients, 2) for s in scenarios]
    outcomes = []
    header = (
        f"{'scenario':<30} {'median s/round':>14} {'min':>8} {'max':>8} {'startup s':>10} "
        f"{'teardown s':>10} {'peak RSS MB':>11} {'peak PSS MB':>11}"
    )
    print(header)
    for scenario in scenarios:
        with tempfile.TemporaryDirectory(prefix="fedlift-bench-") as tmp:
            o = run(scenario, Path(tmp))
        outcomes.append(o)
        print(
            f"{o.scenario:<30} {o.median_s:>14.4f} {o.min_s:>8.4f} {o.max_s:>8.4f} "
            f"{o.startup_s:>10.2f} {o.teardown_s:>10.2f} {o.peak_rss_mb:>11.0f} "
            f"{o.peak_pss_mb:>11.0f}",
            flush=True,
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps([asdict(o) for o in outcomes], indent=2) + "\n")
    print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
