"""The ``fedlift`` command."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import __version__
from .errors import ClientFailedError, FedliftError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedlift", description="Federated learning for existing training scripts."
    )
    parser.add_argument("--version", action="version", version=f"fedlift {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    sim = commands.add_parser(
        "simulator",
        help="run an exported job on this machine (server + one process per client)",
        description="Run an exported job folder with local clients.",
    )
    sim.add_argument("job", type=Path, help="the exported job folder (holds job.json)")
    sim.add_argument(
        "-n",
        "--n_clients",
        type=int,
        default=None,
        help="number of clients (default: the job's n_clients)",
    )
    sim.add_argument(
        "-t",
        "--threads",
        type=int,
        default=None,
        help="how many clients run a task at once (default: all)",
    )
    sim.add_argument(
        "-w",
        "--workspace",
        type=Path,
        default=Path("/tmp/fedlift/workspace"),
        help="folder for models, metrics and logs (default: %(default)s)",
    )
    sim.add_argument(
        "-gpu",
        "--gpu",
        default=None,
        help="GPU groups, assigned to clients round-robin: 0,1 or [0,1],[2,3]",
    )
    sim.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "simulator":
        from .simulator import run_simulator

        try:
            run_simulator(
                args.job, args.workspace, args.n_clients, args.threads, args.gpu, quiet=args.quiet
            )
        except ClientFailedError as exc:
            print(f"\nfedlift: the job failed because a client failed.\n{exc}", file=sys.stderr)
            return 1
        except FedliftError as exc:
            print(f"fedlift: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("fedlift: interrupted", file=sys.stderr)
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
