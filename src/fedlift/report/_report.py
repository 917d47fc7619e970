"""One run's report (:func:`write_report`) and several runs overlaid (:func:`compare_report`).

The page, in order: the title (job, state, runner, dates, duration); a failed job's cause;
notes on what could not be read; the curves per round (global metrics, each site's
metrics, round time, bytes, server memory); participation; the label distribution; the
cross-site heatmaps; the strategy's state; the job's config, versions, machine and seed.
The numbers behind every drawn line are embedded in the page as JSON
(``<script id="fedlift-data">``), keyed by the id the line's SVG group carries
(``series-ID``).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .._atomic import atomic_write_text
from ..errors import ConfigError
from ._page import (
    Cell,
    data_script,
    esc,
    format_bytes,
    format_duration,
    format_time,
    json_text,
    key_values,
    page,
    safe_id,
    table,
)
from ._read import MAX_NAMES, Record, Run, finite, read_run
from ._svg import Panel, Series, heatmap_svg, panels_svg, participation_svg, partition_svg

__all__ = ["REPORT_NAME", "compare_report", "write_report"]

REPORT_NAME = "report.html"
"""The report's file name in a job's server folder."""

_TRAFFIC = (
    "bytes_sent",
    "bytes_received",
    "model_bytes",
    "model_bytes_sent",
    "result_bytes",
    "result_bytes_received",
)
_MEMORY = ("server_rss", "server_peak_rss")
_MAX_PANELS = 12
_MAX_SITE_PANELS = 6
_MAX_SITE_LINES = 32
_MAX_POINTS = 1000
"""A longer series is drawn (and embedded) with every k-th round and its last."""
_MAX_TABLE_ROWS = 200
_DRAWABLE = 1e150


def _natural(name: str) -> tuple[Any, ...]:
    """Sort key: ``site-2`` before ``site-10``."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


class _Page:
    """The series drawn so far (for the embedded JSON) and the figures' salts."""

    def __init__(self) -> None:
        self.series: dict[str, dict[str, Any]] = {}
        self.notes: list[str] = []
        self._figures = 0

    def line(self, key: str, label: str, x: list[float], y: list[float | None]) -> Series:
        if len(x) > _MAX_POINTS:
            step = math.ceil(len(x) / _MAX_POINTS)
            keep = [*range(0, len(x) - 1, step), len(x) - 1]
            x, y = [x[i] for i in keep], [y[i] for i in keep]
            note = f"series of more than {_MAX_POINTS} rounds are drawn with every k-th round"
            if note not in self.notes:
                self.notes.append(note)
        base = safe_id(key)
        ident, n = base, 1
        while ident in self.series:
            n += 1
            ident = f"{base}-{n}"
        self.series[ident] = {"label": label, "x": x, "y": y}
        return Series(ident, label, x, y)

    def salt(self) -> str:
        self._figures += 1
        return f"fedlift-report-{self._figures}"


def _tasks(records: Sequence[Record]) -> list[str]:
    seen = dict.fromkeys(r.task for r in records)
    return sorted(seen, key=lambda t: (t != "train", t))


def _names(maps: Sequence[dict[str, Any]]) -> list[str]:
    names: dict[str, None] = {}
    for values in maps:
        names.update(dict.fromkeys(values))
    return list(names)


def _metrics(record: Record) -> Mapping[str, float]:
    return record.metrics


def _numbers(record: Record) -> Mapping[str, float]:
    return record.numbers


def _strategy(record: Record) -> Mapping[str, float]:
    return record.strategy


def _seconds(record: Record) -> Mapping[str, float]:
    return {} if record.seconds is None else {"seconds": record.seconds}


def _curve(
    records: Sequence[Record], key: str, pick: Callable[[Record], Mapping[str, float]] = _metrics
) -> tuple[list[float], list[float | None]]:
    """x (rounds) and y (``pick(record)[key]``) where it is; y is None where it cannot be
    drawn (NaN, Inf, beyond +-1e150: an axis spanning more overflows)."""
    xs: list[float] = []
    ys: list[float | None] = []
    for record in records:
        v = pick(record).get(key)
        if v is None:
            continue
        xs.append(float(record.round))
        ys.append(v if math.isfinite(v) and abs(v) <= _DRAWABLE else None)
    return xs, ys


def _site_metrics(record: Record, site: str) -> Mapping[str, float]:
    entry = record.sites.get(site)
    return {} if entry is None else entry["metrics"]


