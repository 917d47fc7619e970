"""Every job's report: one self-contained HTML page of what the run did.

:func:`write_report` reads a run's server folder (``metrics.jsonl``, ``run.json``,
``cross_site_val.json``, ``partition.json``) and writes ``report.html`` beside them: the
cause of a failure first, then the curves per round, participation, label distribution,
cross-site heatmaps, the strategy's state and the job's config, with matplotlib's figures
as inline SVG and the numbers behind them embedded as JSON. The page fetches nothing, so it
opens offline and archives as one file. :func:`compare_report` overlays several runs;
:func:`find_run` is what ``fedlift report PATH`` makes of a path; :func:`curves_svg` is a
running job's curves, for the live view.
"""

from ._locate import find_run
from ._report import REPORT_NAME, compare_report, curves_svg, write_report

__all__ = ["REPORT_NAME", "compare_report", "curves_svg", "find_run", "write_report"]
