"""Load a provisioned kit and turn it into gRPC mutual-TLS credentials.

The server requires a client certificate signed by the project CA; clients check the
server's certificate against the same CA *and* against the host name they connect to, so
they must connect to the name in the certificate: the ``server`` address of their kit.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from ..errors import ConfigError, PermissionDeniedError, ProtocolError
from ..transport import tls_channel_credentials, tls_server_credentials
from ._identity import ROLES, identity_of
from ._provision import CA_KEY, CRL_FILE, KIT_CONFIG, parse_server_address, read_crl

__all__ = ["Kit", "Revocations", "channel_credentials", "load_kit", "server_credentials"]

log = logging.getLogger("fedlift.server")

_CLOCK_SKEW = dt.timedelta(minutes=5)
_HOW = "Use the kit folder `fedlift provision` made for this party, unchanged."


@dataclass(frozen=True)
class Kit:
    """One party's provisioned folder: who it is, which server, and its TLS files."""

    role: str
    """``server``, ``site`` or ``admin``."""
    name: str
    """The certificate's CN: the site or admin name, or the server's host name."""
    project: str
    server: str
    """``host:port`` of the server; clients connect to exactly this name."""
    folder: Path
    ca: Path
    cert: Path
    key: Path
    valid_until: dt.datetime

    @property
    def server_host(self) -> str:
        return parse_server_address(self.server)[0]

    @property
    def server_port(self) -> int:
        return parse_server_address(self.server)[1]

    def read_pems(self) -> tuple[bytes, bytes, bytes]:
        """``(ca, cert, key)`` as PEM bytes."""
        return self.ca.read_bytes(), self.cert.read_bytes(), self.key.read_bytes()


def _field(config: dict[str, Any], key: str, where: Path) -> str:
    value = config.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: {key!r} is missing or not a non-empty string. {_HOW}")
    return value


def _file(folder: Path, config: dict[str, Any], key: str, where: Path) -> Path:
    name = _field(config, key, where)
    if Path(name).name != name or name in (".", ".."):
        raise ConfigError(
            f"{where}: {key!r} must be a file name inside the kit folder; received {name!r}."
        )
    path = folder / name
    if not path.is_file():
        raise ConfigError(f"{where} names {key} file {name!r}, but {path} is missing. {_HOW}")
    return path


def _read_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as exc:
        raise ConfigError(f"{path} is not a PEM certificate ({exc}). {_HOW}") from None


def _check_key_mode(path: Path) -> None:
    if os.name != "posix":
        return
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(
            f"the private key {path} can be read by other users (mode {mode:04o}). "
            f"Restrict it: chmod 600 {path}"
        )


def load_kit(path: str | os.PathLike[str]) -> Kit:
    """Read and check the kit in folder ``path`` (or its ``fedlift.json``).

    Raises :class:`~fedlift.errors.ConfigError`, saying what is wrong and how to fix it, when
    a file is missing, the key is readable by others, the certificate does not belong to the
    CA, the key or the config, or the certificate has expired.
    """
    given = Path(path)
    folder = given.parent if given.name == KIT_CONFIG and given.is_file() else given
    if not folder.is_dir():
        raise ConfigError(
            f"no kit folder at {folder}. Give the folder `fedlift provision` made for this "
            "party (e.g. kits/site-1)."
        )
    config_path = folder / KIT_CONFIG
    if not config_path.is_file():
        if (folder / CA_KEY).exists():
            raise ConfigError(
                f"{folder} is the project CA's folder, not a kit: it holds the CA's private key "
                "and belongs on no server or site (keep it offline). Use the server's or a "
                "site's kit folder."
            )
        raise ConfigError(
            f"{folder} holds no {KIT_CONFIG}, so it is not a kit from `fedlift provision`. "
            "Give the folder made for this party (e.g. kits/site-1)."
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{config_path} is not valid JSON ({exc}). {_HOW}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{config_path} must hold a JSON object. {_HOW}")
    role = _field(config, "role", config_path)
    if role not in ROLES:
        raise ConfigError(f"{config_path}: role {role!r} is not one of {', '.join(ROLES)}.")
    name = _field(config, "name", config_path)
    project = _field(config, "project", config_path)
    server = _field(config, "server", config_path)
    try:
        parse_server_address(server)
    except ConfigError as exc:
        raise ConfigError(f"{config_path}: {exc}") from None
    ca_path = _file(folder, config, "ca", config_path)
    cert_path = _file(folder, config, "cert", config_path)
    key_path = _file(folder, config, "key", config_path)
    _check_key_mode(key_path)

    ca = _read_cert(ca_path)
    cert = _read_cert(cert_path)
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{key_path} is not an unencrypted PEM private key ({exc}).") from None
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise ConfigError(
            f"{cert_path} was not signed by the CA in {ca_path}: the files come from different "
            "provisioning runs. Use one whole kit from a single run."
        ) from None
    public = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*public) != cert.public_key().public_bytes(*public):
        raise ConfigError(f"{key_path} is not the private key of {cert_path}. {_HOW}")
    identity = identity_of(cert)
    said = (role, name, project)
    if (identity.role, identity.name, identity.project) != said:
        raise ConfigError(
            f"{config_path} says role={role!r}, name={name!r}, project={project!r}, but "
            f"{cert_path} is for role={identity.role!r}, name={identity.name!r}, "
            f"project={identity.project!r}. {_HOW}"
        )
    now = dt.datetime.now(dt.timezone.utc)
    if cert.not_valid_after_utc < now or ca.not_valid_after_utc < now:
        ended = min(cert.not_valid_after_utc, ca.not_valid_after_utc)
        raise ConfigError(
            f"the certificates of kit {folder} expired on {ended:%Y-%m-%d %H:%M} UTC. Provision "
            "new kits (fedlift provision ... --valid-days N) and hand them out again."
        )
    if cert.not_valid_before_utc > now + _CLOCK_SKEW:
        raise ConfigError(
            f"the certificate of kit {folder} is valid only from "
            f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC: is this machine's clock right?"
        )
    return Kit(
        role=role,
        name=name,
        project=project,
        server=server,
        folder=folder,
        ca=ca_path,
        cert=cert_path,
        key=key_path,
        valid_until=cert.not_valid_after_utc,
    )


