"""``python -m benchmarks --peers --wire``: fedlift's gRPC path beside the peers' deployments.

The scenarios of ``python -m benchmarks --wire`` (10M params x 2 clients, 6 rounds; 100M x 2,
4 rounds; no-compute clients: receive N float32 params in 10 arrays, add 1.0, send; FedAvg),
every framework with its processes talking over loopback, as between machines:

* fedlift over gRPC without shared memory (``fedlift simulator --no-shared-memory``, what
  ``benchmarks/wire.py`` measures; ``run_fedlift(..., shared_memory=False)``), plaintext;
* fedlift over gRPC with mutual TLS, when ``benchmarks.wire`` provides it
  (``run_fedlift_mtls(scenario, workdir, once=...)`` returning an ``Outcome``); until then
  the column reads "not measured";
* Flower's Deployment Runtime: a SuperLink and C SuperNodes, insecure and with TLS
  (``benchmarks/peers/flower_deploy.py``);
* NVFlare's POC mode, mutual TLS (``benchmarks/peers/nvflare_poc.py``).

Each is a timed run, then a second run polled for memory (as ``python -m benchmarks
--peers``); ``--smoke``: tiny sizes, 3 rounds, the polled run only. Prints one table of
s/round and each one's ratio to fedlift's gRPC s/round, then the runs' startup, teardown and
peak PSS; writes ``benchmarks/results/peers_wire.json`` (or ``--json``). The timing rules are
in ``benchmarks/peers/README.md``: s/round is the steady-state cycle on both sides (fedlift:
gaps between consecutive round ends; the peers: gaps between consecutive round starts, from
the clients' timestamps), the first gap excluded.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .common import run_peer_wire, scenario_name

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results" / "peers_wire.json"


@dataclass
class WireScenario:
    params: int
    clients: int
    rounds: int

    @property
    def name(self) -> str:
        return scenario_name(self.params, self.clients)


SCENARIOS = [WireScenario(10_000_000, 2, 6), WireScenario(100_000_000, 2, 4)]
SMOKE = [WireScenario(1000, 2, 3)]


@dataclass
class Cell:
    """One framework's result in one scenario: its fields, or why there is none."""

    column: str
    scenario: str
    median_s: float | None = None
    startup_s: float | None = None
    teardown_s: float | None = None
    peak_pss_mb: float | None = None
    version: str = ""
    why: str = ""
    extra: dict[str, object] = field(default_factory=dict)


COLUMNS = (
    "fedlift gRPC",
    "fedlift mTLS",
    "Flower insecure",
    "Flower TLS",
    "NVFlare POC mTLS",
)


def _fedlift_cell(column: str, s: WireScenario, once: bool, mtls: bool) -> Cell:
    from benchmarks import wire
    from benchmarks.__main__ import Scenario, run_fedlift
    from fedlift import __version__

    scenario = Scenario(s.name, s.params, s.clients, rounds=s.rounds)
    if mtls:  # a real deployment, mutual TLS, server and sites in two network namespaces
        deployed = wire.deployment_round_s(s.params, s.rounds)
        if isinstance(deployed, str):
            return Cell(column, s.name, why=f"not measured: {deployed}")
        return Cell(column, s.name, median_s=deployed, version=__version__)

    def runner(scenario: Scenario, workdir: Path, once: bool = False) -> object:
        return run_fedlift(scenario, workdir, shared_memory=False, once=once)

    with tempfile.TemporaryDirectory(prefix="fedlift-peers-wire-") as tmp:
        o = runner(scenario, Path(tmp), once=once)
    fields = asdict(o)  # type: ignore[call-overload]
    return Cell(
        column,
        s.name,
        median_s=fields["median_s"],
        startup_s=fields["startup_s"],
        teardown_s=fields["teardown_s"],
        peak_pss_mb=fields["peak_pss_mb"],
        version=__version__,
        extra={"server_peak_pss_mb": fields.get("server_peak_pss_mb")},
    )


