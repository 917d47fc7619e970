"""Flower's side of the benchmark; runs in ``benchmarks/.venvs/flower`` (never with fedlift).

``python -m benchmarks.peers.flower_bench --params N --clients C --rounds R`` (from the repo
root, with the Flower venv's python) times ``python flower_app.py ...`` -- Flower's Simulation
Runtime with a message-API ``FedAvg`` and a ``ClientApp`` that adds 1.0 (see ``flower_app``)
-- as a subprocess and prints one JSON line. The timing rules are in
``benchmarks.peers.common``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from benchmarks.peers.common import measure, outcome, peer_parser

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = peer_parser("flower_bench")
    args = parser.parse_args(argv)

    from importlib.metadata import version

    with tempfile.TemporaryDirectory(prefix="peer-flower-") as tmp:
        work = args.keep or Path(tmp)
        times = work / "times"
        times.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            str(HERE / "flower_app.py"),
            f"--params={args.params}",
            f"--clients={args.clients}",
            f"--rounds={args.rounds}",
            f"--times={times}",
            f"--ray-tmp={work / 'ray'}",
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_DISABLE_USAGE_STATS="1")
        timing = measure(
            command,
            times,
            args.rounds,
            args.timeout,
            cwd=work,
            env=env,
            log=work / "log.txt",
            memory=not args.no_memory,
        )
    result = outcome("flower", version("flwr"), args.params, args.clients, timing)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