def _kit(kit: Kit | str | os.PathLike[str]) -> Kit:
    return kit if isinstance(kit, Kit) else load_kit(kit)


def server_credentials(kit: Kit | str | os.PathLike[str]) -> grpc.ServerCredentials:
    """Mutual TLS for the server: its certificate, and only clients of the project CA."""
    loaded = _kit(kit)
    if loaded.role != "server":
        raise ConfigError(
            f"{loaded.folder} is the kit of {loaded.role} {loaded.name!r}; the server needs "
            "the server kit (the `server` folder `fedlift provision` made)."
        )
    return tls_server_credentials(*loaded.read_pems())


def channel_credentials(kit: Kit | str | os.PathLike[str]) -> grpc.ChannelCredentials:
    """Mutual TLS for a site or admin: its certificate, and only a server of the project CA."""
    loaded = _kit(kit)
    if loaded.role == "server":
        raise ConfigError(
            f"{loaded.folder} is the server's kit; a site or admin connects with its own kit "
            "(the folder named after it)."
        )
    return tls_channel_credentials(*loaded.read_pems())


# ----------------------------------------------------------------------------- revocation


@functools.lru_cache(maxsize=1024)
def _serial_of(pem: bytes) -> int:
    try:
        return x509.load_pem_x509_certificate(pem).serial_number
    except ValueError as exc:
        raise ProtocolError(f"the peer's certificate cannot be parsed: {exc}") from None


class Revocations:
    """The project's revoked certificates, as the server kit's ``crl.pem`` lists them.

    ``fedlift revoke --ca CA_FOLDER NAME`` writes the CRL (signed by the project CA) and
    copies it into the server kit next to the CA folder; a server elsewhere needs the file
    copied into its kit folder. :meth:`check` runs for every call: it looks at the file's
    identity (one ``stat``) and re-reads it when it changed, so a revocation takes effect
    for the next call, without a restart. A CRL that is not signed by the project CA is
    refused at start (ConfigError); one that turns bad later is logged and the last good
    list stays in force (a revocation is never undone by a broken or deleted file).
    """

    def __init__(self, kit: Kit | str | os.PathLike[str]) -> None:
        self.kit = _kit(kit)
        self.path = self.kit.folder / CRL_FILE
        self._ca = _read_cert(self.kit.ca)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._revoked: dict[int, dt.datetime] = {}
        if self.path.exists():
            self._load(self._stat(), strict=True)

    @property
    def serials(self) -> frozenset[int]:
        """The serial numbers revoked now (as last read)."""
        self._refresh()
        return frozenset(self._revoked)

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            info = self.path.stat()
        except FileNotFoundError:
            return None
        return info.st_ino, info.st_size, info.st_mtime_ns

    def _load(self, stamp: tuple[int, int, int] | None, strict: bool) -> None:
        try:
            crl = read_crl(self.path, self._ca)
        except (ConfigError, OSError) as exc:
            if strict:
                raise ConfigError(f"the server's revocation list cannot be used: {exc}") from None
            log.error("%s; the revocations read before stay in force", exc)
        else:
            self._revoked = {e.serial_number: e.revocation_date_utc for e in crl}
            log.info("revocation list %s: %d certificates revoked", self.path, len(self._revoked))
        self._stamp = stamp

    def _refresh(self) -> None:
        stamp = self._stat()
        if stamp == self._stamp:
            return
        with self._lock:
            if stamp != self._stamp:
                if stamp is None:
                    log.warning("%s was removed; the revocations read before stay", self.path)
                    self._stamp = None
                else:
                    self._load(stamp, strict=False)

    def check(self, certificate: bytes | None, peer: str | None, role: str | None) -> None:
        """Raise :class:`PermissionDeniedError` naming the peer when ``certificate`` (the
        PEM of a call's verified client certificate) is revoked."""
        if certificate is None:
            return
        self.check_serial(_serial_of(certificate), peer, role)

    def check_serial(self, serial: int, peer: str | None, role: str | None) -> None:
        """:meth:`check` for a certificate's serial number (what the listener's admission
        step knows before a byte of the request is received)."""
        self._refresh()
        when = self._revoked.get(serial)
        if when is not None:
            raise PermissionDeniedError(
                f"the certificate of {role or 'party'} {peer!r} (serial {serial:x}) was revoked "
                f"on {when:%Y-%m-%d %H:%M} UTC; this server refuses it. Ask the project's "
                "admin for a new kit. Received: a call with the revoked certificate."
            )
