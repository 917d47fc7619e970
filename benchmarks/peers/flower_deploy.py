"""Flower's Deployment Runtime, the benchmark over its wire; runs in ``benchmarks/.venvs/flower``.

``python -m benchmarks.peers.flower_deploy --params N --clients C --rounds R [--tls]`` (from
the repo root, with the Flower venv's python) runs the peer benchmark's Flower app in a
deployment on this machine, and prints one JSON line: a ``flower-superlink`` and C
``flower-supernode`` processes on loopback, and the run started with ``flwr run``. The app is
``flower_deploy_app`` (flower_app's ClientApp and FedAvg ``ServerApp``) with ``flower_app.py``
beside it, in an app folder with a ``pyproject.toml`` (``write_app``). The timing rules are
in ``benchmarks.peers.common``.

Outside the timed span: the app folder, a ``FLWR_HOME`` of our own holding the Flower
Configuration (``config.toml``: a SuperLink connection named ``bench``) and, with ``--tls``,
a CA and the SuperLink's certificate for 127.0.0.1/localhost (``make_certificates``). The
timed process (this module with ``--drive``) starts what a user starts: ``flower-superlink``
(``--insecure``, or ``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile``) on a free port,
C ``flower-supernode --superlink 127.0.0.1:PORT`` (``--insecure``, or
``--root-certificates CA``) each with ``--node-config "partition-id=i num-partitions=C"``
and a Runtime API port of its own, then ``flwr run APP bench --stream`` (returns when the
run's logs end: the run is over) and ``flwr ls --run-id`` to check it finished; then it stops
the SuperNodes and the SuperLink (SIGTERM) and exits once every process it started ended.

Flower's defaults stand otherwise: subprocess isolation (the SuperLink and each SuperNode
start a SuperExec that runs the ServerApp / ClientApp in processes of their own), an
in-memory SuperLink state. TLS covers the SuperNodes' and the CLI's connections to the
SuperLink; Flower has no client certificates (no mTLS; a SuperNode can authenticate with a
key pair, ``--enable-supernode-auth``, not used here), and each SuperNode's own Runtime API
to its ClientApp processes stays on loopback without TLS, as Flower ships it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO

from benchmarks.peers.common import become_subreaper, outcome, peer_parser
from benchmarks.peers.deploy_common import (
    free_port,
    mark,
    run_logged,
    save_lingering,
    time_driver,
    wait_for_port,
    wait_for_tree,
)

HERE = Path(__file__).resolve().parent
CONNECTION = "bench"  # the SuperLink connection's name in FLWR_HOME/config.toml


def write_app(folder: Path, params: int, clients: int, rounds: int, times: Path) -> Path:
    """The Flower app folder ``flwr run`` bundles: pyproject.toml and the two modules."""
    from importlib.metadata import version

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("flower_app.py", "flower_deploy_app.py"):
        shutil.copy(HERE / name, folder / name)
    (folder / "pyproject.toml").write_text(
        f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedlift-peer-bench"
version = "1.0.0"
description = "No-compute clients: receive, add 1.0, send; FedAvg"
license = "Apache-2.0"
dependencies = ["flwr=={version("flwr")}", "numpy"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedlift"

[tool.flwr.app.components]
serverapp = "flower_deploy_app:server_app"
clientapp = "flower_deploy_app:client_app"

[tool.flwr.app.config]
params = {params}
clients = {clients}
rounds = {rounds}
times = {json.dumps(str(times))}
"""
    )
    return folder


def make_certificates(folder: Path) -> dict[str, Path]:
    """A CA and a certificate for the SuperLink (SANs 127.0.0.1 and localhost), as PEM."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=2)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("peer-bench CA"))
        .issuer_name(name("peer-bench CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": folder / "ca.crt", "cert": folder / "server.pem", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    paths["key"].chmod(0o600)
    return paths


def write_connection(flwr_home: Path, port: int, ca: Path | None) -> None:
    """The Flower Configuration: one SuperLink connection, ``bench``, the default."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    security = f"root-certificates = {json.dumps(str(ca))}" if ca else "insecure = true"
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\n{security}\n'
    )


def flower_env(work: Path) -> dict[str, str]:
    """Every Flower process's environment: FLWR_HOME (and HOME) of ours, no telemetry, and
    the venv's bin first on PATH (the SuperLink and SuperNodes start ``flower-superexec``)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return dict(
        os.environ,
        PATH=path,
        FLWR_HOME=str(work / "flwr-home"),
        HOME=str(work / "home"),
        FLWR_TELEMETRY_ENABLED="0",
        PYTHONUNBUFFERED="1",
    )


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _log(path: Path, logs: list[IO[bytes]]) -> IO[bytes]:
    """``path`` opened for a service's output (kept in ``logs``, closed at the end)."""
    logs.append(open(path, "wb"))
    return logs[-1]


