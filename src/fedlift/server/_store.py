"""What a job leaves on disk: global and best models, per-round metrics, TensorBoard events.

Every file is written atomically (temporary file, fsync, rename), so a crash never leaves a
half-written model or state file behind. A write that fails (disk full, read-only file
system) raises :class:`~fedlift.errors.StorageError` with one line; the files written before
it (the previous model, checkpoint and state) stay intact and loadable.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .._atomic import (
    StagedFile,
    atomic_path,
    atomic_write_text,
    atomic_writer,
    remove_temp_files,
    spare_path,
    storage_errors,
)
from ..errors import ConfigError, ProtocolError
from ..model import (
    ParamTree,
    flat_keys,
    flatten,
    keras_params,
    load_keras_model,
    load_safetensors,
    map_arrays,
    save_safetensors,
    set_keras_params,
    stage_safetensors,
    unflatten,
)

__all__ = [
    "CHECKPOINT_DIR",
    "CHECKPOINT_FILE",
    "ArraysFormat",
    "Checkpoint",
    "KerasWeightsFormat",
    "ModelFormat",
    "RoundRecord",
    "RunRecorder",
    "keras_params_path",
    "load_initial_model",
    "load_npz",
    "load_params",
    "read_checkpoint",
    "save_npz",
]

log = logging.getLogger("fedlift.server")


class ModelFormat(Protocol):
    """How global models are written and read back: a file suffix, save and load."""

    suffix: str

    def save(self, params: ParamTree, path: Path) -> None: ...

    def load(self, path: Path) -> ParamTree: ...


_STRUCTURE_KEY = "__fedlift_structure__"


def save_npz(params: ParamTree, path: Path) -> None:
    """Write a params tree as ``.npz`` keyed by flat paths (``"dense/0"``), atomically.

    The tree's structure is stored too (as JSON bytes), so :func:`load_npz` rebuilds the
    exact tree; other tools see a plain ``.npz`` of named arrays.
    """
    structure, arrays = flatten(params)
    keys = flat_keys(structure)
    named = dict(zip(keys, arrays, strict=True))
    named[_STRUCTURE_KEY] = np.frombuffer(json.dumps(structure).encode(), np.uint8)
    with atomic_writer(path) as handle:
        np.savez(handle, **named)  # type: ignore[arg-type]


def load_npz(path: Path) -> ParamTree:
    """Read a file written by :func:`save_npz` (never unpickles)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            named = {key: data[key] for key in data.files}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path} as .npz arrays: {exc}") from None
    raw = named.pop(_STRUCTURE_KEY, None)
    if raw is None:
        return named
    try:
        structure = json.loads(raw.tobytes().decode())
        keys = flat_keys(structure)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        raise ConfigError(f"{path} holds a corrupt param structure: {exc!r:.200}") from None
    missing = [k for k in keys if k not in named]
    if missing:
        raise ConfigError(f"{path} lacks arrays {missing[:5]} named by its structure.")
    try:
        return unflatten(structure, [named[k] for k in keys])
    except ProtocolError as exc:
        raise ConfigError(f"{path} holds a corrupt param structure: {exc}") from None


class ArraysFormat:
    """Params trees of plain arrays, saved as ``.safetensors`` (fast: no checksum pass).

    ``recycle=True`` rewrites the file each save replaced (see ``fedlift._atomic``): for a
    model saved again and again by one process, where no reader holds an old copy open.
    """

    suffix = ".safetensors"

    def __init__(self, recycle: bool = False) -> None:
        self.recycle = recycle

    def save(self, params: ParamTree, path: Path) -> None:
        with storage_errors(path):
            save_safetensors(params, path, recycle=self.recycle)

    def stage(self, params: ParamTree, path: Path) -> StagedFile:
        """The bytes of :meth:`save`, not yet published (see ``StagedFile``)."""
        with storage_errors(path):
            return stage_safetensors(params, path, recycle=self.recycle)

    def load(self, path: Path) -> ParamTree:
        return load_params(path)


