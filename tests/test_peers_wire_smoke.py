"""``python -m benchmarks --peers --wire``: its table, and the peers' deployment set-ups.

Quick: the table and the argument checks need no peer; the set-up checks run a few seconds
in the peers' venvs (``benchmarks/.venvs/<peer>``) and are skipped where those are absent
(nothing is installed here). A whole deployment of each peer (about a minute) runs only with
``FEDLIFT_PEER_WIRE_SMOKE=1``.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from benchmarks.peers import common, venvs, wire_peers

ROOT = Path(__file__).resolve().parents[1]


def _python_of(peer: str) -> Path:
    """The peer's venv python, if ``ensure_peer`` finished installing it; else skip."""
    venv = venvs.VENVS / peer
    stamp = venv / venvs.STAMP
    wanted = json.dumps(sorted(venvs.REQUIREMENTS[peer]))
    python = venvs.python_of(venv)
    if not (stamp.is_file() and stamp.read_text() == wanted and python.exists()):
        pytest.skip(f"the {peer} venv is not installed (benchmarks/.venvs/{peer})")
    return python


def _run_in(peer: str, code: str, home: Path, timeout: float = 120) -> str:
    """``code`` in the peer's venv python, with HOME and FLWR_HOME in ``home`` (the peers'
    CLIs keep state there: ``~/.nvflare``, ``~/.flwr``)."""
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HOME=str(home), FLWR_HOME=str(home / ".flwr"))
    done = subprocess.run(
        [str(_python_of(peer)), "-c", code],
        cwd=ROOT,
        env=dict(env, FLWR_TELEMETRY_ENABLED="0"),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def test_the_table_has_one_row_per_scenario_and_ratios_to_fedlift_grpc(
    capsys: pytest.CaptureFixture[str],
) -> None:
    s = wire_peers.WireScenario(10_000_000, 2, 6)
    cells = [
        wire_peers.Cell("fedlift gRPC", s.name, 0.5, 1.0, 0.1, 300.0, "0.1.0"),
        wire_peers.Cell("fedlift mTLS", s.name, why="not measured: no run_fedlift_mtls"),
        wire_peers.Cell("Flower TLS", s.name, 5.0, 15.0, 5.0, 900.0, "1.42.0"),
        wire_peers.Cell("NVFlare POC mTLS", s.name, why="failed: boom"),
    ]
    wire_peers.print_table([s], cells)
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("10M params, 2 clients x 6")]
    assert len(rows) == 1, out
    assert "0.500" in rows[0] and "5.000 (10.0x)" in rows[0], rows[0]
    assert rows[0].count(" -") == 3  # mTLS, Flower insecure (absent), NVFlare (failed)
    assert "failed: boom" in out and "not measured" in out


def test_run_peer_wire_checks_its_arguments_before_installing_anything() -> None:
    with pytest.raises(ValueError, match="peer must be one of"):
        common.run_peer_wire("fedml", 1000, 2, 3)
    with pytest.raises(ValueError, match="mutual TLS only"):
        common.run_peer_wire("nvflare", 1000, 2, 3, tls=False)


def test_the_flower_app_folder_and_certificates_are_what_flower_accepts(tmp_path: Path) -> None:
    out = _run_in(
        "flower",
        f"""
import ssl, socket, threading
from pathlib import Path
from benchmarks.peers.flower_deploy import make_certificates, write_app, write_connection
from flwr.cli.config_utils import load_and_validate
from flwr.cli.build import build_fab_from_disk

work = Path({str(tmp_path)!r})
app = write_app(work / "app", 1000, 2, 3, work / "times")
config, warnings = load_and_validate(app / "pyproject.toml")
assert config["tool"]["flwr"]["app"]["config"]["params"] == 1000, config
assert build_fab_from_disk(app)  # what flwr run ships
certs = make_certificates(work / "certs")
write_connection(work / "flwr-home", 12345, certs["ca"])
assert "root-certificates" in (work / "flwr-home" / "config.toml").read_text()

# A TLS handshake to 127.0.0.1 with that certificate, checked against the CA.
server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
server.load_cert_chain(certs["cert"], certs["key"])
client = ssl.create_default_context(cafile=str(certs["ca"]))
listener = socket.create_server(("127.0.0.1", 0))
port = listener.getsockname()[1]

def serve():
    conn, _ = listener.accept()
    with server.wrap_socket(conn, server_side=True) as tls:
        tls.sendall(b"ok")

thread = threading.Thread(target=serve)
thread.start()
with socket.create_connection(("127.0.0.1", port)) as raw:
    with client.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        print(tls.recv(2).decode())
thread.join()
""",
        tmp_path / "user-home",
    )
    assert out.strip().endswith("ok")


def test_the_nvflare_poc_is_provisioned_on_a_free_port_in_our_folder(tmp_path: Path) -> None:
    out = _run_in(
        "nvflare",
        f"""
import json
from pathlib import Path
from benchmarks.peers.nvflare_poc import prepare

work = Path({str(tmp_path)!r})
kit = prepare(work, 2, 45678)
assert kit.name == "admin@nvidia.com" and kit.is_relative_to(work / "poc"), kit
found = next((work / "poc").glob("*/prod_*/server/startup/fed_server.json"))
server = json.loads(found.read_text())
print(server["servers"][0]["service"]["target"], server["servers"][0]["admin_port"])
print(sorted(p.name for p in kit.parent.iterdir()))
""",
        tmp_path / "user-home",
    )
    assert "server:45678 45678" in out, out
    assert "site-1" in out and "site-2" in out, out
    assert (tmp_path / "home" / ".nvflare").is_dir()  # its CLI state went to our HOME


@pytest.mark.skipif(
    os.environ.get("FEDLIFT_PEER_WIRE_SMOKE") != "1",
    reason="a deployment of each peer takes about a minute; FEDLIFT_PEER_WIRE_SMOKE=1 runs it",
)
@pytest.mark.parametrize(("peer", "tls"), [("flower", False), ("flower", True), ("nvflare", True)])
def test_a_whole_deployment_runs_and_leaves_nothing_behind(peer: str, tls: bool) -> None:
    _python_of(peer)
    r = common.run_peer_wire(peer, 1000, 2, 3, tls=tls, timeout=300, memory=False)
    assert r["peer"] == peer and r["tls"] is tls
    assert len(r["round_s"]) == 2  # type: ignore[arg-type]
    assert r["lingering_pids"] == [] and r["driver_lingering_pids"] == [], r
