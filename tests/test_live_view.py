"""The live view's boundary, attacked for real: real kits from ``fedlift provision``, real TLS
over loopback (``ssl`` + ``http.client`` and raw sockets) against a DeployServer serving
``web="127.0.0.1:0"``.

Who gets in (an admin's certificate, a token's session; not a site, not another CA's
lookalike, not a revoked admin, not a forged, foreign, expired or over-long token), what the
page and the state say (CSP with a nonce, no key material, no paths outside the store), and
what hostile clients cannot do: stall or flood connections until a job's rounds or another
admin wait on them, or keep a connection past its lifetime.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import errno
import http.client
import http.cookies
import json
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedlift.cli import main
from fedlift.deploy import DeployServer, load_kit, make_web_token, provision
from fedlift.deploy import _live as live_module
from fedlift.deploy._live import LiveView
from fedlift.deploy._provision import issue_certificate, revoke
from fedlift.deploy._tls import Revocations
from fedlift.deploy._webtoken import MAX_TOKEN_HOURS, verify_web_token
from fedlift.errors import ConfigError, PermissionDeniedError
from test_deploy_server import (
    ADMIN,
    SITES,
    Party,
    Site,
    free_port,
    job_zip,
    make_job,
    status,
    wait_state,
)

EVE = "eve@org"  # a second admin, the one revoked
CONTEXT = b"fedlift-web-token/1."
REFUSED = (ssl.SSLError, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)
"""How a refused TLS connection shows: a failed handshake, a reset, or a cut mid-write
(http.client.RemoteDisconnected is a ConnectionResetError)."""


# ------------------------------------------------------------------------------- helpers


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[tuple[Path, DeployServer]]:
    kits = tmp_path / "kits"
    provision("demo", f"localhost:{free_port()}", SITES, [ADMIN, EVE], kits)
    with DeployServer(
        kits / "server", tmp_path / "ws", address="127.0.0.1:0", web="127.0.0.1:0"
    ) as server:
        assert server.live is not None and server.live.port > 0
        yield kits, server


def live_of(deployment: tuple[Path, DeployServer]) -> tuple[Path, DeployServer, LiveView]:
    kits, server = deployment
    assert server.live is not None
    return kits, server, server.live


def tls_context(kits: Path, cert: Path | None = None) -> ssl.SSLContext:
    """A client that trusts only the project CA (and checks the server's name), showing
    the certificate in folder ``cert`` (cert.pem, key.pem) if one is given."""
    context = ssl.create_default_context(cafile=str(kits / "ca" / "ca.pem"))
    if cert is not None:
        context.load_cert_chain(cert / "cert.pem", cert / "key.pem")
    return context


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    kits: Path,
    port: int,
    path: str = "/",
    *,
    cert: Path | None = None,
    cookie: str | None = None,
    method: str = "GET",
    body: bytes | None = None,
    source: str = "127.0.0.1",
    timeout: float = 10.0,
) -> Reply:
    conn = http.client.HTTPSConnection(
        "127.0.0.1",
        port,
        context=tls_context(kits, cert),
        timeout=timeout,
        source_address=(source, 0),
    )
    try:
        headers = {"Cookie": f"{live_module._COOKIE}={cookie}"} if cookie else {}
        conn.request(method, path, body=body, headers=headers)
        reply = conn.getresponse()
        return Reply(reply.status, reply.headers, reply.read())
    finally:
        conn.close()


def outcome(kits: Path, port: int, path: str = "/api/state", **kw: Any) -> int | str:
    """The HTTP status, or "refused" when TLS refuses the connection."""
    try:
        return request(kits, port, path, **kw).status
    except REFUSED:
        return "refused"


def session_of(reply: Reply) -> str:
    cookie = http.cookies.SimpleCookie(reply.headers["Set-Cookie"])
    return cookie[live_module._COOKIE].value


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def cert_der(cert_pem: Path) -> bytes:
    cert = x509.load_pem_x509_certificates(cert_pem.read_bytes())[0]  # the leaf
    return cert.public_bytes(serialization.Encoding.DER)


def signed_token(key_pem: Path, payload: dict[str, Any]) -> str:
    """A token in fedlift's format, signed with the key in ``key_pem`` (whoever holds it)."""
    key = serialization.load_pem_private_key(key_pem.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    body = b64(json.dumps(payload, separators=(",", ":")).encode())
    signature = key.sign(CONTEXT + body.encode("ascii"), ec.ECDSA(hashes.SHA256()))
    return f"v1.{body}.{b64(signature)}"


def claims(cert: Path, *, aud: str = "localhost", hours: float = 1.0) -> dict[str, Any]:
    return {
        "aud": aud,
        "exp": int(time.time() + hours * 3600),
        "cert": base64.b64encode(cert_der(cert / "cert.pem")).decode(),
    }


def lookalike_admin(kits: Path, out: Path, *, same_key: bool) -> Path:
    """An admin certificate of ANOTHER CA that copies everything it can: a CA of the same
    name (subject) as the project's, a leaf with the admin's exact subject, and optionally
    the admin's own public key (its private key too, as if stolen): only the CA's signature
    differs. Written as a kit-like folder (cert.pem holds the leaf and the fake CA)."""
    real_ca = x509.load_pem_x509_certificate((kits / "ca" / "ca.pem").read_bytes())
    admin = x509.load_pem_x509_certificate((kits / ADMIN / "cert.pem").read_bytes())
    fake_key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    fake_ca = (
        x509.CertificateBuilder()
        .subject_name(real_ca.subject)
        .issuer_name(real_ca.subject)
        .public_key(fake_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(fake_key.public_key()), critical=False
        )
        .sign(fake_key, hashes.SHA256())
    )
    stolen = serialization.load_pem_private_key((kits / ADMIN / "key.pem").read_bytes(), None)
    assert isinstance(stolen, ec.EllipticCurvePrivateKey)
    leaf, key = issue_certificate(
        fake_ca,
        fake_key,
        name=ADMIN,
        role="admin",
        project="demo",
        not_before=now - dt.timedelta(days=1),
        not_after=now + dt.timedelta(days=30),
        key=stolen if same_key else None,
    )
    assert leaf.subject == admin.subject and leaf.issuer == admin.issuer
    out.mkdir(parents=True)
    pem = serialization.Encoding.PEM
    (out / "cert.pem").write_bytes(leaf.public_bytes(pem) + b"\n" + fake_ca.public_bytes(pem))
    (out / "key.pem").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return out


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until ``predicate`` held (fails after ``timeout``)."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - start


class Slow:
    """A hostile connection from ``source``: the TLS handshake completes, then either half
    a request line and nothing more, or (``pipeline``) that many GETs sent at once with a
    tiny receive buffer, and not one byte of the answers read."""

    def __init__(
        self,
        kits: Path,
        port: int,
        *,
        source: str = "127.0.0.1",
        cert: Path | None = None,
        pipeline: int = 0,
    ) -> None:
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if pipeline:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        raw.bind((source, 0))
        raw.settimeout(10)
        raw.connect(("127.0.0.1", port))
        self.sock = tls_context(kits, cert).wrap_socket(raw, server_hostname="127.0.0.1")
        if pipeline:
            self.sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * pipeline)
        else:
            self.sock.sendall(b"GET /api/sta")

    def closed_by_server(self, timeout: float) -> float:
        """Seconds until the server closed this connection (reading only to see that)."""
        start = time.monotonic()
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
        except TimeoutError:
            raise AssertionError(f"the server kept the connection past {timeout} s") from None
        except REFUSED:
            pass
        return time.monotonic() - start

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def refused_at_once(kits: Path, port: int, source: str = "127.0.0.1") -> tuple[bool, float]:
    """(whether an admin's connection from ``source`` was closed without an answer, and how
    long that took): it completes what handshake it can, asks for the state, reads."""
    start = time.monotonic()
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.bind((source, 0))
    raw.settimeout(5)
    try:
        raw.connect(("127.0.0.1", port))
        with tls_context(kits, kits / ADMIN).wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            sock.sendall(b"GET /api/state HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = sock.recv(65536)
        return answer == b"", time.monotonic() - start
    except REFUSED:
        return True, time.monotonic() - start
    finally:
        raw.close()


# ----------------------------------------------------------------------- 1. access matrix


def test_an_admin_certificate_opens_the_page_and_a_state_without_secrets(
    deployment: tuple[Path, DeployServer], tmp_path: Path
) -> None:
    kits, server, live = live_of(deployment)
    port = live.port
    admin = Party(kits, ADMIN, server.address)
    try:
        job_id = admin.call("job_submit", arrays=job_zip(make_job(tmp_path / "job"))).fields[
            "job_id"
        ]
    finally:
        admin.close()

    page = request(kits, port, "/", cert=kits / ADMIN)
    assert page.status == 200, page.body
    assert page.headers["Content-Type"].startswith("text/html")
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert page.headers["X-Frame-Options"] == "DENY"
    directives = {
        d.split()[0]: d.split()[1:] for d in page.headers["Content-Security-Policy"].split(";")
    }
    assert directives["default-src"] == ["'none'"]
    (script_src,) = [s for s in directives["script-src"] if s.startswith("'nonce-")]
    nonce = script_src.removeprefix("'nonce-").removesuffix("'")
    assert len(nonce) >= 16 and "'unsafe-inline'" not in directives["script-src"]
    assert "'unsafe-eval'" not in directives["script-src"]
    assert directives["frame-ancestors"] == ["'none'"]
    html = page.body.decode()
    scripts = re.findall(r"<script\b[^>]*>", html)
    assert scripts and all(re.search(f"nonce=[\"']{nonce}[\"']", tag) for tag in scripts)
    assert not re.search(r"<[^>]+\son[a-z]+\s*=", html)  # no inline handlers (CSP blocks them)
    # a nonce is per answer, or it is no nonce
    again = request(kits, port, "/", cert=kits / ADMIN)
    assert script_src not in again.headers["Content-Security-Policy"]
    assert request(kits, port, "/", cert=kits / ADMIN, method="HEAD").status == 200

    reply = request(kits, port, "/api/state", cert=kits / ADMIN)
    assert reply.status == 200, reply.body
    assert reply.headers["Content-Type"].startswith("application/json")
    assert reply.headers["X-Content-Type-Options"] == "nosniff"
    state = reply.json()
    assert {"server", "project", "jobs", "progress", "sites"} <= set(state)
    assert state["server"] == "localhost" and state["project"] == "demo"
    assert [job["job_id"] for job in state["jobs"]] == [job_id]
    text = reply.body.decode()
    for secret in ("server", "ca", ADMIN):
        key_pem = (kits / secret / ("ca-key.pem" if secret == "ca" else "key.pem")).read_text()
        assert key_pem not in text
        for line in key_pem.splitlines()[1:-1]:  # not even one line of base64 of a key
            assert line not in text
    assert "PRIVATE" not in text and "BEGIN" not in text and "token" not in text.lower()
    assert str(kits) not in text and str(tmp_path / "job") not in text

    def strings(value: Any) -> Iterator[str]:
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for k, v in value.items():
                yield str(k)
                yield from strings(v)
        elif isinstance(value, list):
            for v in value:
                yield from strings(v)

    for item in strings(state):
        if item.startswith("/") or "/tmp" in item or str(tmp_path) in item:
            assert Path(item).resolve().is_relative_to(server.workspace), item


@pytest.mark.reliability
def test_no_certificate_a_site_or_the_server_itself_gets_403(
    deployment: tuple[Path, DeployServer], reliability: Any
) -> None:
    kits, server, live = live_of(deployment)
    port = live.port
    for path in ("/", "/api/state", "/api/curves/x.svg", "/nope"):
        reply = request(kits, port, path)
        assert reply.status == 403, (path, reply.status)
        assert b"no admin certificate" in reply.body and b"demo" not in reply.body
    site = request(kits, port, "/api/state", cert=kits / "site-1")
    assert site.status == 403 and b"site 'site-1' may not open the live view" in site.body
    assert b'"jobs"' not in site.body
    # the server's own kit (serverAuth only): refused by TLS or by role, never served
    assert outcome(kits, port, cert=kits / "server") in ("refused", 403)
    # a made-up session cookie is no session
    assert request(kits, port, "/api/state", cookie="x" * 43).status == 403
    reliability.hostile(
        "live view: no certificate, a site's, the server's, a made-up cookie", tried=7
    )


@pytest.mark.reliability
@pytest.mark.parametrize("same_key", [False, True], ids=["own-key", "admins-stolen-key"])
def test_a_lookalike_admin_certificate_of_another_ca_is_never_served(
    deployment: tuple[Path, DeployServer], tmp_path: Path, same_key: bool, reliability: Any
) -> None:
    kits, server, live = live_of(deployment)
    fake = lookalike_admin(kits, tmp_path / "fake", same_key=same_key)
    for path in ("/", "/api/state"):
        assert outcome(kits, live.port, path, cert=fake) in ("refused", 403)
    # the same request with the real certificate is served: the refusal is the CA's
    assert outcome(kits, live.port, cert=kits / ADMIN) == 200
    reliability.hostile("live view: an admin lookalike of another CA", tried=2)


def test_a_revoked_admin_is_refused_by_certificate_token_and_open_session(
    deployment: tuple[Path, DeployServer],
) -> None:
    kits, server, live = live_of(deployment)
    port = live.port
    opened = request(kits, port, "/?token=" + make_web_token(load_kit(kits / EVE), 1))
    assert opened.status == 303
    session = session_of(opened)
    assert request(kits, port, "/api/state", cookie=session).status == 200
    assert request(kits, port, "/api/state", cert=kits / EVE).status == 200

    revoke(kits / "ca", [EVE])  # while the view runs: the server kit's crl.pem is re-read
    by_cert = request(kits, port, "/api/state", cert=kits / EVE)
    assert by_cert.status == 403 and b"admin 'eve@org'" in by_cert.body
    assert b"was revoked" in by_cert.body
    fresh = request(kits, port, "/?token=" + make_web_token(load_kit(kits / EVE), 1))
    assert fresh.status == 403 and b"was revoked" in fresh.body
    assert "Set-Cookie" not in fresh.headers
    # the session eve's token opened before the revocation ends with it
    assert request(kits, port, "/api/state", cookie=session).status == 403
    assert request(kits, port, "/api/state", cookie=session).status == 403
    # the other admin is still served
    assert request(kits, port, "/api/state", cert=kits / ADMIN).status == 200


def test_the_view_is_read_only_even_for_an_admin(deployment: tuple[Path, DeployServer]) -> None:
    kits, server, live = live_of(deployment)
    port = live.port
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
        for path in ("/", "/api/state"):
            reply = request(kits, port, path, cert=kits / ADMIN, method=method, body=b"{}")
            assert reply.status == 405, (method, path, reply.status)
    no_body = request(kits, port, "/api/state", cert=kits / ADMIN, method="POST")
    assert no_body.status == 405
    with_body = request(kits, port, "/api/state", cert=kits / ADMIN, body=b"x" * 100)
    assert with_body.status == 413
    # a body sent chunked (no Content-Length) is refused as well
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=tls_context(kits, kits / ADMIN),
                                       timeout=10)  # fmt: skip
    try:
        conn.request("GET", "/api/state", body=iter([b"x" * 100]), encode_chunked=True)
        assert conn.getresponse().status == 413
    finally:
        conn.close()


# ------------------------------------------------------------------------------- 2. tokens


def test_a_token_opens_a_strict_session_cookie(deployment: tuple[Path, DeployServer]) -> None:
    kits, server, live = live_of(deployment)
    port = live.port
    token = make_web_token(load_kit(kits / ADMIN), 1)
    opened = request(kits, port, f"/?token={token}")
    assert opened.status == 303
    assert opened.headers["Location"] == "/" and token not in str(opened.headers)
    raw_cookie = opened.headers["Set-Cookie"]
    parts = {part.strip() for part in raw_cookie.split(";")}
    assert {"HttpOnly", "Secure", "SameSite=Strict", "Path=/"} <= parts, raw_cookie
    assert len(opened.headers.get_all("Set-Cookie") or []) == 1
    morsel = http.cookies.SimpleCookie(raw_cookie)[live_module._COOKIE]
    assert morsel["httponly"] and morsel["secure"] and morsel["samesite"] == "Strict"
    assert morsel["path"] == "/" and 3500 <= int(morsel["max-age"]) <= 3600
    session = morsel.value
    assert len(session) >= 40 and session not in token

    state = request(kits, port, "/api/state", cookie=session)
    assert state.status == 200 and state.json()["project"] == "demo"
    assert request(kits, port, "/", cookie=session).status == 200
    tampered = session[:-1] + ("B" if session.endswith("A") else "A")  # never the same
    assert request(kits, port, "/api/state", cookie=tampered).status == 403


@pytest.mark.reliability
def test_forged_foreign_expired_and_overlong_tokens_get_403(
    deployment: tuple[Path, DeployServer], tmp_path: Path, reliability: Any
) -> None:
    kits, server, live = live_of(deployment)
    port = live.port
    admin_key = kits / ADMIN / "key.pem"
    good = signed_token(admin_key, claims(kits / ADMIN))
    # the control: a token this file signs the way fedlift does is accepted
    assert verify_web_token(good, load_kit(kits / "server"))[0].name == ADMIN
    assert request(kits, port, f"/?token={good}").status == 303

    version, body, signature = good.split(".")
    longer = {**claims(kits / ADMIN), "exp": int(time.time() + 2 * 3600)}
    sig = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
    sig[-1] ^= 0x01
    sig[8] ^= 0x80
    eve_cert = claims(kits / EVE)
    fake = lookalike_admin(kits, tmp_path / "fake", same_key=False)
    bomb = b64(b"[" * 5000)
    attacks = {
        "payload altered, signature kept": f"v1.{b64(json.dumps(longer).encode())}.{signature}",
        "signature bytes flipped": f"{version}.{body}.{b64(bytes(sig))}",
        "expired": make_web_token(load_kit(kits / ADMIN), 1, now=time.time() - 2 * 86400),
        "for another server": signed_token(admin_key, claims(kits / ADMIN, aud="evil.example")),
        "site's key and certificate": signed_token(
            kits / "site-1" / "key.pem", claims(kits / "site-1")
        ),
        "admin's certificate, site's key": signed_token(
            kits / "site-1" / "key.pem", claims(kits / ADMIN)
        ),
        "another admin's certificate, admin's key": signed_token(admin_key, eve_cert),
        "more than a week": signed_token(
            admin_key, claims(kits / ADMIN, hours=MAX_TOKEN_HOURS + 24)
        ),
        "lookalike of another CA": signed_token(fake / "key.pem", claims(fake)),
        "version 2": "v2." + good.split(".", 1)[1],
        "no signature": f"v1.{body}.",
        "empty": "",
        "8 KB of garbage": "v1." + "A" * 7000 + ".AAAA",
        "nested JSON bomb": f"v1.{bomb}.{signature}",
    }
    answers = {}
    for name, token in attacks.items():
        reply = request(kits, port, f"/?token={token}")
        answers[name] = reply.status
        assert "Set-Cookie" not in reply.headers, name
    assert answers == dict.fromkeys(attacks, 403)
    assert request(kits, port, f"/?token={good}").status == 303  # the view still serves
    reliability.hostile(
        "live view: forged, foreign, expired and malformed tokens", tried=len(attacks)
    )


def test_a_100_kb_token_is_refused_quickly(deployment: tuple[Path, DeployServer]) -> None:
    kits, server, live = live_of(deployment)
    garbage = "v1." + "A" * 100_000 + ".AAAA"
    start = time.monotonic()
    with pytest.raises(PermissionDeniedError, match="not a fedlift live-view token"):
        verify_web_token(garbage, load_kit(kits / "server"))
    assert time.monotonic() - start < 0.5
    start = time.monotonic()
    answer = outcome(kits, live.port, f"/?token={garbage}")
    assert answer == "refused" or 400 <= int(answer) < 500, answer  # too long a line: 4xx
    assert time.monotonic() - start < 5
    assert outcome(kits, live.port, cert=kits / ADMIN) == 200


def test_verify_web_token_says_why(tmp_path: Path, deployment: tuple[Path, DeployServer]) -> None:
    kits, _ = deployment
    server_kit = load_kit(kits / "server")
    kit = load_kit(kits / ADMIN)
    now = time.time()
    token = make_web_token(kit, 2, now=now)
    identity, expires = verify_web_token(token, server_kit, Revocations(server_kit), now=now)
    assert identity.name == ADMIN and identity.role == "admin" and expires == int(now) + 7200

    def refused(token: str, match: str, **kw: Any) -> None:
        with pytest.raises(PermissionDeniedError, match=match):
            verify_web_token(token, server_kit, **kw)

    version, body, signature = token.split(".")
    refused("v1." + "A" * 9000 + ".A", "not a fedlift live-view token")
    refused(f"{body}.{signature}", r"not a fedlift live-view token \(v1.X.Y\)")
    refused(f"v2.{body}.{signature}", r"\(v1.X.Y\)")
    refused(f"v1.{body[:-7]}.{signature}", "cannot be read: it was cut or altered")
    refused(f"v1.{b64(b'[1, 2]')}.{signature}", "cannot be read")
    refused(f"v1.{b64(b'[' * 5000)}.{signature}", "cannot be read")
    float_exp = b64(json.dumps({"aud": "x", "exp": 1.5, "cert": ""}).encode())
    refused(f"v1.{float_exp}.{signature}", "cannot be read")
    refused(signed_token(kits / ADMIN / "key.pem", {**claims(kits / ADMIN), "exp": True}), "read")
    fake = lookalike_admin(kits, tmp_path / "fake", same_key=True)
    refused(signed_token(fake / "key.pem", claims(fake)), "not issued by this project's CA")
    refused(token, "outside its validity period", now=now + 400 * 86400)
    refused(signed_token(kits / "site-2" / "key.pem", claims(kits / "site-2")),
            "site 'site-2''s; only an admin of this project")  # fmt: skip
    refused(signed_token(kits / "server" / "key.pem", claims(kits / "server")),
            "server 'localhost''s; only an admin")  # fmt: skip
    revoke(kits / "ca", [EVE])
    eve = make_web_token(load_kit(kits / EVE), 1)
    verify_web_token(eve, server_kit)  # without the revocations it would pass ...
    revoked = r"admin 'eve@org' \(serial [0-9a-f]+\) was revoked"
    refused(eve, revoked, revocations=Revocations(kits / "server"))
    refused(signed_token(kits / ADMIN / "key.pem", claims(kits / ADMIN, aud="evil.example")),
            "for server 'evil.example', not this one \\('localhost'\\)")  # fmt: skip
    refused(token, "has expired: make a new one", now=now + 7200)
    week = signed_token(kits / ADMIN / "key.pem", claims(kits / ADMIN, hours=7 * 24 + 1))
    refused(week, "claims more than 168 hours")
    refused(f"{version}.{body}.{signature[:-4]}AAAA", "forged or altered")
    swapped = make_web_token(load_kit(kits / EVE), 2, now=now).split(".")[2]
    refused(f"{version}.{body}.{swapped}", "forged or altered")


def test_make_web_token_needs_an_admin_kit_and_sane_hours(
    deployment: tuple[Path, DeployServer],
) -> None:
    kits, _ = deployment
    for party in ("site-1", "server"):
        with pytest.raises(ConfigError, match="is signed with an admin's kit"):
            make_web_token(load_kit(kits / party))
    for hours in (0, -1, MAX_TOKEN_HOURS + 1, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="--hours must be"):
            make_web_token(load_kit(kits / ADMIN), hours)
    assert make_web_token(load_kit(kits / ADMIN), MAX_TOKEN_HOURS)


def test_the_cli_prints_a_link_whose_token_opens_the_view(
    deployment: tuple[Path, DeployServer], capsys: pytest.CaptureFixture[str]
) -> None:
    kits, server, live = live_of(deployment)
    assert main(["web-token", str(kits / ADMIN), "--url", "https://x:1/", "--hours", "2"]) == 0
    out, _ = capsys.readouterr()
    (link,) = out.split()
    assert link.startswith("https://x:1/?token=v1.")
    token = link.removeprefix("https://x:1/?token=")
    identity, expires = verify_web_token(token, server.kit, server.revocations)
    assert identity.name == ADMIN and abs(expires - (time.time() + 7200)) < 60
    assert request(kits, live.port, f"/?token={token}").status == 303

    assert main(["web-token", str(kits / ADMIN)]) == 0
    out, err = capsys.readouterr()
    assert verify_web_token(out.strip(), server.kit)[0].name == ADMIN
    assert "?token=" in err and "12 h" in err
    assert main(["web-token", str(kits / "site-1")]) == 1
    _, err = capsys.readouterr()
    assert err.startswith("fedlift: error: ") and len(err.strip().splitlines()) == 1
    assert "admin's kit" in err


# ------------------------------------------------------------------ 3. hostile, slow clients


@pytest.mark.reliability
def test_slow_clients_hold_neither_a_running_job_nor_an_admin_elsewhere(
    deployment: tuple[Path, DeployServer],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    reliability: Any,
) -> None:
    kits, server, live = live_of(deployment)
    reliability.fault("live view: 8 slow and stalled browsers while a job runs")
    # long enough that no slow connection is cut off before the job is done: if the job's
    # rounds waited on them, it could not finish while they hang on
    monkeypatch.setattr(live_module, "CONNECTION_SECONDS", 120.0)
    per_ip = live_module.MAX_PER_IP
    admin = Party(kits, ADMIN, server.address)
    sites = [Site(kits, name, server.address) for name in SITES[:2]]
    slow: list[Slow] = []
    try:
        slow += [Slow(kits, live.port) for _ in range(per_ip - 2)]
        slow += [Slow(kits, live.port, cert=kits / ADMIN, pipeline=300) for _ in range(2)]
        wait_for(lambda: live.connections == per_ip, 10, "the slow connections to count")
        refused_before = live.refused
        refused, took = refused_at_once(kits, live.port)
        assert refused and took < 2.0, (refused, took)
        assert live.refused == refused_before + 1 and live.connections == per_ip

        for site in sites:
            site.start()
        job = make_job(tmp_path / "job", num_rounds=6)
        job_id = admin.call("job_submit", arrays=job_zip(job)).fields["job_id"]

        # an admin at another loopback address polls as the page does, while the job runs
        latencies: list[float] = []
        seen_progress: list[dict[str, Any]] = []
        while status(admin, job_id)["state"] in ("submitted", "running"):
            start = time.monotonic()
            reply = request(kits, live.port, "/api/state", cert=kits / ADMIN, source="127.0.0.2")
            latencies.append(time.monotonic() - start)
            assert reply.status == 200
            if job_id in reply.json()["progress"]:
                seen_progress.append(reply.json()["progress"][job_id])
            time.sleep(0.1)
        summary = wait_state(admin, job_id, "finished", timeout=60)
        assert summary["error"] is None
        assert latencies and max(latencies) < 2.0, latencies
        assert seen_progress and set(seen_progress[-1]) <= {"site-1", "site-2"}
        for site in sites:
            assert sorted(r for j, r in site.rounds if j == job_id) == list(range(6))
            assert not site.errors
        # ... and all the while, the slow ones hung on (and still do)
        assert live.connections == per_ip
        assert refused_at_once(kits, live.port)[0]
    finally:
        for conn in slow:
            conn.close()
        for site in sites:
            site.finish()
        admin.close()
    wait_for(lambda: live.connections == 0, 15, "every connection to be released")
    assert outcome(kits, live.port, cert=kits / ADMIN) == 200  # 127.0.0.1 is served again


def test_a_stalled_connection_is_cut_off_after_its_lifetime(
    deployment: tuple[Path, DeployServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    kits, server, live = live_of(deployment)
    monkeypatch.setattr(live_module, "CONNECTION_SECONDS", 2.0)
    raw = socket.create_connection(("127.0.0.1", live.port), timeout=15)  # no handshake
    raw_since = time.monotonic()
    half = Slow(kits, live.port)
    unread = Slow(kits, live.port, cert=kits / ADMIN, pipeline=300)
    try:
        wait_for(lambda: live.connections == 2, 5, "two connections to count")
        # the server cuts both (the unread one's client still holds its socket): its own
        # limit, before aiohttp's 5 s idle close
        released = wait_for(lambda: live.connections == 0, 10, "the cut-off")
        assert 1.0 <= released <= 4.5, released
        assert half.closed_by_server(5) < 2.5
        with contextlib.suppress(ConnectionResetError):
            assert raw.recv(1) == b""
        handshake_cut = time.monotonic() - raw_since
        assert 4.0 <= handshake_cut <= 9.0, handshake_cut  # _HANDSHAKE_SECONDS = 5
    finally:
        raw.close()
        half.close()
        unread.close()
    assert outcome(kits, live.port, cert=kits / ADMIN) == 200


def test_the_total_connection_limit_holds_across_addresses(
    deployment: tuple[Path, DeployServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    kits, server, live = live_of(deployment)
    monkeypatch.setattr(live_module, "MAX_CONNECTIONS", 3)
    slow = [Slow(kits, live.port, source=f"127.0.0.{i}") for i in (3, 4, 5)]
    try:
        wait_for(lambda: live.connections == 3, 10, "three connections")
        assert refused_at_once(kits, live.port, source="127.0.0.6")[0]
        assert live.refused == 1
    finally:
        for conn in slow:
            conn.close()
    wait_for(lambda: live.connections == 0, 10, "the connections to be released")
    assert outcome(kits, live.port, cert=kits / ADMIN, source="127.0.0.6") == 200


# ---------------------------------------------------------------------- 4. the --web address


def test_a_taken_web_port_is_an_os_error_and_one_cli_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kits = provision("demo", f"localhost:{free_port()}", SITES, [ADMIN], tmp_path / "kits")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        grpc_port = free_port()
        with pytest.raises(OSError) as caught:
            DeployServer(
                kits["server"],
                tmp_path / "ws",
                address=f"127.0.0.1:{grpc_port}",
                web=f"127.0.0.1:{port}",
            )
        assert caught.value.errno == errno.EADDRINUSE

        def grpc_port_free() -> bool:
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", grpc_port))
                except OSError:
                    return False
                return True

        wait_for(grpc_port_free, 10, "the failed server to let go of its gRPC port")

        argv = ["server", "start", str(kits["server"]), "-w", str(tmp_path / "ws2"),
                "--address", "127.0.0.1:0", "--web", f"127.0.0.1:{port}"]  # fmt: skip
        assert main(argv) == 1
        _, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fedlift: error: "), err
        assert "--web" in lines[0] and f":{port}" in lines[0] and "already in use" in lines[0]


def test_a_web_address_that_is_not_host_port_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kits = provision("demo", f"localhost:{free_port()}", SITES, [ADMIN], tmp_path / "kits")
    for web in ("nonsense", "127.0.0.1:99999", ":8443", "127.0.0.1:http"):
        with pytest.raises(ConfigError, match=r"--web must be HOST:PORT.*Received: --web"):
            DeployServer(kits["server"], tmp_path / "ws", address="127.0.0.1:0", web=web)
    argv = ["server", "start", str(kits["server"]), "-w", str(tmp_path / "ws2"),
            "--address", "127.0.0.1:0", "--web", "nonsense"]  # fmt: skip
    assert main(argv) == 1
    _, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1 and "HOST:PORT" in err, err


# ---------------------------------------------------------------------------------- 5. stop


def test_stop_ends_the_live_view_and_its_connections(
    deployment: tuple[Path, DeployServer],
) -> None:
    kits, server, live = live_of(deployment)
    assert outcome(kits, live.port, cert=kits / ADMIN) == 200
    held = Slow(kits, live.port)
    try:
        wait_for(lambda: live.connections == 1, 5, "the held connection")
        stopper = threading.Thread(target=server.stop)
        start = time.monotonic()
        stopper.start()
        stopper.join(20)
        assert not stopper.is_alive() and time.monotonic() - start < 15
        assert held.closed_by_server(5) < 5
    finally:
        held.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", live.port), timeout=5).close()
    live.stop()  # again: a no-op
