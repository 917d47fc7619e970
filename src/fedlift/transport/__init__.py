"""Transports: one small interface, an in-memory twin and gRPC; see :mod:`.testing`.

The certificate identity names (:class:`Identity`, :func:`identity_of`, ...) load on first
use: they need ``cryptography``, which a plaintext transport (a simulator's site) never does.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._base import Handler, Listener, Transport, describe_error
from ._grpc import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_SHM_MIN_BYTES,
    DEFAULT_STREAM_MIN_BYTES,
    GrpcListener,
    GrpcTransport,
)
from ._memory import MemoryListener, MemoryTransport
from ._tls import read_tls_files, tls_channel_credentials, tls_server_credentials

if TYPE_CHECKING:
    from ._identity import (
        PROJECT_ATTRIBUTE,
        ROLE_ATTRIBUTE,
        ROLES,
        Identity,
        identity_from_pem,
        identity_of,
    )

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_SHM_MIN_BYTES",
    "DEFAULT_STREAM_MIN_BYTES",
    "PROJECT_ATTRIBUTE",
    "ROLES",
    "ROLE_ATTRIBUTE",
    "GrpcListener",
    "GrpcTransport",
    "Handler",
    "Identity",
    "Listener",
    "MemoryListener",
    "MemoryTransport",
    "Transport",
    "describe_error",
    "identity_from_pem",
    "identity_of",
    "read_tls_files",
    "tls_channel_credentials",
    "tls_server_credentials",
]

_LAZY = frozenset(
    {"PROJECT_ATTRIBUTE", "ROLES", "ROLE_ATTRIBUTE", "Identity", "identity_from_pem", "identity_of"}
)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module("._identity", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
