"""Transports: one small interface, an in-memory twin and gRPC; see :mod:`.testing`."""

from ._base import Handler, Listener, Transport, describe_error
from ._grpc import DEFAULT_CHUNK_BYTES, DEFAULT_SHM_MIN_BYTES, GrpcListener, GrpcTransport
from ._memory import MemoryListener, MemoryTransport

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_SHM_MIN_BYTES",
    "GrpcListener",
    "GrpcTransport",
    "Handler",
    "Listener",
    "MemoryListener",
    "MemoryTransport",
    "Transport",
    "describe_error",
]
