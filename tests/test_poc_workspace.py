"""``fedlift poc start`` never deletes the user's files: it refuses a non-empty folder it
did not make and replaces only what its marker says an earlier start created."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fedlift.deploy._poc import MARKER, _claim_workspace, poc_start
from fedlift.errors import ConfigError


def user_files(folder: Path) -> dict[str, str]:
    """Some files of the user's: a document, a nested dataset, a hidden file."""
    files = {
        "thesis.tex": "\\section{Results}\n",
        "data/train.csv": "x,y\n1,2\n",
        ".bashrc": "alias ll='ls -l'\n",
    }
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return {name: hashlib.sha256(text.encode()).hexdigest() for name, text in files.items()}


def digests(folder: Path, names: dict[str, str]) -> dict[str, str]:
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names}


@pytest.mark.reliability
def test_poc_start_refuses_a_folder_of_user_files(reliability: Any, tmp_path: Path) -> None:
    ws = tmp_path / "my-documents"
    ws.mkdir()
    expected = user_files(ws)
    with pytest.raises(ConfigError) as info:
        poc_start(1, ws)
    message = str(info.value)
    assert "not empty" in message and "--workspace" in message and "thesis.tex" in message
    assert digests(ws, expected) == expected
    assert sorted(p.name for p in ws.iterdir()) == [".bashrc", "data", "thesis.tex"]
    # The CLI says the same in one line, exit status 1, and deletes nothing either.
    done = fedlift("poc", "start", "-n", "1", "--workspace", str(ws))
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("fedlift: error: the POC workspace"), done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    lost = sum(digests(ws, expected)[n] != expected[n] for n in expected)
    reliability.hostile("poc start on a folder of user files", tried=2)
    reliability.measure(bytes_corrupted=lost)
    assert lost == 0 and not (ws / MARKER).exists()


@pytest.mark.reliability
def test_a_tampered_marker_never_reaches_outside_the_workspace(
    reliability: Any, tmp_path: Path
) -> None:
    ws = tmp_path / "poc"
    ws.mkdir()
    victim = tmp_path / "victim"
    victim.mkdir()
    expected = user_files(victim)
    (ws / "kits").symlink_to(victim)  # an entry the marker lists, now a symlink out
    entries = ["kits", "../victim", str(victim), "..", ".", "", "a/../../victim", 7]
    (ws / MARKER).write_text(json.dumps({"format": "fedlift-poc/1", "created": entries}))

    _claim_workspace(ws)  # replaces what the marker vouches for, and nothing else
    assert not (ws / "kits").exists() and not (ws / "kits").is_symlink()
    lost = sum(digests(victim, expected)[n] != expected[n] for n in expected)
    reliability.hostile("marker entries naming paths outside the workspace", tried=len(entries))
    reliability.measure(bytes_corrupted=lost)
    assert lost == 0 and sorted(p.name for p in victim.iterdir()) == [
        ".bashrc",
        "data",
        "thesis.tex",
    ]


def fedlift(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedlift", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


@pytest.mark.reliability
def test_poc_start_again_replaces_only_what_it_created(reliability: Any, tmp_path: Path) -> None:
    ws = tmp_path / "poc"
    # Real processes, started by the CLI as a user does (they outlive the command).
    started = fedlift("poc", "start", "-n", "1", "--workspace", str(ws))
    try:
        assert started.returncode == 0, started.stderr
        assert (ws / MARKER).is_file() and (ws / "kits" / "site-1").is_dir()
        old_cert = (ws / "kits" / "server" / "cert.pem").read_bytes()
        first = json.loads((ws / "poc.json").read_text())
    finally:
        stopped = fedlift("poc", "stop", "--workspace", str(ws))
    assert stopped.returncode == 0, stopped.stderr
    expected = user_files(ws)  # the user adds files to the POC's folder
    (ws / "notes.md").write_text("mine\n")
    expected["notes.md"] = hashlib.sha256(b"mine\n").hexdigest()
    reliability.fault("poc start over an earlier POC's workspace holding user files")
    started = fedlift("poc", "start", "-n", "1", "--workspace", str(ws))
    try:
        assert started.returncode == 0, started.stderr
        second = json.loads((ws / "poc.json").read_text())
        assert first["pids"] != second["pids"]
        new_cert = (ws / "kits" / "server" / "cert.pem").read_bytes()
        assert new_cert != old_cert  # the earlier kits were replaced, not kept
        lost = sum(digests(ws, expected)[n] != expected[n] for n in expected)
        reliability.measure(bytes_corrupted=lost)
        assert lost == 0
        created = json.loads((ws / MARKER).read_text())["created"]
        assert set(created) == {"kits", "logs", "server", "site-1", "poc.json"}
    finally:
        stopped = fedlift("poc", "stop", "--workspace", str(ws))
    assert stopped.returncode == 0, stopped.stderr


@pytest.mark.reliability
def test_poc_start_uses_an_empty_folder(tmp_path: Path) -> None:

    ws = tmp_path / "empty"
    ws.mkdir()
    _claim_workspace(ws)
    assert [p.name for p in ws.iterdir()] == [MARKER]
    _claim_workspace(ws)  # again: the marker vouches for the folder
    assert [p.name for p in ws.iterdir()] == [MARKER]
