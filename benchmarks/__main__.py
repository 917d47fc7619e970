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

Two modes compare variants of one scenario in the same run (so the machine's state is the
same for all), each against fedlift's FedAvg with FULL results:

* ``--strategy NAME[,NAME...]`` (or ``all``): 10M params x 8 clients (or ``--only``'s
  scenarios) with FedAvg, then with each named strategy (``fedlift.server``'s registry, as
  ``job.json`` names them); prints s/round and peak PSS beside FedAvg's, and the targets.
  ``fedmedian``, ``fedtrimmedavg`` and ``krum`` are FedAvg with that robust aggregator.
* ``--diff``: 10M params x 2 clients (or ``--only``'s) with FULL results, then with DIFF
  results (the clients send the change, a constant tree made once); prints the ratio.

``--wire`` measures the gRPC path against this machine's TCP and TLS floors
(``benchmarks/wire.py``); ``benchmarks/compression.py`` what compression costs in accuracy.

With ``--smoke`` each variant runs once, polled (its times are then the polled run's).
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
from fedlift import Compression, FedJob, ScriptRunner
from fedlift.errors import ConfigError
from fedlift.server import AGGREGATORS, STRATEGIES, Strategy, strategy_from_spec

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

STRATEGY_NAMES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm", "scaffold",
                  "cyclic", "fedmedian", "fedtrimmedavg", "krum")  # fmt: skip
"""What ``--strategy`` takes: ``job.json`` strategy types, and the robust aggregators."""

ROBUST = ("fedmedian", "fedtrimmedavg", "krum")
"""Aggregator names (``fedlift.server.AGGREGATORS``), run as FedAvg with that aggregator."""

STRATEGY_TARGETS = {"fedadam": 1.3, "scaffold": 2.2, "fedmedian": 3.0}
"""s/round as a multiple of FedAvg's, at most. SCAFFOLD's results carry twice the data (the
model and the control variate's change); a median must hold every result."""

DIFF_TARGET = 1.10
"""DIFF results' s/round as a multiple of FULL's, at most: the new global model is
published once, as FULL's is, so DIFF should cost no more than its add."""

STRATEGY_SCENARIO = "10M params, 8 clients"
DIFF_SCENARIO = "10M params, 2 clients"


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


def run_fedlift(
    scenario: Scenario,
    workdir: Path,
    shared_memory: bool = True,
    *,
    strategy: Strategy | None = None,
    diff: bool = False,
    once: bool = False,
    compression: Compression | None = None,
) -> Outcome:
    """Times from a run without the memory poll, peak memory from a second, polled run
    (``once``: the polled run only, for smoke runs). ``strategy``: the job's (default
    FedAvg); ``diff``: the clients send DIFF results; ``compression``: the job's."""
    c = compression
    if once:
        return _run_fedlift(scenario, workdir / "memory", shared_memory, True, strategy, diff, c)
    timed = _run_fedlift(scenario, workdir / "timed", shared_memory, False, strategy, diff, c)
    polled = _run_fedlift(scenario, workdir / "memory", shared_memory, True, strategy, diff, c)
    timed.peak_rss_mb, timed.peak_pss_mb = polled.peak_rss_mb, polled.peak_pss_mb
    timed.server_peak_pss_mb = polled.server_peak_pss_mb
    return timed


def _run_fedlift(
    scenario: Scenario,
    workdir: Path,
    shared_memory: bool,
    memory: bool,
    strategy: Strategy | None = None,
    diff: bool = False,
    compression: Compression | None = None,
) -> Outcome:
    job = FedJob(
        "bench", scenario.clients, scenario.rounds, model_of(scenario.params),
        final_evaluation=False, strategy=strategy, compression=compression,
    )  # fmt: skip
    job.to_clients(ScriptRunner(HERE / "noop_client.py", script_args="--diff" if diff else "",
                                framework="numpy"))  # fmt: skip
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


def parse_strategies(value: str) -> list[str]:
    """``--strategy``'s value: names separated by commas, or ``all``; FedAvg is the
    baseline every run has, so it is not repeated."""
    names = [n.strip().lower() for n in value.split(",") if n.strip()]
    if names == ["all"]:
        return [n for n in STRATEGY_NAMES if n != "fedavg"]
    unknown = [n for n in names if n not in STRATEGY_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown strategy {', '.join(unknown) or '(none given)'}; expected names among "
            f"{', '.join(STRATEGY_NAMES)} separated by commas, or all. Received: {value!r}"
        )
    return [n for n in dict.fromkeys(names) if n != "fedavg"]


def strategy_of(name: str) -> Strategy | str:
    """The strategy ``--strategy name`` runs, built by the registry from the spec job.json
    would hold; a string instead says why it cannot run in this tree."""
    if name in ROBUST:
        if name not in AGGREGATORS:
            return (f"the aggregator {name!r} is not registered in fedlift.server.AGGREGATORS "
                    f"(registered: {', '.join(sorted(AGGREGATORS))})")  # fmt: skip
        spec: dict[str, object] = {"type": "fedavg", "aggregator": name}
    elif name not in STRATEGIES:
        return (f"the strategy {name!r} is not in fedlift.server.STRATEGIES "
                f"(known: {', '.join(sorted(STRATEGIES))})")  # fmt: skip
    else:
        spec = {"type": name}
    try:
        return strategy_from_spec(spec, where="benchmark")
    except ConfigError as exc:
        return str(exc)


def _x(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "-"


def print_comparison(
    title: str, what: str, rows: list[tuple[str, Outcome, float | None]], note: dict[str, str]
) -> None:
    """One scenario's variants against the first row: s/round, PSS and their ratios."""
    base = rows[0][1]
    print(f"{title} (ratios to {rows[0][0]})")
    print(f"{what:<14} {'s/round':>9} {'ratio':>7} {'target':>16} {'peak PSS MB':>12} "
          f"{'ratio':>7}")  # fmt: skip
    for label, o, target in rows:
        goal = ""
        if target is not None:
            met = "met" if o.median_s <= target * base.median_s else "NOT met"
            goal = f"<= {target:.2f}x {met}"
        pss = _x(o.peak_pss_mb, base.peak_pss_mb)
        line = (f"{label:<14} {o.median_s:>9.4f} {_x(o.median_s, base.median_s):>7} "
                f"{goal:>16} {o.peak_pss_mb:>12.0f} {pss:>7}")  # fmt: skip
        print(line + (f"  ({note[label]})" if label in note else ""))


def _row(o: Outcome, base: Outcome, target: float | None, **keys: str) -> dict[str, object]:
    return {**keys, **asdict(o), "ratio_s": o.median_s / base.median_s if base.median_s else None,
            "ratio_pss": o.peak_pss_mb / base.peak_pss_mb if base.peak_pss_mb else None,
            "target_ratio_s": target}  # fmt: skip


def run_strategies(
    scenarios: list[Scenario], names: list[str], once: bool
) -> tuple[list[dict[str, object]], list[dict[str, str]]]:
    """Each scenario with FedAvg, then with each strategy of ``names``; printed per scenario.
    A strategy that cannot be built here, or whose run fails, is skipped with a line."""
    rows: list[dict[str, object]] = []
    skipped: list[dict[str, str]] = []
    for scenario in scenarios:
        floor = memcpy_floor(scenario.params, scenario.clients)
        done: list[tuple[str, Outcome, float | None]] = []
        for name in ["fedavg", *names]:
            built = strategy_of(name)
            if isinstance(built, str):
                print(f"skipped {name}: {built}", flush=True)
                skipped.append({"strategy": name, "scenario": scenario.name, "why": built})
                continue
            with tempfile.TemporaryDirectory(prefix="fedlift-bench-") as tmp:
                try:
                    o = run_fedlift(scenario, Path(tmp), strategy=built, once=once)
                except RuntimeError as exc:
                    if name == "fedavg":  # the baseline: nothing to compare without it
                        raise
                    print(f"{name}: {scenario.name} failed: {str(exc)[:300]}", flush=True)
                    skipped.append({"strategy": name, "scenario": scenario.name,
                                    "why": str(exc)[:3000]})  # fmt: skip
                    continue
            o.floor_s = floor
            done.append((name, o, STRATEGY_TARGETS.get(name)))
            print(f"ran fedlift {name}: {scenario.name}: {o.median_s:.4f} s/round", flush=True)
        rows += [_row(o, done[0][1], t, mode="strategy", strategy=n) for n, o, t in done]
        print()
        print_comparison(f"strategies, {scenario.name}, {scenario.rounds} rounds", "strategy",
                         done, {"cyclic": "the sites one after another",
                                "scaffold": "results carry twice the data"})  # fmt: skip
        print()
    return rows, skipped


def run_diff(scenarios: list[Scenario], once: bool) -> list[dict[str, object]]:
    """Each scenario with FULL results, then with DIFF results; printed per scenario."""
    rows: list[dict[str, object]] = []
    for scenario in scenarios:
        floor = memcpy_floor(scenario.params, scenario.clients)
        done: list[tuple[str, Outcome, float | None]] = []
        for kind, diff in (("FULL", False), ("DIFF", True)):
            with tempfile.TemporaryDirectory(prefix="fedlift-bench-") as tmp:
                o = run_fedlift(scenario, Path(tmp), diff=diff, once=once)
            o.floor_s = floor
            done.append((kind, o, DIFF_TARGET if diff else None))
            print(f"ran fedlift {kind}: {scenario.name}: {o.median_s:.4f} s/round", flush=True)
        rows += [_row(o, done[0][1], t, mode="diff", params_type=k) for k, o, t in done]
        print()
        print_comparison(f"FULL vs DIFF results, {scenario.name}, {scenario.rounds} rounds",
                         "params_type", done, {})  # fmt: skip
        print()
    return rows


def _meta() -> dict[str, object]:
    return {"machine": platform.machine(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
            "load_avg": os.getloadavg(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip


SMOKE_STRATEGY_CLIENTS = 5
"""Strategies' smoke runs have this many clients at most (a run's start costs ~0.3 s of CPU
per client): the fewest with which every named one runs (Krum with f=1 needs n > 2f + 2)."""


def _scenarios(
    only: str | None, default: str, smoke: bool, most_clients: int | None = None
) -> list[Scenario]:
    chosen = [s for s in SCENARIOS if (only in s.name if only else s.name == default)]
    if smoke:
        smoked = []
        for s in chosen:
            clients = min(s.clients, most_clients or s.clients)
            fewer = "" if clients == s.clients else f", {clients} clients"
            smoked.append(Scenario(f"{s.name} (smoke{fewer})", 1000, clients, 3))
        chosen = smoked
    if not chosen:
        raise SystemExit(
            f"--only {only!r} names no scenario; expected part of one of: "
            + ", ".join(s.name for s in SCENARIOS)
        )
    return chosen


def run_modes(args: argparse.Namespace) -> int:
    """``--strategy`` and/or ``--diff``: their comparisons, then one results file."""
    rows: list[dict[str, object]] = []
    skipped: list[dict[str, str]] = []
    if args.strategy is not None:
        scenarios = _scenarios(args.only, STRATEGY_SCENARIO, args.smoke, SMOKE_STRATEGY_CLIENTS)
        rows, skipped = run_strategies(scenarios, args.strategy, once=args.smoke)
    if args.diff:
        rows += run_diff(_scenarios(args.only, DIFF_SCENARIO, args.smoke), once=args.smoke)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": _meta(), "results": rows, "skipped": skipped},
                                    indent=2) + "\n")  # fmt: skip
    print(f"results: {args.json}")
    return 0


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
        help="only the seed TF job: 2 clients x 3 rounds, 2,000 samples each (wall seconds); "
             "with --peers also NVFlare and Flower (benchmarks/tf_job.py)",
    )  # fmt: skip
    parser.add_argument(
        "--large", action="store_true",
        help="only the 3 GB model, with shared memory and through gRPC chunks",
    )  # fmt: skip
    parser.add_argument(
        "--strategy", type=parse_strategies, default=None, metavar="NAME[,NAME...]",
        help=f"compare strategies with FedAvg (default scenario: {STRATEGY_SCENARIO}); "
             f"names: {', '.join(STRATEGY_NAMES)}, or all",
    )  # fmt: skip
    parser.add_argument(
        "--diff", action="store_true",
        help=f"compare DIFF results with FULL (default scenario: {DIFF_SCENARIO})",
    )  # fmt: skip
    parser.add_argument(
        "--wire", action="store_true",
        help="the gRPC path (--no-shared-memory) at 10M x 2 and 100M x 2 against this "
             "machine's TCP and TLS floors (benchmarks/wire.py)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.wire and args.peers:  # fedlift's gRPC beside Flower's and NVFlare's deployments
        from benchmarks.peers import wire_peers

        json_path = None if args.json == parser.get_default("json") else args.json
        return wire_peers.main(smoke=args.smoke, only=args.only, json_path=json_path)
    if args.wire:
        from benchmarks import wire

        default = args.json == parser.get_default("json")
        return wire.main(smoke=args.smoke, json_path=HERE / "results" / "wire.json" if default
                         else args.json)  # fmt: skip
    if args.large:
        return run_large(args.json)
    if args.tf_job:
        default = args.json == parser.get_default("json")
        return run_tf_job(peers=args.peers, json_path=None if default else args.json)
    if args.strategy is not None or args.diff:
        return run_modes(args)
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
    meta = _meta()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "results": [asdict(o) for o in results]},
                                    indent=2) + "\n")  # fmt: skip
    print(f"\nresults: {args.json}")
    return 0


def run_tf_job(peers: bool = False, json_path: Path | None = None) -> int:
    """The flagship Keras job as a user starts it, against the same training centralised
    (and, with ``peers``, NVFlare's and Flower's runs of it): ``benchmarks/tf_job.py``."""
    from benchmarks import tf_job

    return tf_job.main(peers=peers, json_path=json_path)


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
