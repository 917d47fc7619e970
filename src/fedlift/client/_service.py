"""External-process mode, worker side: launch the script and serve its Client API calls.

The worker starts a gRPC listener on a private Unix socket, launches
``command script script_args`` with the address and a per-run secret token in its
environment (never its argv: ``/proc/PID/cmdline`` is world-readable), and answers the
script's operations. The listener checks the token (call metadata) before it reads a byte
of a call, so a process that is not the script cannot make the worker decode a message
(and so open or unlink shared memory):

``hello``     -> ``context`` (job, site, config); the first call of ``flare.init()``
``next_task`` -> ``task`` / ``stop`` / ``none`` (long poll; every rank sees every task)
``submit``    -> ``ok`` (only rank 0's answer goes to the server)
``log``       -> ``ok``
``error``     -> ``ok`` (a rank's uncaught exception, with its traceback: the site's error
names it, not only the launcher's summary, and fails at once if the launcher lingers)

The subprocess lives for the whole job, its output is relayed line by line, and how it ends
(clean exit, crash, signal, never calling init) reaches the server within seconds.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from ..codec import Message, check_log_record, model_from_wire, model_to_wire, shm_available
from ..errors import ConfigError, ProtocolError
from ..transport import GrpcListener
from ._link import LocalLink, Task
from ._tree import stop_tree
from ._watchdog import WORKER_PID_ENV

__all__ = ["ENV_ADDRESS", "ENV_TOKEN", "ScriptProcess", "ScriptService"]

log = logging.getLogger("fedlift.client")

ENV_ADDRESS = "FEDLIFT_CLIENT_ADDRESS"
ENV_TOKEN = "FEDLIFT_CLIENT_TOKEN"
_MAX_WAIT = 30.0
_TAIL = 40
_RANK_ERROR_GRACE = 5.0


class ScriptService:
    """Answers the external script's Client API calls from the worker's :class:`LocalLink`."""

    def __init__(self, link: LocalLink, on_error: Callable[[str], None] | None = None) -> None:
        self._link = link
        self._on_error = on_error
        self._cond = threading.Condition()
        self._seq = 0
        self._task: Task | None = None
        self._stopped = False
        self.hello = threading.Event()
        threading.Thread(target=self._pump, name="fedlift-task-pump", daemon=True).start()

    def _pump(self) -> None:
        """Move tasks from the link to the script's ranks (one consumer of the link)."""
        while True:
            task = self._link.next_task(None)
            with self._cond:
                if task is None:
                    self._stopped = True
                    self._cond.notify_all()
                    return
                self._seq += 1
                self._task = task
                self._cond.notify_all()

    def handle(self, request: Message) -> Message:
        fields = request.fields
        rank = str(fields.get("rank", "0"))
        if request.op == "hello":
            self.hello.set()
            ctx = self._link.context
            return Message(
                "context",
                {
                    "job_id": ctx.job_id,
                    "site_name": ctx.site_name,
                    "site_index": ctx.site_index,
                    "num_sites": ctx.num_sites,
                    "config": ctx.config,
                },
            )
        if request.op == "next_task":
            return self._next_task(fields)
        if request.op == "submit":
            task_id = fields.get("task_id")
            if not isinstance(task_id, str):
                raise ProtocolError("submit needs a task_id string.")
            if rank == "0":
                self._link.submit(
                    task_id, model_from_wire(fields.get("model") or {}, list(request.arrays))
                )
            return Message("ok")
        if request.op == "log":
            self._link.log(check_log_record(fields))
            return Message("ok")
        if request.op == "error":
            text = fields.get("error")
            if not isinstance(text, str):
                raise ProtocolError("error needs the traceback as a string.")
            if self._on_error is not None:
                self._on_error(f"rank {rank} of the script raised:\n{text[-20_000:]}\n")
            return Message("ok")
        if request.op == "bye":
            if rank == "0":
                self._link.stop()
            return Message("ok")
        raise ProtocolError(f"unknown Client API operation {request.op!r}.")

    def _next_task(self, fields: dict[str, Any]) -> Message:
        after = fields.get("after", 0)
        wait = fields.get("wait", _MAX_WAIT)
        if not isinstance(after, int) or not isinstance(wait, int | float):
            raise ProtocolError("next_task needs an int 'after' and a numeric 'wait'.")
        deadline = time.monotonic() + min(max(float(wait), 0.0), _MAX_WAIT)
        with self._cond:
            while True:
                if self._task is not None and self._seq > after:
                    task = self._task
                    model_fields, arrays = model_to_wire(task.model)
                    return Message(
                        "task",
                        {
                            "seq": self._seq,
                            "task_id": task.task_id,
                            "task_name": task.name,
                            "model": model_fields,
                        },
                        arrays,
                    )
                if self._stopped:
                    return Message("stop")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return Message("none")
                self._cond.wait(remaining)


