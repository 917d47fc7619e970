"""Operational errors at the CLI are one clear line (``fedlift: error: ...``), exit status 1,
never a traceback: a read-only workspace, a full disk, a port that is taken, a refused job.

Real file systems (tmpfs mounted read-only or full, as root) and real subprocesses."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedlift.deploy import provision
from test_deploy_server import ADMIN, make_job


def fedlift(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedlift", *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """The single error line; fails the test unless the command failed with exactly one."""
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("fedlift: error: "), lines[0]
    return lines[0]


@contextlib.contextmanager
def tmpfs(where: Path, size: str = "1m") -> Iterator[Path]:
    """A tmpfs mounted at ``where`` (root only), unmounted whatever happens."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def remount_read_only(where: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True, capture_output=True)


@pytest.fixture
def free_port() -> Iterator[int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    yield port


@pytest.mark.reliability
def test_a_read_only_workspace_is_one_line(reliability: Any, tmp_path: Path) -> None:
    kits = provision("ro", "127.0.0.1:1", ["site-1"], [ADMIN], tmp_path / "kits")
    job = make_job(tmp_path / "job")
    with tmpfs(tmp_path / "ro") as mount:
        remount_read_only(mount)
        reliability.fault("read-only workspace (tmpfs remounted ro)")
        commands = {
            "server": (
                "server",
                "start",
                str(kits["server"]),
                "-w",
                str(mount / "ws"),
                "--address",
                "127.0.0.1:0",
            ),  # fmt: skip
            "simulator": ("simulator", str(job), "-w", str(mount / "sim"), "-q"),
            "provision": (
                "provision",
                "--project",
                "p",
                "--server",
                "127.0.0.1:1",
                "--sites",
                "s1",
                "-o",
                str(mount / "kits"),
            ),  # fmt: skip
        }
        for name, command in commands.items():
            line = one_line_error(fedlift(*command))
            assert "read-only" in line and "EROFS" in line, (name, line)
            assert str(mount) in line, (name, line)  # the path
            assert "writable" in line, (name, line)  # the fix
        assert list(mount.iterdir()) == []


@pytest.mark.reliability
def test_a_full_disk_is_one_line(reliability: Any, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "full", size="256k") as mount:
        with open(mount / "filler", "wb", buffering=0) as filler:  # fill it to the last block
            with contextlib.suppress(OSError):
                while True:
                    filler.write(b"\0" * 4096)

        with pytest.raises(OSError) as probe:
            (mount / "probe").write_bytes(b"\0" * 8192)
        assert probe.value.errno == errno.ENOSPC  # the disk really is full
        (mount / "probe").unlink(missing_ok=True)
        reliability.fault("disk full (tmpfs filled)")
        done = fedlift("provision", "--project", "p", "--server", "127.0.0.1:1",
                       "--sites", "s1", "-o", str(mount / "kits"))  # fmt: skip
        line = one_line_error(done)
        assert "full" in line.lower() or "space" in line.lower(), line
        assert str(mount) in line, line


@pytest.mark.reliability
def test_a_taken_port_is_one_line_for_server_start(
    reliability: Any, tmp_path: Path, free_port: int
) -> None:
    kits = provision("port", f"localhost:{free_port}", ["site-1"], [ADMIN], tmp_path / "kits")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_port))
        taken.listen()
        reliability.fault("server port already taken")
        for extra in (["--address", f"127.0.0.1:{free_port}"], []):  # given, and the kit's
            done = fedlift("server", "start", str(kits["server"]), "-w", str(tmp_path / "ws"),
                           *extra, timeout=60)  # fmt: skip
            line = one_line_error(done)
            assert f":{free_port}" in line and "already in use" in line, line
            assert "--address" in line, line  # the fix


@pytest.mark.reliability
def test_fedlift_errors_are_one_line(reliability: Any, tmp_path: Path) -> None:
    line = one_line_error(fedlift("simulator", str(tmp_path / "nope")))
    assert "is not a fedlift job folder" in line
    kits = provision("e", "127.0.0.1:1", ["site-1"], [ADMIN], tmp_path / "kits")
    job = make_job(tmp_path / "job")
    secret = tmp_path / "secret.pem"
    secret.write_text("PRIVATE\n")
    (job / "app" / "key.pem").symlink_to(secret)
    line = one_line_error(fedlift("job", "submit", str(job), "--kit", str(kits[ADMIN])))
    assert "app/key.pem is a symlink to" in line and "outside" in line, line
    reliability.hostile("job submit of a folder with a symlink out (CLI)", tried=1)
    line = one_line_error(fedlift("server", "start", str(kits["site-1"]), "-w", str(tmp_path)))
    assert "needs the server kit" in line


@pytest.mark.reliability
def test_os_error_lines_name_the_path_and_the_fix() -> None:
    from fedlift.cli import _error_line

    line = _error_line(PermissionError(errno.EACCES, "Permission denied", "/srv/ws/server.log"))
    assert line == (
        "/srv/ws/server.log: permission denied (EACCES). Choose a folder you may write to "
        "(e.g. --workspace DIR) or fix its permissions."
    )
    line = _error_line(OSError(errno.ENOSPC, "No space left on device", "/data/ws"))
    assert line.startswith("/data/ws: the disk is full (ENOSPC). Free some space")
    assert _error_line(OSError(errno.EIO, "Input/output error")) == "Input/output error (EIO)."


@pytest.mark.reliability
def test_a_full_server_disk_refuses_a_submit_in_one_line_and_stores_nothing(
    reliability: Any, tmp_path: Path, free_port: int
) -> None:
    from fedlift.deploy import DeployServer

    kits = provision("full", f"127.0.0.1:{free_port}", ["site-1"], [ADMIN], tmp_path / "kits")
    job = make_job(tmp_path / "job")
    (job / "app" / "data.bin").write_bytes(os.urandom(64 << 10))  # needs room on the server
    with tmpfs(tmp_path / "server-disk", size="512k") as mount:
        with DeployServer(kits["server"], mount / "ws", address=f"127.0.0.1:{free_port}") as server:
            filler = mount / "filler"
            with open(filler, "wb", buffering=0) as sink, contextlib.suppress(OSError):
                while True:
                    sink.write(b"\0" * 4096)
            reliability.fault("server disk full during job_submit")
            line = one_line_error(fedlift("job", "submit", str(job), "--kit", str(kits[ADMIN])))
            assert "could not store the job" in line and "No space left" in line, line
            assert str(mount) not in line, line  # no server path reaches the admin
            assert list(server.jobs_dir.iterdir()) == []  # nothing half-stored
            filler.unlink()  # space again: the same server takes the same job
            done = fedlift("job", "submit", str(job), "--kit", str(kits[ADMIN]))
            assert done.returncode == 0, done.stderr
            assert len(list(server.jobs_dir.iterdir())) == 1
