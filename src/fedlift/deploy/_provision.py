"""``provision``: one project CA and a kit (CA certificate, own certificate and key, config)
for the server, every site and every admin.

Keys are EC P-256 (ECDSA with SHA-256): as strong as RSA-3072, generated in about a
millisecond instead of a tenth of a second, small certificates and fast handshakes, and
supported by every TLS stack gRPC uses. How a certificate names its holder (CN, role in OU,
project in O) is in :mod:`._identity`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .._atomic import atomic_write_bytes
from ..errors import ConfigError
from ._identity import PROJECT_ATTRIBUTE, ROLE_ATTRIBUTE

__all__ = [
    "CA_CERT",
    "CA_FOLDER",
    "CA_KEY",
    "CERT_FILE",
    "CRL_FILE",
    "KEY_FILE",
    "KIT_CONFIG",
    "MANIFEST",
    "SERVER_FOLDER",
    "issue_certificate",
    "parse_server_address",
    "provision",
    "revoke",
]

KIT_CONFIG = "fedlift.json"
CA_FILE = "ca.pem"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
CRL_FILE = "crl.pem"
"""The project's certificate revocation list: in the CA folder, and copied to the server kit."""
CA_FOLDER = "ca"
CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
SERVER_FOLDER = "server"
MANIFEST = "provision.json"
KIT_FORMAT = 1

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ADMIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+@-]{0,63}")
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_RESERVED = frozenset({SERVER_FOLDER, CA_FOLDER, MANIFEST})
_CLOCK_SKEW = dt.timedelta(minutes=5)  # machines' clocks differ: valid from a little earlier
_MAX_VALID_DAYS = 36_500


# ------------------------------------------------------------------------------ validation


def _check_name(name: object, what: str, pattern: re.Pattern[str], allowed: str) -> str:
    if not isinstance(name, str) or not pattern.fullmatch(name):
        raise ConfigError(
            f"{what} name {name!r} is not valid: use 1 to 64 characters of {allowed}, "
            "starting with a letter or digit."
        )
    return name


def _check_parties(sites: Sequence[str], admins: Sequence[str]) -> None:
    if isinstance(sites, str) or isinstance(admins, str):
        raise ConfigError("sites and admins are lists of names, e.g. ['site-1', 'site-2'].")
    if not sites:
        raise ConfigError("give at least one site (e.g. sites=['site-1', 'site-2']).")
    seen: dict[str, tuple[str, str]] = {}
    site_chars = "letters, digits, '.', '_' and '-'"
    admin_chars = "letters, digits, '.', '_', '-', '+' and '@'"
    parties = [(s, "site", _NAME, site_chars) for s in sites]
    parties += [(a, "admin", _ADMIN, admin_chars) for a in admins]
    for name, role, pattern, allowed in parties:
        _check_name(name, role, pattern, allowed)
        key = name.casefold()  # kits are folders: site-1 and Site-1 collide on some disks
        if key in _RESERVED:
            raise ConfigError(
                f"{role} name {name!r} is reserved: 'server', 'ca' and {MANIFEST!r} are "
                "provisioning's own entries in the output folder; choose another name."
            )
        if key in seen:
            first_role, first = seen[key]
            raise ConfigError(
                f"{role} name {name!r} collides with {first_role} {first!r} (kits are folders, "
                "and names are compared ignoring case); every site and admin needs its own name."
            )
        seen[key] = (role, name)