def load_params(path: Path) -> ParamTree:
    """A params tree from ``.safetensors`` or ``.npz`` (never unpickles)."""
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    return load_npz(path)


class KerasWeightsFormat:
    """Keras models: loads the job's ``.keras`` file once and writes ``.weights.h5`` files."""

    suffix = ".weights.h5"

    def __init__(self, model: Any) -> None:
        self._model = model

    @classmethod
    def from_file(cls, path: Path) -> tuple[KerasWeightsFormat, ParamTree]:
        """Load a ``.keras`` file; returns the format and the model's params tree."""
        model = load_keras_model(path)
        return cls(model), keras_params(model)

    def save(self, params: ParamTree, path: Path) -> None:
        set_keras_params(self._model, params)
        atomic_path(path, lambda tmp: self._model.save_weights(str(tmp)), suffix=self.suffix)

    def load(self, path: Path) -> ParamTree:
        self._model.load_weights(str(path))
        return keras_params(self._model)


def keras_params_path(model_path: Path) -> Path:
    """Where a job keeps its Keras initial model's weights as a params tree (layer name ->
    weights, ``.safetensors``): beside the ``.keras`` file, which a server without Keras
    cannot read."""
    return model_path.with_name(model_path.name.removesuffix(".keras") + ".params.safetensors")


def load_initial_model(path: Path) -> tuple[ModelFormat, ParamTree]:
    """The initial model of an exported job: ``.keras``, ``.safetensors`` or ``.npz``.

    The server needs neither TensorFlow nor PyTorch. A PyTorch model is a
    ``.safetensors`` file (read here with numpy). A Keras model is read with Keras where
    Keras can be imported, and global models are then written as ``.weights.h5``; where it
    cannot, the job runs from the same weights as a params tree that the export wrote
    beside it (:func:`keras_params_path`), and global models are ``.safetensors`` files of
    that tree (``fedlift.model.set_keras_params`` loads one into the model).
    """
    if not path.is_file():
        raise ConfigError(f"the initial model {path} does not exist.")
    if path.name.endswith(".keras"):
        try:
            return KerasWeightsFormat.from_file(path)
        except ImportError as exc:
            return _keras_without_keras(path, exc)
    if path.suffix in (".npz", ".safetensors"):
        return ArraysFormat(), load_params(path)
    raise ConfigError(
        f"the initial model {path.name} has an unknown format; expected .keras, .safetensors "
        "or .npz."
    )


def _keras_without_keras(path: Path, exc: ImportError) -> tuple[ModelFormat, ParamTree]:
    params_file = keras_params_path(path)
    if params_file.is_symlink() or not params_file.is_file():
        raise ConfigError(
            f"the initial model {path.name} is a Keras model, and Keras cannot be imported in "
            f"the server's process ({exc}). Install it there (pip install 'fedlift[tf]'), or "
            f"export the job again with this fedlift: it writes {params_file.name} beside "
            f"it, which a server without Keras runs from. Received: {path.name} alone."
        ) from None
    log.warning(
        "Keras cannot be imported in the server's process (%s): the job runs from %s, and "
        "global models are written as .safetensors params trees (layer name -> weights; "
        "fedlift.model.set_keras_params loads one into the model)",
        exc,
        params_file.name,
    )
    return ArraysFormat(), load_params(params_file)


