"""The report's figures: matplotlib, drawn on its own Figure (never pyplot), as inline SVG.

Text stays text (``svg.fonttype = "none"``), ids are salted per figure so that figures
sharing one page never share a clip path's id, and the output is the same for the same
data (no date in it, a fixed hash salt). Paths are not simplified, so each line's SVG path
has one vertex per plotted point: a test can read the numbers back from the pixels.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "Panel",
    "Series",
    "figure_svg",
    "heatmap_svg",
    "panels_svg",
    "participation_svg",
    "partition_svg",
]

_RC: dict[Any, Any] = {
    "svg.fonttype": "none",
    "path.simplify": False,
    "font.size": 9.0,
    "axes.titlesize": 10.0,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "text.parse_math": False,  # a "$" in a site's or metric's name is text, not TeX
}
_METADATA = {"Date": None, "Creator": None, "Format": None, "Type": None}
_WIDTH = 9.0
"""Figure width, inches (the page's column)."""


@dataclass
class Series:
    """One line: ``x`` and ``y`` (NaN and Inf kept here, left out of the drawn line)."""

    id: str
    label: str
    x: list[float]
    y: list[float | None]


@dataclass
class Panel:
    """One axes: a title, its lines, the y axis' unit (``"B"``: bytes, ``"s"``)."""

    title: str
    series: list[Series] = field(default_factory=list)
    unit: str = ""
    xlabel: str = "round"


def figure_svg(figure: Figure, salt: str) -> str:
    """``figure`` as an ``<svg>`` element for an HTML page (no XML prolog, no metadata)."""
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({**_RC, "svg.hashsalt": salt}):
        figure.savefig(buffer, format="svg", metadata=_METADATA)
    text = buffer.getvalue()
    text = text[text.find("<svg") :]
    return re.sub(r"\s*<metadata>.*?</metadata>", "", text, count=1, flags=re.DOTALL)


def _new_figure(height: float) -> Figure:
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context(_RC):
        return Figure(figsize=(_WIDTH, height), layout="constrained")


def _plot(axes: Axes, series: Series, index: int) -> None:
    points = [
        (x, y)
        for x, y in zip(series.x, series.y, strict=True)
        if y is not None and math.isfinite(x) and math.isfinite(y)
    ]
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    (line,) = axes.plot(
        xs,
        ys,
        marker="o",
        markersize=3.0,
        linewidth=1.4,
        label=series.label,
        color=f"C{index % 10}",
    )
    line.set_gid("series-" + series.id)


def _unit_axis(axes: Axes, unit: str) -> None:
    if unit == "B":
        from matplotlib.ticker import EngFormatter

        axes.yaxis.set_major_formatter(EngFormatter(unit="B"))
    elif unit:
        axes.set_ylabel(unit)


def panels_svg(panels: Sequence[Panel], salt: str, columns: int = 2) -> str:
    """Panels in a grid of ``columns`` (one figure), each with its legend."""
    import matplotlib
    from matplotlib.ticker import MaxNLocator

    columns = max(1, min(columns, len(panels)))
    rows = math.ceil(len(panels) / columns)
    figure = _new_figure(2.6 * rows + 0.2)
    with matplotlib.rc_context(_RC):
        for k, panel in enumerate(panels):
            axes = figure.add_subplot(rows, columns, k + 1)
            for index, series in enumerate(panel.series):
                _plot(axes, series, index)
            axes.set_title(panel.title)
            axes.set_xlabel(panel.xlabel)
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
            _unit_axis(axes, panel.unit)
            if 1 < len(panel.series) <= 12:
                axes.legend(fontsize="small")
    return figure_svg(figure, salt)


def _grid(matrix: Sequence[Sequence[float | None]]) -> Any:
    """A float64 array of ``matrix``, NaN where a cell is None, NaN, Inf or beyond +-1e150."""
    import numpy as np

    values = np.array(
        [[math.nan if v is None else v for v in row] for row in matrix], dtype=np.float64
    )
    values[~(np.abs(values) <= 1e150)] = math.nan  # (an axis spanning more overflows)
    return values


def _image(figure: Figure, values: Any, **options: Any) -> tuple[Axes, Any]:
    """One axes showing ``values`` as an image (no grid over it), and the image."""
    axes = figure.add_subplot()
    image = axes.imshow(values, aspect="auto", **options)
    axes.grid(False)
    return axes, image


def heatmap_svg(
    title: str,
    matrix: Sequence[Sequence[float | None]],
    rows: list[str],
    cols: list[str],
    salt: str,
) -> str:
    """A heatmap, each cell annotated with its number (blank where there is none)."""
    import matplotlib
    import numpy as np

    values = _grid(matrix)
    figure = _new_figure(min(1.6 + 0.45 * len(rows), 12.0))
    with matplotlib.rc_context(_RC):
        axes, image = _image(figure, values, cmap="viridis")
        axes.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
        axes.set_yticks(range(len(rows)), rows)
        axes.set_xlabel("data of site")
        axes.set_ylabel("model of")
        axes.set_title(title)
        finite = values[np.isfinite(values)]
        middle = float(finite.min() + finite.max()) / 2 if finite.size else 0.0
        if len(rows) * len(cols) <= 400:
            for i in range(len(rows)):
                for j in range(len(cols)):
                    v = values[i, j]
                    if math.isfinite(v):
                        color = "black" if v > middle else "white"
                        axes.text(j, i, f"{v:.3g}", ha="center", va="center", color=color)
        figure.colorbar(image, ax=axes)
    return figure_svg(figure, salt)


def participation_svg(
    shares: Sequence[Sequence[float | None]],
    left_out: Sequence[Sequence[bool]],
    rows: list[str],
    sites: list[str],
    salt: str,
) -> str:
    """Rounds x sites: the weight share of each site in the round (blue), left out (red x)."""
    import matplotlib

    height = min(1.4 + 0.22 * len(sites), 6.0)
    figure = _new_figure(height)
    figure.set_size_inches(min(_WIDTH, 5.0 + 0.3 * len(rows)), height)
    with matplotlib.rc_context(_RC):
        axes, image = _image(figure, _grid(shares).T, cmap="Blues", vmin=0.0, vmax=1.0)
        marks = [(i, j) for i, row in enumerate(left_out) for j, out in enumerate(row) if out]
        if marks:
            axes.plot(
                [m[0] for m in marks], [m[1] for m in marks], "x", color="#c0392b",
                markersize=8, markeredgewidth=2,
            )  # fmt: skip
        step = max(1, len(rows) // 20)
        axes.set_xticks(range(0, len(rows), step), rows[::step])
        axes.set_yticks(range(len(sites)), sites)
        axes.set_xlabel("round")
        figure.colorbar(image, ax=axes, label="weight share")
    return figure_svg(figure, salt)


def partition_svg(summary: dict[str, Any], salt: str) -> str:
    """The label distribution: a stacked bar per site (fedlift.data's picture)."""
    import matplotlib
    import numpy as np

    from ..data import summary_figure

    with matplotlib.rc_context({**_RC, "axes.grid": False}):
        figure = summary_figure(
            np.asarray(summary["counts"], dtype=np.int64), summary["names"], summary["sites"]
        )
    return figure_svg(figure, salt)
