"""fedlift's round-overhead benchmark: ``python -m benchmarks`` (or ``make bench``).

Clients do no compute (receive, add a constant, send), so what is measured is what the
framework itself costs per round. fedlift runs exactly as a user runs it (``fedlift
simulator`` as a subprocess) and, with ``--peers``, NVFlare and Flower run the same
scenarios in their own venvs (``benchmarks/peers``), measured by the same rules:

* s/round: the gaps between consecutive round ends (aggregation, saving, sending the next
  model and the clients' work all included); the first gap is excluded;
* startup: launch to the first round done; teardown: the last round done to the exit;
* peak RSS and PSS summed over the whole process tree, polled every 50 ms, in a second run
  of the scenario: reading ``smaps_rollup`` walks every process's page tables (~10 ms of
  CPU per poll for nine processes here), which would slow the timed run;
* floor: this machine's warm memcpy of the bytes a round must move (the model to and from
  every client), measured at start.

Prints one table and writes ``benchmarks/results/latest.json``. ``--smoke`` runs every
scenario at tiny sizes (only proves the benchmark still runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks.peers.common import TreePoller
from fedlift import FedAvgJob, ScriptRunner

HERE = Path(__file__).resolve().parent


@dataclass
class Scenario:
    name: str
    params: int
    clients: int
    rounds: int = 12
    target_s: float | None = None
    target_pss_mb: float | None = None


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
    floor_s: float = 0.0
    peer: str = "fedlift"
    server_peak_pss_mb: float = 0.0


SCENARIOS = [
    Scenario("1M params, 2 clients", 1_000_000, 2, target_s=0.01),
    Scenario("10M params, 2 clients", 10_000_000, 2, target_s=0.04),
    Scenario("10M params, 8 clients", 10_000_000, 8, target_s=0.12),
    Scenario("100M params, 2 clients", 100_000_000, 2, rounds=8, target_s=0.5,
             target_pss_mb=2200),
]  # fmt: skip


LARGE = Scenario("3 GB model, 1 client", 750_000_000, 1, rounds=2)
"""Beyond gRPC's 2 GB message limit; run with --large (needs ~16 GB of memory)."""


class ServerPoller(TreePoller):
    """Peak memory of the server process alone (the simulator's main process)."""

    def pids(self) -> list[int]:
        return [self.root]


