"""Deployment commands of ``fedlift``: ``client start``, ``poc start|stop``, ``job ...`` and
``revoke``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ._names import ADMIN, DEFAULT_POC_WORKSPACE

__all__ = ["add_revoke_command", "add_site_commands", "run_revoke", "run_site_command"]

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
    start.add_argument(
        "--allow-jobs",
        action="append",
        default=None,
        metavar="NAMES",
        help="run only jobs with these names (comma-separated, * wildcards; repeatable); "
        "other jobs are refused and fail",
    )

    poc = commands.add_parser("poc", help="a server and N sites on this machine, over mTLS")
    poc_sub = poc.add_subparsers(dest="poc_command", metavar="ACTION", required=True)
    poc_start = poc_sub.add_parser("start", help="provision and start server + sites")
    poc_start.add_argument("-n", "--n_sites", type=int, default=2, help="sites (default 2)")
    poc_start.add_argument("--workspace", type=Path, default=DEFAULT_POC_WORKSPACE)
    poc_start.add_argument(
        "--web", action="store_true", help="serve the live view too, and print a link to it"
    )
    poc_stop = poc_sub.add_parser("stop", help="stop what `poc start` started")
    poc_stop.add_argument("--workspace", type=Path, default=DEFAULT_POC_WORKSPACE)

    job = commands.add_parser("job", help="submit and follow jobs on a server (admins)")
    job_sub = job.add_subparsers(dest="job_command", metavar="ACTION", required=True)
    kit_help = "the admin's kit folder (default: $FEDLIFT_KIT)"
    submit = job_sub.add_parser("submit", help="upload an exported job folder")
    submit.add_argument("job", type=Path, help="the exported job folder (holds job.json)")
    job_sub.add_parser("list", help="every job and its state")
    for name, text in (("status", "one job's state"), ("abort", "stop a job"),
                       ("logs", "a job's server log, or a site's"),
                       ("download", "fetch models, metrics and logs")):  # fmt: skip
        sub = job_sub.add_parser(name, help=text)
        sub.add_argument("job_id")
        if name == "logs":
            sub.add_argument("--site", default=None, help="that site's log instead")
        if name == "download":
            sub.add_argument("-o", "--out", type=Path, default=Path("."), help="target folder")
    for sub in job_sub.choices.values():
        sub.add_argument("--kit", type=Path, default=None, help=kit_help)


def _run_job_command(args: argparse.Namespace) -> int:
    from ._admin import AdminClient, format_jobs, format_status

    admin = AdminClient(args.kit)
    try:
        if args.job_command == "submit":
            job_id = admin.submit(args.job)
            print(f"submitted {args.job} as job {job_id}")
        elif args.job_command == "list":
            print(format_jobs(admin.list()))
        elif args.job_command == "status":
            print(format_status(admin.status(args.job_id)))
        elif args.job_command == "logs":
            sys.stdout.write(admin.logs(args.job_id, args.site))
        elif args.job_command == "abort":
            admin.abort(args.job_id)
            print(f"aborted job {args.job_id}")
        else:
            print(f"downloaded job {args.job_id} to {admin.download(args.job_id, args.out)}")
    finally:
        admin.close()
    return 0


def run_site_command(args: argparse.Namespace) -> int:
    """Run ``client``, ``poc`` or ``job``; errors propagate to :func:`fedlift.cli.main`,
    which prints FedliftError and OSError (disk full, read-only, port taken) as one line."""
    if args.command == "job":
        return _run_job_command(args)
    if args.command == "client":
        from ._client import serve_forever

        logging.getLogger("fedlift").setLevel(logging.INFO)
        allow = None
        if args.allow_jobs:
            allow = [n.strip() for v in args.allow_jobs for n in v.split(",") if n.strip()]
        return serve_forever(args.kit, args.workspace, allow)
    from ._poc import poc_start, poc_stop

    if args.poc_command == "start":
        state = poc_start(args.n_sites, args.workspace, web=args.web)
        pids = state["pids"]
        sites = [k for k in pids if k != "server"] if isinstance(pids, dict) else []
        print(f"POC running: server {state['server']}, sites {', '.join(sites)} "
              f"(logs in {args.workspace}/logs).")  # fmt: skip
        print(f"Submit a job:  fedlift job submit --kit {state['admin_kit']} JOB_FOLDER")
        print(f"Stop it:       fedlift poc stop --workspace {args.workspace}")
        print(f"(admin: {ADMIN})")
        if "web" in state:
            from ._tls import load_kit
            from ._webtoken import make_web_token

            token = make_web_token(load_kit(Path(str(state["admin_kit"]))))
            print(f"Live view:     {state['web']}?token={token}")
        return 0
    stopped = poc_stop(args.workspace)
    print(f"stopped: {', '.join(stopped)}")
    return 0


def add_revoke_command(commands: Subparsers) -> None:  # type: ignore[type-arg]
    revoke = commands.add_parser(
        "revoke",
        help="revoke site or admin certificates (writes the project's signed CRL)",
        description="Add certificates to the project's revocation list (CA_FOLDER/crl.pem, "
        "signed by the CA, copied into the server kit next to it). The server re-reads its "
        "kit's crl.pem when it changes and refuses every call made with a revoked certificate.",
    )
    revoke.add_argument("names", nargs="*", help="sites or admins whose kits lie next to --ca")
    revoke.add_argument(
        "--ca", type=Path, required=True, help="the project CA folder (kits/ca: holds the key)"
    )
    revoke.add_argument(
        "--cert", action="append", type=Path, default=[], help="a certificate file to revoke"
    )


def run_revoke(args: argparse.Namespace) -> int:
    from ._provision import revoke

    done = revoke(args.ca, list(args.names), certs=list(args.cert))  # errors: cli.main
    for serial, name in done["revoked"].items():
        state = "revoked" if name in done["added"] else "already revoked"
        print(f"{state}: {name} (serial {serial})")
    print(f"revocation list: {done['crl']}")
    for copy in done["copies"]:
        print(f"copied to the server kit: {copy} (the running server reads it at once)")
    if not done["copies"]:
        print("no server kit next to the CA folder: copy it into the server's kit folder")
    return 0
