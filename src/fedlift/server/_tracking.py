"""What the sites' scripts log, written per site: TensorBoard always, MLflow or W&B on request.

Every record a site sends (``flare.log`` and :mod:`fedlift.client.tracking`'s writers)
reaches :class:`Tracking` already checked by the runtime (names, sizes, types; see
:func:`fedlift.codec.check_log_record`). What is left to bound is how much one site may log
in a job, and how much may wait to be written: a site past its budget is cut off (one
warning in the server's log, the job goes on), and so is a flood the writer cannot keep up
with. Records are written by one background thread, in batches, so a site's ``log`` call
never waits for a disk or a database, and a backend that fails (a full disk, a broken
database) is switched off with one error instead of failing the job: tracking is a
by-product of training, not its result.

Where (under the job's server folder, ``WORKSPACE/server`` in the simulator,
``JOB_FOLDER/server`` on a deployed server):

- ``tensorboard/SITE/events.out.tfevents.*``: every number, one TensorBoard run per site
  (the server's own round metrics stay in ``tensorboard/``);
- ``mlflow.db`` (an MLflow SQLite store) and ``mlflow-artifacts/`` with
  ``tracking="mlflow"``: one experiment named after the job, one run per site tagged
  ``site`` and ``job_id``, as NVFlare's MLflow receiver keeps them;
- ``wandb/`` with ``tracking="wandb"``: one offline W&B run per site, grouped by job id
  (``wandb sync`` uploads them).
"""

from __future__ import annotations

import importlib.util
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..errors import ConfigError
from ._runtime import LogRecord
from ._store import _TensorBoard

__all__ = [
    "TRACKING_CHOICES",
    "Batch",
    "Tracking",
    "TrackingSink",
    "check_tracking",
    "group_by_site",
    "missing_tracking_packages",
    "site_folder",
]

log = logging.getLogger("fedlift.server")

TRACKING_CHOICES = ("tensorboard", "mlflow", "wandb")
"""A job's ``tracking``: besides TensorBoard (always, when installed), where the sites'
logs also go. ``"tensorboard"`` only makes TensorBoard required."""

_PACKAGES: dict[str, tuple[str, ...]] = {
    "tensorboard": ("tensorboard",),
    # MLflow's SQLite store (its maintained backend) runs on SQLAlchemy and Alembic, which
    # mlflow-skinny leaves out.
    "mlflow": ("mlflow", "sqlalchemy", "alembic"),
    "wandb": ("wandb",),
}

Batch = list[tuple[float, LogRecord]]
"""Records with the time (``time.time()``) each arrived."""


def missing_tracking_packages(choice: str) -> list[str]:
    """The packages ``tracking=choice`` needs that this interpreter cannot import."""
    return [name for name in _PACKAGES[choice] if importlib.util.find_spec(name) is None]


def check_tracking(value: object, where: str = "tracking", *, packages: bool = True) -> str | None:
    """``value`` as a job's ``tracking`` setting (None or one of :data:`TRACKING_CHOICES`);
    with ``packages``, also that what it writes with is installed here. Raises
    :class:`~fedlift.errors.ConfigError` naming the pip extra to install."""
    if value is None:
        return None
    if not isinstance(value, str) or value not in TRACKING_CHOICES:
        raise ConfigError(
            f"{where} must be None (TensorBoard only, when installed) or one of "
            f"{', '.join(repr(c) for c in TRACKING_CHOICES)}. Received: tracking={value!r:.60}."
        )
    missing = missing_tracking_packages(value) if packages else []
    if missing:
        raise ConfigError(
            f"{where}: tracking={value!r} needs {', '.join(_PACKAGES[value])}, and "
            f"{', '.join(missing)} cannot be imported here. Install them with: "
            f"pip install 'fedlift[{value}]'. Received: tracking={value!r}."
        )
    return value


def site_folder(site: str) -> str:
    """A folder name for ``site``: letters, digits, ``_ . -`` (others become ``_``)."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", site)[:128].lstrip(".")
    return name or "site"


def group_by_site(batch: Batch) -> dict[str, Batch]:
    """``batch`` split by site, in arrival order within each site."""
    out: dict[str, Batch] = {}
    for item in batch:
        out.setdefault(item[1].site, []).append(item)
    return out


class TrackingSink(Protocol):
    """One backend the sites' records are written to."""

    name: str

    def write(self, batch: Batch) -> None: ...

    def close(self, failed: bool) -> None: ...


class _TensorBoardSink:
    """Every number as a scalar of its site's TensorBoard run (``tensorboard/SITE``)."""

    name = "TensorBoard"

    def __init__(self, root: Path) -> None:
        self._root = root
        self._writers: dict[str, _TensorBoard] = {}

    def write(self, batch: Batch) -> None:
        for site, items in group_by_site(batch).items():
            writer = self._writers.get(site)
            if writer is None:
                writer = self._writers[site] = _TensorBoard(self._root / site_folder(site))
            for _, record in items:
                for name, value in record.numbers():
                    writer.scalar(name, value, record.step or 0)
            writer.flush()

    def close(self, failed: bool) -> None:
        for writer in self._writers.values():
            writer.close()


@dataclass
class _Budget:
    entries: int = 0
    text_chars: int = 0
    dropped: int = 0


def _size(record: LogRecord) -> tuple[int, int]:
    """(entries, text characters) of a record: a dict counts each of its entries."""
    value = record.value
    if isinstance(value, dict):
        return len(value), 0
    if record.data_type == "TEXT" and isinstance(value, str):
        return 1, len(value)
    return 1, 0


