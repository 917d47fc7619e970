"""``python -m benchmarks.peers --peer nvflare|flower --params N --clients C --rounds R``.

Runs one scenario with a peer framework in its own venv (created under ``benchmarks/.venvs/``
on first use) and prints one JSON line: the fields of fedlift's benchmark ``Outcome`` plus
``peer``, ``version`` and ``round_s``. Other arguments go to the peer's module
(``benchmarks.peers.nvflare_bench --help``).
"""

from __future__ import annotations

import argparse
import json
import sys

from .common import PEERS, run_peer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__)
    parser.add_argument("--peer", choices=PEERS, required=True)
    parser.add_argument("--params", type=int, required=True)
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--rounds", type=int, default=6, help="at least 3")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds for the run")
    args, extra = parser.parse_known_args(argv)
    if args.rounds < 3:
        parser.error(
            "--rounds must be >= 3 (the first round is excluded, and the last ends "
            "no measured interval)"
        )
    result = run_peer(
        args.peer, args.params, args.clients, args.rounds, timeout=args.timeout, extra_args=extra
    )
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
