"""Bounded resources per peer: concurrent calls per identity, and streams that go idle.

* :class:`PeerSlots` counts the calls each peer (its certificate's name, or its
  connection without TLS) has in progress; one more than the limit is refused at once, so
  one peer cannot take every server thread.
* :class:`Watchdog` cancels a call whose stream has moved no chunk (in or out) for
  ``idle_timeout`` seconds, which frees its thread and what it holds. A stream that still
  moves bytes, however slowly, is never cut. The time a handler takes to answer (a long
  poll) does not count: only waiting on the peer does.

The stream being read bumps a counter per chunk (one attribute store); the watchdog thread
compares counters a few times per ``idle_timeout``, so the hot path reads no clock.

The caller's side keeps the same rule (:class:`~fedlift.transport.GrpcTransport`): a
call's ``timeout`` is the longest the call may go without a chunk moving either way, not
a deadline for the whole call, so one setting covers a long poll, a slow link and a dead
peer alike. Each stream gets its own limit (``Progress.limit``).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

from ..errors import ConfigError, ResourceLimitError

__all__ = ["PeerSlots", "Progress", "Watchdog"]

log = logging.getLogger("fedlift.transport")


class _Cancellable(Protocol):
    def cancel(self) -> None: ...


class Progress:
    """What a stream has moved so far; ``chunks`` is bumped per chunk by the stream."""

    __slots__ = ("chunks", "context", "expired", "idle_since", "label", "limit", "seen", "watched")

    def __init__(
        self, context: _Cancellable | None = None, label: str = "", limit: float | None = None
    ) -> None:
        self.chunks = 0
        self.context = context
        self.label = label
        self.limit = limit
        """Seconds this stream may stay idle (None: the watchdog's ``idle_timeout``)."""
        self.seen = 0
        self.idle_since = 0.0
        self.watched = True
        self.expired = False
        """Set when the watchdog cancelled the stream for idleness."""


class Watchdog:
    """Cancels streams that move nothing for ``idle_timeout`` seconds (see module doc)."""

    def __init__(self, idle_timeout: float, interval: float | None = None) -> None:
        if not (isinstance(idle_timeout, int | float) and idle_timeout > 0):
            raise ConfigError(
                f"idle_timeout must be a number of seconds > 0; received: {idle_timeout!r}."
            )
        self.idle_timeout = float(idle_timeout)
        self._interval = min(1.0, self.idle_timeout / 4) if interval is None else interval
        self._streams: set[Progress] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.cancelled = 0
        """How many streams were cancelled for idleness (for logs and tests)."""
        self._thread = threading.Thread(target=self._run, name="fedlift-idle-watch", daemon=True)
        self._thread.start()

    def watch(
        self, context: _Cancellable | None, label: str, limit: float | None = None
    ) -> Progress:
        progress = Progress(context, label, limit)
        progress.idle_since = time.monotonic()
        with self._lock:
            self._streams.add(progress)
        return progress

    def pause(self, progress: Progress) -> None:
        """Stop timing ``progress`` (the handler is working, not waiting on the peer)."""
        progress.watched = False

    def resume(self, progress: Progress) -> None:
        progress.seen = progress.chunks
        progress.idle_since = time.monotonic()
        progress.watched = True

    def done(self, progress: Progress) -> None:
        with self._lock:
            self._streams.discard(progress)

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            now = time.monotonic()
            with self._lock:
                streams = list(self._streams)
            for progress in streams:
                if not progress.watched:
                    continue
                if progress.chunks != progress.seen:
                    progress.seen = progress.chunks
                    progress.idle_since = now
                elif now - progress.idle_since >= (progress.limit or self.idle_timeout):
                    self.done(progress)
                    self.cancelled += 1
                    progress.expired = True
                    log.warning(
                        "cancelled a call %s: its stream moved nothing for %.1f s",
                        progress.label,
                        now - progress.idle_since,
                    )
                    if progress.context is not None:
                        progress.context.cancel()


class PeerSlots:
    """At most ``limit`` calls in progress per peer key."""

    def __init__(self, limit: int) -> None:
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ConfigError(f"max_calls_per_peer must be an int >= 1; received: {limit!r}.")
        self.limit = limit
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def enter(self, key: str) -> None:
        """Take a slot for ``key``, or raise ResourceLimitError when all are taken."""
        with self._lock:
            count = self._counts.get(key, 0)
            if count >= self.limit:
                raise ResourceLimitError(
                    f"{key} has {count} calls in progress already, the most one peer may "
                    f"have (max_calls_per_peer={self.limit}); the call was refused. Let "
                    f"calls finish before starting more. Received: call {count + 1} of {key}."
                )
            self._counts[key] = count + 1

    def leave(self, key: str) -> None:
        with self._lock:
            count = self._counts.get(key, 0) - 1
            if count > 0:
                self._counts[key] = count
            else:
                self._counts.pop(key, None)

    def in_use(self, key: str) -> int:
        with self._lock:
            return self._counts.get(key, 0)

    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())