def model_of(n_params: int, n_arrays: int = 10) -> dict[str, np.ndarray]:
    sizes = [n_params // n_arrays] * n_arrays
    sizes[-1] += n_params - sum(sizes)
    return {f"layer{i}": np.zeros(size, np.float32) for i, size in enumerate(sizes)}


def memcpy_floor(n_params: int, clients: int) -> float:
    """Seconds to copy the model once to and once from every client, warm buffers."""
    source = np.ones(n_params, np.float32)
    target = np.empty_like(source)
    np.copyto(target, source)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        np.copyto(target, source)
        times.append(time.perf_counter() - start)
    return min(times) * 2 * clients


def run_fedlift(scenario: Scenario, workdir: Path, shared_memory: bool = True) -> Outcome:
    """Times from a run without the memory poll, peak memory from a second, polled run."""
    timed = _run_fedlift(scenario, workdir / "timed", shared_memory, memory=False)
    polled = _run_fedlift(scenario, workdir / "memory", shared_memory, memory=True)
    timed.peak_rss_mb, timed.peak_pss_mb = polled.peak_rss_mb, polled.peak_pss_mb
    timed.server_peak_pss_mb = polled.server_peak_pss_mb
    return timed


def _run_fedlift(scenario: Scenario, workdir: Path, shared_memory: bool, memory: bool) -> Outcome:
    job = FedAvgJob(
        "bench", scenario.clients, scenario.rounds, model_of(scenario.params),
        final_evaluation=False,
    )  # fmt: skip
    job.to_clients(ScriptRunner(HERE / "noop_client.py", framework="numpy"))
    folder = job.export_job(workdir / "jobs")
    command = [sys.executable, "-m", "fedlift", "simulator", "-q", "-w", str(workdir / "ws"),
               str(folder)] + ([] if shared_memory else ["--no-shared-memory"])  # fmt: skip
    start = time.time()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if memory:
        with TreePoller(process.pid) as tree, ServerPoller(process.pid) as server:
            _, err = process.communicate(timeout=1800)
    else:
        _, err = process.communicate(timeout=1800)
    end = time.time()
    if process.returncode != 0:
        raise RuntimeError(f"fedlift failed ({process.returncode}):\n{err.decode()[-3000:]}")
    lines = (workdir / "ws" / "server" / "metrics.jsonl").read_text().splitlines()
    ended = [json.loads(line)["ended_at"] for line in lines]
    gaps = [b - a for a, b in zip(ended, ended[1:], strict=False)][1:] or [ended[0] - start]
    return Outcome(
        scenario.name, scenario.params, scenario.clients,
        statistics.median(gaps), min(gaps), max(gaps),
        ended[0] - start, end - ended[-1],
        tree.peak_rss if memory else 0.0, tree.peak_pss if memory else 0.0,
        server_peak_pss_mb=server.peak_pss if memory else 0.0,
    )  # fmt: skip


def run_peer_outcome(peer: str, scenario: Scenario) -> Outcome:
    """Like :func:`run_fedlift`: a timed run, then a run for peak memory."""
    from benchmarks.peers import run_peer

    r = run_peer(peer, scenario.params, scenario.clients, scenario.rounds, memory=False)
    polled = run_peer(peer, scenario.params, scenario.clients, scenario.rounds, memory=True)
    r.update(peak_rss_mb=polled["peak_rss_mb"], peak_pss_mb=polled["peak_pss_mb"])
    fields = {k: r[k] for k in Outcome.__dataclass_fields__ if k in r and k != "peer"}
    return Outcome(**fields, peer=f"{peer} {r.get('version', '')}".strip())  # type: ignore[arg-type]


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.1f}x" if b > 0 else "-"