def parse_server_address(address: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6) and check both; the host is lower-cased."""
    if not isinstance(address, str) or not address:
        raise ConfigError(f"server address must be host:port; received: {address!r}.")
    example = "e.g. server.example.org:8002, 10.0.0.5:8002 or [2001:db8::5]:8002"
    if address.startswith("["):
        host, sep, port_text = address[1:].partition("]:")
    else:
        host, sep, port_text = address.rpartition(":")
    if not sep or not host or ":" in port_text:
        raise ConfigError(f"server address {address!r} is not host:port ({example}).")
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise ConfigError(f"server address {address!r}: the port must be 1 to 65535.")
    if ":" in host and not address.startswith("["):
        raise ConfigError(f"server address {address!r}: write IPv6 addresses as [addr]:port.")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None:
        if ip.is_unspecified or ip.is_multicast:
            raise ConfigError(
                f"server address {address!r}: {host} is not an address clients can connect to; "
                "give the server's own IP address or DNS name."
            )
        return str(ip), int(port_text)
    name = host.lower().rstrip(".")
    labels = name.split(".")
    if (
        len(name) > 253
        or not all(_LABEL.fullmatch(label) for label in labels)
        or labels[-1].isdigit()
    ):
        raise ConfigError(
            f"server address {address!r}: {host!r} is neither an IP address nor a valid DNS "
            f"name ({example})."
        )
    return name, int(port_text)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host).is_loopback
    return False


def _server_names(host: str) -> list[x509.GeneralName]:
    """The names the server certificate holds: the host, and localhost if the host is local."""
    hosts = [host]
    if _is_loopback(host):
        hosts += ["localhost", "127.0.0.1", "::1"]
    names: list[x509.GeneralName] = []
    for item in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(item)))
        except ValueError:
            names.append(x509.DNSName(item))
    return names


# ---------------------------------------------------------------------------- certificates


def _subject(name: str, role: str | None, project: str) -> x509.Name:
    attributes = [x509.NameAttribute(PROJECT_ATTRIBUTE, project)]
    if role is not None:
        attributes.append(x509.NameAttribute(ROLE_ATTRIBUTE, role))
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, name))
    return x509.Name(attributes)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _make_ca(
    project: str, not_before: dt.datetime, not_after: dt.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    subject = _subject(f"{project} project CA", None, project)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue_certificate(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    name: str,
    role: str,
    project: str,
    not_before: dt.datetime,
    not_after: dt.datetime,
    server_names: Sequence[x509.GeneralName] = (),
    key: ec.EllipticCurvePrivateKey | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf certificate signed by the project CA: ``role`` "server" gets serverAuth and the
    ``server_names`` as subjectAltName; other roles get clientAuth."""
    key = key if key is not None else _new_key()
    usage = ExtendedKeyUsageOID.SERVER_AUTH if role == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(_subject(name, role, project))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
    )
    if server_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(list(server_names)), critical=False
        )
    return builder.sign(ca_key, hashes.SHA256()), key


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),  # gRPC reads keys unencrypted; the file mode guards it
    )


# ---------------------------------------------------------------------------------- files


def _mkdir_private(path: Path) -> None:
    os.mkdir(path, 0o700)
    os.chmod(path, 0o700)  # exactly 0700 whatever the umask


