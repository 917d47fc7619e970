"""Hostile job folders and archives: every path a job names stays in its folder.

Tried for real: job.json naming the server's kit as the app, a script outside app/, an
initial model outside the job, absolute paths, ``..``, symlinks out of the folder, and
archives with zip-slip, absolute, symlink, oversized and lying members, sent to a site
(``unpack_app``, the worker) and to the deployment server (``job_submit`` over real mutual
TLS with an admin kit). All are refused with a clear error, at submit and again where the
job runs; no byte of the server's key reaches a site and no server path reaches a client.
"""

from __future__ import annotations

import io
import json
import os
import struct
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedlift import FedAvgJob, ScriptRunner
from fedlift.client._worker import Worker, unpack_app
from fedlift.codec import Message
from fedlift.deploy import DeployServer, provision
from fedlift.errors import ConfigError, ProtocolError
from fedlift.job import CONFIG_NAME, load_job, zip_dir
from fedlift.server import ServerRuntime
from fedlift.transport import MemoryListener
from test_deploy_server import ADMIN, Party, free_port, make_job

SITES = ["site-1", "site-2"]


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("attack-kits") / "kits"
    provision("attacks", f"localhost:{free_port()}", SITES, [ADMIN], out)
    return out


def edit_config(folder: Path, **changes: Any) -> None:
    path = folder / CONFIG_NAME
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if key == "script":
            data["runner"]["script"] = value
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir())