class Tracking:
    """Writes the sites' log records of one job under ``directory`` (see module docstring).

    ``record`` is the runtime's ``on_log``; ``close`` (once the job has ended) writes what
    is left and ends the runs, as failed with ``failed``. ``tracking`` is the job's setting
    (:func:`check_tracking`: this server must have its packages). ``experiment`` names the
    MLflow experiment and W&B project (the job's name), ``job_id`` tags the runs; with
    ``resume`` (a restarted deployed server) the sites' MLflow runs of ``job_id`` go on.

    Bounds: a site may log ``max_site_entries`` numbers, params and tags in the job, and
    ``max_site_text_chars`` characters of text; ``max_pending`` entries may wait to be
    written. Past either, records are dropped (:attr:`dropped`), with one warning.
    """

    def __init__(
        self,
        directory: Path,
        *,
        tracking: str | None = None,
        experiment: str = "fedlift",
        job_id: str = "",
        resume: bool = False,
        max_site_entries: int = 1_000_000,
        max_site_text_chars: int = 16 * 2**20,
        max_pending: int = 100_000,
    ) -> None:
        self.tracking = check_tracking(tracking, f"the job's tracking ({experiment})")
        self.directory = directory
        self._experiment, self._job_id, self._resume = experiment, job_id, resume
        self._limits = (max_site_entries, max_site_text_chars, max_pending)
        self._cond = threading.Condition()
        self._queue: Batch = []
        self._pending = 0
        self._writing = False
        self._overflow_warned = False
        self._budgets: dict[str, _Budget] = {}
        self._closed = False
        self._failed = False
        self._sinks: list[TrackingSink] = []
        self._thread = threading.Thread(target=self._run, name="fedlift-tracking", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the sites' side
    def record(self, record: LogRecord) -> None:
        """Queue a checked record for writing, unless its site is over its budget."""
        entries, text = _size(record)
        max_entries, max_text, max_pending = self._limits
        with self._cond:
            if self._closed:
                return
            budget = self._budgets.setdefault(record.site, _Budget())
            if budget.entries + entries > max_entries or budget.text_chars + text > max_text:
                if not budget.dropped:
                    log.warning(
                        "%s logged more than its budget for this job (%d numbers, params and "
                        "tags; %d characters of text): its further log records are dropped",
                        record.site,
                        max_entries,
                        max_text,
                    )
                budget.dropped += 1
                return
            if self._pending + entries > max_pending:
                if not self._overflow_warned:
                    log.warning(
                        "the sites log faster than their records can be written (%d wait): "
                        "records are dropped until the writer catches up",
                        self._pending,
                    )
                    self._overflow_warned = True
                budget.dropped += 1
                return
            budget.entries += entries
            budget.text_chars += text
            self._queue.append((time.time(), record))
            self._pending += entries
            self._cond.notify_all()

    @property
    def dropped(self) -> dict[str, int]:
        """Records dropped so far, by site (over budget, or while the writer lagged)."""
        with self._cond:
            return {site: b.dropped for site, b in self._budgets.items() if b.dropped}

    @property
    def backends(self) -> list[str]:
        """The backends being written to now (after :meth:`flush`: those that opened)."""
        with self._cond:
            return [sink.name for sink in self._sinks]

    # ------------------------------------------------------------------ writing
    def _open_sinks(self) -> list[TrackingSink]:
        sinks: list[TrackingSink] = []
        if missing_tracking_packages("tensorboard"):
            log.warning(
                "tensorboard is not installed: the sites' logs get no TensorBoard event files "
                "(pip install 'fedlift[tensorboard]')"
            )
        else:
            sinks.append(_TensorBoardSink(self.directory / "tensorboard"))
        try:
            if self.tracking == "mlflow":
                from ._mlflow_sink import MLflowSink

                sinks.append(
                    MLflowSink(self.directory, self._experiment, self._job_id, self._resume)
                )
            elif self.tracking == "wandb":
                from ._wandb_sink import WandBSink

                sinks.append(WandBSink(self.directory, self._experiment, self._job_id))
        except Exception as exc:  # the job goes on without it; the log says why
            log.error("tracking=%r could not start; the sites' logs skip it: %s",
                      self.tracking, exc)  # fmt: skip
        return sinks

    def _run(self) -> None:
        sinks = self._open_sinks()
        with self._cond:
            self._sinks = list(sinks)
            self._cond.notify_all()
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                batch, self._queue = self._queue, []
                if not batch:
                    break  # closed, and nothing left
                self._writing = True
            for sink in list(sinks):
                try:
                    sink.write(batch)
                except Exception as exc:  # one backend down; the others and the job go on
                    log.error("%s: writing the sites' logs failed; it is switched off: %s",
                              sink.name, exc)  # fmt: skip
                    sinks.remove(sink)
                    self._close_sink(sink, failed=True)
            with self._cond:
                self._pending -= sum(_size(record)[0] for _, record in batch)
                self._writing = False
                self._overflow_warned = False
                self._sinks = list(sinks)
                self._cond.notify_all()
        for sink in sinks:
            self._close_sink(sink, failed=self._failed)

    @staticmethod
    def _close_sink(sink: TrackingSink, failed: bool) -> None:
        try:
            sink.close(failed)
        except Exception as exc:
            log.error("%s: closing failed: %s", sink.name, exc)

    def flush(self) -> None:
        """Wait until every record queued so far is written."""
        with self._cond:
            while (self._queue or self._writing) and self._thread.is_alive():
                self._cond.wait(1.0)

    def close(self, failed: bool = False) -> None:
        """Write what is left, end the runs (as failed with ``failed``) and stop. Once."""
        with self._cond:
            if self._closed:
                return
            self._closed, self._failed = True, failed
            self._cond.notify_all()
        self._thread.join()
        dropped = self.dropped
        if dropped:
            log.warning("log records dropped by site: %s", dropped)
