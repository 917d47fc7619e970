"""A site's client worker: connects to the server, unpacks the job's app, runs the script.

Run as ``python -m fedlift.client.worker --server HOST:PORT --site site-1`` (the simulator
starts one per site in ``WORKSPACE/site-N``). In-process mode the script runs as
``__main__`` in a thread of this process and talks to the worker through a
:class:`~fedlift.client._link.LocalLink`.
"""

from __future__ import annotations

import argparse
import collections
import io
import logging
import os
import queue
import runpy
import shlex
import socket
import sys
import threading
import time
import traceback
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from .._atomic import storage_errors
from .._malloc import tune_allocator
from .._paths import resolve_inside
from ..codec import (
    REMOTE_MIN_BYTES,
    Message,
    ResultEncoder,
    SegmentPool,
    decode_model,
    make_remote_probe,
    model_from_wire,
    model_to_wire,
    shm_available,
)
from ..errors import (
    ConfigError,
    ConnectionLostError,
    FedliftError,
    ProtocolError,
    TransportError,
)
from ..model import FLModel, ParamsType, map_arrays
from ..transport import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_SHM_MIN_BYTES,
    GrpcTransport,
    Transport,
    read_tls_files,
    tls_channel_credentials,
)
from ._link import ClientContext, LocalLink, Task, set_current_link
from ._service import ScriptProcess

__all__ = ["run_worker", "main", "unpack_app"]

log = logging.getLogger("fedlift.client")

SHARED_MEMORY_ENV = "FEDLIFT_SHARED_MEMORY"
"""Set to 1 (by the simulator) when the server runs on this host: payloads go by /dev/shm."""
SERVER_TOKEN_ENV = "FEDLIFT_SERVER_TOKEN"
"""The server's per-run secret (the simulator's); read once and removed from the environment,
so the site's script and its children never see it."""
_SCRIPT_EXIT_GRACE = 1.0  # after the job ended, how long the script may take to return
REMOTE_READS_ENV = "FEDLIFT_REMOTE_READS"
"""Set to 0 to make results go through shared memory even where the server could read them
from the worker's memory (:class:`~fedlift.codec.RemoteArray`)."""

_POLL_SECONDS = 5.0
_MAX_APP_BYTES = 2 << 30
_MAX_APP_FILES = 100_000


