"""Reading a run's files for its report, each one hostile until checked.

Every read is capped (bytes, lines, entries), every value's type is checked before it is
used, and what could not be read is counted or noted, never raised: a report renders
whatever a run left behind, from nothing at all to a finished run's every file.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "MAX_JSON_BYTES",
    "MAX_LINE_BYTES",
    "MAX_METRICS_BYTES",
    "MAX_METRICS_LINES",
    "MAX_NAMES",
    "Record",
    "Run",
    "finite",
    "job_folder",
    "read_json",
    "read_run",
]

MAX_METRICS_BYTES = 50 * 2**20
"""How much of ``metrics.jsonl`` is read: its first 50 MiB."""
MAX_METRICS_LINES = 100_000
"""How many lines of ``metrics.jsonl`` are read."""
MAX_LINE_BYTES = 4 * 2**20
"""A longer line is not parsed (counted as unreadable)."""
MAX_JSON_BYTES = 8 * 2**20
"""The most read of ``run.json``, ``cross_site_val.json``, ``partition.json``, ``job.json``."""
MAX_NAMES = 64
"""The most sites, metrics or strategy values a report draws (the rest are noted)."""
MAX_NAME_CHARS = 200
"""A longer site or metric name is cut to this."""
MAX_VALUES = 500_000
"""The most numbers and reasons kept from ``metrics.jsonl``: past them, later rounds keep
their global entries only (their per-site ones are dropped, and the page says so)."""


def finite(value: Any) -> float | None:
    """``value`` as a float when it is a real number (bools are not); NaN and Inf too."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return float(value)
    except OverflowError:  # an int too large for a float
        return math.inf if value > 0 else -math.inf


def _name(value: Any) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    return value[:MAX_NAME_CHARS]


def _numbers(value: Any) -> dict[str, float]:
    """A ``{name: number}`` mapping's numbers (NaN and Inf kept, the rest dropped)."""
    if not isinstance(value, dict):
        return {}
    out: dict[str, float] = {}
    for key, item in value.items():
        name, number = _name(key), finite(item)
        if name is not None and number is not None and len(out) < MAX_NAMES:
            out[name] = number
    return out


def _short(value: Any) -> bool:
    """A scalar worth showing inline."""
    return isinstance(value, int | float | bool) or (isinstance(value, str) and len(value) < 40)


def _get(value: Any, key: str) -> Any:
    return value.get(key) if isinstance(value, dict) else None


@dataclass
class Record:
    """One checked line of ``metrics.jsonl``."""

    round: int
    task: str
    clients: list[str]
    metrics: dict[str, float]
    seconds: float | None
    ended_at: float | None
    numbers: dict[str, float]
    """The scalar entries of ``extra`` (bytes, memory, total weight, compression)."""
    sites: dict[str, dict[str, Any]]
    """``extra["sites"]``: ``{site: {"metrics": {..}, "weight": float | None}}``."""
    left_out: dict[str, str]
    strategy: dict[str, float]


def _record(data: Any) -> Record | None:
    if not isinstance(data, dict):
        return None
    number, task = data.get("round"), data.get("task")
    if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number < 2**31:
        return None
    if not isinstance(task, str) or not task:
        return None
    clients = data.get("clients")
    extra = data.get("extra")
    extra = extra if isinstance(extra, dict) else {}
    sites: dict[str, dict[str, Any]] = {}
    raw_sites = extra.get("sites")
    if isinstance(raw_sites, dict):
        for site, entry in list(raw_sites.items())[: 4 * MAX_NAMES]:
            name = _name(site)
            if name is None or not isinstance(entry, dict):
                continue
            weight = finite(entry.get("weight"))
            sites[name] = {"metrics": _numbers(entry.get("metrics")), "weight": weight}
    left_out: dict[str, str] = {}
    raw_left = extra.get("left_out")
    if isinstance(raw_left, dict):
        for site, why in list(raw_left.items())[: 4 * MAX_NAMES]:
            name = _name(site)
            if name is not None:
                left_out[name] = why[:4000] if isinstance(why, str) else "left out"
    scalars = {
        key: value
        for key, value in _numbers(extra).items()
        if key not in ("sites", "left_out", "strategy")
    }
    return Record(
        round=number,
        task=task[:MAX_NAME_CHARS],
        clients=[
            c[:MAX_NAME_CHARS]
            for c in (clients if isinstance(clients, list) else [])[:1000]
            if isinstance(c, str)
        ],
        metrics=_numbers(data.get("metrics")),
        seconds=finite(data.get("seconds")),
        ended_at=finite(data.get("ended_at")),
        numbers=scalars,
        sites=sites,
        left_out=left_out,
        strategy=_numbers(extra.get("strategy")),
    )


