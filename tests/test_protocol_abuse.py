"""Protocol abuse against the deployment server over real gRPC + mutual TLS, by parties
holding valid certificates of the project: results for tasks never given, for another job,
round or site; results twice and replayed messages; calls before registration; every admin
operation with a site certificate (and the reverse); hostile job archives.

Each is refused (or ignored, with a log line) while an honest job runs, the job's final
model equals the honest value computed by hand, and the server keeps serving the others.
"""

from __future__ import annotations

import io
import json
import logging
import random
import struct
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from fedlift.codec import Message, model_from_wire, model_to_wire
from fedlift.deploy import DeployServer, channel_credentials, provision
from fedlift.deploy._server import ADMIN_OPS, SITE_JOB_OPS
from fedlift.errors import ConfigError, PermissionDeniedError, ProtocolError
from fedlift.model import FLModel
from fedlift.server._store import load_params
from test_deploy_server import INITIAL, Party, free_port, job_zip, make_job, wait_for
from test_fuzz_wire import MALFORMED

SITES = ["site-1", "site-2", "site-3"]
ADMIN = "admin@org"
NUM_ROUNDS = 2


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("abuse") / "kits"
    provision("demo", f"localhost:{free_port()}", SITES, [ADMIN], out)
    return out


@pytest.fixture
def server(kits: Path, tmp_path: Path) -> Iterator[DeployServer]:
    with DeployServer(kits / "server", tmp_path / "ws", address="127.0.0.1:0") as running:
        yield running


@pytest.fixture
def parties(kits: Path, server: DeployServer) -> Iterator[dict[str, Party]]:
    made = {name: Party(kits, name, server.address) for name in [*SITES, ADMIN]}
    yield made
    for party in made.values():
        party.close()


def result_of(task: Message, site_index: int) -> tuple[dict[str, Any], list[np.ndarray]]:
    """The honest answer of site-i: the global model plus i (weight 1)."""
    model = model_from_wire(task.fields["model"], list(task.arrays))
    assert model.params is not None
    return model_to_wire(FLModel(params={"w": model.params["w"] + np.float32(site_index)}))


def get_task(party: Party, job_id: str) -> Message:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        reply = party.call("get_task", {"job_id": job_id, "site": party.name, "wait": 2.0})
        if reply.op == "task":
            return reply
        assert reply.op == "wait", reply
    raise AssertionError(f"{party.name} got no task")


def submit(
    party: Party, job_id: str, task_id: str, fields: dict[str, Any], arrays: list[np.ndarray],
    site: str | None = None,
) -> Message:  # fmt: skip
    body = {"job_id": job_id, "site": site or party.name, "task_id": task_id, "model": fields}
    return party.call("submit", body, arrays)


def join_job(parties: dict[str, Party], names: list[str]) -> str:
    """``names`` poll until the server hands them the one job that runs."""
    job_ids: dict[str, str] = {}
    deadline = time.monotonic() + 60
    while len(job_ids) < len(names) and time.monotonic() < deadline:
        for name in names:
            if name not in job_ids:
                reply = parties[name].call("next_job", {"wait": 0.5})
                if reply.op == "job":
                    job_ids[name] = reply.fields["job_id"]
    assert sorted(job_ids) == sorted(names) and len(set(job_ids.values())) == 1, job_ids
    return next(iter(job_ids.values()))


