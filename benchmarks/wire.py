"""fedlift's gRPC path against this machine's wire floors: ``python -m benchmarks --wire``.

Every byte between machines goes through gRPC. This measures that path on loopback, the
way a user runs it (``fedlift simulator --no-shared-memory``: the same server runtime,
workers and gRPC transport as a deployment, without shared memory), at 10M x 2 and
100M x 2, no-compute clients, and beside it, in the same run:

* the TCP floor: one stream over loopback between two processes, ``sendall`` from one
  buffer into ``recv_into`` another (no framing, no copies beyond the kernel's);
* the TLS floor: the same through Python's ``ssl`` (TLS 1.3), with the certificates
  ``fedlift provision`` makes for a deployment;
* the gRPC floor: what grpcio itself moves on one stream between two processes, pre-made
  1 MiB messages and nothing else (no framing of fedlift's, no copies, no fold): how close
  to the socket any Python gRPC program can come on this machine;
* a deployment (``fedlift server start`` / ``client start``, mutual TLS with gRPC's own
  TLS) across two network namespaces joined by a veth pair, unshaped (root only; the
  harness of ``benchmarks.slow_link``);
* the same scenarios with int8 results (``Compression(results="int8")``), which put about
  a quarter of the result bytes on the wire.

A round moves the model to every client and a result back from each: ``bytes = 2 x
clients x 4 x params``; a floor's seconds per round are those bytes at its rate. Ratios
are fedlift's s/round over the floor's (goal: within 1.5x of the TCP floor). Server PSS is
the simulator's server process alone (goal: at most 2.5x the model at 100M x 2).
``--smoke`` runs it all at tiny sizes (proves it still runs).
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent

_RECEIVER = r"""
import socket, ssl, sys
port, total, tls = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
listener = socket.create_server(("127.0.0.1", port))
print("ready", flush=True)
conn, _ = listener.accept()
if tls != "-":
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls + "/server/cert.pem", tls + "/server/key.pem")
    conn = context.wrap_socket(conn, server_side=True)
buffer = memoryview(bytearray(1 << 24))
while True:
    got = 0
    while got < total:
        n = conn.recv_into(buffer, min(len(buffer), total - got))
        if not n:
            sys.exit(0)
        got += n
    conn.sendall(b"k")
"""


_GRPC_RECEIVER = r"""
import sys, time
from concurrent import futures
import grpc
limit = [("grpc.max_receive_message_length", 1 << 26)]
def call(chunks, context):
    for _ in chunks:
        pass
    return b"k"
server = grpc.server(futures.ThreadPoolExecutor(2), options=limit)
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
    "floor.F", {"C": grpc.stream_unary_rpc_method_handler(call)}),))
