"""NVFlare's POC mode, the benchmark over its wire; runs in ``benchmarks/.venvs/nvflare``.

``python -m benchmarks.peers.nvflare_poc --params N --clients C --rounds R`` (from the repo
root, with the NVFlare venv's python) runs the peer benchmark's job (``nvflare_bench.build_job``:
``FedJob`` + ``FedAvg`` + the zeros persistor + ``ScriptRunner`` of ``nvflare_client.py``) in
NVFlare's proof-of-concept deployment on this machine: a server and C clients as separate
processes that talk over loopback with mutual TLS, as ``nvflare poc prepare`` provisions them
(NVFlare's default ``connection_security: mtls``), and prints one JSON line. The timing rules
are in ``benchmarks.peers.common``.

Outside the timed span, ``nvflare poc prepare -n C`` provisions the project (certificates,
startup kits) into a POC workspace in a temp dir of our own (``NVFLARE_POC_WORKSPACE``, and
``HOME`` set to it too: ``poc prepare`` registers the kits in ``~/.nvflare/config.conf``),
with the server on a free loopback port instead of 8002/8003. The timed process (this module
with ``--drive``) then runs what a user runs, one command after another: ``nvflare poc
start`` (server and clients, returns when every client is connected), ``nvflare job submit
-j JOB`` with the admin's startup kit, ``nvflare job wait JOB_ID`` (NVFlare's 2 s poll) and
``nvflare poc stop``; it exits once every process it started has ended (what is left after
30 s is killed and reported as lingering).

NVFlare's defaults stand, as in ``nvflare_bench``: ``--task-request-interval`` overrides the
server's ``task_request_interval`` in the job (null in the JSON: NVFlare's default).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.peers.common import become_subreaper, outcome, peer_parser
from benchmarks.peers.deploy_common import (
    free_port,
    mark,
    run_logged,
    save_lingering,
    time_driver,
    wait_for_tree,
)

HERE = Path(__file__).resolve().parent
ADMIN = "admin@nvidia.com"  # the project admin ``nvflare poc prepare`` makes


def nvflare_cli() -> str:
    return str(Path(sys.executable).parent / "nvflare")


def poc_env(work: Path) -> dict[str, str]:
    """The environment of every ``nvflare`` command: the POC workspace and a HOME of ours."""
    home = work / "home"
    home.mkdir(parents=True, exist_ok=True)
    return dict(
        os.environ,
        HOME=str(home),
        NVFLARE_POC_WORKSPACE=str(work / "poc"),
        PYTHONUNBUFFERED="1",
    )


def prepare(work: Path, clients: int, port: int) -> Path:
    """``nvflare poc prepare -n C`` with the server on ``port``; returns the admin's kit.

    The first prepare writes NVFlare's own project.yml; the second provisions it again with
    the server's ports changed (``-i``), so nothing listens on NVFlare's fixed 8002/8003.
    """
    import yaml

    env = poc_env(work)
    log = work / "prepare.log"
    cli = nvflare_cli()
    run_logged([cli, "poc", "prepare", "-n", str(clients), "--force"], env, log, 300)
    project = yaml.safe_load((work / "poc" / "project.yml").read_text())
    for participant in project["participants"]:
        if participant.get("type") == "server":
            participant["fed_learn_port"] = port
            participant["admin_port"] = port
    custom = work / "project.yml"
    custom.write_text(yaml.safe_dump(project))
    run_logged([cli, "poc", "prepare", "-i", str(custom), "--force"], env, log, 300)
    kits = sorted((work / "poc").glob(f"*/prod_*/{ADMIN}"))
    if not kits:
        raise RuntimeError(f"nvflare poc prepare made no {ADMIN} kit under {work / 'poc'}")
    return kits[-1]


def drive(work: Path, job: Path, kit: Path, timeout: float) -> int:
    """The timed process: poc start, job submit, job wait, poc stop; then wait for the tree."""
    become_subreaper()  # the POC's daemons (start.sh runs sub_start.sh &) stay below us
    env = poc_env(work)
    log = work / "drive.log"
    cli = nvflare_cli()
    failure: Exception | None = None
    try:
        run_logged([cli, "poc", "start"], env, log, 300)
        mark(work, "poc_started")
        submit = [cli, "job", "submit", "-j", str(job), "--startup-kit", str(kit)]
        submitted = run_logged(submit, env, log, 300)
        mark(work, "submitted")
        found = re.search(r"job_id:\s*(\S+)", submitted)
        if found is None:
            raise RuntimeError(f"nvflare job submit printed no job_id:\n{submitted}")
        job_id = found.group(1)
        wait = [
            cli,
            "job",
            "wait",
            job_id,
            "--startup-kit",
            str(kit),
            "--timeout",
            str(int(timeout)),
        ]
        run_logged(wait, env, log, timeout + 60)
        mark(work, "job_done")
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        failure = exc
    finally:
        try:
            run_logged([cli, "poc", "stop"], env, log, 120)
            mark(work, "poc_stopped")
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            failure = failure or exc
    left = wait_for_tree()
    save_lingering(work, left)
    if left:
        print(f"lingering after poc stop: {left}", flush=True)
    if failure is not None:
        print(f"nvflare POC failed: {failure}", flush=True)
        for path in sorted((work / "poc").glob("*/prod_*/*/poc_console.log")):
            tail = path.read_text(errors="replace")[-2000:]
            print(f"--- {path.parent.name} console:\n{tail}", flush=True)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = peer_parser("nvflare_poc", task_request_interval=True)
    parser.add_argument("--drive", nargs=3, metavar=("WORK", "JOB", "KIT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.drive:
        work, job, kit = (Path(p) for p in args.drive)
        return drive(work, job, kit, args.timeout)

    import nvflare

    from benchmarks.peers.nvflare_bench import build_job, set_task_request_interval

    with tempfile.TemporaryDirectory(prefix="peer-nvflare-poc-") as tmp:
        work = (args.keep or Path(tmp)).resolve()
        times = work / "times"
        times.mkdir(parents=True, exist_ok=True)
        job = build_job(work / "jobs", args.params, args.clients, args.rounds, times)
        if args.task_request_interval is not None:
            set_task_request_interval(job, args.task_request_interval)
        port = free_port()
        kit = prepare(work, args.clients, port)
        command = [
            sys.executable,
            "-m",
            "benchmarks.peers.nvflare_poc",
            f"--params={args.params}",
            f"--clients={args.clients}",
            f"--timeout={args.timeout}",
            "--drive",
            str(work),
            str(job),
            str(kit),
        ]
        timing = time_driver(
            command, work, times, args.rounds, args.timeout, memory=not args.no_memory
        )
    timing["task_request_interval"] = args.task_request_interval
    timing["deployment"] = "POC (server + clients over loopback), mTLS"
    timing["tls"] = True
    timing["port"] = port
    result = outcome("nvflare", nvflare.__version__, args.params, args.clients, timing)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
