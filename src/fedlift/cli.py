"""The ``fedlift`` command."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import sys
from pathlib import Path

from . import __version__
from .deploy import add_revoke_command, add_site_commands, run_revoke, run_site_command
from .errors import ClientFailedError, FedliftError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedlift", description="Federated learning for existing training scripts."
    )
    parser.add_argument("--version", action="version", version=f"fedlift {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_provision(commands)
    _add_server(commands)
    add_site_commands(commands)
    add_revoke_command(commands)
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
    sim.add_argument(
        "--no-shared-memory",
        action="store_true",
        help="send models through gRPC even on this host (as between machines)",
    )
    _add_report(commands)
    _add_web_token(commands)
    return parser


def _add_web_token(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    token = commands.add_parser(
        "web-token",
        help="print a token that opens the server's live view (admins)",
        description=(
            "Sign a token with this admin kit's key that opens the live view of `fedlift "
            "server start --web` in a browser without a client certificate. Revoking the "
            "admin's certificate ends it."
        ),
    )
    token.add_argument("kit", type=Path, help="the admin's kit folder (from fedlift provision)")
    token.add_argument(
        "--hours", type=float, default=12.0, help="how long it is valid (default 12, at most 168)"
    )
    token.add_argument(
        "--url",
        default=None,
        help="the live view's address (https://HOST:PORT/): print the whole link to open",
    )


def _web_token(args: argparse.Namespace) -> int:
    from .deploy import load_kit, make_web_token

    token = make_web_token(load_kit(args.kit), args.hours)
    if args.url:
        print(f"{args.url.rstrip('/')}/?token={token}")
    else:
        print(token)
        print(f"open https://SERVER:WEBPORT/?token=<the token above> (valid {args.hours:g} h)",
              file=sys.stderr)  # fmt: skip
    return 0


def _add_report(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    report = commands.add_parser(
        "report",
        help="write a job's report.html again, or overlay several runs in one page",
        description=(
            "One WORKSPACE: write its report again (default: its server/report.html). "
            "Several: overlay their global metrics in one page (default: ./fedlift-report.html)."
            " A WORKSPACE is a simulator workspace, a job's server folder or a deployed job's "
            "folder (STORE/jobs/ID)."
        ),
    )
    report.add_argument("workspaces", nargs="+", type=Path, metavar="WORKSPACE")
    report.add_argument("-o", "--out", type=Path, default=None, help="the page to write")
    report.add_argument(
        "--label",
        action="append",
        default=None,
        help="a run's name in the legend (once per WORKSPACE, in order; default: job and folder)",
    )


def _report(args: argparse.Namespace) -> int:
    from .errors import ConfigError
    from .report import compare_report, find_run, write_report

    try:
        found = [find_run(path) for path in args.workspaces]
        if len(found) == 1 and not args.label:
            server_dir, job_dir = found[0]
            written = write_report(server_dir, job_dir=job_dir, out=args.out)
        else:
            out = args.out or Path("fedlift-report.html")
            written = compare_report([s for s, _ in found], out, labels=args.label)
    except ConfigError as exc:  # bad input: one line, the usage error's status
        print(f"fedlift report: error: {_error_line(exc)}", file=sys.stderr)
        return 2
    print(f"report: {written}")
    return 0


def _names(values: list[str] | None) -> list[str]:
    return [n.strip() for v in values or [] for n in v.split(",") if n.strip()]


def _add_provision(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    prov = commands.add_parser(
        "provision",
        help="make a project CA and a TLS kit for the server, every site and every admin",
        description="Make a project CA and one kit (folder) per party for mutual TLS.",
    )
    prov.add_argument("--project", required=True, help="the project's name, e.g. demo")
    prov.add_argument(
        "--server",
        required=True,
        help="host:port that sites connect to; the server certificate is made for this host",
    )
    prov.add_argument(
        "--sites", action="append", required=True, help="site names: site-1,site-2 (repeatable)"
    )
    prov.add_argument(
        "--admin", "--admins", action="append", help="admin names: alice@org (repeatable)"
    )
    prov.add_argument("-o", "--out", type=Path, required=True, help="folder to write kits to")
    prov.add_argument(
        "--force", action="store_true", help="replace the kits already in the output folder"
    )
    prov.add_argument(
        "--valid-days", type=int, default=365, help="certificate lifetime (default: %(default)s)"
    )


def _provision(args: argparse.Namespace) -> int:
    from .deploy import provision

    sites, admins = _names(args.sites), _names(args.admin)
    kits = provision(
        args.project,
        args.server,
        sites,
        admins,
        args.out,
        valid_days=args.valid_days,
        force=args.force,
    )
    rows = [(kits["server"], f"the server ({args.server})")]
    rows += [(kits[s], f"site {s}") for s in sites] + [(kits[a], f"admin {a}") for a in admins]
    rows.append((kits["ca"], "no one: the project CA's key; keep it offline"))
    width = max(len(f"{path}/") for path, _ in rows)
    print(f"Provisioned project {args.project!r} in {args.out}/; give each folder to its party:")
    for path, who in rows:
        print(f"  {f'{path}/':<{width}}  -> {who}")
    print(
        "Each kit holds ca.pem, cert.pem, fedlift.json and key.pem (private: hand it over on a\n"
        f"secure channel). Sites and admins connect to {args.server}, the name in the server's\n"
        "certificate; TLS refuses connections made to any other name."
    )
    return 0


def _add_server(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    server = commands.add_parser(
        "server",
        help="the long-running server of a deployment (job store, sites, admins)",
        description="The server of a deployment across machines.",
    )
    actions = server.add_subparsers(dest="action", metavar="ACTION", required=True)
    start = actions.add_parser(
        "start",
        help="serve until SIGTERM/SIGINT; jobs left running resume from their checkpoint",
        description="Start the server with its kit; it runs until SIGTERM or Ctrl-C.",
    )
    start.add_argument("kit", type=Path, help="the server's kit folder (from fedlift provision)")
    start.add_argument(
        "-w",
        "--workspace",
        type=Path,
        default=None,
        help="the job store (default: server-workspace next to the kit folder)",
    )
    start.add_argument(
        "--address",
        default=None,
        help="host:port to listen on (default: 0.0.0.0 and the port of the kit's address)",
    )
    start.add_argument(
        "--allow-app-code",
        action="store_true",
        help="let jobs name strategies or functions from their app folder; that code runs in "
        "the server's process, with its key (default: refused)",
    )
    start.add_argument(
        "--web",
        default=None,
        metavar="HOST:PORT",
        help="serve the live view (HTTPS; admins by certificate or `fedlift web-token`)",
    )


def _check_port_free(address: str, option: str = "--address") -> None:
    """Raise OSError(EADDRINUSE) when something already listens on ``address``.

    gRPC reports a taken port only as a RuntimeError; this probe (a plain bind, which
    succeeds where only TIME_WAIT sockets remain) turns it into one clear line.
    """
    host, _, port_text = address.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    try:
        port = int(port_text)
    except ValueError:
        return  # not host:port: the server reports it
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OSError(
                    errno.EADDRINUSE, os.strerror(errno.EADDRINUSE), f"{option} {address}"
                ) from None
            # another problem (an unknown host, an address not on this machine): the
            # server's own listener reports it


def _server(args: argparse.Namespace) -> int:
    import signal
    import threading

    from .deploy import DeployServer, load_kit

    kit = load_kit(args.kit)
    workspace = args.workspace or args.kit.resolve().parent / "server-workspace"
    if kit.role == "server":
        _check_port_free(args.address or f"0.0.0.0:{kit.server_port}")
    workspace.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(workspace / "server.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger("fedlift").setLevel(logging.INFO)
    done = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        done.set()

    try:
        if args.web is not None:
            _check_port_free(args.web, "--web")
        server = DeployServer(
            kit,
            workspace,
            address=args.address,
            allow_app_code=args.allow_app_code,
            web=args.web,
        )
        if server.live is not None:
            hint = "admins: a certificate, or a link from `fedlift web-token ADMIN_KIT --url URL`"
            print(f"fedlift server: live view on {server.live.url} ({hint})", flush=True)
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        print(f"fedlift server: listening on {server.address}, workspace {workspace}", flush=True)
        done.wait()
        print("fedlift server: stopping", file=sys.stderr, flush=True)
        server.stop()
        return 0
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


_OS_ERRORS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("the disk is full", "Free some space there or choose another folder."),
    errno.EDQUOT: ("the disk quota is used up", "Free some space or choose another folder."),
    errno.EROFS: (
        "the file system is read-only",
        "Choose a writable folder (e.g. --workspace DIR) or remount it read-write.",
    ),
    errno.EACCES: (
        "permission denied",
        "Choose a folder you may write to (e.g. --workspace DIR) or fix its permissions.",
    ),
    errno.EPERM: (
        "the operation is not permitted",
        "Choose a folder you may write to or fix its permissions.",
    ),
    errno.EADDRINUSE: (
        "the address is already in use",
        "Stop the process that listens there, or pass another --address HOST:PORT.",
    ),
    errno.EADDRNOTAVAIL: (
        "the address is not on this machine",
        "Pass --address with one of this machine's addresses, e.g. 0.0.0.0:PORT.",
    ),
    errno.ENOENT: ("no such file or folder", "Check the path."),
    errno.ENOTDIR: ("a part of the path is not a folder", "Check the path."),
    errno.EISDIR: ("it is a folder, not a file", "Check the path."),
}


def _error_line(exc: BaseException, folder: Path | None = None) -> str:
    """An error as the one line ``fedlift`` prints for it (after ``fedlift: error: ``).

    An OSError names its path, or else ``folder`` (where the command was writing)."""
    if isinstance(exc, OSError) and not isinstance(exc, FedliftError):
        what, fix = _OS_ERRORS.get(exc.errno or -1, (exc.strerror or type(exc).__name__, ""))
        name = errno.errorcode.get(exc.errno or -1)
        where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        if not where and folder is not None:
            where = f"writing to {folder}"
        text = f"{where}: {what}" if where else what
        text += f" ({name})." if name else "."
        return f"{text} {fix}".strip()
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines) or type(exc).__name__


def _folder_of(args: argparse.Namespace) -> Path | None:
    """The folder a command writes to (named when an OSError carries no path)."""
    for name in ("out", "workspace"):
        value = vars(args).get(name)
        if isinstance(value, Path):
            return value
    return None


def _run(args: argparse.Namespace) -> int:
    if args.command == "provision":
        return _provision(args)
    if args.command == "server":
        return _server(args)
    if args.command == "revoke":
        return run_revoke(args)
    if args.command in ("client", "poc", "job"):
        return run_site_command(args)
    if args.command == "report":
        return _report(args)
    if args.command == "web-token":
        return _web_token(args)
    if args.command == "simulator":
        from .simulator import run_simulator

        run_simulator(
            args.job,
            args.workspace,
            args.n_clients,
            args.threads,
            args.gpu,
            quiet=args.quiet,
            shared_memory=not args.no_shared_memory,
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """``fedlift ...``: 0 on success, 1 for an error (one line on stderr; a failed client's
    traceback is printed in full), 2 for usage errors, 130 when interrupted."""
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _run(args)
    except (FedliftError, OSError) as exc:  # operational: one line, no traceback
        if isinstance(exc, ClientFailedError) and args.command == "simulator":
            # the failed client's traceback is what the user needs: printed in full
            print(f"\nfedlift: the job failed because a client failed.\n{exc}", file=sys.stderr)
        else:
            print(f"fedlift: error: {_error_line(exc, _folder_of(args))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fedlift: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
