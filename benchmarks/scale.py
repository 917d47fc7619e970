"""Many clients on one machine: ``python -m benchmarks.scale [--clients 10000] ...``.

Runs :func:`fedlift.simulator.run_local` with every client in every round. Each client does
the least possible work (adds 1 to every parameter of the global model and sends it back
with a metric), so the figures are fedlift's own cost per client update: building the
client's read-only model, calling it, and folding its result into the streaming mean.
Prints total seconds, seconds per round, client updates per second and peak memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import threading
from pathlib import Path

import numpy as np

from fedlift import FLModel
from fedlift.simulator import run_local


def model_of(n_params: int, n_arrays: int = 10) -> dict[str, np.ndarray]:
    sizes = [n_params // n_arrays] * n_arrays
    sizes[-1] += n_params - sum(sizes)
    return {f"layer{i}": np.zeros(size, np.float32) for i, size in enumerate(sizes)}


def add_one(site: str, model: FLModel) -> FLModel:
    """A client: the global params plus one, weighted 1, with a metric."""
    params = {key: value + np.float32(1) for key, value in model.params.items()}
    return FLModel(params=params, metrics={"accuracy": 0.5})


class AnonPeak:
    """Samples this process's anonymous (private) RSS: what grows if results were kept.

    ``ru_maxrss`` also counts shared pages (with Ray: its object store mapped into the
    driver), so both are reported.
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.peak_kb = 0
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now_kb() -> int:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, self.now_kb())
            self._stop.wait(self._interval)

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, self.now_kb())


def main(argv: list[str] | None = None) -> dict[str, float | int | str]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__)
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--params", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backend", choices=["threads", "ray"], default="threads")
    parser.add_argument("--threads", type=int, default=None, help="default: the CPU count")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)

    initial = model_of(args.params)
    with AnonPeak() as anon:
        result = run_local(
            add_one,
            initial,
            args.clients,
            args.rounds,
            threads=args.threads,
            backend=args.backend,
            quiet=True,
        )
    got = result.params["layer0"][:1]
    if not np.allclose(got, args.rounds):  # every round adds 1
        raise SystemExit(f"wrong result: layer0[0] = {got[0]}, expected {args.rounds}")
    round_seconds = [r.seconds for r in result.rounds if r.task == "train"]
    figures: dict[str, float | int | str] = {
        "backend": args.backend,
        "clients": args.clients,
        "params": args.params,
        "rounds": args.rounds,
        "total_s": round(result.seconds, 2),
        "s_per_round": round(sum(round_seconds) / len(round_seconds), 2),
        "client_updates": result.client_updates,
        "updates_per_s": round(result.client_updates / sum(round_seconds), 1),
        "updates_per_s_total": round(result.updates_per_second, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_anon_rss_mb": round(anon.peak_kb / 1024, 1),
    }
    print(
        f"{args.clients:,} clients x {args.params:,} params x {args.rounds} rounds "
        f"({args.backend}):\n"
        f"  total {figures['total_s']} s (startup included), {figures['s_per_round']} s/round\n"
        f"  {figures['updates_per_s']:,} client updates/s in rounds "
        f"({figures['updates_per_s_total']:,}/s over the total)\n"
        f"  peak RSS {figures['peak_rss_mb']:,} MB (anonymous: {figures['peak_anon_rss_mb']:,} MB)"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