print(server.add_insecure_port("127.0.0.1:0"), flush=True)
server.start()
sys.stdin.read()
"""


def grpc_floor(total: int, repeats: int = 3, chunk: int = 1 << 20) -> float:
    """Bytes per second grpcio moves on one stream between two processes (best of
    ``repeats``): the same pre-made ``chunk``-byte message over and over, counted and
    dropped by the receiver."""
    import grpc

    receiver = subprocess.Popen([sys.executable, "-c", _GRPC_RECEIVER], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        port = int(receiver.stdout.readline()) if receiver.stdout is not None else 0
        channel = grpc.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 1 << 26)]
        )
        method = channel.stream_unary("/floor.F/C")
        message = os.urandom(chunk)
        count = max(1, total // chunk)
        method(iter([message] * 2))  # connected and warm
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            method(iter([message] * count))
            best = min(best, time.perf_counter() - started)
        channel.close()
        return count * chunk / best
    finally:
        receiver.kill()
        receiver.wait()


def deployment_round_s(params: int, rounds: int) -> float | str:
    """Seconds per round of a real deployment (mutual TLS) across two network namespaces,
    unshaped, timed as the simulator rows are (gaps between rounds' ends); a string says
    why it was not run."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    from benchmarks.slow_link import Case, run_case

    with tempfile.TemporaryDirectory(prefix="fedlift-wire-netns-") as scratch:
        run_case(Case("unshaped", rate_mbit=None), params, rounds, Path(scratch))
        metrics = next(Path(scratch).rglob("metrics.jsonl"))
        ended = [json.loads(line)["ended_at"] for line in metrics.read_text().splitlines()
                 if json.loads(line)["task"] == "train"]  # fmt: skip
    gaps = [b - a for a, b in zip(ended, ended[1:], strict=False)]
    return statistics.median(gaps[1:] or gaps or [0.0])  # the first round excluded


def stream_floor(total: int, tls: bool, repeats: int = 3) -> float:
    """Bytes per second of one loopback stream (best of ``repeats`` transfers of ``total``)."""
    with tempfile.TemporaryDirectory(prefix="fedlift-floor-") as scratch:
        if tls:  # a deployment's own certificates: the server kit's, checked against the CA
            from fedlift.deploy import provision

            provision("floor", "localhost:1", ["site-1"], [], Path(scratch))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        receiver = subprocess.Popen(
            [sys.executable, "-c", _RECEIVER, str(port), str(total), scratch if tls else "-"],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            if receiver.stdout is None or receiver.stdout.readline().strip() != "ready":
                raise RuntimeError("the floor's receiver did not start")
            sock: socket.socket = socket.create_connection(("127.0.0.1", port))
            if tls:
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                context.load_verify_locations(Path(scratch) / "server" / "ca.pem")
                context.minimum_version = ssl.TLSVersion.TLSv1_3
                sock = context.wrap_socket(sock, server_hostname="localhost")
            payload = memoryview(bytearray(os.urandom(1 << 20)) * 16)  # 16 MiB
            best = float("inf")
            with sock:
                for _ in range(repeats):
                    started = time.perf_counter()
                    left = total
                    while left:
                        chunk = payload[: min(left, len(payload))]
                        sock.sendall(chunk)
                        left -= len(chunk)
                    if sock.recv(1) != b"k":
                        raise RuntimeError("the floor's receiver went away")
                    best = min(best, time.perf_counter() - started)
            return total / best
        finally:
            receiver.kill()
            receiver.wait()


@dataclass
class WireRow:
    scenario: str
    variant: str
    params: int
    clients: int
    s_per_round: float
    tcp_floor_s: float
    tls_floor_s: float
    grpc_floor_s: float
    server_peak_pss_mb: float
    model_mb: float

    @property
    def vs_tcp(self) -> float:
        return self.s_per_round / self.tcp_floor_s

    @property
    def pss_x_model(self) -> float:
        return self.server_peak_pss_mb / self.model_mb


def main(smoke: bool = False, json_path: Path | None = None) -> int:
    from benchmarks.__main__ import Scenario, run_fedlift
    from fedlift import Compression

    scenarios = [
        Scenario("10M params, 2 clients", 10_000_000, 2, rounds=12),
        Scenario("100M params, 2 clients", 100_000_000, 2, rounds=6),
    ]
    if smoke:
        scenarios = [Scenario(s.name + " (smoke)", 100_000, 2, rounds=3) for s in scenarios[:1]]
    rows: list[WireRow] = []
    for scenario in scenarios:
        moved = 2 * scenario.clients * 4 * scenario.params
        tcp = stream_floor(max(moved, 1 << 20), tls=False, repeats=1 if smoke else 3)
        tls = stream_floor(max(moved, 1 << 20), tls=True, repeats=1 if smoke else 3)
        grpc_rate = grpc_floor(max(moved, 1 << 20), repeats=1 if smoke else 3)
        print(f"floors for {scenario.name}: TCP {tcp / 1e9:.2f} GB/s, TLS {tls / 1e9:.2f} GB/s, "
              f"gRPC {grpc_rate / 1e9:.2f} GB/s", flush=True)  # fmt: skip
        for variant, compression in (("gRPC", None), ("gRPC, int8 results",
                                                      Compression(results="int8"))):  # fmt: skip
            with tempfile.TemporaryDirectory(prefix="fedlift-wire-") as tmp:
                outcome = run_fedlift(scenario, Path(tmp), shared_memory=False, once=smoke,
                                      compression=compression)  # fmt: skip
            rows.append(WireRow(
                scenario.name, variant, scenario.params, scenario.clients, outcome.median_s,
                moved / tcp, moved / tls, moved / grpc_rate, outcome.server_peak_pss_mb,
                4 * scenario.params / 1e6,
            ))  # fmt: skip
            print(f"ran {variant}: {scenario.name}: {outcome.median_s:.4f} s/round", flush=True)
        deployed = deployment_round_s(scenario.params, 3 if smoke else scenario.rounds)
        if isinstance(deployed, str):
            print(f"skipped the mTLS deployment across namespaces: {deployed}", flush=True)
        else:
            rows.append(WireRow(
                scenario.name, "mTLS deployment, netns", scenario.params, scenario.clients,
                deployed, moved / tcp, moved / tls, moved / grpc_rate, 0.0,
                4 * scenario.params / 1e6,
            ))  # fmt: skip
            print(f"ran the mTLS deployment: {scenario.name}: {deployed:.4f} s/round", flush=True)
    print()
    print(f"{'scenario':<25}{'variant':<24}{'s/round':>8}{'TCP fl.':>8}{'x TCP':>7}"
          f"{'TLS fl.':>8}{'x TLS':>7}{'gRPC fl.':>9}{'x gRPC':>7}{'server PSS':>12}"
          f"{'x model':>8}")  # fmt: skip
    for r in rows:
        pss = (
            f"{r.server_peak_pss_mb:>10.0f}MB{r.pss_x_model:>8.2f}" if r.server_peak_pss_mb else ""
        )
        print(f"{r.scenario:<25}{r.variant:<24}{r.s_per_round:>8.3f}{r.tcp_floor_s:>8.3f}"
              f"{r.vs_tcp:>7.2f}{r.tls_floor_s:>8.3f}{r.s_per_round / r.tls_floor_s:>7.2f}"
              f"{r.grpc_floor_s:>9.3f}{r.s_per_round / r.grpc_floor_s:>7.2f}{pss}")  # fmt: skip
    print(
        "(floors: the round's bytes, 2 x clients x model, over one loopback stream: TCP, TLS, "
        "and grpcio itself; goals: within 1.5x of the TCP floor (1.5x of TLS for mTLS), "
        "server PSS at most 2.5x the model at 100M x 2)"
    )
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        payload = [{**asdict(r), "vs_tcp": r.vs_tcp, "pss_x_model": r.pss_x_model,
                    "vs_grpc": r.s_per_round / r.grpc_floor_s} for r in rows]  # fmt: skip
        tmp_path = json_path.with_suffix(".tmp")
        tmp_path.write_text(json.dumps({"wire": payload}, indent=2) + "\n")
        tmp_path.replace(json_path)
        print(f"results: {json_path}")
    return 0
