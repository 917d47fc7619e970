"""Print the reliability suite's table from its ledger (see ``reliability_plugin``).

``python tests/reliability_report.py [LEDGER] [--markdown]``; exits 1 when a fault was not
survived, a hostile input was not rejected, or a round, byte of model or resource was lost.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reliability_plugin import MEASURES, ledger_path


def load(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            entries.append(json.loads(line))
    latest: dict[str, dict[str, Any]] = {}
    for entry in entries:  # a test run twice counts once: its last run
        latest[entry["test"]] = entry
    return list(latest.values())


def summarise(entries: list[dict[str, Any]]) -> dict[str, Any]:
    faults = defaultdict(lambda: [0, 0])
    hostile = defaultdict(lambda: [0, 0])
    measured = dict.fromkeys(MEASURES, 0)
    failed_tests = []
    for entry in entries:
        ok = bool(entry["passed"])
        if not ok:
            failed_tests.append(entry["test"])
        area = entry["test"].split("::")[0].rsplit("/", 1)[-1].removesuffix(".py")
        for _name in entry["faults"]:
            faults[area][0] += 1
            faults[area][1] += ok
        for _name, tried in entry["hostile"]:
            hostile[area][0] += tried
            hostile[area][1] += tried if ok else 0
        for key, value in entry["measured"].items():
            measured[key] = measured.get(key, 0) + int(value)
    return {
        "faults": dict(faults),
        "hostile": dict(hostile),
        "measured": measured,
        "failed_tests": failed_tests,
        "tests": len(entries),
        "full": any(e.get("full") for e in entries),
    }


def render(summary: dict[str, Any], markdown: bool = False) -> str:
    f_tot = [sum(v[0] for v in summary["faults"].values()),
             sum(v[1] for v in summary["faults"].values())]  # fmt: skip
    h_tot = [sum(v[0] for v in summary["hostile"].values()),
             sum(v[1] for v in summary["hostile"].values())]  # fmt: skip
    m = summary["measured"]
    rows = [
        ("faults injected / survived", f"{f_tot[0]} / {f_tot[1]}", f_tot[0] == f_tot[1]),
        ("hostile inputs tried / rejected", f"{h_tot[0]:,} / {h_tot[1]:,}", h_tot[0] == h_tot[1]),
        ("rounds lost", str(m["rounds_lost"]), m["rounds_lost"] == 0),
        ("bytes of model lost or corrupted", str(m["bytes_corrupted"]), m["bytes_corrupted"] == 0),
        ("leaks found (processes, segments, fds, temp files)", str(m["leaks"]), m["leaks"] == 0),
    ]
    form = "full" if summary["full"] else "reduced (make reliability runs the full form)"
    lines = []
    if markdown:
        lines += ["| measure | result | |", "|---|---|---|"]
        lines += [f"| {name} | {value} | {'✓' if ok else '✗'} |" for name, value, ok in rows]
    else:
        width = max(len(r[0]) for r in rows)
        lines.append(f"fedlift reliability suite: {summary['tests']} tests, {form}")
        lines += [
            f"  {name:<{width}}  {value:>14}  {'ok' if ok else 'FAIL'}" for name, value, ok in rows
        ]
        by_area = sorted(set(summary["faults"]) | set(summary["hostile"]))
        if by_area:
            lines.append("  by area (faults survived/injected, hostile rejected/tried):")
            for area in by_area:
                fa = summary["faults"].get(area, [0, 0])
                ho = summary["hostile"].get(area, [0, 0])
                lines.append(
                    f"    {area:<36} faults {fa[1]}/{fa[0]:<4} hostile {ho[1]:,}/{ho[0]:,}"
                )
        for test in summary["failed_tests"]:
            lines.append(f"  FAILED: {test}")
    return "\n".join(lines)


def ok(summary: dict[str, Any]) -> bool:
    m = summary["measured"]
    return not summary["failed_tests"] and not any(m[k] for k in MEASURES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("ledger", nargs="?", type=Path, default=None)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    entries = load(args.ledger or ledger_path())
    if not entries:
        print("fedlift reliability suite: no results recorded (run the tests first).")
        return 1
    summary = summarise(entries)
    print(render(summary, args.markdown))
    return 0 if ok(summary) else 1


if __name__ == "__main__":
    sys.exit(main())
