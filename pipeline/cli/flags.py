"""Settings flags: each setting with a flag becomes one, and ``build_settings`` reads them."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from typing import Any

from pipeline.config import ENV_VARS, EnvVar, Settings, settings_from_env, validate, with_values

#: Settings flags by argparse ``dest`` (``--cache-bytes`` is ``cache_bytes``), from the settings.
FLAGS: dict[str, EnvVar] = {v.flag[2:].replace("-", "_"): v for v in ENV_VARS if v.flag}
#: The setting each flag fills, by argparse ``dest``.
_FLAG_PATHS = {dest: var.path for dest, var in FLAGS.items()}


def _flag_type(var: EnvVar) -> Callable[[str], Any]:
    """The setting's own parser, its complaint shown by argparse without the value."""

    def parse(raw: str) -> Any:
        try:
            return var.parse(raw)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = var.flag or var.name
    return parse


def _add_setting_flag(g: argparse._ActionsContainer, var: EnvVar) -> None:
    """One settings flag: its name, choices, metavar and help all come from the setting."""
    assert var.flag is not None
    text = f"{var.help} ({var.name})".replace("%", "%%")
    if var.choices:
        g.add_argument(var.flag, choices=var.choices, help=text)
    else:
        g.add_argument(var.flag, type=_flag_type(var), metavar=var.metavar, help=text)


def add_connection_flags(p: argparse.ArgumentParser) -> None:
    """The ``common`` settings flags (Redis, Kafka, logging), in a group of their own."""
    g = p.add_argument_group("connections (flags override the environment)")
    for var in FLAGS.values():
        if var.flag_scope == "common":
            _add_setting_flag(g, var)


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    """The settings flags only ``kvpipe serve`` takes (the worker's own)."""
    for var in FLAGS.values():
        if var.flag_scope == "serve":
            _add_setting_flag(p, var)


def build_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    """Settings from the environment, then the command's flags on top."""
    settings = settings_from_env(environ)
    values = {path: getattr(args, name, None) for name, path in _FLAG_PATHS.items()}
    return validate(with_values(settings, values))