def _global_panels(page: _Page, records: Sequence[Record], prefix: str = "") -> list[Panel]:
    panels = []
    for metric in _names([r.metrics for r in records])[:_MAX_PANELS]:
        panel = Panel(f"{metric} (global)")
        for task in _tasks(records):
            xs, ys = _curve([r for r in records if r.task == task], metric)
            if xs:
                panel.series.append(page.line(f"{prefix}global-{task}-{metric}", task, xs, ys))
        panels.append(panel)
    return panels


def _site_panels(page: _Page, records: Sequence[Record]) -> list[Panel]:
    panels = []
    for task in _tasks(records):
        of_task = [r for r in records if r.task == task]
        sites = sorted(_names([r.sites for r in of_task]), key=_natural)
        if len(sites) > _MAX_SITE_LINES:
            page.notes.append(
                f"{len(sites)} sites ran {task}: the first {_MAX_SITE_LINES} are drawn per site"
            )
            sites = sites[:_MAX_SITE_LINES]
        metrics = _names([e["metrics"] for r in of_task for e in r.sites.values()])
        for metric in metrics[:_MAX_PANELS]:
            panel = Panel(f"{metric} per site ({task})")
            for site in sites:
                xs, ys = _curve(of_task, metric, functools.partial(_site_metrics, site=site))
                if xs:
                    panel.series.append(page.line(f"site-{task}-{metric}-{site}", site, xs, ys))
            if panel.series:
                panels.append(panel)
    return panels[:_MAX_SITE_PANELS]


def _run_panels(page: _Page, records: Sequence[Record]) -> list[Panel]:
    """Round time, model traffic and server memory."""
    tasks = _tasks(records)
    time = Panel("round wall time", unit="s")
    for task in tasks:
        xs, ys = _curve([r for r in records if r.task == task], "seconds", _seconds)
        if xs:
            time.series.append(page.line(f"seconds-{task}", task, xs, ys))
    traffic = Panel("model bytes per task", unit="B")
    for task in tasks:
        for key in _TRAFFIC:
            xs, ys = _curve([r for r in records if r.task == task], key, _numbers)
            if xs:
                label = f"{key} ({task})" if len(tasks) > 1 else key
                traffic.series.append(page.line(f"{key}-{task}", label, xs, ys))
    memory = Panel("server memory", unit="B")
    for key in _MEMORY:
        xs, ys = _curve(records, key, _numbers)
        if xs:
            memory.series.append(page.line(key, key.removeprefix("server_"), xs, ys))
    return [p for p in (time, traffic, memory) if p.series]


def _strategy_panels(page: _Page, records: Sequence[Record]) -> list[Panel]:
    panels = []
    for name in _names([r.strategy for r in records])[:_MAX_PANELS]:
        xs, ys = _curve(records, name, _strategy)
        panels.append(Panel(name, [page.line(f"strategy-{name}", name, xs, ys)]))
    return panels


def _figure(page: _Page, title: str, panels: list[Panel], intro: str = "") -> str:
    if not panels:
        return ""
    lead = f"<p>{esc(intro)}</p>" if intro else ""
    return f"<h2>{esc(title)}</h2>{lead}<figure>{panels_svg(panels, page.salt())}</figure>"


def _left_out_text(why: str) -> str:
    lowered = why.lower()
    if "timed out" in lowered or "timeout" in lowered:
        return "timed out"
    if "lost" in lowered and "connection" in lowered:
        return "lost"
    lines = [line.strip() for line in why.splitlines() if line.strip()]
    if lines and lines[0].startswith("Traceback"):
        lines = lines[::-1]  # a traceback says what happened in its last line
    first = lines[0] if lines else "left out"
    return "failed: " + (first if len(first) <= 80 else first[:77] + "...")