def _stop(processes: list[subprocess.Popen[bytes]], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds, what is still running of ``processes``."""
    for p in processes:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in processes:
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def drive(work: Path, app: Path, clients: int, port: int, tls: bool, timeout: float) -> int:
    """The timed process: SuperLink, SuperNodes, ``flwr run --stream``, then stop them all."""
    become_subreaper()  # SuperExec and the app processes stay below us
    env = flower_env(work)
    (work / "home").mkdir(exist_ok=True)
    log = work / "drive.log"
    certs = work / "certs"
    security = (
        [
            f"--ssl-ca-certfile={certs / 'ca.crt'}",
            f"--ssl-certfile={certs / 'server.pem'}",
            f"--ssl-keyfile={certs / 'server.key'}",
        ]
        if tls
        else ["--insecure"]
    )
    services: list[subprocess.Popen[bytes]] = []
    logs: list[IO[bytes]] = []
    failure: Exception | None = None
    try:
        superlink = subprocess.Popen(
            [
                _bin("flower-superlink"),
                *security,
                "--host=127.0.0.1",
                f"--port={port}",
                "--disable-runtime-dependency-installation",
            ],
            env=env,
            cwd=work,
            stdout=_log(work / "superlink.log", logs),
            stderr=subprocess.STDOUT,
        )
        services.append(superlink)
        wait_for_port(port, 120, superlink)
        mark(work, "superlink_listening")
        node_security = [f"--root-certificates={certs / 'ca.crt'}"] if tls else ["--insecure"]
        for i in range(clients):
            node = subprocess.Popen(
                [
                    _bin("flower-supernode"),
                    *node_security,
                    f"--superlink=127.0.0.1:{port}",
                    f"--node-config=partition-id={i} num-partitions={clients}",
                    "--host=127.0.0.1",
                    f"--port={free_port()}",
                ],
                env=env,
                cwd=work,
                stdout=_log(work / f"supernode-{i}.log", logs),
                stderr=subprocess.STDOUT,
            )
            services.append(node)
        started = run_logged(
            [_bin("flwr"), "run", str(app), CONNECTION, "--stream"], env, log, timeout, cwd=work
        )
        mark(work, "run_ended")
        run_id = next(
            (w for line in started.splitlines() if "started run" in line for w in line.split()),
            None,
        )
        listed = run_logged(
            [_bin("flwr"), "ls", CONNECTION, "--format=json"], env, log, 120, cwd=work
        )
        if "finished:completed" not in listed:
            raise RuntimeError(f"the run did not complete (run {run_id}):\n{listed[-3000:]}")
        dead = [p.args[0] for p in services if p.poll() is not None]
        if dead:
            raise RuntimeError(f"exited during the run: {dead}")
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        failure = exc
    finally:
        _stop(services[1:])  # the SuperNodes first, then the SuperLink they talk to
        _stop(services[:1])
        mark(work, "services_stopped")
        for f in logs:
            f.close()
    left = wait_for_tree()
    save_lingering(work, left)
    if left:
        print(f"lingering after the services stopped: {left}", flush=True)
    if failure is not None:
        print(f"Flower deployment failed: {failure}", flush=True)
        for path in sorted(work.glob("super*.log")):
            tail = path.read_text(errors="replace")[-2000:]
            print(f"--- {path.name}:\n{tail}", flush=True)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = peer_parser("flower_deploy")
    parser.add_argument("--tls", action="store_true", help="TLS to the SuperLink (else insecure)")
    parser.add_argument("--drive", nargs=3, metavar=("WORK", "APP", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.drive:
        work, app, port = Path(args.drive[0]), Path(args.drive[1]), int(args.drive[2])
        return drive(work, app, args.clients, port, args.tls, args.timeout)

    from importlib.metadata import version

    with tempfile.TemporaryDirectory(prefix="peer-flower-deploy-") as tmp:
        work = (args.keep or Path(tmp)).resolve()
        times = work / "times"
        times.mkdir(parents=True, exist_ok=True)
        app = write_app(work / "app", args.params, args.clients, args.rounds, times)
        ca = make_certificates(work / "certs")["ca"] if args.tls else None
        port = free_port()
        write_connection(work / "flwr-home", port, ca)
        command = [
            sys.executable,
            "-m",
            "benchmarks.peers.flower_deploy",
            f"--params={args.params}",
            f"--clients={args.clients}",
            f"--timeout={args.timeout}",
            *(["--tls"] if args.tls else []),
            "--drive",
            str(work),
            str(app),
            str(port),
        ]
        timing = time_driver(
            command, work, times, args.rounds, args.timeout, memory=not args.no_memory
        )
    timing["deployment"] = "SuperLink + SuperNodes over loopback, " + (
        "TLS" if args.tls else "insecure"
    )
    timing["tls"] = args.tls
    timing["port"] = port
    result = outcome("flower", version("flwr"), args.params, args.clients, timing)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
