"""A deployment over a slow link: ``python -m benchmarks.slow_link`` (root: it makes network
namespaces).

A server and two sites, deployed with mutual TLS as in production, each side in its own
network namespace, joined by a veth pair that ``tc`` shapes, each direction alike:
100 Mbit/s (``tbf``); the same with int8 results (``Compression(results="int8")``); and,
where the kernel has ``netem``, 10 ms delay (20 ms RTT), then 1% loss each way, then
that lossy link with Reno, a loss-based congestion control, instead of BBR, this
machine's default (a namespace here may choose only those two). Cases that need netem
are skipped, with the reason printed, on a kernel without it. The job: a 10M-parameter
model (40 MB), 2 no-compute sites, 3 rounds.

A round must move the model to both sites and both results back; down and up are separate
directions of the link, so the floor is ``2 x 40 MB / 12.5 MB/s`` each way, 12.8 s a
round. Goal (the wire-path issue): each round within 1.25x of bytes / bandwidth. Each
round's time is its record's ``seconds`` in ``metrics.jsonl`` (from the task's start to
the last result in).

``--smoke`` runs one case, 1M parameters and 2 rounds, unshaped but across namespaces
(CI: it proves the benchmark runs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SERVER_IP, SITE_IP, PORT = "10.78.0.1", "10.78.0.2", 8102
RATE_MBIT = 100


@dataclass
class Case:
    name: str
    rate_mbit: float | None = RATE_MBIT  # None: unshaped
    delay_ms: float = 0.0  # each way
    loss_pct: float = 0.0  # each way
    congestion: str = "bbr"
    compression: str = "none"

    def qdisc(self) -> list[str]:
        """The ``tc qdisc add ... root`` arguments for each direction ([]: none)."""
        if self.delay_ms or self.loss_pct:
            return ["netem", "rate", f"{self.rate_mbit}mbit", "delay", f"{self.delay_ms}ms",
                    "loss", f"{self.loss_pct}%", "limit", "100000"]  # fmt: skip
        if self.rate_mbit is not None:
            return ["tbf", "rate", f"{self.rate_mbit}mbit", "burst", "256kb", "latency", "200ms"]
        return []


CASES = [
    Case("100 Mbit/s"),
    Case("100 Mbit/s, int8 results", compression="int8"),
    Case("100 Mbit/s, 20 ms RTT", delay_ms=10),
    Case("100 Mbit/s, 20 ms RTT, 1% loss", delay_ms=10, loss_pct=1),
    Case("100 Mbit/s, 20 ms RTT, 1% loss, Reno", delay_ms=10, loss_pct=1, congestion="reno"),
]  # fmt: skip


def netem_missing() -> str | None:
    """None if this kernel has ``tc netem`` (delay and loss), else why not."""
    ns = f"flbp{os.getpid() % 100000}"
    try:
        _run("ip", "netns", "add", ns)
        _run("ip", "netns", "exec", ns, "ip", "link", "add", "pa", "type", "veth", "peer",
             "name", "pb")  # fmt: skip
        probe = ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "pa", "root", "netem",
                 "delay", "1ms"]  # fmt: skip
        done = subprocess.run(probe, capture_output=True, text=True, check=False)
        return None if done.returncode == 0 else f"tc netem: {done.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


@dataclass
class Result:
    case: str
    params: int
    rounds: list[float]
    floor_s: float

    @property
    def median_s(self) -> float:
        return statistics.median(self.rounds)

    @property
    def ratio(self) -> float:
        return self.median_s / self.floor_s


def _run(*command: str) -> None:
    subprocess.run(list(command), check=True, capture_output=True)


@contextlib.contextmanager
def two_hosts(case: Case) -> Iterator[tuple[str, str]]:
    """Two namespaces joined by a veth pair, both directions shaped by ``case.netem``."""
    if os.geteuid() != 0:
        raise SystemExit("slow_link: network namespaces need root.")
    tag = f"{os.getpid() % 100000}"
    server_ns, site_ns = f"flbs{tag}", f"flbc{tag}"
    try:
        _run("ip", "netns", "add", server_ns)
        _run("ip", "netns", "add", site_ns)
        _run("ip", "link", "add", f"bs{tag}", "type", "veth", "peer", "name", f"bc{tag}")
        for ns, dev, ip in ((server_ns, f"bs{tag}", SERVER_IP), (site_ns, f"bc{tag}", SITE_IP)):
            _run("ip", "link", "set", dev, "netns", ns)
            _run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            if case.qdisc():
                _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root",
                     *case.qdisc())  # fmt: skip
            _run("ip", "netns", "exec", ns, "sysctl", "-w",
                 f"net.ipv4.tcp_congestion_control={case.congestion}")  # fmt: skip
        yield server_ns, site_ns
    finally:
        subprocess.run(["ip", "netns", "del", server_ns], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", site_ns], check=False, capture_output=True)


def run_case(case: Case, params: int, rounds: int, root: Path) -> Result:
    from benchmarks.__main__ import model_of
    from fedlift import Compression, FedJob, ScriptRunner
    from fedlift.deploy import provision

    kits = provision("slowlink", f"{SERVER_IP}:{PORT}", ["site-1", "site-2"], ["bench@org"],
                     root / "kits")  # fmt: skip
    job = FedJob("slow", 2, rounds, model_of(params), final_evaluation=False,
                 compression=Compression(results=case.compression))  # fmt: skip
    job.to_clients(ScriptRunner(HERE / "noop_client.py", framework="numpy"))
    folder = job.export_job(root / "jobs")
    python = [sys.executable, "-m", "fedlift"]
    kit = ["--kit", str(kits["bench@org"])]
    processes: list[subprocess.Popen[bytes]] = []
    with two_hosts(case) as (server_ns, site_ns):
        try:
            with open(root / "server.log", "ab") as log:
                processes.append(subprocess.Popen(
                    ["ip", "netns", "exec", server_ns, *python, "server", "start",
                     str(kits["server"]), "--workspace", str(root / "server-ws")],
                    stdout=log, stderr=subprocess.STDOUT,
                ))  # fmt: skip
            for site in ("site-1", "site-2"):
                with open(root / f"{site}.log", "ab") as log:
                    processes.append(subprocess.Popen(
                        ["ip", "netns", "exec", site_ns, *python, "client", "start",
                         str(kits[site]), "--workspace", str(root / f"{site}-ws")],
                        stdout=log, stderr=subprocess.STDOUT,
                    ))  # fmt: skip
            admin = ["ip", "netns", "exec", site_ns, *python, "job"]
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:  # until the server listens
                if subprocess.run([*admin, "list", *kit], capture_output=True).returncode == 0:
                    break
                time.sleep(0.5)
            done = subprocess.run([*admin, "submit", str(folder), *kit], capture_output=True,
                                  text=True, timeout=300)  # fmt: skip
            if done.returncode != 0:
                raise SystemExit(f"slow_link: submit failed: {done.stderr[-2000:]}")
            job_id = done.stdout.split()[-1].strip()
            state, deadline = "", time.monotonic() + 1800
            while state not in ("finished", "failed") and time.monotonic() < deadline:
                time.sleep(1.0)
                status = subprocess.run([*admin, "status", job_id, *kit], capture_output=True,
                                        text=True, timeout=120)  # fmt: skip
                if status.returncode == 0:
                    state = json.loads(status.stdout).get("state", "")
            if state != "finished":
                log_tail = (root / "server.log").read_text(errors="replace")[-3000:]
                raise SystemExit(f"slow_link: {case.name}: job {state or 'timed out'}:\n{log_tail}")
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
    metrics = next((root / "server-ws").rglob("metrics.jsonl"))
    seconds = [json.loads(line)["seconds"] for line in metrics.read_text().splitlines()
               if json.loads(line)["task"] == "train"]  # fmt: skip
    up = 4 * params * (0.25 + 4 / 256 / 4 if case.compression == "int8" else 1.0)
    floor = 2 * (4 * params + up) / ((case.rate_mbit or 10_000) * 1e6 / 8)
    return Result(case.name, params, [round(s, 2) for s in seconds], floor)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    cases = [Case("unshaped (smoke)", rate_mbit=None)] if args.smoke else CASES
    params, rounds = (1_000_000, 2) if args.smoke else (10_000_000, 3)
    results = []
    missing = None if args.smoke else netem_missing()
    for case in cases:
        if missing and (case.delay_ms or case.loss_pct):
            print(f"skipped {case.name}: this kernel has no netem ({missing})", flush=True)
            continue
        with tempfile.TemporaryDirectory(prefix="fedlift-slowlink-") as scratch:
            results.append(run_case(case, params, rounds, Path(scratch)))
        r = results[-1]
        print(f"ran {case.name}: rounds {r.rounds} s (floor {r.floor_s:.1f} s)", flush=True)
    print(f"\n{'case':<40}{'s/round':>9}{'floor s':>9}{'x floor':>9}")
    for r in results:
        print(f"{r.case:<40}{r.median_s:>9.2f}{r.floor_s:>9.2f}{r.ratio:>9.2f}")
    print(f"(2 sites, {params / 1e6:.0f}M params, mutual TLS across two network namespaces; "
          "floor: the round's bytes each way at the link's rate; goal 1.25x)")  # fmt: skip
    if args.json is not None:
        payload = [{**asdict(r), "median_s": r.median_s, "ratio": r.ratio} for r in results]
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
