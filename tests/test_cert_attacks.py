"""Certificate attacks on the mutual-TLS boundary, re-run as a reliability suite, plus
revoked and expired site kits and the revocation list (``fedlift revoke``).

The TLS attacks are the deployment issue's own tests (tests/test_provision_tls.py), run
here with the ledger; the revocation tests use real handshakes over real gRPC.
"""

from __future__ import annotations

import datetime as dt
import inspect
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

import test_provision_tls as tls
from fedlift.cli import main
from fedlift.deploy import DeployServer, channel_credentials, load_kit, provision
from fedlift.deploy._provision import read_crl, revoke
from fedlift.deploy._tls import Revocations, server_credentials
from fedlift.errors import ConfigError, PermissionDeniedError
from test_provision_tls import forge, kits, other_kits, remote_kits  # noqa: F401  (fixtures)

# -------------------------------------------------- the deployment issue's attacks, re-run

# (test, attacks it tries): each test of tests/test_provision_tls.py that tries attacks on
# the TLS boundary for real, and how many distinct attacks it makes (counted from its body).
TLS_ATTACKS: list[tuple[Callable[..., None], int, str]] = [
    (tls.test_plaintext_and_certificateless_clients_are_refused, 2,
     "plaintext client; TLS client without a certificate"),
    (tls.test_a_client_of_another_project_is_refused, 2,
     "client of another CA (own root); of another CA trusting ours"),
    (tls.test_an_expired_client_certificate_is_refused, 1, "expired client certificate"),
    (tls.test_a_server_certificate_is_not_a_client_certificate, 1,
     "server kit used as a client"),
    (tls.test_the_client_checks_the_server_host_name, 2,
     "server reached by another host name; wrong name override"),
    (tls.test_a_site_certificate_cannot_serve_as_the_server, 1, "site certificate as server"),
    (tls.test_a_site_cannot_claim_another_name, 1, "peer name and role claimed on the wire"),
    (tls.test_without_tls_there_is_no_peer, 1, "peer claimed without TLS"),
    (tls.test_load_kit_says_what_is_wrong, 7,
     "kit: readable key, mixed CA, wrong key, renamed, key path escape, bad json, expired"),
    (tls.test_credentials_need_the_right_kind_of_kit, 2, "server kit as client and reverse"),
]  # fmt: skip


def fixture_args(test: Callable[..., None], available: dict[str, Any]) -> dict[str, Any]:
    return {name: available[name] for name in inspect.signature(test).parameters}


