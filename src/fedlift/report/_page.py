"""The HTML around the figures: escaping, tables, the embedded data, the page itself.

Every string that came from a run's files goes through :func:`esc`; the embedded JSON is
written so that no ``</script>`` or ``<!--`` can appear in it. The page loads nothing: its
style is inline and its figures are inline SVG.
"""

from __future__ import annotations

import datetime
import html
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .._json import finite_json

__all__ = [
    "Cell",
    "data_script",
    "esc",
    "format_bytes",
    "format_duration",
    "format_time",
    "json_text",
    "key_values",
    "page",
    "safe_id",
    "table",
]

_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;
background:#f6f7f9}
main{max-width:1000px;margin:0 auto;padding:16px 24px 48px;background:#fff}
h1{font-size:22px;margin:8px 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid
#dde1e7;padding-bottom:4px}
.meta{color:#4a5261;margin:0 0 8px}.state{display:inline-block;padding:1px 8px;border-radius:9px;
font-weight:600;background:#e8ebf0}.state-finished{background:#d7f0dd;color:#1d6b34}
.state-failed,.state-aborted{background:#f9d9d6;color:#9b2419}.state-running{background:#fff0c7}
.failure{border:1px solid #e3a19a;background:#fdf1ef;padding:8px 14px;border-radius:6px}
.notes{border:1px solid #e6d39a;background:#fffaeb;padding:6px 14px;border-radius:6px}
pre{background:#f3f4f6;padding:8px;overflow:auto;max-height:480px;font-size:12px;
white-space:pre-wrap;word-break:break-word}
table{border-collapse:collapse;font-size:13px;margin:6px 0}th,td{border:1px solid #dde1e7;
padding:3px 8px;text-align:left;vertical-align:top}th{background:#f0f2f5}
td.in{background:#eef5ff}td.out{background:#fde8e6;color:#9b2419}td.none{color:#9aa1ac}
.scroll{overflow-x:auto}svg{max-width:100%;height:auto}
"""


def esc(value: object) -> str:
    """``value`` as text safe anywhere in the page's HTML (quotes too)."""
    return html.escape(str(value), quote=True)


def safe_id(text: str) -> str:
    """``text`` reduced to letters, digits, ``_`` and ``-`` (at most 60 of them)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:60] or "x"


class Cell:
    """A table cell: its text, an optional tooltip (``title``) and CSS class."""

    def __init__(self, text: object, title: str | None = None, css: str | None = None) -> None:
        self.text, self.title, self.css = str(text), title, css

    def html(self) -> str:
        attributes = f' class="{esc(self.css)}"' if self.css else ""
        if self.title:
            attributes += f' title="{esc(self.title)}"'
        return f"<td{attributes}>{esc(self.text)}</td>"


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], css_id: str = "") -> str:
    """An HTML table; a row's cells are :class:`Cell` or anything ``str()`` shows."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = (c if isinstance(c, Cell) else Cell("" if c is None else c) for c in row)
        body.append("<tr>" + "".join(c.html() for c in cells) + "</tr>")
    ident = f' id="{esc(css_id)}"' if css_id else ""
    return (
        f'<div class="scroll"><table{ident}><thead><tr>{head}</tr></thead><tbody>'
        + "".join(body)
        + "</tbody></table></div>"
    )


def key_values(values: Mapping[str, Any], limit: int = 60) -> str:
    """A two-column table of a mapping's first ``limit`` entries."""
    rows = []
    for key, value in list(values.items())[:limit]:
        shown = value if isinstance(value, str) else json_text(value, 2000)
        rows.append([str(key)[:200], shown[:2000]])
    return table(["", ""], rows)


def json_text(value: Any, limit: int = 200_000, indent: int | None = None) -> str:
    """``value`` as JSON text (NaN and Inf as null), cut at ``limit`` characters."""
    try:
        text = json.dumps(finite_json(value), indent=indent, sort_keys=True, default=str)
    except (ValueError, TypeError, RecursionError):
        text = "(not shown: it cannot be written as JSON)"
    if len(text) > limit:
        text = text[:limit] + f"\n... ({len(text) - limit} more characters)"
    return text


def data_script(document: Any) -> str:
    """``document`` as the page's ``<script type="application/json" id="fedlift-data">``."""
    text = json.dumps(finite_json(document), separators=(",", ":"), sort_keys=True)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return f'<script type="application/json" id="fedlift-data">{text}</script>'


def format_time(stamp: float | None) -> str:
    """A unix time as ``YYYY-MM-DD HH:MM:SS UTC`` ("?" when there is none)."""
    if stamp is None or not math.isfinite(stamp):
        return "?"
    try:
        moment = datetime.datetime.fromtimestamp(stamp, tz=datetime.timezone.utc)
    except (OverflowError, OSError, ValueError):
        return "?"
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def format_bytes(count: float | None) -> str:
    if count is None or not math.isfinite(count):
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"  # pragma: no cover (the loop returns)


def page(title: str, body: Sequence[str]) -> str:
    """The whole page: ``title`` (text) and ``body`` (HTML pieces, in order)."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{_STYLE}</style></head>\n<body><main>\n"
        + "\n".join(body)
        + "\n</main></body></html>\n"
    )
