"""The one rule for model and table names: they become Redis keys, metric labels and log text.

1 to 64 ASCII letters, digits, ``_``, ``.`` or ``-``, starting with a letter or digit; so no
whitespace, no control characters (a trailing newline included) and no key separator ``:``.
"""

from __future__ import annotations

import re

from pipeline.errors import ConfigError

__all__ = ["MAX_NAME_CHARS", "check_name", "is_valid_name"]

MAX_NAME_CHARS = 64
_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{MAX_NAME_CHARS - 1}}}", re.ASCII)
#: Longest part of a refused name quoted back in an error message.
_SHOWN_CHARS = 80


def is_valid_name(name: object) -> bool:
    """True when ``name`` is a str that may name a model or an embedding table."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def check_name(name: object, what: str = "model") -> str:
    """Return ``name`` if valid, else raise a one-line :class:`ConfigError` (name ASCII-escaped)."""
    if isinstance(name, str) and _NAME.fullmatch(name) is not None:
        return name
    if not isinstance(name, str):
        shown = f"of type {type(name).__name__}"
    elif len(name) > _SHOWN_CHARS:
        shown = f"{name[:_SHOWN_CHARS]!a}... ({len(name)} characters)"
    else:
        shown = ascii(name)
    raise ConfigError(
        f"invalid {what} name {shown}: use 1-{MAX_NAME_CHARS} letters, digits, '_', '.' or '-', "
        "starting with a letter or digit"
    )
