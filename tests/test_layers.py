"""The layers are imported in one direction only, checked from the source.

model -> codec -> transport -> server -> client -> job -> report -> simulator / deploy -> cli
(every runner writes its job's report, so report sits below them): a module
of one package imports only from its own package, from packages below it, and from the
shared modules (``errors``, ``_atomic``, ``_json``, ``_malloc``, ``_paths``, ``_late``, ``data``), which import no
layer; never a private module (``_name``) of another package, and simulator and deploy do not
import each other. Function-level (lazy) and ``TYPE_CHECKING`` imports count too: a lazy
import still runs against the direction, and a type-only one still ties the layers together.
A lower layer that must call a higher one gets it late (``fedlift._late``), from the top
package, which sits above every layer.
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
    "report": 6,
    "simulator": 7,
    "deploy": 7,
    "cli": 8,
}
SHARED = {"errors", "_atomic", "_json", "_malloc", "_paths", "_late", "data"}
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
            out.append(f"{where}: the shared module {own} is below every layer")
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


def test_layers_import_in_one_direction_only() -> None:
    found = []
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20
    for path in files:
        found += violations(path, path.read_text(encoding="utf-8"))
    assert found == [], "imports against the layers:\n" + "\n".join(found)


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
    assert violations(server, "from .._late import load\n") == []
    job = SRC / "job" / "_example.py"
    typed = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..simulator import R\n"
    assert violations(job, typed) == [
        "job/_example.py:3 imports fedlift.simulator.R: job is below simulator"
    ]
    late, top = SRC / "_late.py", SRC / "__main__.py"
    assert violations(late, "from .job import FedAvgJob\n") == [
        "_late.py:1 imports fedlift.job.FedAvgJob: the shared module _late is below every layer"
    ]
    assert violations(late, "from .errors import ConfigError\n") == []
    assert violations(top, "from .job import FedAvgJob\n") == []  # above every layer
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
        "data/_example.py:2 imports fedlift.server.FedAvg: the shared module data is below every "
        "layer"
    ]
