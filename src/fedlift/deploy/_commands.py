"""The site-side commands of ``fedlift``: ``client start`` and ``poc start|stop``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..errors import FedliftError
from ._poc import ADMIN, DEFAULT_POC_WORKSPACE

__all__ = ["add_site_commands", "run_site_command"]

Subparsers = argparse._SubParsersAction


def add_site_commands(commands: Subparsers) -> None:  # type: ignore[type-arg]
    client = commands.add_parser("client", help="run a site: `fedlift client start KIT`")
    client_sub = client.add_subparsers(dest="client_command", metavar="ACTION", required=True)
    start = client_sub.add_parser(
        "start",
        help="connect to the server with this site's kit and run the jobs it sends",
        description="Serve jobs for one site until stopped (SIGTERM or Ctrl-C).",
    )
    start.add_argument("kit", type=Path, help="the site's kit folder (from fedlift provision)")
    start.add_argument(
        "--workspace",
        type=Path,
        default=None,
        help="where jobs run (default: next to the kit, NAME-workspace)",
    )

    poc = commands.add_parser("poc", help="a server and N sites on this machine, over mTLS")
    poc_sub = poc.add_subparsers(dest="poc_command", metavar="ACTION", required=True)
    poc_start = poc_sub.add_parser("start", help="provision and start server + sites")
    poc_start.add_argument("-n", "--n_sites", type=int, default=2, help="sites (default 2)")
    poc_start.add_argument("--workspace", type=Path, default=DEFAULT_POC_WORKSPACE)
    poc_stop = poc_sub.add_parser("stop", help="stop what `poc start` started")
    poc_stop.add_argument("--workspace", type=Path, default=DEFAULT_POC_WORKSPACE)


def run_site_command(args: argparse.Namespace) -> int:
    try:
        if args.command == "client":
            from ._client import serve_forever

            logging.getLogger("fedlift").setLevel(logging.INFO)
            return serve_forever(args.kit, args.workspace)
        from ._poc import poc_start, poc_stop

        if args.poc_command == "start":
            state = poc_start(args.n_sites, args.workspace)
            pids = state["pids"]
            sites = [k for k in pids if k != "server"] if isinstance(pids, dict) else []
            print(f"POC running: server {state['server']}, sites {', '.join(sites)} "
                  f"(logs in {args.workspace}/logs).")  # fmt: skip
            print(f"Submit a job:  fedlift job submit --kit {state['admin_kit']} JOB_FOLDER")
            print(f"Stop it:       fedlift poc stop --workspace {args.workspace}")
            print(f"(admin: {ADMIN})")
            return 0
        stopped = poc_stop(args.workspace)
        print(f"stopped: {', '.join(stopped)}")
        return 0
    except FedliftError as exc:
        print(f"fedlift: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