def _participation(page: _Page, records: Sequence[Record]) -> str:
    sites = _names([{**dict.fromkeys(r.clients), **r.sites, **r.left_out} for r in records])
    sites = sorted(sites, key=_natural)[:MAX_NAMES]
    if not sites or not records:
        return ""
    shown = records[:_MAX_TABLE_ROWS]
    rows, shares, outs = [], [], []
    for record in shown:
        weights = {s: e["weight"] for s, e in record.sites.items() if e["weight"] is not None}
        total = record.numbers.get("total_weight") or sum(w for w in weights.values() if w > 0)
        row: list[object] = [record.round, record.task]
        share_row: list[float | None] = []
        out_row: list[bool] = []
        for site in sites:
            share = None
            if site in record.left_out:
                why = record.left_out[site]
                row.append(Cell(_left_out_text(why), title=why, css="out"))
            elif site in record.sites:
                weight = weights.get(site)
                if weight is not None and total and math.isfinite(weight / total):
                    share = weight / total
                    row.append(
                        Cell(f"{share:.1%}", title=f"weight {weight:g} of {total:g}", css="in")
                    )
                else:
                    row.append(Cell("in", css="in"))
            elif site in record.clients:
                row.append(Cell("in", css="in"))
            else:
                row.append(Cell("-", title="not asked", css="none"))
            share_row.append(share)
            out_row.append(site in record.left_out)
        rows.append(row)
        shares.append(share_row)
        outs.append(out_row)
    more = len(records) - len(shown)
    note = f"<p>(the first {len(shown)} of {len(records)} tasks)</p>" if more else ""
    labels = [f"{r.round}" if r.task == "train" else f"{r.round} {r.task[:1]}" for r in shown]
    svg = participation_svg(shares, outs, labels, sites, page.salt())
    return (
        "<h2>Participation</h2><p>Each site's share of the round's weight, or why it was "
        "left out (hover for the whole reason); in the figure a red x marks a site left "
        "out.</p>"
        + table(["round", "task", *sites], rows, css_id="participation")
        + note
        + f"<figure>{svg}</figure>"
    )


def _cross_site(page: _Page, run: Run) -> str:
    matrix = run.cross_site
    if not matrix:
        return ""
    owners = list(matrix)
    sites = sorted(_names(list(matrix.values())), key=_natural)
    metrics = _names([m for row in matrix.values() for m in row.values()])[:4]
    parts = ["<h2>Cross-site evaluation</h2>"]
    for metric in metrics:
        cells = [[matrix[o].get(s, {}).get(metric) for s in sites] for o in owners]
        svg = heatmap_svg(
            f"{metric}: model (rows) on data (columns)", cells, owners, sites, page.salt()
        )
        parts.append(f"<figure>{svg}</figure>")
    return "".join(parts)


def _partition(page: _Page, run: Run) -> str:
    if run.partition is None:
        return ""
    svg = partition_svg(run.partition, page.salt())
    return f"<h2>Label distribution</h2><figure>{svg}</figure>"


def _times(run: Run) -> tuple[float | None, float | None]:
    started, ended = run.number("started_at"), run.number("ended_at")
    stamped = [r for r in run.records if r.ended_at is not None and math.isfinite(r.ended_at)]
    if started is None and stamped:
        first = stamped[0]
        assumed = first.seconds if first.seconds is not None and math.isfinite(first.seconds) else 0
        started = (first.ended_at or 0.0) - assumed
    if ended is None and stamped and run.text("state") != "running":
        ended = stamped[-1].ended_at
    return started, ended


def _state(run: Run) -> str:
    state = run.text("state")
    if state:
        return state
    return "no run.json" if run.records else "nothing recorded"


def _rounds_done(run: Run) -> int:
    return len({r.round for r in run.records if r.task == "train"})


def _title(run: Run) -> str:
    state = _state(run)
    started, ended = _times(run)
    duration = None if started is None or ended is None else ended - started
    facts = [
        f'<span class="state state-{esc(safe_id(state))}" id="state">{esc(state)}</span>',
        f"runner: {esc(run.text('runner') or '?')}",
        f"strategy: {esc(run.strategy or '?')}",
        f"rounds: {_rounds_done(run)}"
        + (f" of {run.number('num_rounds'):g}" if run.number("num_rounds") is not None else ""),
    ]
    times = [
        f"started {esc(format_time(started))}",
        f"ended {esc(format_time(ended))}" if ended is not None else "not ended",
        f"duration {esc(format_duration(duration))}",
    ]
    job_id = run.text("job_id")
    return (
        f"<h1>{esc(run.job_name)}</h1>"
        f'<p class="meta">{" &middot; ".join(facts)}</p>'
        f'<p class="meta">{" &middot; ".join(times)}'
        + (f" &middot; job id {esc(job_id)}" if job_id else "")
        + f'</p><p class="meta">server folder: <code>{esc(run.server_dir)}</code></p>'
    )


