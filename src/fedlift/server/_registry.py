"""Strategies by name: ``job.json``'s ``{"type": "fedadam", "eta": 0.01, ...}`` and back.

One builder serves the simulator, ``run_local`` and a deployed server, and options are
checked in one place, against the strategy's own fields: an unknown ``type`` lists the
known ones, an unknown option lists the strategy's options, and a value of the wrong type
names the option, what it takes and what was received. Ranges are the strategy's own
``__post_init__`` checks, so a strategy built in Python and one built from ``job.json`` are
validated by the same code.

A strategy (or an aggregator, or a function option such as ``sample``) of the user's own
lives in a module of the job's ``app/`` folder and is named ``"module:Name"``
(``"my_strategy:TopK"``); it is imported from that folder, on the server too. That runs
code from the job on the server, as the job's script runs on the sites: only admins who
may submit jobs can do it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import inspect
import sys
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from .._paths import resolve_inside
from ..errors import ConfigError
from ._cyclic import Cyclic
from ._fedavg import FedAvg, FedProx
from ._fedopt import FedAdagrad, FedAdam, FedAvgM, FedYogi
from ._mean import Mean
from ._robust import Custom, FedMedian, FedTrimmedAvg, Krum
from ._scaffold import Scaffold
from ._seam import AggregatorFactory
from ._strategy import Strategy

__all__ = [
    "AGGREGATORS",
    "STRATEGIES",
    "options_of",
    "register_aggregator",
    "strategy_from_spec",
    "strategy_to_spec",
]

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (FedAvg, FedProx, FedAdam, FedYogi, FedAdagrad, FedAvgM, Scaffold, Cyclic)
}
"""The built-in strategies by their ``job.json`` type."""

AGGREGATORS: dict[str, type[Any]] = {
    "mean": Mean,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
    "custom": Custom,
}
"""Aggregator factories by name (``{"type": "fedavg", "aggregator": {"type": "median"}}``)."""


def register_aggregator(name: str, cls: type[Any]) -> None:
    """Make an aggregator factory class known to ``job.json`` under ``name``."""
    AGGREGATORS[name] = cls


def _name_of(cls: type[Any], table: Mapping[str, type[Any]]) -> str | None:
    for name, known in table.items():
        if known is cls:
            return name
    return None


def options_of(cls: type[Any]) -> dict[str, Any]:
    """The options of a strategy or aggregator class: its dataclass fields that are set
    in the constructor, with their annotations (``typing`` objects)."""
    if not dataclasses.is_dataclass(cls):
        return {}
    try:
        hints = get_type_hints(cls)
    except (NameError, TypeError):
        hints = {}
    return {
        f.name: hints.get(f.name, Any)
        for f in dataclasses.fields(cls)
        if f.init and not f.name.startswith("_")
    }


def _describe(kind: Any) -> str:
    origin = get_origin(kind)
    if kind is Any:
        return "any value"
    if origin is Literal:
        return " or ".join(repr(v) for v in get_args(kind))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(kind))
    if kind is type(None):
        return "null"
    if kind is float:
        return "a number"
    if kind is int:
        return "an int"
    if kind is bool:
        return "true or false"
    if kind is str:
        return "a string"
    if _is_callable(kind):
        return "'module:function' in the app folder"
    if kind is AggregatorFactory:
        return "an aggregator ({'type': ...} or its name)"
    return getattr(kind, "__name__", str(kind))


def _is_callable(kind: Any) -> bool:
    return get_origin(kind) in (Callable, typing.Callable) or kind is Callable


class _App:
    """Imports ``module:Name`` references from the job's app folder (once per module);
    ``allowed=False`` refuses them (a deployed server that runs no code from jobs)."""

    def __init__(self, folder: Path | None, allowed: bool = True) -> None:
        self.folder = folder
        self.allowed = allowed
        self._modules: dict[str, types.ModuleType] = {}

    def load(self, ref: str, where: str) -> Any:
        module_name, _, attr = ref.partition(":")
        if (
            not module_name
            or not attr
            or not all(part.isidentifier() for part in [*module_name.split("."), attr])
        ):
            raise ConfigError(
                f"{where} must name 'module:Name' of a module in the job's app folder; "
                f"received: {ref!r}."
            )
        if not self.allowed:
            raise ConfigError(
                f"{where} names {ref!r}: code from the job's app folder, which this server "
                "does not run (it would run with the server's key and see every job). Use "
                "a built-in strategy, or start the server with `fedlift server start "
                "--allow-app-code` to let admins' jobs bring their own."
            )
        if self.folder is None:
            raise ConfigError(
                f"{where} names {ref!r} from the job's app folder, but this run has none. "
                "Pass the strategy object itself, or run the exported job."
            )
        module = self._modules.get(module_name) or self._import(module_name, where)
        value = getattr(module, attr, None)
        if value is None:
            raise ConfigError(
                f"{where}: the app's module {module_name!r} has no {attr!r}. Received: {ref!r}."
            )
        return value

    def _import(self, module_name: str, where: str) -> types.ModuleType:
        folder = self.folder
        if folder is None:
            raise ConfigError(f"{where}: no app folder")
        relative = module_name.replace(".", "/")
        path = folder / f"{relative}.py"
        if not path.is_file():
            path = folder / relative / "__init__.py"
        resolve_inside(folder, path.relative_to(folder).as_posix(), where, "the app folder")
        if not path.is_file():
            raise ConfigError(
                f"{where}: the app folder has no module {module_name!r} ({relative}.py)."
            )
        digest = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:12]
        unique = f"fedlift_app_{digest}.{module_name}"
        spec = importlib.util.spec_from_file_location(unique, path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"{where}: cannot import {path.name} from the app folder.")
        module = importlib.util.module_from_spec(spec)
        added = str(folder) not in sys.path
        if added:
            sys.path.insert(0, str(folder))  # the module's own imports of its neighbours
        try:
            sys.modules[unique] = module
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(unique, None)
            raise ConfigError(
                f"{where}: importing {module_name!r} from the app folder failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        finally:
            if added:
                sys.path.remove(str(folder))
        self._modules[module_name] = module
        return module


def _convert(owner: str, name: str, kind: Any, value: Any, app: _App) -> Any:
    """``value`` from JSON as option ``name`` of ``owner`` (annotation ``kind``)."""
    where = f"{owner}: option {name!r}"
    origin = get_origin(kind)
    if kind is Any:
        return value
    if origin in (Union, types.UnionType):
        for option in get_args(kind):
            try:
                return _convert(owner, name, option, value, app)
            except ConfigError:
                continue
        raise _wrong(where, kind, value)
    if kind is type(None):
        if value is None:
            return None
        raise _wrong(where, kind, value)
    if origin is Literal:
        if value in get_args(kind) and not isinstance(value, bool):
            return value
        raise _wrong(where, kind, value)
    if kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise _wrong(where, kind, value)
    if kind in (int, bool, str):
        if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
            return value
        raise _wrong(where, kind, value)
    if _is_callable(kind):
        if isinstance(value, str):
            function = app.load(value, where)
            if not callable(function):
                raise ConfigError(f"{where}: {value!r} is not a function.")
            return function
        raise _wrong(where, kind, value)
    if kind is AggregatorFactory:
        spec = {"type": value} if isinstance(value, str) else value
        if not isinstance(spec, dict):
            raise _wrong(where, kind, value)
        return _build(spec, AGGREGATORS, "aggregator", f"{where}", app)
    return value


def _wrong(where: str, kind: Any, value: Any) -> ConfigError:
    return ConfigError(f"{where} takes {_describe(kind)}; received: {value!r:.80}.")


def _build(
    spec: Mapping[str, Any],
    table: Mapping[str, type[Any]],
    what: str,
    where: str,
    app: _App,
    also: tuple[str, ...] = (),
) -> Any:
    kind = spec.get("type")
    if not isinstance(kind, str) or not kind:
        raise ConfigError(
            f"{where}: a {what} is named by 'type', one of {', '.join(sorted(table))} or "
            f"'module:Name' in the app folder; received: type={kind!r}."
        )
    if ":" in kind:
        cls = app.load(kind, f"{where}: type")
        if what == "strategy" and not (inspect.isclass(cls) and issubclass(cls, Strategy)):
            raise ConfigError(
                f"{where}: {kind!r} is not a fedlift.server.Strategy subclass; a strategy "
                "of one's own subclasses Strategy and overrides its hooks."
            )
    elif kind in table:
        cls = table[kind]
    else:
        raise ConfigError(
            f"{where}: unknown {what} type {kind!r}; known: {', '.join(sorted(table))}, or "
            f"'module:Name' for one in the app folder. Received: type={kind!r}."
        )
    options = options_of(cls)
    given = {k: v for k, v in spec.items() if k != "type"}
    unknown = sorted(set(given) - set(options)) if options or dataclasses.is_dataclass(cls) else []
    if unknown:
        besides = f" (besides the run's settings: {', '.join(also)})" if also else ""
        raise ConfigError(
            f"{where}: {kind} has no option {', '.join(map(repr, unknown))}; its options: "
            f"{', '.join(options) or 'none'}{besides}. Received: "
            + ", ".join(f"{k}={given[k]!r:.40}" for k in unknown)
            + "."
        )
    owner = f"{where} ({kind})"
    values = {
        k: _convert(owner, k, options[k], v, app) if k in options else v for k, v in given.items()
    }
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"{owner}: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def strategy_from_spec(
    spec: Mapping[str, Any],
    app_dir: Path | None = None,
    *,
    where: str = "workflow",
    besides: tuple[str, ...] = (),
    allow_app_code: bool = True,
) -> Strategy:
    """Build the strategy ``spec`` names (``{"type": ..., **options}``); ``app_dir``: the
    job's app folder, for ``module:Name`` references; ``besides``: the settings accepted
    next to the options where the spec comes from (named when an option is unknown);
    ``allow_app_code=False`` refuses every ``module:Name`` (see :class:`_App`)."""
    built = _build(spec, STRATEGIES, "strategy", where, _App(app_dir, allow_app_code), besides)
    if not isinstance(built, Strategy):
        raise ConfigError(f"{where}: {spec.get('type')!r} did not build a Strategy.")
    return built


def _reference(value: Any, app_dir: Path | None, where: str) -> str:
    """``module:Name`` of a class or function defined in a module of ``app_dir``."""
    name = getattr(value, "__qualname__", "")
    try:
        source = inspect.getsourcefile(value)
    except TypeError:
        source = None
    if app_dir is not None and source is not None and "." not in name and "<" not in name:
        path = Path(source).resolve()
        root = app_dir.resolve()
        if root in path.parents:
            relative = path.relative_to(root).with_suffix("")
            parts = list(relative.parts)
            if parts[-1] == "__init__":
                parts.pop()
            if parts and all(p.isidentifier() for p in parts):
                return f"{'.'.join(parts)}:{name}"
    raise ConfigError(
        f"{where}: {value!r:.80} cannot be written to job.json: a class or function of "
        "one's own must be defined at the top level of a module in the job's app folder "
        "(the script's folder), so that the server can import it."
    )


def _value_to_json(value: Any, app_dir: Path | None, where: str) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        name = _name_of(type(value), AGGREGATORS) or _reference(type(value), app_dir, where)
        return {"type": name, **_options_to_json(value, app_dir, where)}
    if callable(value):
        return _reference(value, app_dir, where)
    raise ConfigError(f"{where}: {value!r:.80} cannot be written to job.json.")


def _options_to_json(obj: Any, app_dir: Path | None, where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        if not f.init or f.name.startswith("_"):
            continue
        value = getattr(obj, f.name)
        if f.default is not dataclasses.MISSING and value == f.default:
            continue
        if f.default_factory is not dataclasses.MISSING and value == f.default_factory():
            continue
        out[f.name] = _value_to_json(value, app_dir, f"{where}: option {f.name!r}")
    return out


def strategy_to_spec(strategy: Strategy, app_dir: Path | None = None) -> dict[str, Any]:
    """The ``job.json`` spec of ``strategy``: its type and the options that differ from
    their defaults (the inverse of :func:`strategy_from_spec`)."""
    cls = type(strategy)
    where = f"the strategy {cls.__name__}"
    name = _name_of(cls, STRATEGIES) or _reference(cls, app_dir, where)
    if not dataclasses.is_dataclass(strategy):
        return {"type": name}
    return {"type": name, **_options_to_json(strategy, app_dir, where)}
