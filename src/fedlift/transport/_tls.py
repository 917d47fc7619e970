"""Mutual-TLS credentials for the gRPC transport, from a party's PEM files.

The transport is the layer that speaks gRPC, so this is where PEM bytes become gRPC
credentials. Provisioning (``fedlift.deploy``) decides which files a party uses and checks
them (``load_kit``); a site's worker (``fedlift.client``), which sits below deploy and must
not import it, is handed the three paths by whoever launched it and reads them here.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from ..errors import ConfigError

__all__ = ["read_tls_files", "tls_channel_credentials", "tls_server_credentials"]


def tls_server_credentials(ca: bytes, cert: bytes, key: bytes) -> grpc.ServerCredentials:
    """A server's side of mutual TLS: it presents ``cert`` (with ``key``) and accepts only
    clients whose certificate the CA ``ca`` signed (all PEM)."""
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )


def tls_channel_credentials(ca: bytes, cert: bytes, key: bytes) -> grpc.ChannelCredentials:
    """A client's side of mutual TLS: it presents ``cert`` (with ``key``) and trusts only a
    server whose certificate the CA ``ca`` signed (all PEM)."""
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


def read_tls_files(ca: Path, cert: Path, key: Path) -> tuple[bytes, bytes, bytes]:
    """``(ca, cert, key)`` as PEM bytes; a file that cannot be read is a ConfigError naming it.

    Only files that look like PEM are accepted: gRPC would take anything and fail later, at
    the handshake, with a message that names no file.
    """
    out = []
    for what, path in (("CA certificate", ca), ("certificate", cert), ("private key", key)):
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"cannot read the {what} file for mutual TLS ({exc.strerror or exc}). Pass the "
                f"files of this party's provisioned kit. Received: {what}={str(path)!r}."
            ) from None
        if b"-----BEGIN " not in data:
            raise ConfigError(
                f"the {what} file for mutual TLS is not PEM (no '-----BEGIN' line). Pass the "
                f"files of this party's provisioned kit. Received: {what}={str(path)!r}."
            )
        out.append(data)
    return out[0], out[1], out[2]