def _parent_death_signal() -> Callable[[], None] | None:
    """A preexec function that makes the child get SIGKILL if the worker dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def set_signal() -> None:
        prctl(pr_set_pdeathsig, signal.SIGKILL)

    return set_signal


def _relay(stream: IO[bytes], sink: IO[str], tail: collections.deque[str] | None) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", errors="replace")
        if tail is not None:
            tail.append(line)
        sink.write(line)
        sink.flush()
    stream.close()


class ScriptProcess:
    """The external script: launched once per job, watched, stopped, never orphaned."""

    def __init__(
        self,
        command: str,
        script: Path,
        script_args: list[str],
        app_dir: Path,
        link: LocalLink,
        on_error: Callable[[str], None],
        init_timeout: float,
    ) -> None:
        argv = shlex.split(command)
        if not argv:
            raise ConfigError("ScriptRunner(command=...) is empty; use e.g. 'python3 -u'.")
        if os.path.basename(argv[0]) in ("python", "python3"):
            argv[0] = sys.executable  # the worker's interpreter: the script sees fedlift
        self.argv = [*argv, str(script), *script_args]
        self.link = link
        self.on_error = on_error
        self.init_timeout = init_timeout
        self.tail: collections.deque[str] = collections.deque(maxlen=_TAIL)
        self._dir = Path(tempfile.mkdtemp(prefix="fedlift-"))
        self._token = secrets.token_hex(32)
        self._rank_errors: list[str] = []
        self.service = ScriptService(link, self._rank_failed)
        self._listener = GrpcListener(
            self.service.handle,
            f"unix:{self._dir / 'client.sock'}",
            shared_memory=shm_available(),
            token=self._token,
            # All ranks share one peer name on a Unix socket; the token already proves them.
            max_calls_per_peer=64,
        )
        self._app_dir = app_dir
        self._script = script
        self.process: subprocess.Popen[bytes] | None = None

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        paths = [str(self._script.parent), str(self._app_dir)]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
        env[ENV_ADDRESS] = self._listener.address
        env[ENV_TOKEN] = self._token
        env[WORKER_PID_ENV] = str(os.getpid())
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self) -> None:
        try:
            self.process = subprocess.Popen(
                self.argv,
                cwd=os.getcwd(),
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                preexec_fn=_parent_death_signal(),
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot launch the script with {shlex.join(self.argv)!r}: {exc}. Check "
                "ScriptRunner(command=...)."
            ) from None
        log.info("launched %s (pid %d)", shlex.join(self.argv), self.process.pid)
        out = threading.Thread(
            target=_relay, args=(self.process.stdout, sys.stdout, None), daemon=True
        )
        err = threading.Thread(
            target=_relay, args=(self.process.stderr, sys.stderr, self.tail), daemon=True
        )
        out.start()
        err.start()
        threading.Thread(target=self._watch, args=(out, err), daemon=True).start()
        threading.Thread(target=self._watch_init, daemon=True).start()

    def _rank_failed(self, text: str) -> None:
        """A rank raised: its traceback goes into the site's error when the launcher exits,
        or on its own if the launcher still runs 5 s later (torchrun waits up to 30 s for
        the other ranks before it gives up)."""
        self._rank_errors.append(text)
        if len(self._rank_errors) > 1:
            return
        process = self.process

        def report_if_lingering() -> None:
            if process is None:
                return
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(_RANK_ERROR_GRACE)
                return
            if not self.link.stopped:
                self.on_error(text + "(the launcher still runs; it is being stopped)")

        threading.Thread(target=report_if_lingering, daemon=True).start()

    def _watch(self, out: threading.Thread, err: threading.Thread) -> None:
        process = self.process
        if process is None:
            return
        code = process.wait()
        out.join(5)
        err.join(5)
        error: str | None = None
        if code != 0 and not self.link.stopped:
            how = f"exited with status {code}" if code > 0 else f"was killed by signal {-code}"
            error = (
                f"the script process {how} ({shlex.join(self.argv)}).\n"
                + "".join(self._rank_errors[:2])
                + f"Last lines of its stderr:\n{''.join(self.tail)}"
            )
            self.on_error(error)
        self.link.script_ended(error)

    def _watch_init(self) -> None:
        if self.service.hello.wait(self.init_timeout):
            return
        process = self.process
        if process is None or process.poll() is not None:
            return
        self.on_error(
            f"the script did not call flare.init() within {self.init_timeout:g} s of starting "
            f"({shlex.join(self.argv)}). Call flare.init() early in the script, or raise "
            "ScriptRunner(init_timeout=...) if it loads data for longer first."
        )
        self.terminate(grace=0)

    def terminate(self, grace: float) -> None:
        """Wait ``grace`` s for the script to end, then end its whole process tree: SIGTERM,
        then SIGKILL to what is left 5 s later (:func:`~fedlift.client._tree.stop_tree`).

        The tree, not the process group: ``torchrun`` starts each rank in a session of its
        own. ``torchrun`` answers SIGTERM by sending SIGTERM to its ranks and waiting 30 s
        for them; a rank that ignores it would outlive a launcher killed after 5 s, so the
        ranks are signalled by PID as well. (A rank whose launcher died unseen, or whose
        worker is SIGKILLed, ends through its own watch on the worker:
        :mod:`~fedlift.client._watchdog`.)
        """
        process = self.process
        if process is None:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(grace)
        if process.poll() is not None:
            return
        log.warning("the script did not exit; ending its process tree")
        left = stop_tree(process.pid)
        if left:
            log.error("the script's processes %s survived SIGKILL", left)

    def close(self) -> None:
        self._listener.stop(grace=0.5)
        shutil.rmtree(self._dir, ignore_errors=True)