@dataclass
class Run:
    """What a run's server folder holds, checked; ``notes``: what could not be read."""

    server_dir: Path
    records: list[Record] = field(default_factory=list)
    bad_lines: int = 0
    truncated: bool = False
    values: int = 0
    sites_dropped: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    """``run.json`` (an empty dict when absent or unreadable)."""
    config: Any = None
    cross_site: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    partition: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.records and not self.info

    @property
    def job_name(self) -> str:
        for name in (self.info.get("job"), _get(self.config, "name")):
            if isinstance(name, str) and name:
                return name[:MAX_NAME_CHARS]
        folder = self.server_dir.parent if self.server_dir.name == "server" else self.server_dir
        return folder.name or str(folder)

    def text(self, key: str) -> str | None:
        value = self.info.get(key)
        return value[:MAX_NAME_CHARS] if isinstance(value, str) and value else None

    @property
    def strategy(self) -> str | None:
        """run.json's strategy: a name, or a spec ``{"type": name, option: value}``."""
        spec = self.info.get("strategy")
        if isinstance(spec, dict):
            name = spec.get("type")
            options = ", ".join(
                f"{k}={v}" for k, v in list(spec.items())[:12] if k != "type" and _short(v)
            )
            text = f"{name if isinstance(name, str) else '?'}" + (f"({options})" if options else "")
            return text[:MAX_NAME_CHARS]
        return self.text("strategy")

    def number(self, key: str) -> float | None:
        value = finite(self.info.get(key))
        return value if value is not None and math.isfinite(value) else None


def read_json(path: Path, notes: list[str], limit: int = MAX_JSON_BYTES) -> Any:
    """``path``'s JSON (None when absent); a file that cannot be read gets a note."""
    try:
        if not path.is_file():
            return None
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        notes.append(f"{path.name} could not be read: {exc.strerror or exc}")
        return None
    if len(data) > limit:
        notes.append(f"{path.name} is larger than {limit // 2**20} MiB and was not read")
        return None
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        notes.append(f"{path.name} could not be read: {str(exc)[:200]}")
        return None


def _size(record: Record) -> int:
    """How many values ``record`` keeps."""
    sites = sum(1 + len(entry["metrics"]) for entry in record.sites.values())
    return (
        sites
        + len(record.metrics)
        + len(record.numbers)
        + len(record.strategy)
        + len(record.left_out)
    )


def _read_metrics(run: Run) -> None:
    path = run.server_dir / "metrics.jsonl"
    try:
        if not path.is_file():
            return
        handle = open(path, "rb")
    except OSError as exc:
        run.notes.append(f"metrics.jsonl could not be read: {exc.strerror or exc}")
        return
    budget = MAX_METRICS_BYTES
    with handle:
        while True:
            if len(run.records) + run.bad_lines >= MAX_METRICS_LINES or budget <= 0:
                run.truncated = bool(handle.read(1))
                break
            try:
                line = handle.readline(min(MAX_LINE_BYTES, budget) + 1)
            except OSError as exc:
                run.notes.append(f"metrics.jsonl could not be read: {exc.strerror or exc}")
                break
            if not line:
                break
            budget -= len(line)
            if budget <= 0 and not line.endswith(b"\n"):  # the cap cut this line short
                run.truncated = True
                break
            if not line.endswith(b"\n") and len(line) > MAX_LINE_BYTES:
                run.bad_lines += 1
                while line and not line.endswith(b"\n") and budget > 0:  # skip the rest
                    line = handle.readline(min(MAX_LINE_BYTES, budget))
                    budget -= len(line)
                continue
            if not line.strip():
                continue
            try:
                record = _record(json.loads(line))
            except (ValueError, RecursionError):
                record = None
            if record is None:
                run.bad_lines += 1
                continue
            if run.values > MAX_VALUES and (record.sites or record.left_out):
                record.sites, record.left_out = {}, {}
                run.sites_dropped += 1
            run.values += _size(record)
            run.records.append(record)
    if run.sites_dropped:
        run.notes.append(
            f"metrics.jsonl holds more than {MAX_VALUES:,} values: the per-site entries of "
            f"its last {run.sites_dropped} rounds were not kept"
        )
    if run.truncated:
        run.notes.append(
            f"metrics.jsonl is longer than {MAX_METRICS_BYTES // 2**20} MiB or "
            f"{MAX_METRICS_LINES} lines; only its start was read"
        )