def zip_of(entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as bundle:
        for name, data in entries:
            bundle.writestr(name, data)
    return buffer.getvalue()


def folder_zip(folder: Path) -> dict[str, bytes]:
    """The job folder's files by name (what an attacker zips by hand, links as files)."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def set_sizes(data: bytes, name: str, size: int) -> bytes:
    """The archive with ``name``'s uncompressed size rewritten to ``size`` in both the
    local header and the central directory (a member that lies about its size)."""
    raw = bytearray(data)
    encoded = name.encode()
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        start = 0
        while (at := raw.find(signature, start)) >= 0:
            name_at = at + (30 if signature == b"PK\x03\x04" else 46)
            if raw[name_at : name_at + len(encoded)] == encoded:
                struct.pack_into("<I", raw, at + offset, size)
            start = at + 4
    return bytes(raw)


# ------------------------------------------------------------------ job.json containment


@pytest.mark.reliability
def test_load_job_refuses_every_path_that_leaves_the_job(reliability: Any, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "kit").mkdir(parents=True)
    (outside / "kit" / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\nsecret\n")
    (outside / "kit" / "train.py").write_text("print('in the kit')\n")  # found, if allowed
    (outside / "evil.py").write_text("open('/tmp/pwned', 'w')\n")
    (outside / "model.safetensors").write_bytes((tmp_path / "x").as_posix().encode())
    job = make_job(tmp_path / "job")
    (job / "evil.py").write_text("print('outside app/')\n")
    (job / "kit-link").symlink_to(outside / "kit")
    (job / "model-link").symlink_to(outside / "model.safetensors")
    good = json.loads((job / CONFIG_NAME).read_text())
    cases: list[tuple[str, Any, str]] = [
        ("app", str(outside / "kit"), "not an absolute path"),
        ("app", "../outside/kit", "with '..'"),
        ("app", "app/../../outside/kit", "with '..'"),
        ("app", "kit-link", "through a symlink"),
        ("app", "..\\outside\\kit", "with '..'"),
        ("app", 7, "must be a path relative to"),
        ("script", str(outside / "evil.py"), "not an absolute path"),
        ("script", "../evil.py", "with '..'"),
        ("script", "sub/../../../outside/evil.py", "with '..'"),
        ("script", "train.py\x00.txt", "NUL byte"),
        ("initial_model", str(outside / "model.safetensors"), "not an absolute path"),
        ("initial_model", "../outside/model.safetensors", "with '..'"),
        ("initial_model", "model-link", "through a symlink"),
    ]
    field_names = {"app": "'app'", "script": "'runner.script'", "initial_model": "'initial_model'"}
    for key, value, phrase in cases:
        (job / CONFIG_NAME).write_text(json.dumps(good))
        edit_config(job, **{key: value})
        with pytest.raises(ConfigError) as info:
            load_job(job)
        message = str(info.value)
        assert field_names[key] in message, message
        assert phrase in message, message
        assert "relative to" in message, message  # the fix
    # A script that is a symlink out of app/: the app cannot be shipped as it is.
    (job / CONFIG_NAME).write_text(json.dumps(good))
    (job / "app" / "link.py").symlink_to(outside / "evil.py")
    edit_config(job, script="link.py")
    with pytest.raises(ConfigError) as info:
        load_job(job)
    assert "'app' cannot be shipped" in str(info.value), str(info.value)
    assert "app/link.py is a symlink to" in str(info.value) and "outside" in str(info.value)
    (job / "app" / "link.py").unlink()
    reliability.hostile(
        "job.json path leaving the job (abs, .., symlink, NUL)", tried=len(cases) + 1
    )
    (job / CONFIG_NAME).write_text(json.dumps(good))
    config, _ = load_job(job)  # the same folder, unedited, loads
    assert config.app == "app" and config.runner.script == "train.py"


# ------------------------------------------------------------------ symlinks at submit / export


@pytest.mark.reliability
def test_symlinks_out_of_a_job_are_refused_and_links_inside_are_packed(
    reliability: Any, tmp_path: Path
) -> None:
    secret = tmp_path / "home" / ".ssh"
    secret.mkdir(parents=True)
    (secret / "id_ed25519").write_bytes(b"PRIVATE-KEY-BYTES")
    job = make_job(tmp_path / "job")
    app = job / "app"
    (app / "data").mkdir()
    (app / "data" / "labels.txt").write_text("cat\n")
    (app / "alias.py").symlink_to("train.py")  # inside: packed as the file
    (app / "data-alias").symlink_to("data")  # inside: packed as the folder's files
    with zipfile.ZipFile(io.BytesIO(zip_dir(job))) as bundle:
        packed = {name: bundle.read(name) for name in bundle.namelist()}
    assert packed["app/alias.py"] == (app / "train.py").read_bytes()
    assert packed["app/data-alias/labels.txt"] == b"cat\n"

    hostile: list[tuple[str, Callable[[], None], str]] = [
        ("app/key", lambda: (app / "key").symlink_to(secret / "id_ed25519"), "outside"),
        ("app/ssh", lambda: (app / "ssh").symlink_to(secret), "outside"),
        ("app/gone", lambda: (app / "gone").symlink_to(app / "missing.py"), "does not exist"),
        ("app/loop", lambda: (app / "loop").symlink_to(app), "a loop"),
        ("app/up", lambda: (app / "up").symlink_to(".."), "a loop"),
        ("app/fifo", lambda: os.mkfifo(app / "fifo"), "neither a file nor a folder"),
    ]
    for rel, make, phrase in hostile:
        make()
        try:
            with pytest.raises(ConfigError) as info:
                zip_dir(job)
            assert rel in str(info.value) and phrase in str(info.value), str(info.value)
            with pytest.raises(ConfigError) as loaded:  # what submit and the simulator check
                load_job(job)
            assert "cannot be shipped" in str(loaded.value) and rel in str(loaded.value)
            # Exporting an app with the same entry is refused too, and exports nothing.
            runner = ScriptRunner(app / "train.py", framework="numpy")
            fed = FedAvgJob("linked", 2, 1, {"w": np.zeros(2, np.float32)})
            fed.to_clients(runner)
            with pytest.raises(ConfigError) as exported:
                fed.export_job(tmp_path / "exports")
            assert rel.split("/")[1] in str(exported.value)
            assert not (tmp_path / "exports" / "linked").exists()
            assert list((tmp_path / "exports").iterdir()) == []
        finally:
            (job / rel).unlink()
    reliability.hostile("symlink out / dangling / loop / FIFO in a job folder", tried=len(hostile))
    # A link from app/ to the job's model is inside the job but not the app: the app is
    # what ships to sites, so it is refused there too (the same in the simulator and deployed).
    (app / "model").symlink_to("../initial_model.safetensors")
    with pytest.raises(ConfigError, match="app/model is a symlink to"):
        load_job(job)
    (app / "model").unlink()
    load_job(job)  # the inner links alone are fine
    # What the export copies for inner links is plain files, and the secret is nowhere.
    fed = FedAvgJob("linked", 2, 1, {"w": np.zeros(2, np.float32)})
    fed.to_clients(ScriptRunner(app / "train.py", framework="numpy"))
    exported_dir = fed.export_job(tmp_path / "exports")
    copied = exported_dir / "app" / "alias.py"
    assert copied.is_file() and not copied.is_symlink()
    leaked = sum(
        b"PRIVATE-KEY-BYTES" in p.read_bytes() for p in exported_dir.rglob("*") if p.is_file()
    )
    reliability.measure(leaks=leaked)
    assert leaked == 0


@pytest.mark.reliability
def test_export_never_replaces_a_folder_it_did_not_export(reliability: Any, tmp_path: Path) -> None:
    script = tmp_path / "project" / "train.py"
    script.parent.mkdir()
    script.write_text("pass\n")
    job = FedAvgJob("thesis", 2, 1, {"w": np.zeros(2, np.float32)})
    job.to_clients(ScriptRunner(script, framework="numpy"))
    mine = tmp_path / "exports" / "thesis"
    mine.mkdir(parents=True)
    (mine / "chapter1.tex").write_text("my work\n")
    with pytest.raises(ConfigError, match="is not a fedlift job folder"):
        job.export_job(tmp_path / "exports")
    reliability.hostile("export over a user's folder of the job's name", tried=1)
    assert (mine / "chapter1.tex").read_text() == "my work\n"
    (mine / "chapter1.tex").unlink()  # empty now: it may be used
    assert (job.export_job(tmp_path / "exports") / CONFIG_NAME).is_file()


# ------------------------------------------------------------------ archives a site unpacks


def hostile_archives(tmp_path: Path) -> list[tuple[str, bytes, str, dict[str, int]]]:
    """(what, archive, phrase, unpack_app limits) for every kind of hostile member."""
    link = zipfile.ZipInfo("data")
    link.external_attr = (0o120777 << 16) | 0
    lying = set_sizes(zip_of([("big.bin", b"\0" * 200_000)]), "big.bin", 10)
    many = zip_of([(f"f{i}.txt", b"") for i in range(30)])
    return [
        ("zip-slip ..", zip_of([("../evil.py", b"x")]), "unsafe path", {}),
        ("zip-slip nested ..", zip_of([("a/../../evil.py", b"x")]), "unsafe path", {}),
        ("absolute member", zip_of([(str(tmp_path / "abs.py"), b"x")]), "unsafe path", {}),
        ("backslash member", zip_of([("..\\evil.py", b"x")]), "unsafe path", {}),
        ("drive letter member", zip_of([("C:/evil.py", b"x")]), "unsafe path", {}),
        ("symlink member", zip_of([("train.py", b"x"), (link, b"/etc")]), "symlink", {}),
        (
            "claims too much",
            zip_of([("big.bin", b"\0" * 5000)]),
            "more than 4,096",
            {"max_bytes": 4096},
        ),
        ("lies about its size", lying, "corrupt", {"max_bytes": 4096}),
        ("too many members", many, "at most 20", {"max_files": 20}),
        ("file and folder", zip_of([("a", b"x"), ("a/b.py", b"y")]), "as a file and as", {}),
        ("member twice", zip_of([("t.py", b"x"), ("t.py", b"y")]), "twice", {}),
        ("not a zip", b"PK\x03\x04 but nothing else", "not a valid zip", {}),
    ]


@pytest.mark.reliability
@pytest.mark.filterwarnings("ignore:Duplicate name:UserWarning")
def test_unpack_app_refuses_hostile_archives_before_writing(
    reliability: Any, tmp_path: Path
) -> None:
    cases = hostile_archives(tmp_path)
    for what, data, phrase, limits in cases:
        box = tmp_path / what.replace(" ", "-")
        target = box / "site" / "app"
        with pytest.raises(ProtocolError) as info:
            unpack_app(data, target, **limits)
        assert phrase in str(info.value), (what, str(info.value))
        assert str(box) not in str(info.value)  # members are named, never the target
        assert files_under(box) == [], what  # refused before anything was written
    assert not (tmp_path / "abs.py").exists() and not (tmp_path / "evil.py").exists()
    reliability.hostile("hostile app archive at a site", tried=len(cases))
    # Control: the same limits let an honest archive through.
    ok = unpack_app(
        zip_of([("train.py", b"pass\n"), ("pkg/m.py", b"")]), tmp_path / "ok", max_files=2
    )
    assert files_under(ok) == ["pkg/m.py", "train.py"]


def site_runtime(app_zip: bytes, script: str) -> tuple[ServerRuntime, MemoryListener, list[str]]:
    config = {"job_name": "attack", "num_rounds": 1,
              "runner": {"script": script, "framework": "numpy"}}  # fmt: skip
    runtime = ServerRuntime("job-1", ["site-1"], config, app_zip)
    errors: list[str] = []

    def handler(request: Message) -> Message:
        if request.op == "client_error":
            errors.append(str(request.fields.get("error")))
        return runtime.handle(request)

    return runtime, MemoryListener(handler), errors


@pytest.mark.reliability
def test_a_site_refuses_to_run_a_script_outside_the_app(reliability: Any, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    evil = f"open({str(marker)!r}, 'w').write('ran')\n"
    app_zip = zip_of([("train.py", b"raise SystemExit('never run in this test')\n")])
    workspace = tmp_path / "site-1"
    workspace.mkdir()
    (workspace / "evil.py").write_text(evil)  # beside the app: ../evil.py from app/
    (tmp_path / "evil.py").write_text(evil)
    scripts = [str(tmp_path / "evil.py"), "../evil.py", "../../evil.py", "sub/../../evil.py"]
    for script in scripts:
        runtime, listener, errors = site_runtime(app_zip, script)
        worker = Worker(listener.connect(), "site-1", workspace)
        assert worker.run(register_timeout=30) == 2
        assert len(errors) == 1 and "refused the job" in errors[0], errors
        assert "runner.script" in errors[0] and repr(script) in errors[0]
        assert not marker.exists(), f"{script} ran"
        runtime.stop("test over", failed=True)
    reliability.hostile("runner.script outside app/ sent to a site", tried=len(scripts))


# ------------------------------------------------------------------ the server, over mTLS


@pytest.fixture
def server(kits: Path, tmp_path: Path) -> Iterator[DeployServer]:
    with DeployServer(kits / "server", tmp_path / "server-ws", address="127.0.0.1:0") as running:
        yield running


class Collector(threading.Thread):
    """A site that takes every job it is offered and keeps every byte the server sends."""

    def __init__(self, kits: Path, name: str, address: str) -> None:
        super().__init__(name=f"collector-{name}", daemon=True)
        self.party = Party(kits, name, address)
        self.quit = threading.Event()
        self.received: list[bytes] = []
        self.jobs: list[str] = []

    def keep(self, reply: Message) -> None:
        self.received.append(json.dumps(reply.fields, default=str).encode())
        for array in reply.arrays:
            data = array.tobytes()
            self.received.append(data)
            try:  # an app archive: what it unpacks to counts too
                with zipfile.ZipFile(io.BytesIO(data)) as bundle:
                    self.received.extend(bundle.read(n) for n in bundle.namelist())
            except zipfile.BadZipFile:
                pass

    def run(self) -> None:
        while not self.quit.is_set():
            try:
                reply = self.party.call("next_job", {"wait": 0.3}, retry_for=10)
                self.keep(reply)
                if reply.op == "job":
                    job_id = str(reply.fields["job_id"])
                    self.jobs.append(job_id)
                    welcome = self.party.call(
                        "register", {"job_id": job_id, "site": self.party.name}
                    )
                    self.keep(welcome)
            except Exception:  # the job failed under us: keep polling
                time.sleep(0.1)

    def finish(self) -> bytes:
        self.quit.set()
        self.join(20)
        self.party.close()
        return b"".join(self.received)


def key_leaks(received: bytes, key_file: Path) -> int:
    """How many pieces of the key are in ``received``: the whole file, its PEM header, and
    every base64 line of its body (any one of them is a leak)."""
    key = key_file.read_bytes()
    body = [line for line in key.splitlines() if line and not line.startswith(b"-----")]
    assert body, "the key file has no body to look for"
    return (
        received.count(key)
        + received.count(b"PRIVATE KEY")
        + sum(received.count(line) for line in body)
    )


def submitted_archives(kits: Path, server: DeployServer, tmp_path: Path) -> list[tuple[str, bytes]]:
    """Archives an admin builds by hand (no client-side check): each names something on
    the server's disk, or is a hostile zip."""
    job = make_job(tmp_path / "template")
    files = folder_zip(job)
    good = json.loads(files[CONFIG_NAME])
    kit = str(kits / "server")
    depth = "../" * (len(server.jobs_dir.parts) + 3)

    def with_config(**changes: Any) -> bytes:
        data = json.loads(json.dumps(good))
        for key, value in changes.items():
            if key == "script":
                data["runner"]["script"] = value
            else:
                data[key] = value
        return zip_of([*((n, b) for n, b in files.items() if n != CONFIG_NAME),
                       (CONFIG_NAME, json.dumps(data).encode())])  # fmt: skip

    link = zipfile.ZipInfo("app/kit")
    link.external_attr = (0o120777 << 16) | 0
    claims = set_sizes(zip_of([*files.items(), ("app/big.bin", b"\0" * 1000)]), "app/big.bin",
                       0xFFFF_0000)  # fmt: skip
    return [
        ("app = the server's kit (absolute)", with_config(app=kit, script="key.pem")),
        (
            "app = the server's kit (..)",
            with_config(app=f"{depth}{kit.lstrip('/')}", script="key.pem"),
        ),
        ("script = the server's key (absolute)", with_config(script=f"{kit}/key.pem")),
        ("script outside app (..)", with_config(script="../job.json")),
        ("initial_model = the server's key", with_config(initial_model=f"{kit}/key.pem")),
        ("initial_model outside (..)", with_config(initial_model="../../meta.json")),
        ("zip-slip member", zip_of([*files.items(), ("../../../evil.py", b"x")])),
        ("absolute member", zip_of([*files.items(), (f"{server.workspace}/evil.py", b"x")])),
        ("symlink member", zip_of([*files.items(), (link, kit.encode())])),
        ("member claiming 4 GiB", claims),
        (
            "job.json not JSON",
            zip_of(
                [
                    *((n, b) for n, b in files.items() if n != CONFIG_NAME),
                    (CONFIG_NAME, b"{not json"),
                ]
            ),
        ),  # fmt: skip
        ("no job.json", zip_of([("readme.txt", b"no job")])),
        ("not a zip", b"PK\x05\x06" + b"\0" * 18),
    ]


@pytest.mark.reliability
def test_job_submit_over_mtls_refuses_hostile_jobs_and_names_no_server_path(
    reliability: Any, kits: Path, server: DeployServer, tmp_path: Path
) -> None:
    admin = Party(kits, ADMIN, server.address)
    site = Collector(kits, "site-1", server.address)
    site.start()
    try:
        archives = submitted_archives(kits, server, tmp_path)
        for what, data in archives:
            with pytest.raises(ConfigError) as info:
                admin.call("job_submit", arrays=[np.frombuffer(data, np.uint8)])
            message = str(info.value)
            assert message.startswith("the job was refused: "), (what, message)
            for secret_path in (str(server.workspace), str(kits), str(tmp_path)):
                assert secret_path not in message, (what, message)
            assert list(server.jobs_dir.iterdir()) == [], what  # nothing stored
        reliability.hostile("hostile job_submit over mTLS", tried=len(archives))
        assert not (server.workspace / "evil.py").exists()
        assert not (server.workspace.parent / "evil.py").exists()
        # Control: the honest job from the same template is accepted.
        honest = zip_of(list(folder_zip(tmp_path / "template").items()))
        accepted = admin.call("job_submit", arrays=[np.frombuffer(honest, np.uint8)])
        assert accepted.op == "job"
    finally:
        received = site.finish()
        admin.close()
    leaks = key_leaks(received, kits / "server" / "key.pem")
    reliability.measure(leaks=leaks)
    assert leaks == 0


def seed_job(ws: Path, job_id: str, edit: Callable[[Path], None], submitted_at: float) -> None:
    """A job already in the server's store (as written before these checks existed)."""
    folder = ws / "jobs" / job_id
    make_job(folder / "job")
    edit(folder / "job")
    meta = {"job_id": job_id, "name": job_id, "state": "submitted", "submitted_by": ADMIN,
            "submitted_at": submitted_at, "started_at": None, "finished_at": None,
            "round_done": None, "num_rounds": 2, "n_clients": 2, "sites": [],
            "error": None}  # fmt: skip
    (folder / "meta.json").write_text(json.dumps(meta))


@pytest.mark.reliability
def test_a_stored_job_naming_the_server_kit_fails_and_no_key_byte_reaches_a_site(
    reliability: Any, kits: Path, tmp_path: Path
) -> None:
    kit = kits / "server"
    ws = tmp_path / "server-ws"

    def app_is_kit(job: Path) -> None:  # key.pem is the "script": it is in the kit
        edit_config(job, app=str(kit), script="key.pem")

    def app_links_to_kit(job: Path) -> None:
        (job / "kit").symlink_to(kit)
        edit_config(job, app="kit", script="key.pem")

    def model_is_key(job: Path) -> None:
        edit_config(job, initial_model=f"{kit}/key.pem")

    tampered = {"job-app-kit": app_is_kit, "job-app-link": app_links_to_kit,
                "job-model-key": model_is_key}  # fmt: skip
    for i, (job_id, edit) in enumerate(tampered.items()):
        seed_job(ws, job_id, edit, submitted_at=1000.0 + i)
    with DeployServer(kit, ws, address="127.0.0.1:0") as server:
        collectors = [Collector(kits, s, server.address) for s in SITES]
        for c in collectors:
            c.start()
        admin = Party(kits, ADMIN, server.address)
        try:
            deadline = time.monotonic() + 60
            states: dict[str, Any] = {}
            while time.monotonic() < deadline and not any(c.jobs for c in collectors):
                states = {j: admin.call("job_status", {"job_id": j}).fields for j in tampered}
                if all(s["state"] == "failed" for s in states.values()):
                    break
                time.sleep(0.1)  # the job runner works through the queue
            time.sleep(0.5)  # a site that was offered a job registers and gets its app
        finally:
            received = b"".join(c.finish() for c in collectors)
            admin.close()
    reliability.hostile("stored job whose app/model is the server's kit", tried=len(tampered))
    leaks = key_leaks(received, kit / "key.pem")
    jobs_offered = sum(len(c.jobs) for c in collectors)
    reliability.measure(leaks=leaks)
    assert leaks == 0 and jobs_offered == 0, (leaks, jobs_offered)
    assert all(s["state"] == "failed" for s in states.values()), states
    for state in states.values():
        assert "'app'" in state["error"] or "'initial_model'" in state["error"], state