class _TensorBoard:
    """Scalar summaries in TensorBoard event files, written without TensorFlow.

    Uses tensorboard's protobuf messages and TFRecord writer on a plain file (tensorboard's
    own EventFileWriter would import TensorFlow for its file system layer).
    """

    def __init__(self, directory: Path) -> None:
        self._file: Any = None
        self._path = directory
        self._error: BaseException | None = None
        # tensorboard's modules take ~0.1 s to import: in the background, while the job
        # starts its sites, not before them (the first scalar waits for it).
        self._opening: threading.Thread | None = threading.Thread(
            target=self._open, args=(directory,), name="fedlift-tensorboard", daemon=True
        )
        self._opening.start()

    def _open(self, directory: Path) -> None:
        try:
            from tensorboard.compat.proto import event_pb2, summary_pb2
            from tensorboard.summary.writer.record_writer import RecordWriter
        except ImportError:  # optional at run time; the dependency is declared
            log.warning("tensorboard is not installed: no TensorBoard event files are written")
            return
        try:
            name = f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.{os.getpid()}"
            self._path = directory / name
            with storage_errors(self._path):
                directory.mkdir(parents=True, exist_ok=True)
                self._file = open(self._path, "wb")
            self._records = RecordWriter(self._file)
            self._event, self._summary = event_pb2.Event, summary_pb2.Summary
            self._write(self._event(wall_time=time.time(), file_version="brain.Event:2"))
        except BaseException as exc:  # raised where the writer is next used
            self._error = exc

    def _ready(self) -> bool:
        """Whether there is an event file to write to (waits for it to be opened)."""
        if self._opening is not None:
            self._opening.join()
            self._opening = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return self._file is not None

    def _write(self, event: Any) -> None:
        with storage_errors(self._path):
            self._records.write(event.SerializeToString())

    def scalar(self, tag: str, value: float, step: int) -> None:
        if not self._ready() or not math.isfinite(value):
            return
        summary = self._summary(value=[self._summary.Value(tag=tag, simple_value=value)])
        self._write(self._event(wall_time=time.time(), step=step, summary=summary))

    def flush(self) -> None:
        if self._ready():
            with storage_errors(self._path):
                self._file.flush()

    def close(self) -> None:
        if self._ready():
            file, self._file = self._file, None
            with storage_errors(self._path):
                file.close()


class _BackgroundWriter:
    """Writes models in one background thread, so rounds do not wait for the disk.

    A newer write for the same file replaces an older one that has not started yet (only
    the latest global model matters). Errors surface at the next ``submit`` or ``flush``.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: dict[str, Callable[[], object]] = {}
        self._running: str | None = None  # the key being written
        self._holding = False  # ... and its job (and the model it writes from) still runs
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="fedlift-writer", daemon=True)
        self._thread.start()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, key: str, job: Callable[[], object]) -> None:
        """Run ``job`` in the background; if it returns a callable, that runs right after,
        once ``job`` itself (and what it holds) has been let go."""
        with self._cond:
            self._raise()
            self._pending.pop(key, None)
            self._pending[key] = job
            self._cond.notify_all()

    def busy_with(self, key: str) -> bool:
        """Whether a write for ``key`` is waiting or under way."""
        with self._cond:
            return key in self._pending or self._running == key

    def wait_released(self, key: str) -> None:
        """Wait until no running write for ``key`` holds what it writes from (its slow
        finishing part, such as an fsync, may still run)."""
        with self._cond:
            while self._running == key and self._holding:
                self._cond.wait()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return
                key = next(iter(self._pending))
                job: Callable[[], object] | None = self._pending.pop(key)
                self._running, self._holding = key, True
            try:
                finish = job() if job is not None else None
                job = None  # what it wrote from (a model) can go before the slow part
                with self._cond:
                    self._holding = False
                    self._cond.notify_all()
                if callable(finish):
                    finish()
            except BaseException as exc:  # handed to the workflow at its next call
                log.error("writing %s failed: %s", key, exc)
                with self._cond:
                    self._error = exc
            finally:
                job = None
                with self._cond:
                    self._running, self._holding = None, False
                    self._cond.notify_all()

    def flush(self) -> None:
        with self._cond:
            while self._pending or self._running is not None:
                self._cond.wait()
            self._raise()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
            self._thread.join()


@dataclass
class RoundRecord:
    """One line of ``metrics.jsonl``."""

    round: int
    task: str
    clients: list[str]
    metrics: dict[str, float]
    seconds: float
    is_best: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    ended_at: float = field(default_factory=time.time)
    """Wall-clock time (``time.time()``) when the round's results were all in."""


PER_SITE_KEYS = ("sites", "left_out")
"""The entries of a round's ``extra`` that hold something per site: written to
``metrics.jsonl``, not kept in :attr:`RunRecorder.records`."""

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "checkpoint.json"


