"""The peer benchmark's harness, without installing any peer (no nvflare, no flwr here)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from benchmarks.peers import common
from benchmarks.peers.venvs import ensure_venv


def _write(folder: Path, site: str, events: list[tuple[str, int, float]]) -> None:
    (folder / f"{site}.txt").write_text("".join(f"{k} {r} {t:.6f}\n" for k, r, t in events))


def test_model_sizes_match_the_fedlift_benchmark() -> None:
    from benchmarks.__main__ import model_of

    for n in (1000, 1_000_000, 10_000_003):
        assert common.model_sizes(n) == [a.size for a in model_of(n).values()]
        assert sum(common.model_sizes(n)) == n


def test_scenario_names_match_the_fedlift_benchmark() -> None:
    from benchmarks.__main__ import SCENARIOS

    for s in SCENARIOS:
        assert common.scenario_name(s.params, s.clients) == s.name


def test_round_times_from_client_timestamps(tmp_path: Path) -> None:
    # Round r starts when the LAST site received it: 10.0, 12.0, 15.0, 19.0.
    _write(
        tmp_path,
        "site-1",
        [
            ("recv", 0, 10.0),
            ("send", 0, 10.1),
            ("recv", 1, 11.5),
            ("send", 1, 11.6),
            ("recv", 2, 15.0),
            ("send", 2, 15.1),
            ("recv", 3, 18.0),
            ("send", 3, 18.1),
        ],
    )
    _write(
        tmp_path,
        "site-2",
        [
            ("recv", 0, 9.0),
            ("send", 0, 9.1),
            ("recv", 1, 12.0),
            ("send", 1, 12.1),
            ("recv", 2, 14.0),
            ("send", 2, 14.1),
            ("recv", 3, 19.0),
            ("send", 3, 19.5),
        ],
    )
    (tmp_path / "site-2.txt").open("a").write("garbage line\n")
    events = common.read_events(tmp_path)
    assert set(events) == {"site-1", "site-2"}
    assert common.round_starts(events, 4) == [10.0, 12.0, 15.0, 19.0]
    out = common.summarize(events, rounds=4, launched=5.0, exited=21.5)
    assert out["round_s"] == pytest.approx([2.0, 3.0, 4.0])
    # The first round is excluded: samples 3.0 and 4.0.
    assert out["median_s"] == pytest.approx(3.5)
    assert out["min_s"] == pytest.approx(3.0)
    assert out["max_s"] == pytest.approx(4.0)
    # Startup ends at the first arrival of round 1's model (11.5); teardown starts at the
    # last send of the last round (19.5).
    assert out["startup_s"] == pytest.approx(6.5)
    assert out["teardown_s"] == pytest.approx(2.0)


def test_summarize_refuses_incomplete_runs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="never ran"):
        common.summarize({}, 3, 0.0, 1.0)
    _write(tmp_path, "site-1", [("recv", 0, 1.0), ("send", 0, 1.1), ("recv", 1, 2.0)])
    _write(tmp_path, "site-2", [("recv", 0, 1.0), ("send", 0, 1.1)])
    with pytest.raises(ValueError, match="only 1 of 3 rounds"):
        common.summarize(common.read_events(tmp_path), 3, 0.0, 3.0)
    with pytest.raises(ValueError, match=">= 3"):
        common.summarize(common.read_events(tmp_path), 2, 0.0, 3.0)


def test_append_event_writes_what_read_events_reads(tmp_path: Path) -> None:
    common.append_event(tmp_path, "site-3", "recv", 0)
    common.append_event(tmp_path, "site-3", "send", 0)
    events = common.read_events(tmp_path)["site-3"]
    assert set(events["recv"]) == {0} and events["send"][0] >= events["recv"][0]


def test_tree_memory_of_this_process_and_a_child() -> None:
    me = os.getpid()
    own_rss, own_pss = common.tree_memory([me])
    assert own_rss > 10 and 0 < own_pss <= own_rss  # a Python process with pytest loaded
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; b = b'x' * (64 << 20); print(flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        child.stdout.readline()  # the 64 MiB are written
        assert child.pid in common.process_tree(me)
        assert me not in common.process_tree(child.pid)
        with common.TreePoller(me, interval=0.01) as poller:
            while poller.samples < 3:
                time.sleep(0.01)
        child_rss = common.tree_memory([child.pid])[0]
        assert child_rss > 64
        assert poller.peak_rss >= own_rss + 64 * 0.9
        assert poller.peak_pss > 64
        # The timed runs' poll: RSS only (statm, no page-table walk), no PSS.
        assert common.tree_rss([child.pid]) == pytest.approx(child_rss, rel=0.1)
        with common.TreePoller(me, interval=0.01, pss=False) as cheap:
            while cheap.samples < 3:
                time.sleep(0.01)
        assert cheap.peak_rss >= own_rss + 64 * 0.9 and cheap.peak_pss == 0.0
    finally:
        child.communicate(b"", timeout=30)
    assert common.tree_memory([child.pid]) == (0.0, 0.0)  # gone: counts 0
    assert common.tree_rss([child.pid]) == 0.0


def test_ensure_venv_is_idempotent_with_a_stamp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks.peers import venvs

    calls: list[list[str]] = []

    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        if cmd[1:3] == ["-m", "venv"]:
            python = Path(cmd[3]) / "bin" / "python"
            python.parent.mkdir(parents=True)
            python.touch()
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(venvs, "VENVS", tmp_path)
    monkeypatch.setattr(venvs.subprocess, "run", fake_run)
    venv = ensure_venv("peer", ["pkg==1"])
    assert venv == tmp_path / "peer" and len(calls) == 2  # venv + pip
    assert calls[1][-1] == "pkg==1"
    ensure_venv("peer", ["pkg==1"])
    assert len(calls) == 2  # stamp matches: nothing to do
    ensure_venv("peer", ["pkg==2"])
    assert len(calls) == 3 and calls[2][-1] == "pkg==2"  # new list: pip only, same venv
