"""Reading a report back: its embedded data, its lines' SVG paths, and the check that each
line's pixels are the numbers it claims (shared by the report's unit and browser tests)."""

from __future__ import annotations

import json
import math
import re
from html.parser import HTMLParser
from typing import Any

_NUMBER = r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?"


class _Lines(HTMLParser):
    """The ``d`` of the first path drawn in each ``<g id="series-...">`` (not its markers)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paths: dict[str, str] = {}
        self.data: str | None = None
        self._open: list[str | None] = []  # the series of each open <g> (None: not one)
        self._in_data = False
        self._defs = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "g":
            ident = values.get("id") or ""
            self._open.append(ident[len("series-") :] if ident.startswith("series-") else None)
        elif tag == "defs":
            self._defs += 1
        elif tag == "path" and not self._defs:
            series = next((s for s in reversed(self._open) if s is not None), None)
            if series is not None and series not in self.paths:
                self.paths[series] = values.get("d") or ""
        elif tag == "script" and values.get("id") == "fedlift-data":
            self._in_data = True

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag == "g":
            self._open.pop()
        elif tag == "defs":
            self._defs -= 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "g" and self._open:
            self._open.pop()
        elif tag == "defs":
            self._defs -= 1
        elif tag == "script":
            self._in_data = False

    def handle_data(self, data: str) -> None:
        if self._in_data:
            self.data = (self.data or "") + data


def read_page(text: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The page's embedded series and each series' SVG path ``d``."""
    parser = _Lines()
    parser.feed(text)
    assert parser.data is not None, "no <script id=fedlift-data> in the page"
    return json.loads(parser.data)["series"], parser.paths


def vertices(d: str) -> list[tuple[float, float]]:
    """The points of an SVG path made of M and L commands."""
    assert re.fullmatch(rf"\s*(?:[ML]\s*{_NUMBER}\s+{_NUMBER}\s*)*", d), d
    numbers = [float(n) for n in re.findall(_NUMBER, d)]
    return list(zip(numbers[::2], numbers[1::2], strict=True))


def _affine(values: list[float], pixels: list[float], decreasing: bool) -> None:
    """``pixels == a * values + b`` (to the SVG's 6 decimals), with a < 0 if decreasing."""
    distinct = [(v, p) for v, p in zip(values, pixels, strict=True)]
    low = min(distinct)
    high = max(distinct)
    if high[0] == low[0]:
        assert max(pixels) - min(pixels) < 1e-4, (values, pixels)
        return
    a = (high[1] - low[1]) / (high[0] - low[0])
    b = low[1] - a * low[0]
    assert (a < 0) if decreasing else (a > 0), (values, pixels)
    for v, p in zip(values, pixels, strict=True):
        assert abs(a * v + b - p) < 2e-3, (values, pixels, a, b)


def check_line(series: dict[str, Any], d: str) -> int:
    """A drawn line matches its numbers: one vertex per finite point, x and y an affine
    map of them (y decreasing: SVG's y grows downwards). Returns the vertex count."""
    points = [
        (x, y)
        for x, y in zip(series["x"], series["y"], strict=True)
        if y is not None and math.isfinite(y)
    ]
    drawn = vertices(d)
    assert len(drawn) == len(points), (series, d)
    if points:
        _affine([p[0] for p in points], [q[0] for q in drawn], decreasing=False)
        _affine([p[1] for p in points], [q[1] for q in drawn], decreasing=True)
    return len(drawn)
