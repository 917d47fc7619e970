"""How a certificate says who its holder is: the one convention provisioning, TLS and the
transport share (here, below deploy, so the transport can name its peers).

Every certificate a project CA issues names its holder in the subject::

    CN = the party's name      (site-1, alice@org, or the server's host name)
    OU = the party's role      (server | site | admin)
    O  = the project           (demo)

The CA signs the whole subject, so a peer that completes the mutual-TLS handshake with a
certificate of this project cannot claim another name or role.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

from ..errors import ProtocolError

__all__ = ["ROLES", "Identity", "identity_from_pem", "identity_of"]

ROLES: tuple[str, ...] = ("server", "site", "admin")
"""The roles a certificate can carry (its subject's OU)."""

ROLE_ATTRIBUTE = NameOID.ORGANIZATIONAL_UNIT_NAME
PROJECT_ATTRIBUTE = NameOID.ORGANIZATION_NAME


@dataclass(frozen=True)
class Identity:
    """The holder of a certificate, as the project CA certified it."""

    name: str
    role: str | None
    project: str | None
    serial: int | None = None
    """The certificate's serial number (what a revocation list names)."""


def _single(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str | None:
    values = cert.subject.get_attributes_for_oid(oid)
    if len(values) != 1:
        return None  # absent or ambiguous: never guess
    value = values[0].value
    return value if isinstance(value, str) else None


def identity_of(cert: x509.Certificate) -> Identity:
    """The name (CN), role (OU, only if one of :data:`ROLES`) and project (O) of ``cert``."""
    name = _single(cert, NameOID.COMMON_NAME)
    if not name:
        raise ProtocolError("the peer's certificate has no single common name (CN).")
    role = _single(cert, ROLE_ATTRIBUTE)
    return Identity(
        name,
        role if role in ROLES else None,
        _single(cert, PROJECT_ATTRIBUTE),
        cert.serial_number,
    )


@functools.lru_cache(maxsize=1024)
def identity_from_pem(pem: bytes) -> Identity:
    """:func:`identity_of` for a PEM certificate (cached: a peer sends the same one each call)."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise ProtocolError(f"the peer's certificate cannot be parsed: {exc}") from None
    return identity_of(cert)
