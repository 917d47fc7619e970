"""Tokens that let an admin open the live view in a browser that has no client certificate.

``fedlift web-token ADMIN_KIT`` signs, with the admin's own private key, a short statement:
this certificate, for this server, until this time. The server checks it as it checks a
client certificate in the TLS handshake, and more: the certificate was issued by the
project CA, is in its validity period, is an admin's of this project and is not revoked;
the token is for this server and has not expired; and the signature is the certificate's
key's. The server keeps no secret for it and no list of tokens: revoking the admin's
certificate (``fedlift revoke``) ends every token it signed.

Format: ``v1.<payload>.<signature>``, both base64url; the payload is JSON
``{"aud": server name, "exp": unix seconds, "cert": base64 DER}``; the signature is ECDSA
P-256 with SHA-256 over ``b"fedlift-web-token/1." + payload``.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import time

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..errors import ConfigError, PermissionDeniedError
from ._identity import Identity, identity_of
from ._tls import Kit, Revocations

__all__ = ["MAX_TOKEN_HOURS", "make_web_token", "verify_web_token"]

MAX_TOKEN_HOURS = 24 * 7
"""The longest a token may be valid: a week (the server refuses one that claims longer)."""
_CONTEXT = b"fedlift-web-token/1."
_MAX_TOKEN = 8192
_SKEW = 300.0


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def make_web_token(kit: Kit, hours: float = 12.0, *, now: float | None = None) -> str:
    """A token for the live view of the server ``kit`` (an admin's kit) names, valid for
    ``hours`` (at most :data:`MAX_TOKEN_HOURS`), signed with the kit's private key."""
    if kit.role != "admin":
        raise ConfigError(
            f"{kit.folder} is the kit of {kit.role} {kit.name!r}; a live-view token is signed "
            "with an admin's kit (the admins/<name> folder `fedlift provision` made)."
        )
    if not isinstance(hours, int | float) or not 0 < hours <= MAX_TOKEN_HOURS:
        raise ConfigError(
            f"--hours must be a number of hours > 0 and at most {MAX_TOKEN_HOURS}. "
            f"Received: hours={hours!r}."
        )
    key = serialization.load_pem_private_key(kit.key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{kit.key} is not an EC key, which fedlift's kits hold.")
    cert = x509.load_pem_x509_certificate(kit.cert.read_bytes())
    issued = time.time() if now is None else now
    payload = json.dumps(
        {
            "aud": kit.server_host,
            "exp": int(issued + hours * 3600),
            "cert": base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode(),
        },
        separators=(",", ":"),
    ).encode()
    body = _b64(payload)
    signature = key.sign(_CONTEXT + body.encode("ascii"), ec.ECDSA(hashes.SHA256()))
    return f"v1.{body}.{_b64(signature)}"


def verify_web_token(
    token: str,
    server_kit: Kit,
    revocations: Revocations | None = None,
    *,
    now: float | None = None,
) -> tuple[Identity, float]:
    """The admin ``token`` speaks for, and when it expires; raises
    :class:`~fedlift.errors.PermissionDeniedError` saying why it is refused (see the
    module docstring for every check)."""
    clock = time.time() if now is None else now
    if not isinstance(token, str) or len(token) > _MAX_TOKEN:
        raise PermissionDeniedError("the token is not a fedlift live-view token.")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != "v1":
        raise PermissionDeniedError("the token is not a fedlift live-view token (v1.X.Y).")
    try:
        payload = json.loads(_unb64(parts[1]))
        signature = _unb64(parts[2])
        der = base64.b64decode(payload["cert"], validate=True)
        audience, expires = payload["aud"], payload["exp"]
    except (ValueError, TypeError, KeyError, binascii.Error, UnicodeDecodeError, RecursionError):
        raise PermissionDeniedError("the token cannot be read: it was cut or altered.") from None
    if not isinstance(audience, str) or not isinstance(expires, int) or isinstance(expires, bool):
        raise PermissionDeniedError("the token cannot be read: it was cut or altered.")
    try:
        cert = x509.load_der_x509_certificate(der)
        ca = x509.load_pem_x509_certificate(server_kit.ca.read_bytes())
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise PermissionDeniedError(
            "the token's certificate was not issued by this project's CA."
        ) from None
    moment = dt.datetime.fromtimestamp(clock, dt.timezone.utc)
    if not (
        cert.not_valid_before_utc - dt.timedelta(seconds=_SKEW)
        <= moment
        <= cert.not_valid_after_utc
    ):
        raise PermissionDeniedError("the token's certificate is outside its validity period.")
    identity = identity_of(cert)
    if identity.role != "admin" or identity.project != server_kit.project:
        raise PermissionDeniedError(
            f"the token's certificate is {identity.role or 'no role'} {identity.name!r}'s; "
            "only an admin of this project may open the live view."
        )
    if revocations is not None:
        revocations.check_serial(cert.serial_number, identity.name, identity.role)
    if audience != server_kit.name:
        raise PermissionDeniedError(
            f"the token is for server {audience!r:.80}, not this one ({server_kit.name!r})."
        )
    if expires <= clock:
        raise PermissionDeniedError(
            "the token has expired: make a new one with `fedlift web-token ADMIN_KIT`."
        )
    if expires > clock + MAX_TOKEN_HOURS * 3600 + _SKEW:
        raise PermissionDeniedError(f"the token claims more than {MAX_TOKEN_HOURS} hours.")
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise PermissionDeniedError("the token's certificate holds no EC key.")
    try:
        public.verify(signature, _CONTEXT + parts[1].encode("ascii"), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise PermissionDeniedError(
            "the token's signature is not its certificate's key's: it was forged or altered."
        ) from None
    return identity, float(expires)