def _failure(run: Run) -> str:
    failure = run.info.get("failure")
    if not isinstance(failure, dict):
        if run.text("state") in ("failed", "aborted"):
            return (
                '<section class="failure" id="failure"><h2>Why the job '
                f"{esc(run.text('state'))}</h2><p>run.json records no cause.</p></section>"
            )
        return ""

    def text(key: str, limit: int = 4000) -> str:
        value = failure.get(key)
        return value[-limit:] if isinstance(value, str) else ""

    site = text("site", 200)
    exception = text("exception", 200) or "an error"
    message = text("message", 4000)
    tail = text("traceback_tail", 20_000)
    where = f" at site <b>{esc(site)}</b>" if site else ""
    return (
        '<section class="failure" id="failure"><h2>Why the job '
        f"{esc(run.text('state') or 'failed')}</h2>"
        f"<p><b>{esc(exception)}</b>{where}: {esc(message)}</p>"
        + (f"<pre>{esc(tail)}</pre>" if tail else "")
        + "</section>"
    )


def _notes(notes: Sequence[str]) -> str:
    if not notes:
        return ""
    items = "".join(f"<li>{esc(n)}</li>" for n in notes)
    return f'<section class="notes" id="notes"><ul>{items}</ul></section>'


def _details(run: Run) -> str:
    parts = []
    if run.config is not None:
        parts.append(
            f'<h2>Config</h2><pre id="config">{esc(json_text(run.config, indent=2))}</pre>'
        )
    for key, title in (("versions", "Versions"), ("machine", "Machine")):
        values = run.info.get(key)
        if isinstance(values, dict) and values:
            shown = {
                str(k): f"{format_bytes(v)} ({v})" if str(k).endswith("bytes") and finite(v) else v
                for k, v in list(values.items())[:60]
            }
            parts.append(f"<h2>{title}</h2>{key_values(shown)}")
    if "seed" in run.info:
        seed = run.info["seed"]
        parts.append(f"<h2>Seed</h2><p>{esc(json_text(seed, 200))}</p>")
    return "".join(parts)


def _section(name: str, draw: Callable[[], str], notes: list[str]) -> str:
    """``draw()``, or a note where it failed: a report is never lost to one odd value."""
    try:
        return draw()
    except Exception as exc:  # matplotlib's errors have no common class; none may escape
        notes.append(f"the {name} section could not be drawn: {type(exc).__name__}: {exc}"[:500])
        return ""


def _body(run: Run, page: _Page) -> list[str]:
    body = [_title(run), _failure(run)]
    if run.empty and not run.cross_site and run.partition is None:
        body.append(
            f'<p id="nothing">Nothing recorded yet: {esc(run.server_dir)} holds no '
            "metrics.jsonl or run.json. The report fills in as the job runs its rounds.</p>"
        )
    records = run.records
    sections: list[tuple[str, Callable[[], str]]] = [
        ("global metrics", lambda: _figure(page, "Global metrics", _global_panels(page, records))),
        ("sites", lambda: _figure(page, "Metrics per site", _site_panels(page, records))),
        (
            "round time",
            lambda: _figure(page, "Round time, traffic and memory", _run_panels(page, records)),
        ),
        ("participation", lambda: _participation(page, records)),
        ("label distribution", lambda: _partition(page, run)),
        ("cross-site evaluation", lambda: _cross_site(page, run)),
        ("strategy", lambda: _figure(page, "Strategy state", _strategy_panels(page, records))),
        ("config", lambda: _details(run)),
    ]
    figures = [_section(name, draw, run.notes) for name, draw in sections]
    run.notes.extend(page.notes)
    body.append(_notes(run.notes))  # after the figures were drawn: their notes too
    return [*body, *figures, data_script({"series": page.series})]


def write_report(server_dir: Path, *, job_dir: Path | None = None, out: Path | None = None) -> Path:
    """Write the report of the run in ``server_dir`` to ``server_dir/report.html`` (or
    ``out``), atomically; returns its path. It renders whatever the folder holds (nothing
    yet, a job that failed in its first round, a finished run) and raises only when
    ``out`` cannot be written (:class:`~fedlift.errors.StorageError`). ``job_dir``: the
    job folder (its ``job.json`` and ``partition.json``); default: the one beside
    ``server_dir`` (a workspace's ``jobs/JOB``, a deployed job's ``job``)."""
    server_dir = Path(server_dir)
    target = Path(out) if out is not None else server_dir / REPORT_NAME
    run = read_run(server_dir, None if job_dir is None else Path(job_dir))
    document = _Page()
    html_text = page(f"{run.job_name}: fedlift report", _body(run, document))
    atomic_write_text(target, html_text)
    return target