def _matrix(data: Any) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    if not isinstance(data, dict):
        return out
    for owner, row in list(data.items())[:MAX_NAMES]:
        name = _name(owner)
        if name is None or not isinstance(row, dict):
            continue
        cells = {}
        for site, metrics in list(row.items())[:MAX_NAMES]:
            site_name = _name(site)
            if site_name is not None and (values := _numbers(metrics)):
                cells[site_name] = values
        if cells:
            out[name] = cells
    return out


def _partition(data: Any, notes: list[str]) -> dict[str, Any] | None:
    """``partition.json`` checked: ``{"counts": clients x classes ints, "names",
    "sites"}``, at most 1000 clients and 100 classes."""
    if data is None:
        return None
    counts = data.get("counts") if isinstance(data, dict) else None
    ok = (
        isinstance(counts, list)
        and 0 < len(counts) <= 1000
        and all(isinstance(row, list) for row in counts)
        and 0 < len(counts[0]) <= 100
        and all(len(row) == len(counts[0]) for row in counts)
        and all(
            isinstance(c, int) and not isinstance(c, bool) and 0 <= c < 2**53
            for row in counts
            for c in row
        )
    )
    if not ok or not isinstance(data, dict) or not isinstance(counts, list):
        notes.append(
            "partition.json holds no counts (a list of rows of non-negative ints, at most "
            "1000 clients and 100 classes) and is not drawn"
        )
        return None
    n_clients, n_classes = len(counts), len(counts[0])
    names = data.get("class_names")
    if not (isinstance(names, list) and len(names) == n_classes):
        names = [str(j) for j in range(n_classes)]
    sites = data.get("sites")
    if not (isinstance(sites, list) and len(sites) == n_clients):
        sites = [f"site-{i + 1}" for i in range(n_clients)]
    return {
        "counts": counts,
        "names": [str(n)[:MAX_NAME_CHARS] for n in names],
        "sites": [str(s)[:MAX_NAME_CHARS] for s in sites],
    }


def job_folder(server_dir: Path, job_name: str | None) -> Path | None:
    """The job folder beside a server folder, where there is one: a deployed job's
    ``../job``, else a simulator workspace's ``../jobs/JOB`` (or its only job)."""
    try:
        deployed = server_dir.parent / "job"
        if (deployed / "job.json").is_file():
            return deployed
        jobs = server_dir.parent / "jobs"
        if job_name and "/" not in job_name and (jobs / job_name / "job.json").is_file():
            return jobs / job_name
        if jobs.is_dir():
            found = [p for p in sorted(jobs.iterdir())[:100] if (p / "job.json").is_file()]
            return found[0] if len(found) == 1 else None
    except OSError:
        return None
    return None


def read_run(server_dir: Path, job_dir: Path | None = None) -> Run:
    """Everything the report shows of the run in ``server_dir`` (``job_dir``: its job
    folder, for ``job.json`` and ``partition.json``; default: the one beside it, see
    :func:`job_folder`); never raises for what is missing."""
    run = Run(server_dir=server_dir)
    _read_metrics(run)
    if run.bad_lines:
        lines = "line" if run.bad_lines == 1 else "lines"
        run.notes.append(f"{run.bad_lines} {lines} of metrics.jsonl could not be read")
    info = read_json(server_dir / "run.json", run.notes)
    if isinstance(info, dict):
        run.info = info
    elif info is not None:
        run.notes.append("run.json is not a JSON object and was not read")
    if job_dir is None:
        job_dir = job_folder(server_dir, run.text("job"))
    run.config = run.info.get("config")
    if run.config is None and job_dir is not None:
        run.config = read_json(job_dir / "job.json", run.notes)
    run.cross_site = _matrix(read_json(server_dir / "cross_site_val.json", run.notes))
    for folder in (server_dir, job_dir):
        if folder is not None and (folder / "partition.json").is_file():
            run.partition = _partition(read_json(folder / "partition.json", run.notes), run.notes)
            break
    return run