def expect(error: type[Exception], phrase: str, call: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(error) as info:
        call(*args, **kwargs)
    assert phrase in str(info.value), str(info.value)
    return str(info.value)


@pytest.mark.reliability
def test_protocol_abuse_leaves_the_aggregate_honest(
    reliability: Any,
    server: DeployServer,
    parties: dict[str, Party],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="fedlift.server")
    admin, s1, s2, s3 = parties[ADMIN], parties["site-1"], parties["site-2"], parties["site-3"]
    job_id = admin.call("job_submit", arrays=job_zip(make_job(tmp_path / "job"))).fields["job_id"]
    assert join_job(parties, ["site-1", "site-2"]) == job_id
    other_id = admin.call("job_submit", arrays=job_zip(make_job(tmp_path / "other"))).fields[
        "job_id"
    ]  # queued behind the first: no site of it yet
    kinds: list[str] = []
    fields0, arrays0 = model_to_wire(FLModel(params={"w": np.full(4, 1e6, np.float32)}))

    # 1. calls before registration: a result before any task exists is dropped, not queued
    assert submit(s1, job_id, uuid.uuid4().hex, fields0, arrays0).op == "ok"
    kinds.append("submit before registration")
    # 2. a site outside the job, with a valid certificate
    for op in sorted(SITE_JOB_OPS):
        expect(PermissionDeniedError, "site-3 is not a site of job", s3.call, op,
               {"job_id": job_id, "site": "site-3", "task_id": "t"})  # fmt: skip
    kinds.append("a site outside the job")

    for party in (s1, s2):
        assert party.call("register", {"job_id": job_id, "site": party.name}).op == "welcome"
    replays: list[tuple[str, dict[str, Any], list[np.ndarray]]] = []
    for round_number in range(NUM_ROUNDS):
        task1 = get_task(s1, job_id)
        task_id = task1.fields["task_id"]
        if round_number == 0:
            # 3. a result for the running task that was never handed to that site
            expect(ProtocolError, "never handed to it", submit, s2, job_id, task_id,
                   fields0, arrays0)  # fmt: skip
            kinds.append("result for a task never given")
            # 4. speaking for another site (its task, its name)
            expect(PermissionDeniedError, "site-1 cannot act as site-2", submit, s1, job_id,
                   task_id, fields0, arrays0, site="site-2")  # fmt: skip
            kinds.append("result for another site's task")
            # 5. a result for another job (one it is not a site of)
            expect(PermissionDeniedError, f"site-1 is not a site of job {other_id}", submit,
                   s1, other_id, task_id, fields0, arrays0)  # fmt: skip
            kinds.append("result for another job")
            # 6. a hostile model in a result, and a hostile log record
            bad = {"job_id": job_id, "site": "site-1", "task_id": task_id, "model": [1]}
            expect(ProtocolError, "must be a JSON object of fields", s1.call, "submit", bad)
            record = {"job_id": job_id, "site": "site-1", "key": "loss", "value": "NaN!"}
            expect(ProtocolError, "must be a number", s1.call, "log", record)
            kinds.append("malformed result and log")
            # 7. an operation that does not exist
            expect(ProtocolError, "unknown operation 'steal_model'", s1.call, "steal_model",
                   {"job_id": job_id})  # fmt: skip
            kinds.append("unknown operation")
        honest1 = result_of(task1, 1)
        assert submit(s1, job_id, task_id, *honest1).op == "ok"
        # 8. the same result twice: dropped (FedAvg would count site-1 twice otherwise)
        assert submit(s1, job_id, task_id, fields0, arrays0).op == "ok"
        if round_number == 0:
            kinds.append("a result twice")
            # 9. a forged task id while the round runs
            assert submit(s1, job_id, uuid.uuid4().hex, fields0, arrays0).op == "ok"
            kinds.append("result for a forged task id")
        else:
            # 10. replayed messages: last round's result and registration, verbatim
            for op, body, arrays in replays:
                assert s1.call(op, body, arrays).op in ("ok", "welcome")
            kinds.append("replayed result and registration of another round")
        replays = [("submit", {"job_id": job_id, "site": "site-1", "task_id": task_id,
                               "model": fields0}, arrays0)]  # fmt: skip
        task2 = get_task(s2, job_id)
        assert task2.fields["task_id"] == task_id
        assert submit(s2, job_id, task_id, *result_of(task2, 2)).op == "ok"
    replays.append(("register", {"job_id": job_id, "site": "site-1"}, []))

    wait_for(lambda: admin.call("job_status", {"job_id": job_id}).fields["state"] == "finished",
             60, "the job to finish")  # fmt: skip
    for op, body, arrays in replays:  # after the end, replays change nothing either
        reply = s1.call(op, body, arrays)
        assert reply.op in ("ok", "welcome")
    summary = admin.call("job_status", {"job_id": job_id}).fields
    assert summary["state"] == "finished" and summary["error"] is None
    assert summary["round_done"] == NUM_ROUNDS - 1

    # The aggregate is the honest one: each round the mean of w+1 and w+2, i.e. w+1.5.
    expected = INITIAL + np.float32(1.5 * NUM_ROUNDS)
    models = server.jobs_dir / job_id / "server" / "models"
    params = load_params(models / "global_model.safetensors")
    assert isinstance(params, dict)
    np.testing.assert_array_equal(params["w"], expected)
    assert np.array_equal(params["w"], np.array([3.0, 4.0, 5.0, 6.0], np.float32))  # by hand
    bytes_corrupted = int(np.count_nonzero(params["w"] != expected)) * 4

    # The server kept serving: the queued job starts for the next sites that poll.
    assert join_job(parties, ["site-1", "site-2"]) == other_id
    assert admin.call("job_abort", {"job_id": other_id}).op == "job"
    ignored = [r.getMessage() for r in caplog.records if "ignoring" in r.getMessage()]
    assert any("repeated result from site-1" in line for line in ignored), ignored
    assert any("result for a task not running from site-1" in line for line in ignored), ignored

    assert len(kinds) == 10
    for kind in kinds:
        reliability.hostile(f"protocol abuse: {kind}")
    reliability.measure(rounds_lost=0, bytes_corrupted=bytes_corrupted)
    assert bytes_corrupted == 0


# ---------------------------------------------------------------------------- role checks


@pytest.mark.reliability
def test_every_operation_checks_the_role_in_the_certificate(
    reliability: Any, server: DeployServer, parties: dict[str, Party], tmp_path: Path
) -> None:
    site, admin = parties["site-1"], parties[ADMIN]
    body = {"job_id": "job-x", "site": "site-1", "wait": 0, "text": "x"}
    checks = 0
    for op in sorted(ADMIN_OPS):
        arrays = job_zip(make_job(tmp_path / op)) if op == "job_submit" else []
        expect(PermissionDeniedError, f"site 'site-1' may not call {op!r}: it needs an admin kit",
               site.call, op, body, arrays)  # fmt: skip
        checks += 1
    for op in sorted(SITE_JOB_OPS | {"next_job", "site_log"}):
        expect(PermissionDeniedError, f"admin {ADMIN!r} may not call {op!r}: it needs a site kit",
               admin.call, op, {**body, "site": ADMIN})  # fmt: skip
        checks += 1
    assert checks == len(ADMIN_OPS) + len(SITE_JOB_OPS) + 2 == 13
    # nothing was stored, and both parties are still served in their own roles
    assert list(server.jobs_dir.iterdir()) == []
    assert admin.call("job_list").fields["jobs"] == []
    assert site.call("next_job", {"wait": 0}).op == "none"
    reliability.hostile("operations of the other role", tried=checks)


# ------------------------------------------------------------------- hostile job archives


def zip_of(entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytearray:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as bundle:
        for name, data in entries:
            bundle.writestr(name, data)
    return bytearray(buffer.getvalue())


def claim_sizes(data: bytearray, size: int) -> bytearray:
    """Every central-directory entry of ``data`` claims ``size`` uncompressed bytes."""
    at = data.find(b"PK\x01\x02")
    while at != -1:
        struct.pack_into("<I", data, at + 24, size)
        at = data.find(b"PK\x01\x02", at + 4)
    return data


def job_members(folder: Path) -> list[tuple[str, bytes]]:
    return [(p.relative_to(folder).as_posix(), p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()]  # fmt: skip


@pytest.mark.reliability
def test_hostile_job_archives_are_refused(
    reliability: Any, server: DeployServer, parties: dict[str, Party], tmp_path: Path
) -> None:
    admin = parties[ADMIN]
    honest = job_members(make_job(tmp_path / "job"))
    outside = tmp_path / "ws" / "evil.py"
    link = zipfile.ZipInfo("app/data")
    link.external_attr = (0o120777 << 16) | 0
    cases: list[tuple[str, bytearray, str]] = [
        ("zip-slip ../", zip_of([*honest, ("../../evil.py", b"x")]), "unsafe path"),
        ("zip-slip nested", zip_of([*honest, ("app/../../../evil.py", b"x")]), "unsafe path"),
        ("zip-slip absolute", zip_of([*honest, (str(outside), b"x")]), "unsafe path"),
        ("symlink member", zip_of([*honest, (link, b"/etc")]), "holds a symlink: 'app/data'"),
        (
            "zip bomb: one member claims 3 GiB",
            claim_sizes(zip_of(honest), 3 << 30),
            "unpacks to more than 2,147,483,648 bytes",
        ),  # fmt: skip
        (
            "zip bomb: members claim 1.5 GiB each",
            claim_sizes(zip_of(honest), 3 << 29),
            "unpacks to more than 2,147,483,648 bytes",
        ),  # fmt: skip
        ("not a zip", bytearray(b"PK\x03\x04 but not really"), "not a valid zip"),
    ]
    for name, data, phrase in cases:
        expect(ConfigError, phrase, admin.call, "job_submit", {},
               [np.frombuffer(bytes(data), np.uint8)])  # fmt: skip
        assert list(server.jobs_dir.iterdir()) == [], name  # refused: nothing kept
    assert not outside.exists() and not (tmp_path / "evil.py").exists()
    # ... and an honest archive is still taken
    reply = admin.call("job_submit", {}, [np.frombuffer(bytes(zip_of(honest)), np.uint8)])
    assert (
        json.loads((server.jobs_dir / reply.fields["job_id"] / "meta.json").read_text())["state"]
        == "submitted"
    )
    reliability.hostile("hostile job archives (zip-slip, symlink, zip bomb)", tried=len(cases))


# ---------------------------------------------------- malformed frames over real mTLS


@pytest.mark.reliability
def test_malformed_frames_over_mtls_are_answered_and_the_server_serves_on(
    reliability: Any, kits: Path, server: DeployServer, parties: dict[str, Party]
) -> None:
    """Every kind of malformed frame of the wire suite, sent by a site with a valid
    certificate straight onto both gRPC methods: each call ends with the server's
    ProtocolError (INVALID_ARGUMENT), and the server goes on serving everyone."""
    rng = random.Random(20261201)
    frames = [(name, bytes(build())) for name, build, _ in MALFORMED]
    frames += [(f"random-{i}", rng.randbytes(rng.randrange(1, 300))) for i in range(40)]
    channel = grpc.secure_channel(server.address, channel_credentials(kits / "site-1"))
    stream = channel.stream_stream("/fedlift.v1.Exchange/Call")
    small = channel.unary_unary("/fedlift.v1.Exchange/Small")
    answered: list[str] = []
    try:
        for name, data in frames:
            for method in ("Call", "Small"):
                with pytest.raises(grpc.RpcError) as info:
                    if method == "Call":
                        list(stream(iter([data]), timeout=20))
                    else:
                        small(data, timeout=20)
                error: Any = info.value
                details = json.loads(error.details())
                # Claims past a limit are refused at admission as ResourceLimitError
                # (RESOURCE_EXHAUSTED); every other malformed frame as ProtocolError.
                expected = {
                    grpc.StatusCode.INVALID_ARGUMENT: "ProtocolError",
                    grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceLimitError",
                }
                assert error.code() in expected, (name, method, error)
                assert details["fedlift_error"] == expected[error.code()], (name, details)
                answered.append(f"{name}/{method}")
            if len(answered) % 40 == 0:  # the server still serves its parties meanwhile
                assert parties[ADMIN].call("job_list").op == "jobs"
    finally:
        channel.close()
    assert len(answered) == 2 * len(frames)
    assert parties[ADMIN].call("job_list").fields["jobs"] == []
    assert parties["site-2"].call("next_job", {"wait": 0}).op == "none"
    reliability.hostile("malformed frames over real mTLS (both methods)", tried=len(answered))