def _unsafe(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return (
        not name
        or name.startswith(("/", "\\"))
        or "\\" in name
        or "\x00" in name
        or PurePosixPath(name).is_absolute()
        or ".." in parts
        or (len(name) > 1 and name[0].isalpha() and name[1] == ":")  # C:\\...
    )


def unpack_app(
    archive: np.ndarray | bytes,
    target: Path,
    *,
    max_bytes: int = _MAX_APP_BYTES,
    max_files: int = _MAX_APP_FILES,
) -> Path:
    """Extract the job's app (a zip) into ``target``; refuses archives that escape it.

    Every member is checked before anything is written: a name that is absolute, holds
    ``..`` or a backslash, a symlink, a file that is also a folder, more than
    ``max_files`` members or sizes that claim more than ``max_bytes`` in all refuse the
    whole archive (:class:`~fedlift.errors.ProtocolError`). The claimed sizes are not
    trusted either: bytes are counted as they are written, and a member whose data does
    not match its header (size or CRC) is refused. Messages name members, never
    ``target``, so they may be sent to a peer.
    """
    data = archive.tobytes() if isinstance(archive, np.ndarray) else archive
    target.mkdir(parents=True, exist_ok=True)
    if not data:
        return target
    try:
        bundle = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as exc:
        raise ProtocolError(f"the job's app archive is not a valid zip file: {exc}") from None
    root = target.resolve()
    with bundle:
        members = bundle.infolist()
        if len(members) > max_files:
            raise ProtocolError(
                f"the job's app archive holds {len(members):,} members; at most "
                f"{max_files:,} are allowed."
            )
        claimed = 0
        files: set[str] = set()
        folders: set[str] = set()
        plan: list[tuple[zipfile.ZipInfo, Path]] = []
        for info in members:
            name = info.filename
            if _unsafe(name):
                raise ProtocolError(f"the job's app archive holds an unsafe path: {name!r:.200}")
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise ProtocolError(f"the job's app archive holds a symlink: {name!r:.200}")
            claimed += info.file_size
            if claimed > max_bytes:
                raise ProtocolError(
                    f"the job's app archive unpacks to more than {max_bytes:,} bytes "
                    f"(by the sizes it claims, at member {name!r:.200})."
                )
            destination = (root / Path(*PurePosixPath(name).parts)).resolve()
            if root not in destination.parents and destination != root:
                raise ProtocolError(f"the job's app archive path escapes: {name!r:.200}")
            key = PurePosixPath(name).as_posix().rstrip("/")
            parents = {p.as_posix() for p in PurePosixPath(key).parents if p.as_posix() != "."}
            if info.is_dir():
                folders.add(key)
            else:
                if destination == root or key in files:
                    raise ProtocolError(f"the job's app archive holds {name!r:.200} twice.")
                files.add(key)
            folders |= parents
            if files & folders:
                clash = sorted(files & folders)[0]
                raise ProtocolError(
                    f"the job's app archive holds {clash!r:.200} as a file and as a folder."
                )
            plan.append((info, destination))
        written = 0
        with storage_errors(target):  # disk full, read-only: one clear line
            for info, destination in plan:
                if info.is_dir():
                    destination.mkdir(parents=True, exist_ok=True)
                    continue
                destination.parent.mkdir(parents=True, exist_ok=True)
                if destination.is_dir():
                    raise ProtocolError(
                        f"the job's app archive member {info.filename!r:.200} would replace "
                        "a folder."
                    )
                try:
                    with bundle.open(info) as src, open(destination, "wb") as dst:
                        while chunk := src.read(1 << 20):
                            written += len(chunk)
                            if written > max_bytes:
                                raise ProtocolError(
                                    "the job's app archive unpacks to more than "
                                    f"{max_bytes:,} bytes."
                                )
                            dst.write(chunk)
                except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError,
                        RuntimeError) as exc:  # fmt: skip
                    destination.unlink(missing_ok=True)  # no partial member stays behind
                    raise ProtocolError(
                        f"the job's app archive member {info.filename!r:.200} is corrupt or not "
                        f"readable: {exc}"
                    ) from None
                except BaseException:
                    destination.unlink(missing_ok=True)
                    raise
    return target


