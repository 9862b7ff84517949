"""Model plugins, loaded once at the process edge (docs/plugins.md).

Two ways in, both chosen by the operator, never by a request: installed distributions that
declare an entry point in the ``kvpipe.models`` group (``kind = "package.module:Class"``),
and the modules named in ``KVPIPE_MODEL_PLUGINS``, each listing its classes in a module-level
``KVPIPE_MODELS``. Every failure is one :class:`ConfigError` line naming its source.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Sequence
from typing import Any

import structlog

from pipeline.errors import ConfigError
from pipeline.params.models import model_kinds, one_line, register_model

__all__ = ["ENTRY_POINT_GROUP", "MODULE_ATTRIBUTE", "load_model_plugins"]

log = structlog.get_logger("kvpipe.plugins")

#: The entry point group an installed plugin distribution declares its classes in.
ENTRY_POINT_GROUP = "kvpipe.models"
#: What a ``KVPIPE_MODEL_PLUGINS`` module defines: a list of its plugin classes.
MODULE_ATTRIBUTE = "KVPIPE_MODELS"


def _failure(exc: Exception) -> str:
    return f"{type(exc).__name__}: {one_line(exc)}"


def _load_entry_point(ep: importlib.metadata.EntryPoint) -> str:
    """Register the class one entry point names; its name must be the class's kind."""
    dist = getattr(ep, "dist", None)
    package = f", package {dist.name}" if dist is not None else ""
    where = f"entry point {ep.name} = {ep.value} ({ENTRY_POINT_GROUP}{package})"
    try:
        obj = ep.load()
    except Exception as exc:
        raise ConfigError(f"model plugin {where} cannot be loaded: {_failure(exc)}") from None
    kind = getattr(obj, "kind", None)
    if isinstance(obj, type) and isinstance(kind, str) and kind != ep.name:
        raise ConfigError(
            f"model plugin {where} loads a class of kind {kind!r}; name the entry point {kind!r}"
        )
    return register_model(obj, source=where)


def _load_module(name: str) -> list[str]:
    """Import one ``KVPIPE_MODEL_PLUGINS`` module and register its ``KVPIPE_MODELS``."""
    where = f"module {name} (KVPIPE_MODEL_PLUGINS)"
    try:
        module = importlib.import_module(name)
    except Exception as exc:
        raise ConfigError(f"model plugin {where} cannot be imported: {_failure(exc)}") from None
    classes: Any = getattr(module, MODULE_ATTRIBUTE, None)
    if not isinstance(classes, list | tuple):
        raise ConfigError(
            f"model plugin {where} must define {MODULE_ATTRIBUTE} = [YourModel, ...], "
            f"a list of its plugin classes (found {type(classes).__name__})"
        )
    return [register_model(cls, source=where) for cls in classes]


def load_model_plugins(modules: Sequence[str] = (), *, entry_points: bool = True) -> list[str]:
    """Register the installed entry points' and ``modules``' plugin classes; returns their kinds.

    Loading the same class again is a no-op; a kind that is built in or already taken by
    another class, a class that breaks the protocol, or a module that fails to import is a
    one-line :class:`ConfigError`.
    """
    kinds: list[str] = []
    if entry_points:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            kinds.append(_load_entry_point(ep))
    for name in modules:
        kinds.extend(_load_module(name))
    kinds = list(dict.fromkeys(kinds))
    if kinds:
        sources = model_kinds()
        log.info("model_plugins_loaded", kinds={k: sources[k] for k in kinds})
    return kinds