@dataclass
class Checkpoint:
    """The last completed round of a run, as ``checkpoint.json`` names it."""

    round_done: int
    path: Path
    best_round: int | None
    best_value: float | None
    strategy_state: dict[str, Any] = field(default_factory=dict)
    """The strategy's :meth:`~fedlift.server.Strategy.state` saved with the model."""


def read_checkpoint(directory: Path) -> Checkpoint | None:
    """``directory/checkpoint.json`` (None when there is none yet); raises
    :class:`~fedlift.errors.ConfigError` when it is unreadable or its model file is missing."""
    path = directory / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        round_done = data["round_done"]
        name = data["path"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not a valid checkpoint record: {exc!r:.200}") from None
    if not isinstance(round_done, int) or not isinstance(name, str) or Path(name).name != name:
        raise ConfigError(f"{path} is not a valid checkpoint record: {data!r:.200}")
    model = directory / CHECKPOINT_DIR / name
    if not model.is_file():
        raise ConfigError(f"{path} names the model {model}, which is missing.")
    best_round, best_value = data.get("best_round"), data.get("best_value")
    plain = data.get("strategy", {})
    if not isinstance(plain, dict):
        raise ConfigError(f"{path} is not a valid checkpoint record: 'strategy' {plain!r:.100}")
    arrays: Any = {}
    arrays_name = data.get("strategy_arrays")
    if arrays_name is not None:
        if not isinstance(arrays_name, str) or Path(arrays_name).name != arrays_name:
            raise ConfigError(f"{path} is not a valid checkpoint record: {arrays_name!r:.100}")
        arrays_path = directory / CHECKPOINT_DIR / arrays_name
        if not arrays_path.is_file():
            raise ConfigError(f"{path} names the strategy state {arrays_path}, which is missing.")
        arrays = load_npz(arrays_path)
    return Checkpoint(
        round_done,
        model,
        best_round if isinstance(best_round, int) else None,
        float(best_value) if isinstance(best_value, int | float) else None,
        join_state(plain, arrays if isinstance(arrays, dict) else {}),
    )


def _is_array_tree(value: Any) -> bool:
    if isinstance(value, np.ndarray):
        return True
    if isinstance(value, dict) and value:
        return all(_is_array_tree(v) for v in value.values())
    if isinstance(value, list | tuple) and value:
        return all(_is_array_tree(v) for v in value)
    return False


def split_state(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A strategy state as its JSON part and its param trees (top-level keys)."""
    plain = {k: v for k, v in state.items() if not _is_array_tree(v)}
    trees = {k: v for k, v in state.items() if _is_array_tree(v)}
    return plain, trees


def join_state(plain: dict[str, Any], trees: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`split_state`."""
    return {**plain, **trees}


class RunRecorder:
    """Writes a job's results under ``directory`` as rounds complete.

    With ``checkpoints`` every round's global model is also written to
    ``checkpoint/round-<k><suffix>`` and *then* ``checkpoint.json`` names it (both atomic, older
    checkpoints removed after), so a crash at any moment leaves a pair that belongs together.
    With ``resume`` the run goes on from that checkpoint: ``metrics.jsonl`` keeps the rounds
    it covers (later lines, from the interrupted round, are dropped) and the best model so
    far is remembered; :attr:`checkpoint` is what to resume from (None: start again).

    Without checkpoints the global model is written at most every ``save_interval`` seconds
    (0: after every round), and always after the last round: when rounds take less than
    that, writing each one would cost more than the round. ``state.json`` names the round
    the file holds. A write lets go of the model before the next round's aggregate needs
    its memory (the main loop waits for that, at worst).
    """

    def __init__(
        self,
        directory: Path,
        model_format: ModelFormat,
        key_metric: str = "accuracy",
        higher_is_better: bool = True,
        *,
        checkpoints: bool = False,
        resume: bool = False,
        save_interval: float = 0.0,
    ) -> None:
        if not isinstance(save_interval, int | float) or not save_interval >= 0:
            raise ConfigError(
                f"save_interval must be a number of seconds >= 0; received: {save_interval!r}."
            )
        self._save_interval = float(save_interval)
        self._last_save = -math.inf
        self.directory = directory
        self.models_dir = directory / "models"
        with storage_errors(self.models_dir):
            self.models_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = directory / "metrics.jsonl"
        self._format = model_format
        self._checkpoints = checkpoints
        self.key_metric = key_metric
        self._higher = higher_is_better
        self.best_value: float | None = None
        self.best_round: int | None = None
        self.records: list[RoundRecord] = []
        self.checkpoint: Checkpoint | None = None
        if resume:
            for folder in (directory, self.models_dir, directory / CHECKPOINT_DIR):
                remove_temp_files(folder)  # of writes the crash cut short
            self.checkpoint = read_checkpoint(directory)
            self._resume(-1 if self.checkpoint is None else self.checkpoint.round_done)
        else:
            self.metrics_path.unlink(missing_ok=True)
        self._tb = _TensorBoard(directory / "tensorboard")
        self._writer = _BackgroundWriter()

    def _resume(self, round_done: int) -> None:
        if self.checkpoint is not None:
            self.best_round = self.checkpoint.best_round
            self.best_value = self.checkpoint.best_value
        if not self.metrics_path.is_file():
            return
        kept: list[str] = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                data = json.loads(line)
                record = RoundRecord(**data)
            except (ValueError, TypeError):
                continue  # a line cut short by the crash
            if record.task == "train" and record.round <= round_done:
                kept.append(line)
                for key in PER_SITE_KEYS:
                    record.extra.pop(key, None)
                self.records.append(record)
        atomic_write_text(self.metrics_path, "".join(f"{line}\n" for line in kept))

    def load_checkpoint(self) -> ParamTree | None:
        """The params of :attr:`checkpoint` (None without one)."""
        if self.checkpoint is None:
            return None
        return self._format.load(self.checkpoint.path)

    @property
    def global_model_path(self) -> Path:
        return self.models_dir / f"global_model{self._format.suffix}"

    @property
    def best_model_path(self) -> Path:
        return self.models_dir / f"best_model{self._format.suffix}"

    def _improves(self, metrics: dict[str, float]) -> bool:
        value = metrics.get(self.key_metric)
        if value is None or not math.isfinite(value):
            return False
        if self.best_value is None:
            return True
        return value > self.best_value if self._higher else value < self.best_value

    def record(self, record: RoundRecord, evaluated_params: ParamTree | None) -> RoundRecord:
        """Store a round's metrics; if they are the best so far, save ``evaluated_params``
        (the model the clients evaluated) as the best model."""
        improves = evaluated_params is not None and self._improves(record.metrics)
        if improves:
            record.is_best = True
        # The line first: when it cannot be written, nothing of this round is remembered.
        self._append_metrics(json.dumps(asdict(record), allow_nan=True) + "\n")
        # What each site did stays in the file: held for every round, it would grow with
        # rounds x sites (2,000 sites: ~1 KB each a round).
        for key in PER_SITE_KEYS:
            record.extra.pop(key, None)
        self.records.append(record)
        if improves and evaluated_params is not None:
            self.best_value = record.metrics[self.key_metric]
            self.best_round = record.round
            best, path = evaluated_params, self.best_model_path
            self._writer.submit("best", lambda: self._format.save(best, path))
        for key, value in record.metrics.items():
            self._tb.scalar(f"global/{key}", float(value), record.round)
        self._tb.flush()
        return record

    def _append_metrics(self, line: str) -> None:
        """One line onto ``metrics.jsonl``; a failed append is cut off again (no half line)."""
        with storage_errors(self.metrics_path):
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
            fd = os.open(self.metrics_path, flags, 0o644)
            try:
                size = os.lseek(fd, 0, os.SEEK_END)
                view = memoryview(line.encode("utf-8"))
                try:
                    while view:
                        view = view[os.write(fd, view) :]
                except OSError:
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, size)  # frees what the half line took
                    raise
            finally:
                os.close(fd)

    def save_global(
        self,
        params: ParamTree,
        round_done: int,
        *,
        final: bool = False,
        strategy_state: dict[str, Any] | None = None,
    ) -> None:
        """Save the global model after ``round_done``, then the job state (both atomic).

        Runs in the background; :meth:`flush` waits for it. With checkpoints, and for the
        ``final`` model, every call is written; otherwise a model is skipped when the last
        one written is less than ``save_interval`` seconds old (with an interval of 0, when
        a newer one comes before it starts, the newer one is written instead).
        With checkpoints, ``strategy_state`` (the strategy's :meth:`~Strategy.state`) is
        written with the model: its arrays to ``checkpoint/strategy-<k>.npz``, the rest
        into ``checkpoint.json``, which names both.
        """
        if self._checkpoints and strategy_state:
            # Written in the background while the strategy goes on (FedOpt updates its
            # moments in place): the checkpoint takes a copy of them as they are now.
            plain, trees = split_state(strategy_state)
            strategy_state = {**plain, **{k: map_arrays(np.array, v) for k, v in trees.items()}}
        state = {
            "round_done": round_done,
            "best_round": self.best_round,
            "best_value": self.best_value,
            "key_metric": self.key_metric,
        }

        def write_state() -> None:
            atomic_write_text(self.directory / "state.json", json.dumps(state, indent=2) + "\n")

        stage = getattr(self._format, "stage", None)
        if self._checkpoints or stage is None:

            def write() -> None:
                self._format.save(params, self.global_model_path)
                write_state()
                if self._checkpoints:
                    self._write_checkpoint(params, state, strategy_state or {})

            if self._checkpoints or self._due(final):
                self._writer.submit("global", write)
            return

        def write_then_publish() -> Callable[[], None]:
            # The bytes go to the page cache while the params are held (~a copy); the fsync
            # (seconds for a large model on a slow disk) runs after they are let go, so the
            # global model's memory can be reused meanwhile.
            staged = stage(params, self.global_model_path)

            def publish() -> None:
                staged.publish()
                write_state()

            return publish

        # The write of the model before this one must have let go of it: its memory is what
        # the next round's aggregate reuses (a pooled segment), instead of a new allocation.
        self._writer.wait_released("global")
        if self._due(final):
            self._writer.submit("global", write_then_publish)

    def _due(self, final: bool) -> bool:
        """Whether a global model is to be written now (see :meth:`save_global`)."""
        now = time.monotonic()
        if (
            not final
            and self._save_interval > 0
            and (now - self._last_save < self._save_interval or self._writer.busy_with("global"))
        ):
            return False
        self._last_save = now
        return True

    def _write_checkpoint(
        self, params: ParamTree, state: dict[str, Any], strategy_state: dict[str, Any]
    ) -> None:
        folder = self.directory / CHECKPOINT_DIR
        name = f"round-{state['round_done']}{self._format.suffix}"
        self._format.save(params, folder / name)  # the model first ...
        record = {**state, "path": name}
        if strategy_state:
            plain, arrays = split_state(strategy_state)
            record["strategy"] = plain
            if arrays:
                arrays_name = f"strategy-{state['round_done']}.npz"
                save_npz(arrays, folder / arrays_name)
                record["strategy_arrays"] = arrays_name
        # ... then the record that names it: it never points at a missing or partial file.
        atomic_write_text(self.directory / CHECKPOINT_FILE, json.dumps(record, indent=2) + "\n")
        keep = {name, record.get("strategy_arrays")}
        for old in [*folder.glob("round-*"), *folder.glob(".round-*"), *folder.glob("strategy-*"),
                    *folder.glob(".strategy-*")]:  # + a crash's temp files  # fmt: skip
            if old.name not in keep:
                old.unlink(missing_ok=True)

    def flush(self) -> None:
        """Wait until every model handed over so far is on disk."""
        self._writer.flush()

    def close(self) -> None:
        try:
            self._writer.close()
        finally:
            self._tb.close()
            for path in (self.global_model_path, self.best_model_path):
                spare_path(path).unlink(missing_ok=True)