def curves_svg(server_dir: Path) -> tuple[str, dict[str, Any]]:
    """The global metrics and every site's, per round, of the run in ``server_dir`` (which
    may still be running) as one SVG, and the series drawn (``{id: {label, x, y}}``): what
    the live view shows of a running job. Read as the report reads (bounded, checked);
    an empty string when there is nothing to draw yet."""
    run = read_run(Path(server_dir))
    document = _Page()
    panels = _global_panels(document, run.records) + _site_panels(document, run.records)
    panels = [p for p in panels if p.series]
    if not panels:
        return "", {}
    return panels_svg(panels, "fedlift-live"), document.series


def _default_label(run: Run) -> str:
    folder = run.server_dir.parent if run.server_dir.name == "server" else run.server_dir
    return f"{run.job_name} ({folder.name or folder})"


def _outcome(run: Run, label: str) -> list[object]:
    started, ended = _times(run)
    last = next((r for r in reversed(run.records) if r.task == "train"), None)
    final_rounds = run.number("num_rounds")
    final = next(
        (r for r in reversed(run.records) if r.task == "validate" and r.round == final_rounds),
        None,
    )

    def shown(record: Record | None) -> str:
        if record is None:
            return ""
        return ", ".join(f"{k} {v:.4g}" for k, v in list(record.metrics.items())[:8])

    return [
        label,
        run.job_name,
        run.strategy or "?",
        run.text("runner") or "?",
        _state(run),
        _rounds_done(run),
        format_duration(None if started is None or ended is None else ended - started),
        shown(last),
        shown(final),
        json_text(run.info.get("seed"), 40) if "seed" in run.info else "",
    ]


def compare_report(
    server_dirs: Sequence[Path], out: Path, labels: Sequence[str] | None = None
) -> Path:
    """Overlay several runs (say FedAvg and FedProx on the same sites) in one page: each
    global metric's curves of every run on the same axes, legend by label (default: the
    job's name and its folder), and a table of each run's config and outcome. Writes
    ``out`` atomically and returns it; raises ConfigError for no runs or labels that do
    not match them, StorageError when ``out`` cannot be written."""
    dirs = [Path(d) for d in server_dirs]
    if not dirs:
        raise ConfigError(
            "compare_report needs at least one server folder to draw; pass the runs' "
            "server folders. Received: server_dirs=[]"
        )
    if labels is not None and (isinstance(labels, str) or len(labels) != len(dirs)):
        raise ConfigError(
            f"compare_report: labels must name each of the {len(dirs)} runs, in order; give "
            f"one label per server folder or none. Received: labels={labels!r:.200}"
        )
    runs = [read_run(d) for d in dirs]
    names = list(labels) if labels is not None else [_default_label(r) for r in runs]
    document = _Page()
    metrics = _names([rec.metrics for run in runs for rec in run.records])[:_MAX_PANELS]
    panels = []
    for metric in metrics:
        panel = Panel(metric)
        for k, (run, label) in enumerate(zip(runs, names, strict=True)):
            for task in _tasks(run.records):
                of_task = [r for r in run.records if r.task == task]
                xs, ys = _curve(of_task, metric)
                if xs:
                    line_label = f"{label} ({task})"
                    panel.series.append(
                        document.line(f"run{k + 1}-{task}-{metric}", line_label, xs, ys)
                    )
        panels.append(panel)
    headers = ["run", "job", "strategy", "runner", "state", "rounds", "duration"]
    headers += ["last round's metrics", "final evaluation", "seed"]
    rows = [_outcome(run, label) for run, label in zip(runs, names, strict=True)]
    body = [f"<h1>{esc(len(runs))} runs compared</h1>", table(headers, rows, css_id="runs")]
    notes = [
        f"{label}: {note}" for run, label in zip(runs, names, strict=True) for note in run.notes
    ]
    figure = _section("global metrics", lambda: _figure(document, "Global metrics", panels), notes)
    body += [_notes(notes + document.notes), figure]
    for run, label in zip(runs, names, strict=True):
        if run.config is not None:
            body.append(
                f"<details><summary>config of {esc(label)}</summary>"
                f"<pre>{esc(json_text(run.config, indent=2))}</pre></details>"
            )
    body.append(data_script({"series": document.series}))
    atomic_write_text(Path(out), page("fedlift report: runs compared", body))
    return Path(out)
