"""The reliability suite's ledger: tests say what they injected or tried, and what they
measured; ``make reliability`` (and ``make test``) print one table from it.

A test takes the ``reliability`` fixture and reports:

* ``reliability.fault("site SIGKILL while training")`` - a fault it injects; it counts as
  survived when the test passes;
* ``reliability.hostile("NaN params", tried=1)`` - hostile inputs it sends; they count as
  rejected when the test passes (the test itself asserts each was refused);
* ``reliability.measure(rounds_lost=0, bytes_corrupted=0, leaks=0)`` - what it measured
  (any subset; values add up over the suite). The test asserts them too: the table shows
  what was measured, the assertions make the run fail.

``reliability.full`` is True under ``make reliability`` (``FEDLIFT_RELIABILITY_FULL=1``):
tests then run their full forms (e.g. 200 soak rounds instead of 20).

Every record is appended, with the test's outcome, to ``$FEDLIFT_RELIABILITY_LOG`` (default
``.reliability/ledger.jsonl`` under the repository), which ``python -m tests.reliability_report``
turns into the table.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
LEDGER_ENV = "FEDLIFT_RELIABILITY_LOG"
FULL_ENV = "FEDLIFT_RELIABILITY_FULL"
MEASURES = ("rounds_lost", "bytes_corrupted", "leaks")


def ledger_path() -> Path:
    return Path(os.environ.get(LEDGER_ENV) or ROOT / ".reliability" / "ledger.jsonl")


def full_run() -> bool:
    return os.environ.get(FULL_ENV) == "1"


@dataclass
class Ledger:
    test: str
    injected: list[str] = field(default_factory=list)
    tried: list[tuple[str, int]] = field(default_factory=list)
    measured: dict[str, int] = field(default_factory=dict)
    full: bool = field(default_factory=full_run)

    def fault(self, name: str) -> None:
        """A fault this test injects (survived if the test passes)."""
        self.injected.append(name)

    def hostile(self, name: str, tried: int = 1) -> None:
        """``tried`` hostile inputs of one kind (rejected if the test passes)."""
        if tried < 0:
            raise ValueError(f"tried must be >= 0; received: {tried}")
        self.tried.append((name, int(tried)))

    def measure(self, **values: int) -> None:
        """Measured figures: rounds_lost, bytes_corrupted, leaks (they add up)."""
        for key, value in values.items():
            if key not in MEASURES:
                raise ValueError(f"unknown measure {key!r}; expected one of {MEASURES}")
            self.measured[key] = self.measured.get(key, 0) + int(value)

    def entry(self, passed: bool) -> dict[str, Any]:
        return {
            "test": self.test,
            "passed": passed,
            "full": self.full,
            "time": time.time(),
            "faults": self.injected,
            "hostile": self.tried,
            "measured": self.measured,
        }


_KEY = pytest.StashKey[Ledger]()


@pytest.fixture
def reliability(request: pytest.FixtureRequest) -> Iterator[Ledger]:
    ledger = Ledger(request.node.nodeid)
    request.node.stash[_KEY] = ledger
    yield ledger


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    ledger = item.stash.get(_KEY, None)
    if ledger is None:
        return
    # One line per test: at the call phase, or at setup/teardown when that is what failed.
    if report.when == "call" or (report.when != "call" and report.failed):
        if getattr(item, "_fedlift_ledger_written", False):
            return
        item._fedlift_ledger_written = True  # type: ignore[attr-defined]
        if not (ledger.injected or ledger.tried or ledger.measured):
            return
        path = ledger_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as sink:
            sink.write(json.dumps(ledger.entry(report.passed)) + "\n")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "reliability: part of the reliability suite (make reliability)"
    )
    config.addinivalue_line("markers", "slow: a full form; not run by make test")
