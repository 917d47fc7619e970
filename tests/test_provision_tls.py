"""Provisioning and mutual TLS: kit layout and modes, certificate contents, and every attack
on the gRPC boundary tried for real (each one must fail), plus the conformance suite over TLS.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedlift.cli import main
from fedlift.client.worker import main as worker_main
from fedlift.client.worker import run_worker
from fedlift.codec import Message, decode, encode
from fedlift.deploy import Kit, channel_credentials, load_kit, provision, server_credentials
from fedlift.deploy._provision import issue_certificate
from fedlift.errors import ConfigError, ConnectionLostError
from fedlift.transport import (
    GrpcListener,
    GrpcTransport,
    Handler,
    MemoryListener,
    read_tls_files,
    tls_channel_credentials,
    tls_server_credentials,
)
from fedlift.transport.testing import CHECKS, Factory

SITES = ["site-1", "site-2"]
ADMINS = ["alice@org"]
PARTY_FILES = {"ca.pem", "cert.pem", "key.pem", "fedlift.json"}
PARTY_FILES_PEM = ("ca.pem", "cert.pem", "key.pem")


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Project 'demo' whose server is local (its certificate names localhost, 127.0.0.1)."""
    out = tmp_path_factory.mktemp("demo") / "kits"
    provision("demo", "localhost:8002", SITES, ADMINS, out)
    return out


@pytest.fixture(scope="module")
def other_kits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another project with its own CA and a site of the same name."""
    out = tmp_path_factory.mktemp("other") / "kits"
    provision("other", "localhost:8002", ["site-1"], [], out)
    return out


@pytest.fixture(scope="module")
def remote_kits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project whose server certificate is for server.example.org only."""
    out = tmp_path_factory.mktemp("remote") / "kits"
    provision("demo", "server.example.org:8002", ["site-1"], [], out)
    return out