def _peer_cell(column: str, peer: str, tls: bool, s: WireScenario, once: bool) -> Cell:
    timed = None
    if not once:  # as run_peer_outcome: a timed run, then one polled for memory
        timed = run_peer_wire(peer, s.params, s.clients, s.rounds, tls=tls, memory=False)
    polled = run_peer_wire(peer, s.params, s.clients, s.rounds, tls=tls, memory=True)
    timed = timed or polled
    keep = (
        "round_s",
        "phases_after_last_send",
        "deployment",
        "lingering_pids",
        "driver_lingering_pids",
        "load_avg_before",
        "load_avg_after",
    )
    return Cell(
        column,
        s.name,
        median_s=float(timed["median_s"]),  # type: ignore[arg-type]
        startup_s=float(timed["startup_s"]),  # type: ignore[arg-type]
        teardown_s=float(timed["teardown_s"]),  # type: ignore[arg-type]
        peak_pss_mb=float(polled["peak_pss_mb"]),  # type: ignore[arg-type]
        version=str(timed.get("version", "")),
        extra={k: timed.get(k) for k in keep},
    )


def run_cell(column: str, s: WireScenario, once: bool) -> Cell:
    """One column of one scenario; a failure is a cell with ``why``, not an exception."""
    try:
        if column.startswith("fedlift"):
            return _fedlift_cell(column, s, once, mtls=column == "fedlift mTLS")
        peer = "flower" if column.startswith("Flower") else "nvflare"
        return _peer_cell(column, peer, tls=not column.endswith("insecure"), s=s, once=once)
    except (RuntimeError, ValueError, OSError) as exc:
        return Cell(column, s.name, why=f"failed: {str(exc)[-3000:]}")


def _fmt(cell: Cell | None, base: Cell | None) -> str:
    if cell is None or cell.median_s is None:
        return "-"
    ratio = ""
    if base is not None and base.median_s and cell is not base:
        ratio = f" ({cell.median_s / base.median_s:.1f}x)"
    return f"{cell.median_s:.3f}{ratio}"


def print_table(scenarios: list[WireScenario], cells: list[Cell]) -> None:
    """One row per scenario: each column's s/round and its ratio to fedlift's gRPC."""
    by = {(c.scenario, c.column): c for c in cells}
    width = 20
    print("s/round over loopback (ratio to fedlift gRPC)")
    print(f"{'scenario':<24}" + "".join(f"{c:>{width}}" for c in COLUMNS))
    for s in scenarios:
        base = by.get((s.name, COLUMNS[0]))
        row = "".join(f"{_fmt(by.get((s.name, c)), base):>{width}}" for c in COLUMNS)
        print(f"{s.name + f' x {s.rounds}':<24}{row}")
    print()
    head = f"{'scenario':<24}{'framework':<20}{'version':>9}{'start s':>9}{'end s':>8}"
    print(head + f"{'peak PSS MB':>13}")
    for c in cells:
        if c.median_s is None:
            print(f"{c.scenario:<24}{c.column:<20}  {c.why[:200]}")
            continue
        times = f"{c.startup_s or 0:>9.2f}{c.teardown_s or 0:>8.2f}"
        print(f"{c.scenario:<24}{c.column:<20}{c.version:>9}{times}{c.peak_pss_mb or 0:>13.0f}")
    print(
        "(fedlift: fedlift simulator --no-shared-memory, plaintext gRPC; Flower: SuperLink + "
        "SuperNodes; NVFlare: poc start + job submit; every one with its own defaults)"
    )


def main(smoke: bool = False, only: str | None = None, json_path: Path | None = None) -> int:
    """Run every column of every scenario (``only``: scenarios whose name contains it)."""
    scenarios = SMOKE if smoke else SCENARIOS
    if only:
        scenarios = [s for s in scenarios if only in s.name]
        if not scenarios:
            raise SystemExit(f"--only {only!r} names no scenario of --peers --wire")
    cells: list[Cell] = []
    # Column by column, as python -m benchmarks --peers runs fedlift first: a peer's run
    # leaves gigabytes of freed memory and page cache behind, which slows what runs next.
    for column in COLUMNS:
        for s in scenarios:
            cell = run_cell(column, s, once=smoke)
            cells.append(cell)
            done = f"{cell.median_s:.4f} s/round" if cell.median_s is not None else cell.why[:300]
            print(f"ran {column}: {s.name}: {done}", flush=True)
    print()
    print_table(scenarios, cells)
    path = json_path or RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "scenarios": [{**asdict(s), "name": s.name} for s in scenarios],
        "results": [asdict(c) for c in cells],
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"results: {path}")
    return 0
