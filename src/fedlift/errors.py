"""The one exception hierarchy of fedlift.

Every error fedlift raises on purpose is a :class:`FedliftError`. Errors that cross a
process boundary are sent by class name and rebuilt on the other side, so code on
either end can catch the same class (see :func:`error_from_name`).
"""

from __future__ import annotations

__all__ = [
    "ClientAPIError",
    "ClientFailedError",
    "ConfigError",
    "ConnectionLostError",
    "FedliftError",
    "InvalidResultError",
    "JobAbortedError",
    "JobFailedError",
    "PermissionDeniedError",
    "ProtocolError",
    "ReceiveTimeoutError",
    "RemoteError",
    "ResourceLimitError",
    "RoundTimeoutError",
    "StorageError",
    "TransportError",
    "TransportTimeoutError",
    "error_from_name",
]


class FedliftError(Exception):
    """Base class of every error fedlift raises on purpose."""


class ConfigError(FedliftError, ValueError):
    """A job, runner, workflow or CLI argument is invalid."""


class ClientAPIError(FedliftError, RuntimeError):
    """The Client API (``fedlift.client``) was used in the wrong order or with wrong values."""


class ReceiveTimeoutError(ClientAPIError, TimeoutError):
    """``receive(timeout=...)`` got no model in time."""


class ProtocolError(FedliftError, ValueError):
    """A message on the wire is malformed, too large or not what the protocol allows."""


class TransportError(FedliftError, ConnectionError):
    """A message could not be delivered."""


class ConnectionLostError(TransportError):
    """The peer is gone (process ended, network down, server stopped)."""


class TransportTimeoutError(TransportError, TimeoutError):
    """A call got no reply within its timeout."""


class RemoteError(FedliftError):
    """The peer failed with an error that has no fedlift class on this side."""


class ClientFailedError(FedliftError):
    """A client's training script raised, exited early or its process died.

    ``site``: the site that failed, where one did (None when the job as a whole ran out
    of sites); the message holds its traceback or what became of its process."""

    def __init__(self, *args: object, site: str | None = None) -> None:
        super().__init__(*args)
        self.site = site


class RoundTimeoutError(FedliftError, TimeoutError):
    """Too few clients answered within the round timeout."""


class JobAbortedError(FedliftError):
    """The job was stopped before it finished (by a failure elsewhere or by a user)."""


class JobFailedError(FedliftError):
    """A job ended failed (a site's error under ``on_client_error="fail"``, too few sites
    in a round, a server error), so it has no result; the message holds the reason."""


class InvalidResultError(ClientFailedError, ValueError):
    """A site's result cannot be aggregated: NaN or Inf values, keys, shapes or dtypes that
    differ from the global model, or a weight that is not a finite number > 0. The message
    names the site; the job's error policy decides whether the job fails or the site is left
    out of the round."""


class ResourceLimitError(ProtocolError):
    """A peer went past a limit the server keeps per peer (concurrent calls, message size,
    an idle stream): the call is refused before anything is allocated for it."""


class StorageError(FedliftError, OSError):
    """Writing to the workspace failed (disk full, read-only file system, no permission);
    what was on disk before the write is intact."""


class PermissionDeniedError(FedliftError):
    """The caller's certificate does not allow this operation (wrong role or another party's
    name)."""


_BY_NAME: dict[str, type[FedliftError]] = {
    cls.__name__: cls
    for cls in (
        FedliftError,
        ConfigError,
        ClientAPIError,
        ReceiveTimeoutError,
        ProtocolError,
        TransportError,
        TransportTimeoutError,
        ConnectionLostError,
        RemoteError,
        ClientFailedError,
        RoundTimeoutError,
        JobAbortedError,
        JobFailedError,
        PermissionDeniedError,
        InvalidResultError,
        ResourceLimitError,
        StorageError,
    )
}


def error_from_name(name: str, message: str) -> FedliftError:
    """Rebuild an error sent by a peer; unknown names become :class:`RemoteError`."""
    cls = _BY_NAME.get(name)
    if cls is None:
        return RemoteError(f"{name}: {message}")
    return cls(message)
