"""The end of a run on this machine: ``run.json`` says how it ended, then ``report.html`` is
written from what the run left (:func:`fedlift.report.write_report`)."""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import FedliftError
from ..server import RunInfo

__all__ = ["REPORT_FILE", "end_run"]

log = logging.getLogger("fedlift.server")

REPORT_FILE = "report.html"


def end_run(info: RunInfo, error: BaseException | None, job_dir: Path | None) -> None:
    """Complete ``info`` with the run's outcome (``error``: None when it finished), then
    write the report beside it. Neither hides the run's own outcome: a write that fails
    (disk full, read-only) is logged in one line."""
    try:
        info.end(error)
    except FedliftError as exc:
        log.error("%s could not be written: %s", info.path, exc)
    from ..report import write_report  # matplotlib: loaded at the end, not at launch

    try:
        write_report(info.path.parent, job_dir=job_dir)
    except Exception as exc:  # the report never turns a finished run into a failed one
        log.error("%s could not be written: %r", info.path.parent / REPORT_FILE, exc)