@pytest.mark.reliability
@pytest.mark.parametrize(
    ("test", "attacks", "what"), TLS_ATTACKS, ids=[t.__name__[5:] for t, _, _ in TLS_ATTACKS]
)
def test_tls_attacks_of_the_deployment_issue(
    reliability: Any,
    test: Callable[..., None],
    attacks: int,
    what: str,
    kits: Path,  # noqa: F811
    other_kits: Path,  # noqa: F811
    remote_kits: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    available = {"kits": kits, "other_kits": other_kits, "remote_kits": remote_kits}
    test(**fixture_args(test, {**available, "tmp_path": tmp_path}))
    reliability.hostile(f"TLS: {what}", tried=attacks)


# ---------------------------------------------------------------------- an expired site kit


@pytest.mark.reliability
def test_an_expired_site_kit_is_refused_by_the_site_and_the_server(
    reliability: Any,
    kits: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    expired = forge(kits, tmp_path / "expired", name="site-1", role="site", days=(-30, -1))
    config = json.loads((kits / "site-1" / "fedlift.json").read_text())
    (expired / "fedlift.json").write_text(json.dumps(config))
    os.chmod(expired / "key.pem", 0o600)
    with pytest.raises(ConfigError, match="expired on"):
        load_kit(expired)  # the site's own start refuses it, with the fix
    with serving(kits, Revocations(kits / "server")) as address:
        denied = call_raw(address, tls.raw_credentials(expired))
        assert denied is not None and denied.startswith("UNAVAILABLE"), denied
        assert call_raw(address, channel_credentials(kits / "site-1")) is None  # still serves
    reliability.hostile("expired site kit (load and handshake)", tried=2)


# --------------------------------------------------------------------------- revocation


@pytest.fixture
def project(tmp_path: Path) -> Path:
    out = tmp_path / "kits"
    provision("demo", "localhost:8002", ["site-1", "site-2", "site-3"], ["alice@org"], out)
    return out


def serial(kit: Path) -> int:
    return x509.load_pem_x509_certificate((kit / "cert.pem").read_bytes()).serial_number


def ca_cert(project: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate((project / "ca" / "ca.pem").read_bytes())


def test_cli_revoke_writes_a_signed_crl_and_copies_it_to_the_server_kit(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["revoke", "--ca", str(project / "ca"), "site-2"]) == 0
    printed = capsys.readouterr().out
    assert f"revoked: site-2 (serial {serial(project / 'site-2'):x})" in printed
    assert str(project / "server" / "crl.pem") in printed
    crl = read_crl(project / "ca" / "crl.pem", ca_cert(project))  # signed by the CA
    assert [e.serial_number for e in crl] == [serial(project / "site-2")]
    assert (project / "server" / "crl.pem").read_bytes() == (
        project / "ca" / "crl.pem"
    ).read_bytes()
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert number == 1

    # again, with another one: site-2 stays once, site-3 joins, the CRL number goes up
    assert main(["revoke", "--ca", str(project / "ca"), "site-2", "site-3"]) == 0
    printed = capsys.readouterr().out
    assert "already revoked: site-2" in printed and "revoked: site-3" in printed
    crl = read_crl(project / "ca" / "crl.pem", ca_cert(project))
    assert sorted(e.serial_number for e in crl) == sorted(
        [serial(project / "site-2"), serial(project / "site-3")]
    )
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 2
    assert serial(project / "site-1") not in {e.serial_number for e in crl}

    # a certificate file instead of a name (a kit no longer next to the CA folder)
    moved = project.parent / "moved-alice"
    shutil.move(project / "alice@org", moved)
    assert main(["revoke", "--ca", str(project / "ca"), "alice@org"]) == 1
    assert "there is no kit 'alice@org'" in capsys.readouterr().err
    assert main(["revoke", "--ca", str(project / "ca"), "--cert", str(moved / "cert.pem")]) == 0
    assert "revoked: alice@org" in capsys.readouterr().out


@pytest.mark.reliability
def test_revoke_refuses_what_it_cannot_vouch_for(
    reliability: Any,
    project: Path,
    other_kits: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    ca = str(project / "ca")
    cases = [
        (["revoke", "--ca", str(project / "site-1"), "site-2"], "is not a project CA folder"),
        (["revoke", "--ca", ca], "name at least one"),
        (["revoke", "--ca", ca, "../site-1"], "is not valid"),
        (["revoke", "--ca", ca, "server"], "provisioning's own folder"),
        (
            ["revoke", "--ca", ca, "--cert", str(other_kits / "site-1" / "cert.pem")],
            "was not signed by this project's CA",
        ),  # fmt: skip
    ]
    for argv, phrase in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert phrase in err and err.count("\n") == 1, err  # one clear line, no traceback
    assert not (project / "ca" / "crl.pem").exists()
    # a CRL in the CA folder that the CA did not sign is not extended, it is refused
    forged = forged_crl(other_kits / "ca", [serial(project / "site-1")])
    (project / "ca" / "crl.pem").write_bytes(forged)
    assert main(["revoke", "--ca", ca, "site-2"]) == 1
    assert "not signed by the project CA" in capsys.readouterr().err
    reliability.hostile("revoke with a bad CA, name, certificate or CRL", tried=len(cases) + 1)


def forged_crl(ca_folder: Path, serials: list[int]) -> bytes:
    """A CRL signed by the CA in ``ca_folder`` (another project's, for a forgery)."""
    ca = x509.load_pem_x509_certificate((ca_folder / "ca.pem").read_bytes())
    key = serialization.load_pem_private_key((ca_folder / "ca-key.pem").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(now)
        .next_update(now + dt.timedelta(days=1))
    )
    for number in serials:
        entry = x509.RevokedCertificateBuilder().serial_number(number).revocation_date(now)
        builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


# A real mutual-TLS server that checks each call's handshake certificate against the
# revocation list, as the deployment server does (see DeployServer.handle).


@pytest.fixture
def served_project(project: Path) -> Iterator[tuple[Path, str]]:
    with serving(project, Revocations(project / "server")) as address:
        yield project, address


def serving_handler(revocations: Revocations) -> grpc.GenericRpcHandler:
    def call(request: bytes, context: grpc.ServicerContext) -> bytes:
        auth = context.auth_context()
        pem = bytes(auth["x509_pem_cert"][0])
        name = auth["x509_common_name"][0].decode()
        try:
            revocations.check(pem, name, "site")
        except PermissionDeniedError as exc:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        return b"served " + name.encode()

    method = grpc.unary_unary_rpc_method_handler(call)
    return grpc.method_handlers_generic_handler("t.Revocation", {"Call": method})


class serving:
    def __init__(self, project: Path, revocations: Revocations) -> None:
        self.server = grpc.server(ThreadPoolExecutor(max_workers=4))
        self.server.add_generic_rpc_handlers((serving_handler(revocations),))
        port = self.server.add_secure_port("127.0.0.1:0", server_credentials(project / "server"))
        self.address = f"127.0.0.1:{port}"

    def __enter__(self) -> str:
        self.server.start()
        return self.address

    def __exit__(self, *exc: object) -> None:
        self.server.stop(0).wait()


def call_raw(address: str, credentials: grpc.ChannelCredentials) -> str | None:
    """None if served, else the refusal's details (or the handshake failure)."""
    channel = grpc.secure_channel(
        address, credentials, options=[("grpc.ssl_target_name_override", "localhost")]
    )
    try:
        reply = channel.unary_unary("/t.Revocation/Call")(b"hello", timeout=10)
        assert reply.startswith(b"served ")
        return None
    except grpc.RpcError as exc:
        return f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
    finally:
        channel.close()


@pytest.mark.reliability
def test_a_revoked_site_is_refused_over_mutual_tls_naming_it(
    reliability: Any, served_project: tuple[Path, str], caplog: pytest.LogCaptureFixture
) -> None:
    project, address = served_project
    site = {name: channel_credentials(project / name) for name in ("site-1", "site-2", "site-3")}
    assert [call_raw(address, site[n]) for n in sorted(site)] == [None, None, None]

    revoke(project / "ca", ["site-2"])  # while the server runs: it reads the new file
    denied = call_raw(address, site["site-2"])
    assert denied is not None and denied.startswith("PERMISSION_DENIED")
    assert f"site 'site-2' (serial {serial(project / 'site-2'):x}) was revoked" in denied
    assert call_raw(address, site["site-1"]) is None and call_raw(address, site["site-3"]) is None

    # a tampered list (signed by nobody we trust) is logged and changes nothing
    caplog.set_level(logging.ERROR, logger="fedlift.server")
    good = (project / "server" / "crl.pem").read_bytes()
    (project / "server" / "crl.pem").write_bytes(forged_crl(project / "ca", [])[:-40] + b"x\n")
    assert call_raw(address, site["site-2"]) is not None  # still revoked
    assert any("revocations read before stay" in r.getMessage() for r in caplog.records)
    # ... and so is a deleted one: deleting the file undoes no revocation
    (project / "server" / "crl.pem").unlink()
    assert call_raw(address, site["site-2"]) is not None
    (project / "server" / "crl.pem").write_bytes(good)
    revoke(project / "ca", ["site-3"])
    assert call_raw(address, site["site-3"]) is not None
    assert call_raw(address, site["site-1"]) is None  # the others are still served
    reliability.hostile("revoked site kits over mTLS", tried=4)
    reliability.hostile("tampered or deleted revocation list", tried=2)


@pytest.mark.reliability
def test_a_revocation_list_of_another_ca_is_refused_at_start(
    reliability: Any,
    project: Path,
    other_kits: Path,  # noqa: F811
) -> None:
    (project / "server" / "crl.pem").write_bytes(forged_crl(other_kits / "ca", []))
    with pytest.raises(ConfigError, match="revocation list cannot be used.*not signed by the"):
        Revocations(project / "server")
    (project / "server" / "crl.pem").write_bytes(b"-----BEGIN X509 CRL-----\nnope\n")
    with pytest.raises(ConfigError, match="is not a PEM certificate revocation list"):
        Revocations(project / "server")
    (project / "server" / "crl.pem").unlink()
    assert Revocations(project / "server").serials == frozenset()  # no list: none revoked
    reliability.hostile("revocation list of another CA or not a CRL", tried=2)


def test_revocations_check_names_the_peer_and_passes_the_others(project: Path) -> None:
    revoke(project / "ca", ["site-2", "alice@org"])
    revocations = Revocations(project / "server")
    assert revocations.serials == {serial(project / "site-2"), serial(project / "alice@org")}
    pem = (project / "alice@org" / "cert.pem").read_bytes()
    with pytest.raises(PermissionDeniedError, match="admin 'alice@org' .* was revoked on"):
        revocations.check(pem, "alice@org", "admin")
    revocations.check((project / "site-1" / "cert.pem").read_bytes(), "site-1", "site")
    revocations.check(None, None, None)  # no TLS: nothing to check (no peer either)


# ------------------------------------------------ the deployment server, once it is wired


@pytest.mark.reliability
def test_the_deployment_server_refuses_a_revoked_site(
    reliability: Any, project: Path, tmp_path: Path
) -> None:
    from test_deploy_server import Party

    with DeployServer(project / "server", tmp_path / "ws", address="127.0.0.1:0") as server:
        if not hasattr(server, "revocations"):
            pytest.skip(
                "DeployServer does not check revocations yet: it needs the wiring in "
                "deploy/_server.py and transport/_grpc.py described in the rel-hostile report"
            )
        parties = {n: Party(project, n, server.address) for n in ("site-1", "site-2")}
        try:
            assert parties["site-2"].call("next_job", {"wait": 0}).op == "none"
            revoke(project / "ca", ["site-2"])
            with pytest.raises(PermissionDeniedError, match="'site-2' .* was revoked"):
                parties["site-2"].call("next_job", {"wait": 0})
            assert parties["site-1"].call("next_job", {"wait": 0}).op == "none"
        finally:
            for party in parties.values():
                party.close()
    reliability.hostile("revoked site kit against DeployServer", tried=1)
