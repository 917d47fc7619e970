from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "scripts"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture
def scripts_dir() -> Path:
    return SCRIPTS


def worker_pids(workspace: Path) -> list[int]:
    """PIDs of fedlift worker processes whose cwd lies in ``workspace`` (leak checks)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if "fedlift.client.worker" in cmdline and cwd.startswith(str(workspace)):
            found.append(int(entry.name))
    return found


sys.path.insert(0, str(Path(__file__).resolve().parent))

from reliability_plugin import (  # noqa: E402,F401  (the reliability suite's ledger)
    pytest_configure,
    pytest_runtest_makereport,
    reliability,
)
