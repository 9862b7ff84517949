"""One rule for model and table names, wherever they enter."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.client import InferenceClient
from pipeline.config import KafkaSettings
from pipeline.errors import ConfigError, UnreadableMessage
from pipeline.io.kv.memory import MemoryKV
from pipeline.names import MAX_NAME_CHARS, check_name, is_valid_name
from pipeline.params.store import ParamStore, check_model_name
from pipeline.params.updates import Announcement

BAD = [
    "nl\n",  # re.match with '$' let a trailing newline through
    "\nnl",
    "a\nb",
    "a\r",
    "a\tb",
    "a b",
    " a",
    "a\x00",
    "a\x7f",
    "a\x1b[31m",
    "a\u2028",
    "a\u00a0",
    "a\u3000",
    "a\ufeff",
    "",
    "a" * (MAX_NAME_CHARS + 1),
    "-a",
    ".a",
    "a:b",
    "a/b",
    "é",
    "bad\ud800",
]
GOOD = ["m", "0", "clf-v2.1_x", "a" * MAX_NAME_CHARS]


@pytest.mark.parametrize("name", BAD, ids=[ascii(n)[:20] for n in BAD])
def test_control_characters_whitespace_and_odd_names_are_refused(name: str) -> None:
    assert not is_valid_name(name)
    with pytest.raises(ConfigError) as caught:
        check_name(name)
    message = str(caught.value)
    assert message.startswith("invalid model name ")
    assert message.isascii() and message.isprintable()  # one line, safe on any terminal
    with pytest.raises(ConfigError, match="invalid model name"):
        check_model_name(name)
    with pytest.raises(ConfigError, match="invalid table name"):
        check_name(name, "table")


@pytest.mark.parametrize("name", GOOD)
def test_the_allowed_alphabet_still_passes(name: str) -> None:
    assert is_valid_name(name)
    assert check_name(name) == name == check_model_name(name)


def test_non_strings_and_huge_names_give_a_short_line() -> None:
    for value in (None, 7, b"m", ["m"]):
        assert not is_valid_name(value)
        with pytest.raises(ConfigError, match="of type"):
            check_name(value)
    with pytest.raises(ConfigError) as caught:
        check_name("x" * 1_000_000)
    assert len(str(caught.value)) < 300 and "1000000 characters" in str(caught.value)


async def test_store_and_client_refuse_bad_names_before_writing_or_sending() -> None:
    kv = MemoryKV()
    store = ParamStore(kv, prefix="p")
    with pytest.raises(ConfigError):
        await store.write_rows("nl\n", "user", [0], np.zeros((1, 2)))
    with pytest.raises(ConfigError, match="invalid table name"):
        await store.write_rows("m", "user\n", [0], np.zeros((1, 2)))
    assert kv.keys() == []
    client = InferenceClient(KafkaSettings())  # never started: the check comes first
    with pytest.raises(ConfigError, match="invalid model name"):
        await client.submit("nl\n", np.zeros((1, 2)))


def test_announcements_with_bad_names_are_unreadable() -> None:
    ok = Announcement("m", "embedding", 1, table="user", rows=(1,))
    assert Announcement.from_bytes(ok.to_bytes()).model == "m"
    for bad in (
        Announcement("m\n", "dense", 1),
        Announcement("m", "embedding", 1, table="user\n", rows=(1,)),
    ):
        with pytest.raises(UnreadableMessage):
            Announcement.from_bytes(bad.to_bytes())
