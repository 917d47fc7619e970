"""Deployment across machines: provisioning kits and mutual TLS with certificate identities.

``provision`` makes a project CA and a kit per party (server, sites, admins); the server
serves with ``server_credentials(kit)``, sites and admins connect with
``channel_credentials(kit)``, and every request a TLS :class:`~fedlift.transport.GrpcListener`
hands its handler carries ``peer`` and ``peer_role`` from the client's verified certificate
(never from the wire). ``job.run(PocEnv(...))`` runs a job on a POC it starts and stops on
this machine; ``job.run(ProdEnv(kit=ADMIN_KIT))`` submits it to a deployed server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._exports import lazy_exports
from ._commands import add_revoke_command, add_site_commands, run_revoke, run_site_command

if TYPE_CHECKING:  # loaded on first use: the CLI's parser needs none of it (cryptography)
    from ._env import PocEnv, ProdEnv
    from ._identity import ROLES
    from ._live import LiveView
    from ._provision import provision, revoke
    from ._server import DeployServer
    from ._tls import Kit, Revocations, channel_credentials, load_kit, server_credentials
    from ._webtoken import make_web_token, verify_web_token

__all__ = [
    "ROLES",
    "DeployServer",
    "PocEnv",
    "ProdEnv",
    "Kit",
    "LiveView",
    "Revocations",
    "add_revoke_command",
    "add_site_commands",
    "channel_credentials",
    "load_kit",
    "make_web_token",
    "provision",
    "revoke",
    "run_revoke",
    "run_site_command",
    "server_credentials",
    "verify_web_token",
]

_LAZY = {
    "PocEnv": "_env",
    "ProdEnv": "_env",
    "ROLES": "_identity",
    "provision": "_provision",
    "revoke": "_provision",
    "DeployServer": "_server",
    "Kit": "_tls",
    "Revocations": "_tls",
    "channel_credentials": "_tls",
    "load_kit": "_tls",
    "server_credentials": "_tls",
    "LiveView": "_live",
    "make_web_token": "_webtoken",
    "verify_web_token": "_webtoken",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals(), __all__)