def cert_of(folder: Path, name: str = "cert.pem") -> x509.Certificate:
    return x509.load_pem_x509_certificate((folder / name).read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def recording() -> tuple[list[Message], Handler]:
    seen: list[Message] = []

    def handler(request: Message) -> Message:
        seen.append(request)
        return Message("ok", {"peer": request.peer, "peer_role": request.peer_role})

    return seen, handler


@contextmanager
def serving(server_kit: Path, handler: Handler) -> Iterator[GrpcListener]:
    listener = GrpcListener(handler, "127.0.0.1:0", credentials=server_credentials(server_kit))
    try:
        yield listener
    finally:
        listener.stop(0)


def call(
    address: str,
    credentials: grpc.ChannelCredentials | None,
    request: Message | None = None,
    server_name_override: str | None = None,
) -> Message:
    transport = GrpcTransport(
        address, credentials=credentials, server_name_override=server_name_override
    )
    try:
        return transport.call(request or Message("hello"), timeout=10)
    finally:
        transport.close()


def raw_credentials(folder: Path, ca_from: Path | None = None) -> grpc.ChannelCredentials:
    """Client credentials straight from the files, skipping load_kit's own checks."""
    return grpc.ssl_channel_credentials(
        root_certificates=((ca_from or folder) / "ca.pem").read_bytes(),
        private_key=(folder / "key.pem").read_bytes(),
        certificate_chain=(folder / "cert.pem").read_bytes(),
    )


def forge(
    kits: Path,
    target: Path,
    *,
    name: str,
    role: str,
    days: tuple[int, int] = (-1, 30),
    server_names: list[x509.GeneralName] | None = None,
) -> Path:
    """A certificate signed by the project's real CA (as if its key were used), in a folder."""
    ca_cert = cert_of(kits / "ca", "ca.pem")
    ca_key = serialization.load_pem_private_key((kits / "ca" / "ca-key.pem").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    now = dt.datetime.now(dt.timezone.utc)
    cert, key = issue_certificate(
        ca_cert,
        ca_key,
        name=name,
        role=role,
        project="demo",
        not_before=now + dt.timedelta(days=days[0]),
        not_after=now + dt.timedelta(days=days[1]),
        server_names=server_names or [],
    )
    target.mkdir(parents=True, exist_ok=True)
    (target / "ca.pem").write_bytes((kits / "ca" / "ca.pem").read_bytes())
    (target / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (target / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return target


# --------------------------------------------------------------------------- provisioning


def test_layout_modes_and_returned_folders(tmp_path: Path) -> None:
    out = tmp_path / "kits"
    folders = provision("demo", "server.example.org:8002", SITES, ADMINS, out, valid_days=30)
    assert folders == {name: out / name for name in ["ca", "server", *SITES, *ADMINS]}
    assert sorted(p.name for p in out.iterdir()) == sorted([*folders, "provision.json"])
    assert mode(out) == 0o700
    for party in ["server", *SITES, *ADMINS]:
        kit = out / party
        assert {p.name for p in kit.iterdir()} == PARTY_FILES, party
        assert mode(kit) == 0o700, party
        assert mode(kit / "key.pem") == 0o600, party
        assert (kit / "ca.pem").read_bytes() == (out / "ca" / "ca.pem").read_bytes()
    assert {p.name for p in (out / "ca").iterdir()} == {"ca.pem", "ca-key.pem"}
    assert mode(out / "ca") == 0o700 and mode(out / "ca" / "ca-key.pem") == 0o600

    config = json.loads((out / "site-1" / "fedlift.json").read_text())
    assert {k: config[k] for k in ("role", "name", "project", "server")} == {
        "role": "site",
        "name": "site-1",
        "project": "demo",
        "server": "server.example.org:8002",
    }
    assert (config["ca"], config["cert"], config["key"]) == ("ca.pem", "cert.pem", "key.pem")
    manifest = json.loads((out / "provision.json").read_text())
    assert [(k["folder"], k["role"]) for k in manifest["kits"]] == [
        ("server", "server"),
        ("site-1", "site"),
        ("site-2", "site"),
        ("alice@org", "admin"),
    ]
    assert not list(tmp_path.glob(".kits*")), "a temporary folder was left behind"


def test_keys_never_exist_with_wider_permissions(tmp_path: Path) -> None:
    """Even with a permissive umask the keys are created 0600 (not chmod-ed afterwards)."""
    old = os.umask(0)
    try:
        out = tmp_path / "kits"
        provision("demo", "server.example.org:8002", ["site-1"], [], out)
    finally:
        os.umask(old)
    keys = [out / "ca" / "ca-key.pem", out / "server" / "key.pem", out / "site-1" / "key.pem"]
    assert [mode(k) for k in keys] == [0o600] * 3
    assert mode(out / "site-1") == 0o700


def test_the_ca_key_is_in_no_party_kit(tmp_path: Path) -> None:
    out = tmp_path / "kits"
    provision("demo", "server.example.org:8002", SITES, ADMINS, out)
    ca_key = (out / "ca" / "ca-key.pem").read_bytes()
    holders = [p for p in out.rglob("*") if p.is_file() and p.read_bytes() == ca_key]
    assert holders == [out / "ca" / "ca-key.pem"]
    party_files = [p for p in out.rglob("*") if p.is_file() and p.parent.name != "ca"]
    assert not any(b"PRIVATE KEY" in p.read_bytes() and p.name != "key.pem" for p in party_files)
    with pytest.raises(ConfigError, match="CA's folder, not a kit"):
        load_kit(out / "ca")


def test_certificates_name_roles_hosts_and_usages(tmp_path: Path) -> None:
    out = tmp_path / "kits"
    provision("demo", "server.example.org:8002", SITES, ADMINS, out, valid_days=10)
    ca = cert_of(out / "ca", "ca.pem")
    basic = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)

    def attr(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> list[object]:
        return [a.value for a in cert.subject.get_attributes_for_oid(oid)]

    server = cert_of(out / "server")
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["server.example.org"]
    assert names.get_values_for_type(x509.IPAddress) == []  # no localhost for a remote host
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert attr(server, NameOID.ORGANIZATIONAL_UNIT_NAME) == ["server"]

    for name, role in [("site-1", "site"), ("site-2", "site"), ("alice@org", "admin")]:
        cert = cert_of(out / name)
        cert.verify_directly_issued_by(ca)
        assert attr(cert, NameOID.COMMON_NAME) == [name]
        assert attr(cert, NameOID.ORGANIZATIONAL_UNIT_NAME) == [role]
        assert attr(cert, NameOID.ORGANIZATION_NAME) == ["demo"]
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        assert dt.timedelta(days=10) <= lifetime <= dt.timedelta(days=10, minutes=6)


@pytest.mark.parametrize(
    ("server", "dns", "ips"),
    [
        ("10.0.0.5:8002", [], ["10.0.0.5"]),
        ("[2001:db8::5]:8002", [], ["2001:db8::5"]),
        ("Server.Example.ORG:443", ["server.example.org"], []),
        ("localhost:8002", ["localhost"], ["127.0.0.1", "::1"]),
        ("127.0.0.1:8002", ["localhost"], ["127.0.0.1", "::1"]),
    ],
)
def test_server_names_by_address_kind(
    tmp_path: Path, server: str, dns: list[str], ips: list[str]
) -> None:
    provision("p", server, ["site-1"], [], tmp_path / "k")
    sans = cert_of(tmp_path / "k" / "server").extensions
    names = sans.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == dns
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address(i) for i in ips]


@pytest.mark.parametrize(
    ("sites", "admins", "server", "message"),
    [
        (["site 1"], [], "h:1", "site name 'site 1' is not valid"),
        (["../etc"], [], "h:1", "not valid"),
        ([".hidden"], [], "h:1", "not valid"),
        (["a" * 65], [], "h:1", "not valid"),
        (["site-1/x"], [], "h:1", "not valid"),
        (["site-1"], ["eve,OU=admin"], "h:1", "admin name 'eve,OU=admin' is not valid"),
        (["server"], [], "h:1", "reserved"),
        (["CA"], [], "h:1", "reserved"),
        (["site-1", "site-1"], [], "h:1", "collides with site 'site-1'"),
        (["site-1", "SITE-1"], [], "h:1", "ignoring case"),
        (["alice"], ["alice"], "h:1", "collides"),
        ([], [], "h:1", "at least one site"),
        ("site-1", [], "h:1", "lists of names"),
        (["h.example.org"], [], "H.example.org:1", "server's host name"),
        (["site-1"], [], "h", "not host:port"),
        (["site-1"], [], "h:0", "port must be"),
        (["site-1"], [], "h:99999", "port must be"),
        (["site-1"], [], "0.0.0.0:8002", "not an address clients can connect to"),
        (["site-1"], [], "bad_host:8002", "neither an IP address nor a valid DNS name"),
        (["site-1"], [], "::1:8002", "[addr]:port"),
    ],
)
def test_names_and_addresses_are_validated(
    tmp_path: Path, sites: list[str], admins: list[str], server: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        provision("demo", server, sites, admins, tmp_path / "kits")
    assert not (tmp_path / "kits").exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("days", [0, -5, 10**6, True, 1.5])
def test_valid_days_is_checked(tmp_path: Path, days: object) -> None:
    with pytest.raises(ConfigError, match="valid_days"):
        provision("demo", "h:1", ["s"], [], tmp_path / "k", valid_days=days)  # type: ignore[arg-type]


def test_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    out = tmp_path / "kits"
    provision("demo", "h.example.org:1", ["site-1"], [], out)
    first_ca = (out / "ca" / "ca.pem").read_bytes()
    with pytest.raises(ConfigError, match="not empty.*new project CA.*--force"):
        provision("demo", "h.example.org:1", ["site-1"], [], out)
    assert (out / "ca" / "ca.pem").read_bytes() == first_ca

    provision("demo", "h.example.org:1", ["site-9"], [], out, force=True)
    assert (out / "ca" / "ca.pem").read_bytes() != first_ca
    assert not (out / "site-1").exists() and (out / "site-9").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kits"]  # nothing left behind

    empty = tmp_path / "empty"
    empty.mkdir()
    provision("demo", "h.example.org:1", ["site-1"], [], empty)  # an empty folder is fine
    assert (empty / "site-1" / "key.pem").is_file()


def test_force_only_replaces_kits_fedlift_made(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("precious")
    with pytest.raises(ConfigError, match="not a folder of fedlift kits"):
        provision("demo", "h.example.org:1", ["site-1"], [], home, force=True)
    assert (home / "thesis.tex").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        provision("demo", "h.example.org:1", ["site-1"], [], tmp_path / "file")


def test_cli_provision_prints_who_gets_which_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "kits"
    argv = ["provision", "--project", "demo", "--server", "server.example.org:8002"]
    argv += ["--sites", "site-1,site-2", "--admin", "alice@org", "-o", str(out)]
    assert main([*argv, "--valid-days", "7"]) == 0
    printed = capsys.readouterr().out
    assert f"{out}/server/" in printed and "the server (server.example.org:8002)" in printed
    assert f"{out}/site-2/" in printed and "site site-2" in printed
    assert "admin alice@org" in printed and "keep it offline" in printed
    assert load_kit(out / "alice@org").role == "admin"
    assert main(argv) == 1  # again without --force
    assert "not empty" in capsys.readouterr().err
    assert main([*argv, "--force", "--sites", "site-3"]) == 0
    assert (out / "site-3").is_dir()
    bad = ["provision", "--project", "demo", "--server", "s:1", "--sites", "server", "-o", "x"]
    assert main(bad) == 1
    assert "reserved" in capsys.readouterr().err


# ----------------------------------------------------------------------------- load_kit


def test_load_kit_reads_a_kit(kits: Path) -> None:
    kit = load_kit(kits / "site-1")
    assert (kit.role, kit.name, kit.project, kit.server) == (
        "site",
        "site-1",
        "demo",
        "localhost:8002",
    )
    assert (kit.server_host, kit.server_port) == ("localhost", 8002)
    assert load_kit(kits / "site-1" / "fedlift.json") == kit
    assert load_kit(kits / "server").name == "localhost"
    assert isinstance(kit, Kit) and kit.valid_until > dt.datetime.now(dt.timezone.utc)


def copy_kit(source: Path, target: Path) -> Path:
    target.mkdir()
    for f in source.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    os.chmod(target / "key.pem", 0o600)
    return target


def test_load_kit_says_what_is_wrong(kits: Path, other_kits: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no kit folder"):
        load_kit(tmp_path / "missing")
    with pytest.raises(ConfigError, match="holds no fedlift.json"):
        load_kit(tmp_path)

    loose = copy_kit(kits / "site-1", tmp_path / "loose")
    os.chmod(loose / "key.pem", 0o644)
    with pytest.raises(ConfigError, match="can be read by other users.*chmod 600"):
        load_kit(loose)

    mixed = copy_kit(kits / "site-1", tmp_path / "mixed")
    (mixed / "ca.pem").write_bytes((other_kits / "ca" / "ca.pem").read_bytes())
    with pytest.raises(ConfigError, match="not signed by the CA"):
        load_kit(mixed)

    wrong_key = copy_kit(kits / "site-1", tmp_path / "wrong-key")
    (wrong_key / "key.pem").write_bytes((kits / "site-2" / "key.pem").read_bytes())
    with pytest.raises(ConfigError, match="is not the private key of"):
        load_kit(wrong_key)

    renamed = copy_kit(kits / "site-1", tmp_path / "renamed")
    config = json.loads((renamed / "fedlift.json").read_text())
    (renamed / "fedlift.json").write_text(json.dumps({**config, "name": "site-2"}))
    with pytest.raises(ConfigError, match="says role='site', name='site-2'.*name='site-1'"):
        load_kit(renamed)
    (renamed / "fedlift.json").write_text(json.dumps({**config, "key": "../site-2/key.pem"}))
    with pytest.raises(ConfigError, match="file name inside the kit folder"):
        load_kit(renamed)
    (renamed / "fedlift.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_kit(renamed)

    expired = forge(kits, tmp_path / "expired", name="site-1", role="site", days=(-30, -1))
    (expired / "fedlift.json").write_text(json.dumps(config))
    os.chmod(expired / "key.pem", 0o600)
    with pytest.raises(ConfigError, match="expired on .*Provision new kits"):
        load_kit(expired)


def test_credentials_need_the_right_kind_of_kit(kits: Path) -> None:
    with pytest.raises(ConfigError, match="the server needs the server kit"):
        server_credentials(kits / "site-1")
    with pytest.raises(ConfigError, match="connects with its own kit"):
        channel_credentials(kits / "server")
    assert isinstance(server_credentials(load_kit(kits / "server")), grpc.ServerCredentials)


# ------------------------------------------------------------ identity over real gRPC + TLS


def test_a_site_is_known_by_its_certificate(kits: Path) -> None:
    seen, handler = recording()
    with serving(kits / "server", handler) as listener:
        reply = call(listener.address, channel_credentials(kits / "site-1"))
        assert reply.fields == {"peer": "site-1", "peer_role": "site"}
        call(listener.address, channel_credentials(kits / "site-2"))
        call(listener.address, channel_credentials(kits / "alice@org"))
    assert [(m.peer, m.peer_role) for m in seen] == [
        ("site-1", "site"),
        ("site-2", "site"),
        ("alice@org", "admin"),
    ]


def test_a_worker_connects_with_its_kits_files(kits: Path, tmp_path: Path) -> None:
    """A site's worker is handed its kit's three files, not the kit (reading a kit is
    deploy's part, and the worker sits below deploy), and connects with mutual TLS as the
    site: the server knows it by its certificate."""
    seen: list[tuple[str, str | None, str | None]] = []

    def handler(request: Message) -> Message:
        seen.append((request.op, request.peer, request.peer_role))
        return Message("nope" if request.op == "register" else "ok")

    kit = load_kit(kits / "site-1")
    with serving(kits / "server", handler) as listener:
        code = run_worker(
            listener.address, "site-1", tmp_path, tls=(kit.ca, kit.cert, kit.key),
            reconnect_seconds=5,
        )  # fmt: skip
    assert code == 1  # the handler's "nope" is no welcome: the worker reports and gives up
    assert seen == [("register", "site-1", "site"), ("client_error", "site-1", "site")]


def test_the_workers_tls_files_are_checked(kits: Path, tmp_path: Path) -> None:
    site = kits / "site-1"
    ca, cert, key = read_tls_files(site / "ca.pem", site / "cert.pem", site / "key.pem")
    assert (ca, cert, key) == tuple((site / f).read_bytes() for f in PARTY_FILES_PEM)
    assert isinstance(tls_channel_credentials(ca, cert, key), grpc.ChannelCredentials)
    assert isinstance(tls_server_credentials(ca, cert, key), grpc.ServerCredentials)
    with pytest.raises(ConfigError, match=r"cannot read the private key .*Received: private key="):
        read_tls_files(site / "ca.pem", site / "cert.pem", tmp_path / "missing.pem")
    (tmp_path / "ca.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match="CA certificate file for mutual TLS is not PEM"):
        read_tls_files(tmp_path / "ca.pem", site / "cert.pem", site / "key.pem")
    with pytest.raises(SystemExit) as stopped:  # all three files, or none
        worker_main(["--server", "localhost:1", "--site", "site-1", "--tls-ca", str(site)])
    assert stopped.value.code == 2


def test_a_site_cannot_claim_another_name(kits: Path) -> None:
    """Request fields and even a Message built with peer=... do not reach the handler:
    the identity comes from the certificate, and peer is never encoded."""
    forged = Message("submit", {"site": "site-2"}, peer="site-2", peer_role="admin")
    assert decode(encode(forged).tobytearray()).peer is None
    seen, handler = recording()
    with serving(kits / "server", handler) as listener:
        reply = call(listener.address, channel_credentials(kits / "site-1"), forged)
    assert reply.fields == {"peer": "site-1", "peer_role": "site"}
    assert (seen[0].peer, seen[0].peer_role, seen[0].fields) == ("site-1", "site", forged.fields)
    assert reply.peer is None  # nor does the client learn anything from the reply's wire


def test_without_tls_there_is_no_peer() -> None:
    seen, handler = recording()
    forged = Message("hello", peer="site-2", peer_role="admin")
    listener = GrpcListener(handler, "127.0.0.1:0")
    try:
        call(listener.address, None, forged)
    finally:
        listener.stop(0)
    memory = MemoryListener(handler)
    memory.connect().call(forged, timeout=5)
    assert [(m.peer, m.peer_role) for m in seen] == [(None, None), (None, None)]


def test_plaintext_and_certificateless_clients_are_refused(kits: Path) -> None:
    seen, handler = recording()
    with serving(kits / "server", handler) as listener:
        with pytest.raises(ConnectionLostError):
            call(listener.address, None)  # no TLS at all
        ca_only = grpc.ssl_channel_credentials((kits / "ca" / "ca.pem").read_bytes())
        with pytest.raises(ConnectionLostError):
            call(listener.address, ca_only)  # TLS, server verified, but no client certificate
        call(listener.address, channel_credentials(kits / "site-1"))  # the server still serves
    assert [m.peer for m in seen] == ["site-1"]


def test_a_client_of_another_project_is_refused(kits: Path, other_kits: Path) -> None:
    seen, handler = recording()
    with serving(kits / "server", handler) as listener:
        # its own CA as root: the server's certificate fails the client's check, and ...
        with pytest.raises(ConnectionLostError, match="CERTIFICATE_VERIFY_FAILED"):
            call(listener.address, channel_credentials(other_kits / "site-1"))
        # ... trusting our CA does not help: the server refuses its certificate
        with pytest.raises(ConnectionLostError):
            call(listener.address, raw_credentials(other_kits / "site-1", ca_from=kits / "ca"))
        call(listener.address, channel_credentials(kits / "site-1"))  # ours still get in
    assert [m.peer for m in seen] == ["site-1"]


def test_an_expired_client_certificate_is_refused(kits: Path, tmp_path: Path) -> None:
    expired = forge(kits, tmp_path / "expired", name="site-1", role="site", days=(-30, -1))
    fresh = forge(kits, tmp_path / "fresh", name="site-1", role="site", days=(-1, 1))
    seen, handler = recording()
    with serving(kits / "server", handler) as listener:
        with pytest.raises(ConnectionLostError):
            call(listener.address, raw_credentials(expired))
        call(listener.address, raw_credentials(fresh))  # same CA and helper: only dates differ
    assert [m.peer for m in seen] == ["site-1"]


def test_a_server_certificate_is_not_a_client_certificate(kits: Path) -> None:
    """The server's own kit lacks the clientAuth usage: a stolen server kit cannot act as a
    client (the server refuses it: 'unsupported certificate purpose')."""
    seen, handler = recording()
    with serving(kits / "server", handler) as listener:
        with pytest.raises(ConnectionLostError):
            call(listener.address, raw_credentials(kits / "server"))
        call(listener.address, channel_credentials(kits / "site-1"))
    assert [m.peer for m in seen] == ["site-1"]


def test_the_client_checks_the_server_host_name(remote_kits: Path) -> None:
    """A server certificate for server.example.org, reached as 127.0.0.1: refused unless the
    client says which name to expect. Deployed clients connect to the name in the cert."""
    seen, handler = recording()
    site = channel_credentials(remote_kits / "site-1")
    with serving(remote_kits / "server", handler) as listener:
        with pytest.raises(ConnectionLostError, match="Hostname Verification"):
            call(listener.address, site)
        with pytest.raises(ConnectionLostError, match="Hostname Verification"):
            call(listener.address, site, server_name_override="other.example.org")
        reply = call(listener.address, site, server_name_override="server.example.org")
    assert reply.fields == {"peer": "site-1", "peer_role": "site"}
    assert len(seen) == 1


def test_a_site_certificate_cannot_serve_as_the_server(kits: Path, tmp_path: Path) -> None:
    """A site holding a CA-signed certificate that even names the server's host cannot pose
    as the server: it lacks the serverAuth usage."""
    rogue = forge(
        kits,
        tmp_path / "rogue",
        name="localhost",
        role="site",
        server_names=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    seen, handler = recording()
    credentials = grpc.ssl_server_credentials(
        [((rogue / "key.pem").read_bytes(), (rogue / "cert.pem").read_bytes())],
        root_certificates=(kits / "ca" / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    listener = GrpcListener(handler, "127.0.0.1:0", credentials=credentials)
    try:
        with pytest.raises(ConnectionLostError, match="unsupported certificate purpose"):
            call(listener.address, channel_credentials(kits / "site-1"))
    finally:
        listener.stop(0)
    assert seen == []


# ------------------------------------------------------------------ conformance over TLS


def tls_factory(kits: Path) -> Callable[[Handler], tuple[GrpcListener, GrpcTransport]]:
    server, site = server_credentials(kits / "server"), channel_credentials(kits / "site-1")

    def factory(handler: Handler) -> tuple[GrpcListener, GrpcTransport]:
        listener = GrpcListener(handler, "127.0.0.1:0", credentials=server)
        return listener, GrpcTransport(listener.address, credentials=site)

    return factory


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__ for c in CHECKS])
def test_conformance_over_mutual_tls(kits: Path, check: Callable[[Factory], None]) -> None:
    check(tls_factory(kits))  # type: ignore[arg-type]