def _user_traceback(exc: BaseException) -> str:
    """The script's traceback without the worker's and runpy's frames on top."""
    tb = exc.__traceback__
    internal = {os.path.abspath(__file__), os.path.abspath(runpy.__file__), "<frozen runpy>"}

    def is_internal(filename: str) -> bool:
        return filename in internal or os.path.abspath(filename) in internal

    while tb is not None and is_internal(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


class ScriptThread(threading.Thread):
    """Runs the user's script as ``__main__`` and reports how it ended to the link."""

    def __init__(self, script: Path, args: list[str], link: LocalLink, on_error: Any) -> None:
        super().__init__(name="fedlift-script", daemon=True)
        self.script = script
        self.args = args
        self.link = link
        self.on_error = on_error

    def run(self) -> None:
        error: str | None = None
        sys.argv = [str(self.script), *self.args]
        for path in (str(self.script.parent),):
            if path not in sys.path:
                sys.path.insert(0, path)
        try:
            runpy.run_path(str(self.script), run_name="__main__")
        except SystemExit as exc:
            if exc.code not in (None, 0):
                error = f"the script called sys.exit({exc.code!r})"
        except BaseException as exc:  # everything the script raises is reported
            error = _user_traceback(exc)
        if error is not None:
            sys.stderr.write(error if error.endswith("\n") else error + "\n")
            sys.stderr.flush()
            self.on_error(error)
        self.link.script_ended(error)


class Worker:
    """One site's connection to the server, for one job."""

    def __init__(
        self,
        transport: Transport,
        site: str,
        workspace: Path,
        shared_memory: bool = False,
        *,
        job_id: str | None = None,
        reconnect_seconds: float = 30.0,
    ) -> None:
        self.transport = transport
        self._job_id = job_id
        self._reconnect = reconnect_seconds
        self._shared = shared_memory
        self._outbox = SegmentPool(keep=1) if shared_memory else None
        self.site = site
        self.workspace = workspace
        self._reported = threading.Event()
        self._keep_last = False  # cross-site evaluation: keep the last trained model
        self._last_model: FLModel | None = None
        self._process: ScriptProcess | None = None
        self._stop_timeout = 60.0
        self._remote_reads = False  # set at registration (see register)
        self._encoder = ResultEncoder()  # compression the tasks ask for; top-k's feedback

    def _call(
        self,
        op: str,
        fields: dict[str, Any],
        arrays: list[np.ndarray] | None = None,
        timeout: float = 60.0,
    ) -> Message:
        routing = (
            {"site": self.site}
            if self._job_id is None
            else {
                "site": self.site,
                "job_id": self._job_id,
            }
        )
        return self.transport.call(Message(op, {**routing, **fields}, arrays or []), timeout)

    def report_error(self, text: str) -> None:
        if self._reported.is_set():
            return
        self._reported.set()
        try:
            self._call("client_error", {"error": text}, timeout=30)
        except FedliftError as exc:
            log.error("could not report the failure to the server: %s", exc)

    def _send_log(self, record: dict[str, Any]) -> None:
        # The record's own fields only: the routing (which site, which job) is the worker's.
        fields = {k: v for k, v in record.items() if k not in ("site", "job_id")}
        self._call("log", fields, timeout=30)

    def register(self, timeout: float) -> tuple[ClientContext, Message]:
        fields: dict[str, Any] = {"pid": os.getpid(), "host": socket.gethostname()}
        if self._shared and os.environ.get(REMOTE_READS_ENV, "1") != "0":
            fields["remote_probe"] = make_remote_probe()
        reply = self._call("register", fields, timeout=timeout)
        if reply.op != "welcome":
            raise ProtocolError(f"register: expected 'welcome' from the server, got {reply.op!r}")
        f = reply.fields
        if f.get("remote_reads") is True:
            # The server reads results where they lie: no copy into shared memory first.
            self._remote_reads = self.transport.enable_remote_reads()
        ctx = ClientContext(
            job_id=str(f.get("job_id")),
            site_name=self.site,
            site_index=int(f.get("site_index", 0)),
            num_sites=int(f.get("num_sites", 1)),
            config=dict(f.get("config") or {}),
        )
        self._keep_last = ctx.config.get("cross_site_eval") is True
        return ctx, reply

    def _retrying(self, op: str, call: Callable[[], Message]) -> Message:
        """``call()``, retried with backoff while the server cannot be reached (a dropped
        link, a flapping one, a restart), for up to ``reconnect_seconds``."""
        delay, deadline = 0.2, time.monotonic() + self._reconnect
        while True:
            try:
                return call()
            except TransportError as exc:
                if time.monotonic() > deadline:
                    raise ConnectionLostError(
                        f"{self.site} lost the server during {op!r} and could not reconnect "
                        f"for {self._reconnect:g} s (raise --reconnect-seconds for longer "
                        f"outages). Received: {exc}"
                    ) from None
                log.warning(
                    "%s: %r failed (%s); retrying in %.1f s", self.site, op, exc, delay
                )  # fmt: skip
                time.sleep(delay)  # backoff while disconnected; not on any hot path
                delay = min(delay * 2, 5.0)

    def _register_first(self, timeout: float) -> tuple[ClientContext, Message]:
        """:meth:`register`, retried while the link drops (for up to ``reconnect_seconds``)."""
        outcome: list[tuple[ClientContext, Message]] = []

        def attempt() -> Message:
            outcome[:] = [self.register(timeout)]
            return outcome[0][1]

        self._retrying("register", attempt)
        return outcome[0]

    def _poll(self) -> Message:
        """``get_task``, retried with backoff while the server is unreachable.

        A poll that failed may have carried a task that never arrived (the link dropped
        while the reply was on its way): the server counts it as handed out. So after a
        failure the site registers again first, which makes the server hand out again the
        task this site holds no result for (:meth:`_serve` skips one it already has).
        """
        lost = False

        def attempt() -> Message:
            nonlocal lost
            if lost:
                self._register_again()
            try:
                return self._call("get_task", {"wait": _POLL_SECONDS}, timeout=_POLL_SECONDS + 30)
            except TransportError:
                lost = True
                raise

        return self._retrying("get_task", attempt)

    def _register_again(self) -> None:
        try:
            self.register(timeout=_POLL_SECONDS + 30)
        except TransportError:
            raise
        except FedliftError as exc:  # a server that is just starting: it has nothing to resend
            log.info("%s: registering again after a lost poll was refused: %s", self.site, exc)

    def run(self, register_timeout: float = 120.0) -> int:
        ctx, welcome = self._register_first(register_timeout)
        runner = ctx.config.get("runner") or {}
        app_dir = unpack_app(welcome.arrays[0] if welcome.arrays else b"", self.workspace / "app")
        try:  # the server checked it too; a site trusts no peer with what it runs
            script = resolve_inside(
                app_dir, runner.get("script"), "the job's runner.script", "the job's app"
            )
        except ConfigError as exc:
            log.error("%s: %s", self.site, exc)
            self.report_error(f"{self.site} refused the job: {exc}")
            return 2
        if not script.is_file():
            text = f"the job's script {runner.get('script')!r:.200} is not in the job's app."
            self.report_error(text)
            return 2
        link = LocalLink(ctx, on_log=self._send_log, wait_delivery=True)
        self._stop_timeout = float(runner.get("stop_timeout", 60.0))
        args = shlex.split(str(runner.get("script_args", "")))
        if runner.get("launch_external_process"):
            process = ScriptProcess(
                str(runner.get("command") or "python3 -u"),
                script,
                args,
                app_dir,
                link,
                self.report_error,
                float(runner.get("init_timeout", 300.0)),
            )
            self._process = process
            log.info("%s: job %s, launching %s", self.site, ctx.job_id, runner.get("script"))
            try:
                process.start()
                return self._serve(link)
            finally:
                process.terminate(grace=0)
                process.close()
        set_current_link(link)
        if str(app_dir) not in sys.path:
            sys.path.insert(0, str(app_dir))
        thread = ScriptThread(script, args, link, self.report_error)
        log.info("%s: job %s, running %s in-process", self.site, ctx.job_id, runner.get("script"))
        if threading.current_thread() is not threading.main_thread():
            thread.start()
            return self._serve(link)
        return self._serve_beside(thread, link)

    def _serve_beside(self, script: ScriptThread, link: LocalLink) -> int:
        """Run the script in this (the main) thread and serve the server from another one.

        The script's arrays then come from glibc's main heap, which gets huge pages
        (``fedlift._malloc``), so the server reads results out of this process 2 MiB at a
        time; and the script may install signal handlers, as in a plain run. When the job
        ends and the script does not (or serving fails), that thread ends the process.
        """
        outcome: list[int] = []

        def serve() -> None:
            try:
                code = self._serve(link)
            except FedliftError as exc:
                log.error("%s: %s", self.site, exc)
                self.report_error(f"{type(exc).__name__}: {exc}")
                code = 1
            except BaseException:  # a bug here must not leave the script running alone
                log.exception("%s: the worker failed", self.site)
                code = 1
            outcome.append(code)
            if not link.wait_script(_SCRIPT_EXIT_GRACE):
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)  # the script outlived the job: leave without it

        server = threading.Thread(target=serve, name="fedlift-serve", daemon=True)
        server.start()
        script.run()
        server.join()
        return outcome[0] if outcome else 1

    def _poll_forever(self, events: queue.Queue[tuple[str, Any]], done: threading.Event) -> None:
        """Long-poll the server in the background, so a stop arrives even mid-task."""
        try:
            while not done.is_set():
                reply = self._poll()
                if reply.op == "wait":
                    continue
                events.put(("server", reply))
                if reply.op == "stop":
                    return
        except FedliftError as exc:
            events.put(("error", exc))

    def _serve(self, link: LocalLink) -> int:
        events: queue.Queue[tuple[str, Any]] = queue.Queue()
        done = threading.Event()
        taken: collections.deque[str] = collections.deque(maxlen=64)  # recent task ids
        link.on_script_end = lambda: events.put(("script_ended", None))
        poller = threading.Thread(
            target=self._poll_forever, args=(events, done), name="fedlift-poll", daemon=True
        )
        poller.start()
        try:
            while True:
                kind, payload = events.get()
                if kind == "error":
                    raise payload
                if kind == "script_ended":
                    if link.script_error is not None:
                        return 1
                    self.report_error(
                        "the script ended before the job did (it returned while the server "
                        "still had rounds to run). Keep the script in "
                        "`while flare.is_running():` until the job ends."
                    )
                    return 1
                reply: Message = payload
                if reply.op == "stop":
                    return self._stop(link, bool(reply.fields.get("failed")))
                if reply.op != "task":
                    raise ProtocolError(f"get_task: unexpected reply {reply.op!r}")
                task_id = str(reply.fields.get("task_id"))
                if task_id in taken:  # sent again after a lost poll; this site has it
                    log.info("%s: task %s arrived again; it is already taken", self.site, task_id)
                    continue
                taken.append(task_id)
                threading.Thread(
                    target=self._run_task, args=(link, reply), name="fedlift-task", daemon=True
                ).start()
        finally:
            done.set()

    def _stop(self, link: LocalLink, failed: bool) -> int:
        stale = link.busy  # the script still works on a task whose result nobody wants
        link.stop()
        grace = 3.0 if (failed or stale) else self._stop_timeout
        if not link.wait_script(grace):
            log.warning("%s: the script did not end %.0f s after the job stopped", self.site, grace)
            if self._process is not None:
                self._process.terminate(grace=0)
            return 1 if failed else 0
        return 1 if (failed or link.script_error) else 0

    def _run_task(self, link: LocalLink, reply: Message) -> None:
        """Hand one task to the script and send its answer back (in its own thread)."""
        fields = reply.fields
        task_id, name = str(fields.get("task_id")), str(fields.get("task_name"))
        try:
            model = decode_model(
                model_from_wire(fields.get("model") or {}, list(reply.arrays)),
                who="the server",
                error=ProtocolError,
            )
            request = self._encoder.request(model) if name == "train" else None
            if name == "submit_model" and self._keep_last:
                # Cross-site evaluation asks for this site's final local model: the last one
                # its script sent for training (the script is not asked again).
                last = self._last_model or FLModel(metrics={})
                model_fields, arrays = model_to_wire(last)
                result_fields = {"task_id": task_id, "model": model_fields}
                self._retrying(
                    "submit",
                    lambda: self._call(
                        "submit", result_fields, arrays, timeout=DEFAULT_IDLE_TIMEOUT
                    ),
                )
                return
            link.offer(Task(task_id, name, model))
            result = link.wait_result(task_id)
            if result is None:
                if not link.stopped and link.script_error is None:
                    self.report_error(
                        f"the script ended before the job did: task {name!r} of round "
                        f"{model.current_round} got no flare.send(). Keep the script in "
                        "`while flare.is_running():` until the job ends."
                    )
                return
            if self._keep_last and name == "train" and result.params is not None:
                local = result.params
                if result.params_type == ParamsType.DIFF and model.params is not None:
                    local = map_arrays(np.add, model.params, local)  # received + change
                self._last_model = FLModel(params=map_arrays(np.array, local))
            result = self._encoder.encode(result, model, request)
            model_fields, arrays = model_to_wire(result)
            del result
            arrays = self._in_outbox(arrays)
            # A result is sent until it is acknowledged: a link that drops mid-transfer costs
            # a resend, not the job. The server ignores a copy it already has (the site is
            # no longer active in that round, or the round is over).
            result_fields = {"task_id": task_id, "model": model_fields}
            self._retrying(
                "submit",
                lambda: self._call("submit", result_fields, arrays, timeout=DEFAULT_IDLE_TIMEOUT),
            )
        except FedliftError as exc:
            log.error("%s: task %s failed: %s", self.site, name, exc)
            self.report_error(f"{type(exc).__name__} while answering task {name!r}: {exc}")
        finally:
            link.delivered(task_id)  # the script's send() returns

    def _in_outbox(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Copy a result into this site's reusable shared-memory segment.

        The server reads a result where it lies and lets go of it before it sends the next
        task, so one segment serves every round and its pages stay mapped: no fresh memory
        per round (a server that still holds the last result gets a new segment, see
        :class:`~fedlift.codec.SegmentPool`). Small results and cross-host links use
        the socket.
        """
        size = sum(a.nbytes for a in arrays)
        if self._outbox is None or size < DEFAULT_SHM_MIN_BYTES:
            return arrays
        if self._remote_reads and size >= REMOTE_MIN_BYTES:
            return arrays  # the server reads them where they are
        specs = [
            (a.shape, a.dtype if a.dtype.byteorder in "|<=" else a.dtype.newbyteorder("<"))
            for a in arrays
        ]
        outbox = self._outbox.allocate(specs)
        for target, source in zip(outbox, arrays, strict=True):
            np.copyto(target, source)
        return outbox


def run_worker(
    server: str,
    site: str,
    workspace: Path | None = None,
    *,
    tls: tuple[Path, Path, Path] | None = None,
    job_id: str | None = None,
    reconnect_seconds: float = 30.0,
) -> int:
    """Serve one site until the job ends; returns the process exit status.

    With ``tls`` (the CA certificate, certificate and key files of a provisioned site's kit,
    which whoever launched the worker checked: ``fedlift client start``) the connection uses
    mutual TLS, and with ``job_id`` every request names the job (a long-running server runs
    many jobs). The worker takes the files, not the kit: reading a kit is deploy's part, and
    deploy sits above the client.
    """
    shared = os.environ.get(SHARED_MEMORY_ENV) == "1" and shm_available()
    credentials = None if tls is None else tls_channel_credentials(*read_tls_files(*tls))
    token = os.environ.pop(SERVER_TOKEN_ENV, None) or None
    transport = GrpcTransport(
        server, wait_for_ready=True, shared_memory=shared, credentials=credentials, token=token
    )
    worker = Worker(
        transport,
        site,
        Path(workspace or os.getcwd()),
        shared_memory=shared,
        job_id=job_id,
        reconnect_seconds=reconnect_seconds,
    )
    try:
        return worker.run()
    except FedliftError as exc:
        log.error("%s: %s", site, exc)
        worker.report_error(f"{type(exc).__name__}: {exc}")
        return 1
    finally:
        transport.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedlift.client.worker")
    parser.add_argument("--server", required=True, help="server address, host:port")
    parser.add_argument("--site", required=True, help="this site's name, e.g. site-1")
    parser.add_argument("--workspace", type=Path, default=None, help="default: current dir")
    parser.add_argument("--tls-ca", type=Path, default=None, help="mTLS: the project CA (PEM)")
    parser.add_argument("--tls-cert", type=Path, default=None, help="mTLS: this site's cert")
    parser.add_argument("--tls-key", type=Path, default=None, help="mTLS: this site's key")
    parser.add_argument("--job-id", default=None, help="the job, on a long-running server")
    parser.add_argument(
        "--reconnect-seconds",
        type=float,
        default=30.0,
        help="how long to retry while the server is unreachable",
    )
    args = parser.parse_args(argv)
    files = (args.tls_ca, args.tls_cert, args.tls_key)
    if any(f is not None for f in files) and not all(f is not None for f in files):
        parser.error(
            "mutual TLS needs all three of --tls-ca, --tls-cert and --tls-key (the files of "
            f"the site's kit). Received: --tls-ca={args.tls_ca} --tls-cert={args.tls_cert} "
            f"--tls-key={args.tls_key}."
        )
    tune_allocator()
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    code = run_worker(
        args.server,
        args.site,
        args.workspace,
        tls=files if args.tls_ca is not None else None,
        job_id=args.job_id,
        reconnect_seconds=args.reconnect_seconds,
    )
    sys.stdout.flush()
    sys.stderr.flush()
    # The script thread may hold non-daemon threads (TF, data loaders): leave without them.
    os._exit(code)
