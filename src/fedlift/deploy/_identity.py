"""The certificate identity convention, defined in :mod:`fedlift.transport._identity` (the
transport names its peers by it, and transport must not import deploy)."""

from ..transport._identity import (
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
