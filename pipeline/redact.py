"""The one place URLs are made safe to show: what :func:`redact_url` masks, :func:`url_secrets`
lists, so foreign error text can be scrubbed of the same values.

Every form redis-py reads is covered: ``:pw@``, ``user:pw@``, a lone ``pw@`` (redis-py takes
it as a user name, but it is usually a misplaced password), query parameters such as
``?password=``, ``unix://`` and ``rediss://``, and percent- or plus-encoded values. The URL is
split by hand, like :func:`urllib.parse.urlsplit` but never raising, so even a malformed URL
(bad port, unclosed ``[``) can be shown in its error message.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, unquote_plus, urlsplit

__all__ = ["MASK", "redact_url", "url_secrets"]

MASK = "***"
#: A query parameter is a secret when its decoded, lower-cased name contains one of these.
_SECRET_PARAMS = ("pass", "pwd", "secret", "token", "credential", "auth")
_QUERY_SEPARATORS = re.compile(r"([&;])")


def _split(url: str) -> tuple[str, str | None, str, str, str | None, str | None]:
    """``url`` as (``scheme://``, userinfo or None, host[:port], path, query, fragment)."""
    head, sep, rest = url.partition("://")
    if not sep:
        head, rest = "", url
    else:
        head += sep
    rest, hashmark, fragment = rest.partition("#")
    rest, qmark, query = rest.partition("?")
    slash = rest.find("/")
    netloc, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
    userinfo, at, host = netloc.rpartition("@")
    return (
        head,
        userinfo if at else None,
        host,
        path,
        query if qmark else None,
        fragment if hashmark else None,
    )


def _hidden_userinfo(userinfo: str) -> tuple[str, str]:
    """(shown, hidden): the user name stays, the password goes; a lone user part goes too."""
    user, colon, password = userinfo.partition(":")
    if colon:
        return f"{user}:{MASK}", password
    return (MASK if user else ""), user


def _query_piece(piece: str) -> tuple[str, str]:
    """(shown, hidden) for one ``name=value`` of the query."""
    name, eq, value = piece.partition("=")
    if not eq:
        return (MASK if piece else ""), piece
    lowered = unquote_plus(name).lower()
    if "@" in value or any(s in lowered for s in _SECRET_PARAMS):
        return f"{name}={MASK}", value
    return piece, ""


def _redacted(url: str) -> tuple[str, list[str]]:
    """The URL safe to show, and the raw text that was masked."""
    head, userinfo, host, path, query, fragment = _split(url)
    hidden: list[str] = []
    out = head
    if "@" in path + (query or "") + (fragment or ""):
        # A password with a raw '/', '?' or '#' in it: its first part reads as the host.
        netloc = host if userinfo is None else f"{userinfo}@{host}"
        password = netloc.rpartition(":")[2]
        hidden += [netloc, "" if password.isdigit() else password]
        out += MASK
    else:
        if userinfo is not None:
            shown, secret = _hidden_userinfo(userinfo)
            out += f"{shown}@"
            hidden.append(secret)
        out += host
    at = path.rfind("@")  # a password with a raw '/' in it: the rest of it lands in the path
    if at >= 0:
        hidden.append(path[1:at])
        path = f"/{MASK}{path[at:]}"
    out += path
    if query is not None:
        pieces = []
        for piece in _QUERY_SEPARATORS.split(query):
            if piece in ("&", ";"):
                pieces.append(piece)
                continue
            shown, secret = _query_piece(piece)
            pieces.append(shown)
            hidden.append(secret)
        out += "?" + "".join(pieces)
    if fragment is not None:
        out += "#" + (MASK if fragment else "")
        hidden.append(fragment)
    return out, hidden


def redact_url(url: str) -> str:
    """``url`` safe to show: passwords, secret query values and lone user parts are ``***``."""
    return _redacted(url)[0]


def url_secrets(url: str) -> tuple[str, ...]:
    """Every value :func:`redact_url` hides, as written and decoded, longest first."""
    hidden = _redacted(url)[1]
    try:  # what redis-py itself will read (urlsplit also drops tabs and newlines)
        parts = urlsplit(url)
        hidden += [parts.password if parts.password is not None else parts.username or ""]
    except ValueError:
        pass
    found = {form for raw in hidden for form in (raw, unquote(raw), unquote_plus(raw)) if form}
    return tuple(sorted(found, key=lambda s: (-len(s), s)))
