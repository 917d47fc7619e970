"""The certificate identity convention, defined in the transport (:class:`~fedlift.transport.
Identity`: the transport names its peers by it, and transport must not import deploy)."""

from ..transport import (
    PROJECT_ATTRIBUTE,
    ROLE_ATTRIBUTE,
    ROLES,
    Identity,
    identity_from_pem,
    identity_of,
)

__all__ = [
    "PROJECT_ATTRIBUTE",
    "ROLE_ATTRIBUTE",
    "ROLES",
    "Identity",
    "identity_from_pem",
    "identity_of",
]
