"""The layers are imported in one direction only, checked from the source.

model -> codec -> transport -> server -> client -> job -> simulator / deploy -> cli: a module
of one package imports only from its own package, from packages below it, and from the
shared modules (``errors``, ``_atomic``, ``_malloc``, ``data``); never a private module
(``_name``) of another package, and simulator and deploy do not import each other. The
shared modules sit below every layer, so they import no layer. Function-level (lazy)
imports count too: a lazy import still runs against the direction.
"""

from __future__ import annotations

import ast
from pathlib import Path

import fedlift

SRC = Path(fedlift.__file__).resolve().parent
RANK = {
    "model": 0,
    "codec": 1,
    "transport": 2,
    "server": 3,
    "client": 4,
    "job": 5,
    "simulator": 6,
    "deploy": 6,
    "cli": 7,
}
SHARED = {"errors", "_atomic", "_malloc", "_paths", "data"}
"""Modules below every layer: any package may import them (a shared package only through
its public ``__init__``), and they import no layer."""


def _package(path: Path) -> str:
    parts = path.relative_to(SRC).parts
    return parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")


def _imported(path: Path, tree: ast.Module) -> list[tuple[int, list[str]]]:
    """Every ``fedlift.*`` name the module imports, as dotted parts, with its line."""
    package = ["fedlift", *path.relative_to(SRC).parent.parts]
    found: list[tuple[int, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = base + (node.module.split(".") if node.module else [])
            else:
                module = (node.module or "").split(".")
            if module[0] == "fedlift":
                found += [(node.lineno, [*module, alias.name]) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [
                (node.lineno, alias.name.split("."))
                for alias in node.names
                if alias.name.split(".")[0] == "fedlift"
            ]
    return found


def violations(path: Path, source: str) -> list[str]:
    """What ``source`` (the text of ``path`` in the package) imports against the rules."""
    own = _package(path)
    tree = ast.parse(source, filename=str(path))
    out = []
    for line, parts in _imported(path, tree):
        if len(parts) < 2 or parts[1] == own:
            continue
        target, where = parts[1], f"{path.relative_to(SRC)}:{line} imports {'.'.join(parts)}"
        if target in SHARED:
            if (SRC / target).is_dir() and any(part.startswith("_") for part in parts[2:]):
                out.append(f"{where}: a private module of {target}")
            continue
        if target not in RANK:
            continue
        if own in SHARED:
            out.append(f"{where}: {own} is shared (below every layer) and imports no layer")
            continue
        if own not in RANK:
            continue  # fedlift/__init__.py and __main__.py sit above every layer
        if RANK[target] > RANK[own]:
            out.append(f"{where}: {own} is below {target}")
        elif RANK[target] == RANK[own]:
            out.append(f"{where}: {own} and {target} are siblings")
        if any(part.startswith("_") for part in parts[2:]):
            out.append(f"{where}: a private module of {target}")
    return out


def _without_line(violation: str) -> str:
    path, rest = violation.split(" imports ", 1)
    return f"{path.rsplit(':', 1)[0]} imports {rest}"


KNOWN: frozenset[str] = frozenset(
    # Debt from before this test existed: each entry is to go (public re-exports, and the
    # simulator handed to the job API by fedlift/__init__). The list may only shrink.
    [
        "cli.py imports fedlift.deploy._commands.add_revoke_command: a private module of deploy",
        "cli.py imports fedlift.deploy._commands.add_site_commands: a private module of deploy",
        "cli.py imports fedlift.deploy._commands.run_revoke: a private module of deploy",
        "cli.py imports fedlift.deploy._commands.run_site_command: a private module of deploy",
        "client/_remote.py imports fedlift.codec._shm: a private module of codec",
        "client/_service.py imports fedlift.codec._shm: a private module of codec",
        "client/_worker.py imports fedlift.codec._remote: a private module of codec",
        "client/_worker.py imports fedlift.codec._shm: a private module of codec",
        "client/_worker.py imports fedlift.codec._wire.REMOTE_MIN_BYTES: a private module of codec",
        "client/_worker.py imports fedlift.deploy.channel_credentials: client is below deploy",
        "deploy/_admin.py imports fedlift.client._worker.unpack_app: a private module of client",
        "deploy/_client.py imports fedlift.client._service._parent_death_signal: a private module of client",
        "deploy/_identity.py imports fedlift.transport._identity.Identity: a private module of transport",
        "deploy/_identity.py imports fedlift.transport._identity.PROJECT_ATTRIBUTE: a private module of transport",
        "deploy/_identity.py imports fedlift.transport._identity.ROLES: a private module of transport",
        "deploy/_identity.py imports fedlift.transport._identity.ROLE_ATTRIBUTE: a private module of transport",
        "deploy/_identity.py imports fedlift.transport._identity.identity_from_pem: a private module of transport",
        "deploy/_identity.py imports fedlift.transport._identity.identity_of: a private module of transport",
        "deploy/_server.py imports fedlift.client._worker.unpack_app: a private module of client",
        "deploy/_server.py imports fedlift.server._store.CHECKPOINT_DIR: a private module of server",
        "deploy/_server.py imports fedlift.server._store.CHECKPOINT_FILE: a private module of server",
        "deploy/_server.py imports fedlift.server._store.load_initial_model: a private module of server",
        "job/_fedjob.py imports fedlift.model._keras.is_keras_model: a private module of model",
        "job/_fedjob.py imports fedlift.model._keras.plain_keras_copy: a private module of model",
        "job/_fedjob.py imports fedlift.model._safetensors.save_safetensors: a private module of model",
        "job/_fedjob.py imports fedlift.simulator.SimulationResult: job is below simulator",
        "job/_fedjob.py imports fedlift.simulator.run_simulator: job is below simulator",
        "server/_runtime.py imports fedlift.codec._remote.RemoteArray: a private module of codec",
        "server/_runtime.py imports fedlift.codec._remote: a private module of codec",
        "server/_runtime.py imports fedlift.codec._shm: a private module of codec",
        "server/_store.py imports fedlift.model._keras.keras_params: a private module of model",
        "server/_store.py imports fedlift.model._keras.load_keras_model: a private module of model",
        "server/_store.py imports fedlift.model._keras.set_keras_params: a private module of model",
        "server/_store.py imports fedlift.model._safetensors.load_safetensors: a private module of model",
        "server/_store.py imports fedlift.model._safetensors.save_safetensors: a private module of model",
        "server/_store.py imports fedlift.model._safetensors.stage_safetensors: a private module of model",
        "simulator/_simulator.py imports fedlift.client._worker.SERVER_TOKEN_ENV: a private module of client",
        "simulator/_simulator.py imports fedlift.client._worker.SHARED_MEMORY_ENV: a private module of client",
        "simulator/_simulator.py imports fedlift.codec._shm: a private module of codec",
        "simulator/_simulator.py imports fedlift.server._store.ArraysFormat: a private module of server",
        "simulator/_simulator.py imports fedlift.server._store.load_initial_model: a private module of server",
    ]
)


def test_layers_import_in_one_direction_only() -> None:
    found = []
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20
    for path in files:
        found += violations(path, path.read_text(encoding="utf-8"))
    new = sorted(v for v in found if _without_line(v) not in KNOWN)
    assert new == [], "imports against the layers:\n" + "\n".join(new)
    gone = sorted(KNOWN - {_without_line(v) for v in found})
    assert gone == [], "fixed: remove from KNOWN:\n" + "\n".join(gone)


def test_the_layer_scanner_can_fail() -> None:
    codec = SRC / "codec" / "_example.py"
    assert violations(codec, "from ..server import FedAvg\n") == [
        "codec/_example.py:1 imports fedlift.server.FedAvg: codec is below server"
    ]
    server = SRC / "server" / "_example.py"
    assert violations(server, "from ..codec import _shm\n") == [
        "server/_example.py:1 imports fedlift.codec._shm: a private module of codec"
    ]
    assert violations(server, "from ..codec._remote import RemoteArray\n") == [
        "server/_example.py:1 imports fedlift.codec._remote.RemoteArray: a private module of codec"
    ]
    assert violations(server, "def f():\n    from fedlift.client import init\n") == [
        "server/_example.py:2 imports fedlift.client.init: server is below client"
    ]
    deploy = SRC / "deploy" / "_example.py"
    assert violations(deploy, "from ..simulator import run_simulator\n") == [
        "deploy/_example.py:1 imports fedlift.simulator.run_simulator: deploy and simulator "
        "are siblings"
    ]
    assert violations(server, "from ..codec import Message\nfrom ..errors import X\n") == []
    assert violations(server, "from ._aggregate import accumulate\n") == []


def test_the_shared_data_package_is_checked_too() -> None:
    server = SRC / "server" / "_example.py"
    assert violations(server, "from ..data import dirichlet\n") == []
    assert violations(server, "from ..data._label_skew import dirichlet\n") == [
        "server/_example.py:1 imports fedlift.data._label_skew.dirichlet: a private module of data"
    ]
    data = SRC / "data" / "_example.py"
    assert (
        violations(data, "from .._atomic import atomic_writer\nfrom ._checks import short\n") == []
    )
    assert violations(data, "def f():\n    from ..server import FedAvg\n") == [
        "data/_example.py:2 imports fedlift.server.FedAvg: data is shared (below every layer) "
        "and imports no layer"
    ]
