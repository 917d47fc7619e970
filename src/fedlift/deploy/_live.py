"""The live view of a deployment: a read-only HTTPS page of the server's jobs, each running
job's round and curves, and the sites with when each was last heard from.

``fedlift server start KIT --web HOST:PORT`` runs it beside the FL server, in the same
process, on an event-loop thread of its own. The stack is aiohttp's low-level server on
asyncio: one thread serves every browser however slowly it reads, without a thread per
connection, and the TLS peer certificate is at hand for access control. It never blocks
the FL server: the snapshot of the server's state (:meth:`DeployServer.snapshot`, a copy
taken under the server's lock in microseconds) and the curves (matplotlib, re-drawn only
when a job's ``metrics.jsonl`` changed) are made on one worker thread, never on gRPC's.

Access: admins of the project only, by their client certificate (mutual TLS: one not
issued by the project CA fails the handshake; a site's, a revoked one, or none gets 403),
or by a token from ``fedlift web-token ADMIN_KIT`` (:mod:`._webtoken`), given once as
``/?token=...`` and then held in a session cookie (``HttpOnly; Secure; SameSite=Strict``).

Bounded per peer: at most :data:`MAX_CONNECTIONS` connections, :data:`MAX_PER_IP` from one
address; a TLS handshake must end within 5 s, a request within :data:`REQUEST_SECONDS`, and
a connection lives at most :data:`CONNECTION_SECONDS` (the page reconnects as it polls), so
a client that reads one byte a second holds a few KB for half a minute, then is cut off.
Only GET and HEAD, with small headers and no body.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import logging
import os
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509

from .._json import finite_json
from ..errors import ConfigError, PermissionDeniedError
from ._identity import identity_of
from ._live_page import live_page
from ._webtoken import verify_web_token

if TYPE_CHECKING:
    from aiohttp import web

    from ._server import DeployServer

__all__ = [
    "CONNECTION_SECONDS",
    "MAX_CONNECTIONS",
    "MAX_PER_IP",
    "REQUEST_SECONDS",
    "LiveView",
]

log = logging.getLogger("fedlift.server")

MAX_CONNECTIONS = 64
MAX_PER_IP = 8
REQUEST_SECONDS = 10.0
CONNECTION_SECONDS = 30.0
_HANDSHAKE_SECONDS = 5.0
_MAX_SESSIONS = 256
_COOKIE = "fedlift_session"
_MAX_HEADER = 8190


@dataclass
class _Session:
    admin: str
    serial: int
    """The serial number of the certificate that signed the token (checked against the
    revocations at every request: revoking the admin ends the session too)."""
    expires: float


class _Guard(asyncio.Protocol):
    """One connection: counted against the limits before aiohttp sees a byte of it, and
    cut off at the end of its lifetime; the HTTP itself is aiohttp's handler's."""

    def __init__(self, view: LiveView, inner: asyncio.Protocol) -> None:
        self._view, self._inner = view, inner
        self._ip: str | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not isinstance(transport, asyncio.Transport):  # a stream server's are
            transport.close()
            return
        peer = transport.get_extra_info("peername")
        ip = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        if not self._view._admit_connection(ip):
            transport.abort()
            return
        self._ip = ip
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(CONNECTION_SECONDS, transport.abort)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._ip is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._ip is not None else None

    def pause_writing(self) -> None:
        if self._ip is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._ip is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._ip is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._view._release_connection(self._ip)
        self._ip = None
        self._inner.connection_lost(exc)


def _ssl_context(server: DeployServer) -> ssl.SSLContext:
    kit = server.kit
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(kit.cert, kit.key)
    context.load_verify_locations(cafile=str(kit.ca))
    # A certificate is asked for, not required (a browser with a token has none); one that
    # is presented must chain to the project CA, or the handshake fails.
    context.verify_mode = ssl.CERT_OPTIONAL
    return context


def _bind(address: str) -> socket.socket:
    host, _, port_text = address.rpartition(":")
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(
            f"--web must be HOST:PORT, e.g. 0.0.0.0:8443. Received: --web {address!r}"
        ) from None
    if not host or not 0 <= port <= 65535:
        raise ConfigError(
            f"--web must be HOST:PORT, e.g. 0.0.0.0:8443. Received: --web {address!r}"
        )
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    sock.setblocking(False)
    return sock


class LiveView:
    """The live view of ``server`` on ``address`` (``HOST:PORT``; port 0 picks one):
    :meth:`start` binds and serves (raises ``OSError`` when the port is taken), :attr:`url`
    is where, :meth:`stop` ends it."""

    def __init__(self, server: DeployServer, address: str) -> None:
        try:
            import aiohttp  # noqa: F401  (checked here: the error names the extra)
        except ImportError:
            raise ConfigError(
                "the live view (--web) needs aiohttp, which is not installed: "
                "pip install 'fedlift[web]'."
            ) from None
        self._server = server
        self._address = address
        self._context = _ssl_context(server)
        self._lock = threading.Lock()
        self._connections: collections.Counter[str] = collections.Counter()
        self._sessions: collections.OrderedDict[str, _Session] = collections.OrderedDict()
        self._curves: dict[str, tuple[tuple[int, int], bytes]] = {}
        self._worker = concurrent.futures.ThreadPoolExecutor(1, "fedlift-live")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.refused = 0
        """Connections refused by the limits so far."""
        self.url = ""

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> str:
        sock = _bind(self._address)
        host, port = sock.getsockname()[:2]
        shown = self._server.kit.name if host in ("0.0.0.0", "::") else host
        self.url = f"https://{shown}:{port}/"
        self._thread = threading.Thread(
            target=self._run, args=(sock,), name="fedlift-live-view", daemon=True
        )
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        log.info("live view on %s", self.url)
        return self.url

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].rstrip("/")) if self.url else 0

    def stop(self) -> None:
        loop, stopped = self._loop, self._stopped
        if loop is not None and stopped is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stopped.set)
        if self._thread is not None:
            self._thread.join(10)
        self._worker.shutdown(wait=False, cancel_futures=True)

    def _run(self, sock: socket.socket) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(sock))
        except BaseException as exc:  # surfaced by start(), or logged once it has returned
            self._error = exc
            if self._ready.is_set():
                log.error("the live view stopped: %r", exc)
            self._ready.set()
        finally:
            loop.close()

    async def _serve(self, sock: socket.socket) -> None:
        from aiohttp import web

        self._stopped = asyncio.Event()
        handler = web.Server(
            self._handle,
            access_log=None,
            keepalive_timeout=5.0,
            max_line_size=_MAX_HEADER,
            max_field_size=_MAX_HEADER,
            max_headers=64,
        )
        loop = asyncio.get_running_loop()
        listener = await loop.create_server(
            lambda: _Guard(self, handler()),
            sock=sock,
            ssl=self._context,
            ssl_handshake_timeout=_HANDSHAKE_SECONDS,
        )
        self._ready.set()
        try:
            await self._stopped.wait()
        finally:
            listener.close()
            await handler.shutdown(1.0)
            listener.close()

    # ------------------------------------------------------------------ limits
    def _admit_connection(self, ip: str) -> bool:
        with self._lock:
            total = sum(self._connections.values())
            if total >= MAX_CONNECTIONS or self._connections[ip] >= MAX_PER_IP:
                self.refused += 1
                return False
            self._connections[ip] += 1
            return True

    def _release_connection(self, ip: str) -> None:
        with self._lock:
            self._connections[ip] -= 1
            if self._connections[ip] <= 0:
                del self._connections[ip]

    @property
    def connections(self) -> int:
        with self._lock:
            return sum(self._connections.values())

    # ------------------------------------------------------------------ access
    def _admin_by_certificate(self, request: web.BaseRequest) -> str | None:
        """The admin whose verified certificate this connection presented (None: none);
        raises PermissionDeniedError for a certificate that is not an admin's."""
        transport = request.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            return None
        identity = identity_of(x509.load_der_x509_certificate(der))
        if identity.role != "admin" or identity.project != self._server.kit.project:
            raise PermissionDeniedError(
                f"{identity.role or 'a certificate without a role'} {identity.name!r} may not "
                "open the live view: it needs an admin's certificate of this project."
            )
        self._server.revocations.check_serial(identity.serial or -1, identity.name, "admin")
        return identity.name

    def _admin_by_session(self, request: web.BaseRequest) -> str | None:
        sid = request.cookies.get(_COOKIE)
        if not sid:
            return None
        with self._lock:
            session = self._sessions.get(sid)
            if session is None or session.expires <= time.time():
                self._sessions.pop(sid, None)
                return None
        try:
            self._server.revocations.check_serial(session.serial, session.admin, "admin")
        except PermissionDeniedError:
            with self._lock:
                self._sessions.pop(sid, None)
            raise
        return session.admin

    def _new_session(self, admin: str, serial: int, expires: float) -> str:
        sid = secrets.token_urlsafe(32)
        with self._lock:
            self._sessions[sid] = _Session(admin, serial, expires)
            while len(self._sessions) > _MAX_SESSIONS:
                self._sessions.popitem(last=False)
        return sid

    # ------------------------------------------------------------------ requests
    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:

        try:
            return await asyncio.wait_for(self._route(request), REQUEST_SECONDS)
        except PermissionDeniedError as exc:
            return _text(403, f"403 Forbidden: {exc}\n" + _HOW_TO_OPEN)
        except TimeoutError:
            return _text(503, "503: the server took too long; try again.\n")

    async def _route(self, request: web.BaseRequest) -> web.StreamResponse:
        from aiohttp import web

        if request.method not in ("GET", "HEAD"):
            return _text(405, "405: the live view is read-only (GET only).\n")
        if request.content_length or request.body_exists:  # chunked bodies too
            return _text(413, "413: requests carry no body.\n")
        admin = self._admin_by_certificate(request) or self._admin_by_session(request)
        token = request.query.get("token")
        if admin is None and token is not None:
            loop = asyncio.get_running_loop()
            identity, expires = await loop.run_in_executor(
                self._worker,
                lambda: verify_web_token(token, self._server.kit, self._server.revocations),
            )
            sid = self._new_session(identity.name, identity.serial or -1, expires)
            reply = web.Response(status=303, headers={"Location": "/", **_HEADERS})
            max_age = max(0, int(expires - time.time()))
            reply.set_cookie(_COOKIE, sid, max_age=max_age, path="/", secure=True,
                             httponly=True, samesite="Strict")  # fmt: skip
            return reply
        if admin is None:
            raise PermissionDeniedError("no admin certificate and no valid session.")
        path = request.path
        if path == "/":
            nonce = secrets.token_urlsafe(16)
            csp = (
                f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
                "img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; "
                "frame-ancestors 'none'"
            )
            title = f"fedlift · {self._server.kit.project}"
            return web.Response(
                text=live_page(nonce, title),
                content_type="text/html",
                headers={**_HEADERS, "Content-Security-Policy": csp, "Cache-Control": "no-store"},
            )
        if path == "/api/state":
            state = await self._in_worker(self._server.snapshot)
            body = json.dumps(finite_json(state), allow_nan=False, default=str)
            return web.Response(
                text=body,
                content_type="application/json",
                headers={**_HEADERS, "Cache-Control": "no-store"},
            )
        if path.startswith("/api/curves/") and path.endswith(".svg"):
            job_id = path.removeprefix("/api/curves/").removesuffix(".svg")
            svg = await self._in_worker(lambda: self._curves_of(job_id))
            if svg is None:
                return _text(404, "404: no such job, or nothing to draw yet.\n")
            return web.Response(
                body=svg,
                content_type="image/svg+xml",
                headers={
                    **_HEADERS,
                    "Cache-Control": "private, max-age=60",
                    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
                },
            )
        return _text(404, "404: not found.\n")

    async def _in_worker(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn)

    def _curves_of(self, job_id: str) -> bytes | None:
        """The job's curves as SVG, drawn again only when its metrics file changed."""
        metrics = self._server.metrics_file(job_id)
        if metrics is None:
            return None
        try:
            stat = metrics.stat()
        except OSError:
            return None
        stamp = (stat.st_size, stat.st_mtime_ns)
        cached = self._curves.get(job_id)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        from ..report import curves_svg

        svg, _ = curves_svg(Path(os.fspath(metrics.parent)))
        if not svg:
            return None
        data = svg.encode("utf-8")
        if len(self._curves) >= 32:
            self._curves.pop(next(iter(self._curves)))
        self._curves[job_id] = (stamp, data)
        return data


def _text(status: int, text: str) -> web.Response:
    from aiohttp import web

    return web.Response(status=status, text=text, content_type="text/plain", headers=_HEADERS)


_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Strict-Transport-Security": "max-age=31536000",
}

_HOW_TO_OPEN = (
    "Open the live view with an admin's certificate of this project (mutual TLS), or with "
    "a token: run `fedlift web-token ADMIN_KIT` and open the URL it prints.\n"
)