def _write(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` from the start: a key never exists with wider access."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, mode)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, mode)  # the umask may have removed bits; never adds any
        with os.fdopen(fd, "wb", closefd=False) as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    finally:
        os.close(fd)


def _json(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _check_out(out: Path, force: bool) -> None:
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise ConfigError(f"the output {out} exists and is not a folder; choose a new folder.")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if not force:
        shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
        raise ConfigError(
            f"the output folder {out} is not empty ({shown}). Provisioning again makes a new "
            "project CA, and every kit already handed out stops working with the new server "
            "kit. Choose a new folder, or pass --force (force=True) to replace these kits."
        )
    if not (out / MANIFEST).is_file():
        raise ConfigError(
            f"the output folder {out} is not empty and holds no {MANIFEST}, so it is not a "
            "folder of fedlift kits; --force only replaces kits fedlift made. Choose an empty "
            "or new folder."
        )


def _install(tmp: Path, out: Path) -> None:
    """Move the finished kits from ``tmp`` to ``out`` (which is absent, empty or replaced)."""
    if out.exists() or out.is_symlink():
        if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
            out.rmdir()
        else:
            old = out.with_name(f".{out.name}.replaced-{uuid.uuid4().hex[:8]}")
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old, out)
                raise
            if old.is_symlink():
                old.unlink()
            else:
                shutil.rmtree(old)
            return
    os.rename(tmp, out)


def _stamp(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------------------ provision


def provision(
    project: str,
    server: str,
    sites: Sequence[str],
    admins: Sequence[str],
    out: str | os.PathLike[str],
    *,
    valid_days: int = 365,
    force: bool = False,
) -> dict[str, Path]:
    """Make a project CA and one kit per party under ``out``; return ``{party: folder}``.

    Parties are ``"ca"`` (``out/ca``: the CA key, for no one; keep it offline), ``"server"``
    (``out/server``) and every site and admin by name (``out/<name>``). Each kit holds
    ``ca.pem``, ``cert.pem``, ``key.pem`` (mode 0600) and ``fedlift.json``; folders are 0700.
    ``server`` is the ``host:port`` clients connect to: the certificate is made for that host
    name, and TLS refuses a connection made to another name. A non-empty ``out`` is refused
    unless ``force`` (and then only if it holds kits fedlift made).
    """
    _check_name(project, "project", _NAME, "letters, digits, '.', '_' and '-'")
    _check_parties(sites, admins)
    host, port = parse_server_address(server)
    for party in [*sites, *admins]:
        if party.casefold() == host or (_is_loopback(host) and _is_loopback(party.casefold())):
            raise ConfigError(
                f"{party!r} is the server's host name; a site or admin named so would hold a "
                "certificate naming the server. Choose another name."
            )
    if len(host) > 64:
        raise ConfigError(f"server host name {host!r} is longer than the 64 characters a CN holds.")
    if isinstance(valid_days, bool) or not isinstance(valid_days, int):
        raise ConfigError(f"valid_days must be a whole number of days; received: {valid_days!r}.")
    if not 1 <= valid_days <= _MAX_VALID_DAYS:
        raise ConfigError(f"valid_days must be 1 to {_MAX_VALID_DAYS}; received: {valid_days}.")
    target = Path(out)
    _check_out(target, force)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    not_before, not_after = now - _CLOCK_SKEW, now + dt.timedelta(days=valid_days)
    ca_cert, ca_key = _make_ca(project, not_before, not_after)
    ca_pem = _cert_pem(ca_cert)

    parties: list[tuple[str, str, str]] = [(SERVER_FOLDER, "server", host)]
    parties += [(s, "site", s) for s in sites] + [(a, "admin", a) for a in admins]

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.provision-", dir=target.parent))
    try:
        os.chmod(tmp, 0o700)
        _mkdir_private(tmp / CA_FOLDER)
        _write(tmp / CA_FOLDER / CA_CERT, ca_pem, 0o644)
        _write(tmp / CA_FOLDER / CA_KEY, _key_pem(ca_key), 0o600)
        kits: list[dict[str, str]] = []
        for folder, role, name in parties:
            cert, key = issue_certificate(
                ca_cert,
                ca_key,
                name=name,
                role=role,
                project=project,
                not_before=not_before,
                not_after=not_after,
                server_names=_server_names(host) if role == "server" else (),
            )
            kit = tmp / folder
            _mkdir_private(kit)
            _write(kit / CA_FILE, ca_pem, 0o644)
            _write(kit / CERT_FILE, _cert_pem(cert), 0o644)
            _write(kit / KEY_FILE, _key_pem(key), 0o600)
            config = {
                "fedlift_kit": KIT_FORMAT,
                "role": role,
                "name": name,
                "project": project,
                "server": address,
                "ca": CA_FILE,
                "cert": CERT_FILE,
                "key": KEY_FILE,
                "valid_until": _stamp(not_after),
            }
            _write(kit / KIT_CONFIG, _json(config), 0o644)
            kits.append({"folder": folder, "role": role, "name": name})
        manifest = {
            "project": project,
            "server": address,
            "created": _stamp(now),
            "valid_until": _stamp(not_after),
            "ca": {
                "folder": CA_FOLDER,
                "give_to": "no one: keep it offline (it signs certificates for this project)",
            },
            "kits": kits,
        }
        _write(tmp / MANIFEST, _json(manifest), 0o644)
        _check_out(target, force)  # again: something may have appeared meanwhile
        _install(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result = {CA_FOLDER: target / CA_FOLDER}
    result.update({folder: target / folder for folder, _, _ in parties})
    return result


# --------------------------------------------------------------------------------- revoke


def _load_ca(ca_folder: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = ca_folder / CA_CERT, ca_folder / CA_KEY
    if not cert_path.is_file() or not key_path.is_file():
        raise ConfigError(
            f"{ca_folder} is not a project CA folder: it needs {CA_CERT} and {CA_KEY} (the "
            f"`ca` folder `fedlift provision` made). Received: ca={str(ca_folder)!r}."
        )
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"the CA files in {ca_folder} cannot be read: {exc}") from None
    public = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    if not isinstance(key, ec.EllipticCurvePrivateKey) or (
        key.public_key().public_bytes(*public) != cert.public_key().public_bytes(*public)
    ):
        raise ConfigError(f"{key_path} is not the private key of {cert_path}.")
    return cert, key


def _kit_certificate(ca_folder: Path, name: str, ca: x509.Certificate) -> x509.Certificate:
    """The certificate of party ``name``: its kit next to the CA folder (provision's output)."""
    _check_name(name, "site or admin", _ADMIN, "letters, digits, '.', '_', '-', '+' and '@'")
    if name.casefold() in _RESERVED:
        raise ConfigError(
            f"{name!r} is provisioning's own folder, not a site or admin; revoke a site or "
            "admin by its name (e.g. site-2)."
        )
    path = ca_folder.parent / name / CERT_FILE
    if not path.is_file():
        raise ConfigError(
            f"there is no kit {name!r} next to the CA folder ({path} is missing). Give the "
            f"certificate itself instead: fedlift revoke --ca {ca_folder} --cert PATH/cert.pem"
        )
    return _issued_by(path, ca)


def _issued_by(path: Path, ca: x509.Certificate) -> x509.Certificate:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{path} is not a readable PEM certificate ({exc}).") from None
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise ConfigError(
            f"{path} was not signed by this project's CA ({exc or 'bad signature'}); it needs "
            "no revoking here: the server refuses it already."
        ) from None
    return cert


def read_crl(path: Path, ca: x509.Certificate) -> x509.CertificateRevocationList:
    """The CRL at ``path``, checked to be signed by ``ca`` (ConfigError otherwise)."""
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
    except ValueError as exc:
        raise ConfigError(f"{path} is not a PEM certificate revocation list ({exc}).") from None
    public = ca.public_key()
    if crl.issuer != ca.subject or not (
        isinstance(public, ec.EllipticCurvePublicKey) and crl.is_signature_valid(public)
    ):
        raise ConfigError(
            f"{path} is not signed by the project CA ({ca.subject.rfc4514_string()}): it may "
            "have been tampered with or come from another project. Write it again with "
            "`fedlift revoke --ca CA_FOLDER NAME`."
        )
    return crl


def revoke(
    ca: str | os.PathLike[str],
    names: Sequence[str] = (),
    *,
    certs: Sequence[str | os.PathLike[str]] = (),
) -> dict[str, Any]:
    """Revoke the certificates of parties ``names`` (their kits next to the CA folder ``ca``)
    and of the certificate files ``certs``: add their serial numbers to the project's signed
    CRL, ``ca/crl.pem``, and copy it into the server kit next to ``ca`` when there is one.

    The server checks every call's client certificate against the ``crl.pem`` of its kit
    folder and re-reads the file when it changes. Returns ``{"crl": path, "copies": [paths],
    "revoked": {serial_hex: name}, "added": [names]}``; revoking a certificate twice is a
    no-op. The CA key signs the CRL: run this where the CA folder is kept (offline).
    """
    if isinstance(names, str) or isinstance(certs, str):
        raise ConfigError("names and certs are lists, e.g. names=['site-2'].")
    if not names and not certs:
        raise ConfigError("name at least one site or admin to revoke (e.g. site-2).")
    ca_folder = Path(ca)
    ca_cert, ca_key = _load_ca(ca_folder)
    targets = [(name, _kit_certificate(ca_folder, name, ca_cert)) for name in names]
    for path in certs:
        cert = _issued_by(Path(path), ca_cert)
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        targets.append((str(cn[0].value) if cn else Path(path).name, cert))
    crl_path = ca_folder / CRL_FILE
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    entries: dict[int, dt.datetime] = {}
    number = 0
    if crl_path.exists():
        old = read_crl(crl_path, ca_cert)
        entries = {e.serial_number: e.revocation_date_utc for e in old}
        with contextlib.suppress(x509.ExtensionNotFound):
            number = old.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    added = [name for name, cert in targets if cert.serial_number not in entries]
    for _, cert in targets:
        entries.setdefault(cert.serial_number, now)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - _CLOCK_SKEW)
        .next_update(max(ca_cert.not_valid_after_utc, now + dt.timedelta(days=1)))
        .add_extension(x509.CRLNumber(number + 1), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
    )
    for serial, when in sorted(entries.items()):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    pem = builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    atomic_write_bytes(crl_path, pem)
    copies = []
    server_kit = ca_folder.parent / SERVER_FOLDER
    if (server_kit / KIT_CONFIG).is_file():
        atomic_write_bytes(server_kit / CRL_FILE, pem)
        copies.append(server_kit / CRL_FILE)
    return {
        "crl": crl_path,
        "copies": copies,
        "revoked": {f"{cert.serial_number:x}": name for name, cert in targets},
        "added": added,
    }