def print_table(scenarios: list[Scenario], results: list[Outcome]) -> None:
    by = {(o.scenario, o.peer.split()[0]): o for o in results}
    peers = sorted({o.peer.split()[0] for o in results} - {"fedlift"})
    head = (f"{'scenario':<24} {'framework':<16} {'median s':>9} {'min':>7} {'max':>7} "
            f"{'start s':>8} {'end s':>6} {'RSS MB':>7} {'PSS MB':>7}")  # fmt: skip
    print(head)
    for s in scenarios:
        for name in ["fedlift", *peers]:
            o = by.get((s.name, name))
            if o is None:
                continue
            print(f"{s.name:<24} {o.peer:<16} {o.median_s:>9.4f} {o.min_s:>7.3f} {o.max_s:>7.3f} "
                  f"{o.startup_s:>8.2f} {o.teardown_s:>6.2f} {o.peak_rss_mb:>7.0f} "
                  f"{o.peak_pss_mb:>7.0f}")  # fmt: skip
        f = by.get((s.name, "fedlift"))
        if f is None:
            continue
        notes = [f"floor {f.floor_s:.4f} s (fedlift {_ratio(f.median_s, f.floor_s)} floor)"]
        for name in peers:
            p = by.get((s.name, name))
            if p is not None:
                notes.append(f"{name} / fedlift: {_ratio(p.median_s, f.median_s)} time, "
                             f"{_ratio(p.peak_pss_mb, f.peak_pss_mb)} PSS")  # fmt: skip
        if s.target_s is not None:
            notes.append(
                f"target <= {s.target_s} s: {'met' if f.median_s <= s.target_s else 'NOT met'}"
            )
        if s.target_pss_mb is not None:
            met = "met" if f.peak_pss_mb <= s.target_pss_mb else "NOT met"
            notes.append(f"target PSS <= {s.target_pss_mb:.0f} MB: {met}")
        print(f"{'':<24} " + "; ".join(notes))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check it runs")
    parser.add_argument("--peers", action="store_true", help="also run NVFlare and Flower")
    parser.add_argument("--only", default=None, help="run scenarios whose name contains this")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "latest.json")
    parser.add_argument(
        "--tf-job", action="store_true",
        help="only the seed TF job: 2 clients x 3 rounds, 2,000 samples each (wall seconds)",
    )  # fmt: skip
    parser.add_argument(
        "--large", action="store_true",
        help="only the 3 GB model, with shared memory and through gRPC chunks",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.large:
        return run_large(args.json)
    if args.tf_job:
        return run_tf_job()
    scenarios = SCENARIOS
    if args.only:
        scenarios = [s for s in scenarios if args.only in s.name]
    if args.smoke:
        scenarios = [Scenario(s.name + " (smoke)", 1000, s.clients, 3) for s in scenarios]
    results: list[Outcome] = []
    for scenario in scenarios:
        with tempfile.TemporaryDirectory(prefix="fedlift-bench-") as tmp:
            outcome = run_fedlift(scenario, Path(tmp))
        outcome.floor_s = memcpy_floor(scenario.params, scenario.clients)
        results.append(outcome)
        print(f"ran fedlift: {scenario.name}: {outcome.median_s:.4f} s/round", flush=True)
    # The peers after fedlift, each framework's scenarios together: a peer's run leaves
    # gigabytes of freed memory and page cache behind, which slows the page faults of
    # whatever runs next for a while; the peers' rounds are seconds long, fedlift's are not.
    for peer in ("nvflare", "flower") if args.peers else ():
        for scenario in scenarios:
            try:
                results.append(run_peer_outcome(peer, scenario))
                print(f"ran {peer}: {scenario.name}: {results[-1].median_s:.4f} s/round",
                      flush=True)  # fmt: skip
            except RuntimeError as exc:
                print(f"{peer}: {scenario.name} failed: {str(exc)[:300]}", flush=True)
    print()
    print_table(scenarios, results)
    meta = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
            "load_avg": os.getloadavg(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "results": [asdict(o) for o in results]},
                                    indent=2) + "\n")  # fmt: skip
    print(f"\nresults: {args.json}")
    return 0


def run_tf_job() -> int:
    """The flagship Keras job as a user starts it: wall time from command to exit."""
    example = HERE.parent / "examples" / "cifar10-tf"
    with tempfile.TemporaryDirectory(prefix="fedlift-bench-") as tmp:
        command = [
            sys.executable,
            "tf_client_api_job.py",
            "--n_clients",
            "2",
            "--num_rounds",
            "3",
            "--script_args",
            "--max_train 2000 --max_test 500",
            "--workspace",
            tmp,
        ]
        start = time.perf_counter()
        done = subprocess.run(command, cwd=example, capture_output=True, text=True, check=False,
                              env=dict(os.environ, FEDLIFT_DATASET="embedded"))  # fmt: skip
        wall = time.perf_counter() - start
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        return 1
    print(f"seed TF job, 2 clients x 3 rounds, 2,000 samples each: {wall:.1f} s wall "
          f"(target <= 15 s; NVFlare measured 25 s)")  # fmt: skip
    return 0


def run_large(json_path: Path) -> int:
    """A 3 GB model (past gRPC's 2 GB message limit) through both paths between processes."""
    model_mb = LARGE.params * 4 / 2**20
    rows = []
    for shared in (True, False):
        with tempfile.TemporaryDirectory(prefix="fedlift-bench-") as tmp:
            o = _run_fedlift(LARGE, Path(tmp), shared, memory=True)  # memory is the point
        path = "shared memory" if shared else "gRPC chunks"
        print(f"{LARGE.name} via {path}: {o.median_s:.2f} s/round (first round included), "
              f"server peak PSS {o.server_peak_pss_mb:.0f} MB = "
              f"{o.server_peak_pss_mb / model_mb:.2f}x the model, whole tree PSS "
              f"{o.peak_pss_mb:.0f} MB", flush=True)  # fmt: skip
        rows.append({**asdict(o), "path": path, "model_mb": model_mb})
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
