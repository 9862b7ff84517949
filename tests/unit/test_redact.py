"""One redaction for every URL form redis-py reads, and the same secrets scrubbed from errors."""

from __future__ import annotations

from urllib.parse import quote, quote_plus

import pytest

from pipeline.config import RedisSettings, settings_from_env
from pipeline.errors import ConfigError
from pipeline.io.kv.protocol import _reason
from pipeline.redact import redact_url, url_secrets

PLAIN = "s3cr3t-Pa55"
#: Needs percent-encoding: '@', ':', '/', space, '+', '%' and a non-ASCII letter.
AWKWARD = "p@ss:w/rd é+%"

#: (URL template with {pw} where the secret goes, how it is shown with PLAIN).
FORMS = [
    ("redis://:{pw}@h:1/0", "redis://:***@h:1/0"),
    ("redis://bob:{pw}@h:1/0", "redis://bob:***@h:1/0"),
    ("redis://{pw}@h:1/0", "redis://***@h:1/0"),  # a lone user part: usually a password
    ("rediss://bob:{pw}@h:6380/0", "rediss://bob:***@h:6380/0"),
    ("unix://:{pw}@/run/redis.sock?db=0", "unix://:***@/run/redis.sock?db=0"),
    ("redis://h:1/0?password={pw}", "redis://h:1/0?password=***"),
    ("redis://h:1?db=2&password={pw}", "redis://h:1?db=2&password=***"),
    (
        "redis://h:1/0?username=bob&password={pw}",
        "redis://h:1/0?username=bob&password=***",
    ),
    ("redis://h:1/0?db=0;password={pw}", "redis://h:1/0?db=0;password=***"),
    ("redis://h:1/0?PASSWORD={pw}", "redis://h:1/0?PASSWORD=***"),
    ("redis://h:1/0?pass%77ord={pw}", "redis://h:1/0?pass%77ord=***"),
    ("rediss://h:1/0?ssl_password={pw}", "rediss://h:1/0?ssl_password=***"),
    ("unix:///run/redis.sock?password={pw}&db=1", "unix:///run/redis.sock?password=***&db=1"),
    ("redis://:{pw}@h:1/0#frag", "redis://:***@h:1/0#***"),
    # malformed: still shown without the secret (these reach error messages)
    ("redis://:{pw}@h:99999/0", "redis://:***@h:99999/0"),
    ("redis://:{pw}@[::1", "redis://:***@[::1"),
    ("redis://:{pw}@:6379/x", "redis://:***@:6379/x"),
]
#: A password with a raw '/', '?' or '#' (not percent-encoded) splits the URL differently.
RAW_SPLITS = ["redis://:ab/{pw}@h:1/0", "redis://:{pw}?x@h:1/0", "redis://:{pw}#x@h:1/0"]


def _encodings(secret: str) -> list[str]:
    """``secret`` as it may be written in a URL: raw (when it can be), percent and plus."""
    forms = [quote(secret, safe=""), quote_plus(secret)]
    return ([secret] if secret == quote(secret, safe="-") else []) + forms


def _visible_forms(secret: str) -> set[str]:
    return {secret, quote(secret, safe=""), quote_plus(secret), quote(secret)}


@pytest.mark.parametrize(("template", "shown"), FORMS, ids=[t for t, _ in FORMS])
def test_every_url_form_is_shown_without_its_secret(template: str, shown: str) -> None:
    assert redact_url(template.format(pw=PLAIN)) == shown
    for secret in (PLAIN, AWKWARD):
        for written in _encodings(secret):
            url = template.format(pw=written)
            text = redact_url(url)
            leaked = [f for f in _visible_forms(secret) | {written} if f in text]
            assert not leaked, (url, text)
            assert secret in url_secrets(url), url  # decoded, as redis-py sends it
            reason = _reason(OSError(f"AUTH {secret} / {written} refused"), url_secrets(url))
            assert secret not in reason and written not in reason, reason
            assert RedisSettings(url=url).redacted_url() == text
            assert written not in repr(RedisSettings(url=url))


@pytest.mark.parametrize("template", RAW_SPLITS)
def test_a_password_with_raw_separators_is_still_hidden(template: str) -> None:
    url = template.format(pw=PLAIN)
    assert PLAIN not in redact_url(url)
    assert PLAIN in url_secrets(url)


def test_urls_without_secrets_are_shown_unchanged() -> None:
    for url in ("redis://h:1/0", "redis://h:1/0?username=bob&db=2", "unix:///run/r.sock"):
        assert redact_url(url) == url
        assert url_secrets(url) == ()


@pytest.mark.parametrize(
    "url",
    [
        f"redis://127.0.0.1:6379/0?password={PLAIN}&db=zero",
        f"redis://:{PLAIN}@127.0.0.1:99999/0",
        f"redis://:{PLAIN}@[::1",
        f"ftp://h/?password={PLAIN}",
    ],
)
def test_config_errors_never_show_the_secret(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_env({"KVPIPE_REDIS": url})
    assert PLAIN not in str(caught.value) and "***" in str(caught.value)
