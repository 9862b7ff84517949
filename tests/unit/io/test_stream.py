"""Generation requests: every bad input has its stable code; stream messages read back."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pipeline.config import LimitSettings
from pipeline.io.stream import (
    GENERATION_CODES,
    StreamAssembler,
    StreamMessage,
    decode_stream,
    encode_generation,
    encode_stream,
)
from pipeline.io.wire import decode_request, decode_result

LIMITS = LimitSettings()


def _decode(body: dict[str, Any] | bytes) -> Any:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return decode_request(raw, [], LIMITS)


def test_a_generation_request_reads_back() -> None:
    raw = encode_generation(
        id="r", model="gpt", prompt="héllo", max_tokens=5, temperature=0.5, top_k=3, seed=9,
        stop=["\n"],
    )  # fmt: skip
    request = decode_request(raw, [], LIMITS)
    spec = request.generation
    assert request.error is None and request.inputs is None and spec is not None
    assert spec.prompt == tuple("héllo".encode()) and spec.text
    assert (spec.max_tokens, spec.temperature, spec.top_k, spec.seed) == (5, 0.5, 3, 9)
    assert spec.stop == (b"\n",)
    ids = _decode({"id": "r", "model": "gpt", "prompt": [1, 2, 255]}).generation
    assert ids.prompt == (1, 2, 255) and not ids.text and ids.max_tokens == 16


@pytest.mark.parametrize(
    ("extra", "code"),
    [
        ({"prompt": ""}, "bad_prompt"),
        ({"prompt": [1, 256]}, "bad_prompt"),
        ({"prompt": [1, True]}, "bad_prompt"),
        ({"prompt": {"a": 1}}, "bad_prompt"),
        ({"prompt": [1] * (LIMITS.max_elements + 1)}, "bad_prompt"),
        ({"prompt": "hi", "max_tokens": 0}, "bad_max_tokens"),
        ({"prompt": "hi", "max_tokens": 10**6}, "bad_max_tokens"),
        ({"prompt": "hi", "max_tokens": 2.5}, "bad_max_tokens"),
        ({"prompt": "hi", "sampling": {"temprature": 1}}, "bad_sampling"),
        ({"prompt": "hi", "sampling": {"temperature": -1}}, "bad_sampling"),
        ({"prompt": "hi", "sampling": {"top_k": -1}}, "bad_sampling"),
        ({"prompt": "hi", "sampling": {"seed": "x"}}, "bad_sampling"),
        ({"prompt": "hi", "sampling": [1]}, "bad_sampling"),
        ({"prompt": "hi", "stop": ["a"] * 5}, "bad_stop"),
        ({"prompt": "hi", "stop": [""]}, "bad_stop"),
    ],
)
def test_bad_generation_input_gets_its_code(extra: dict[str, Any], code: str) -> None:
    request = _decode({"id": "r", "model": "gpt", **extra})
    assert request.error is not None and request.error.code == code
    assert code in GENERATION_CODES


def test_text_that_cannot_be_utf8_gets_bad_text() -> None:
    request = _decode(b'{"id": "r", "model": "gpt", "prompt": "a\\ud800b"}')
    assert request.error is not None and request.error.code == "bad_text"
    request = _decode(b'{"id": "r", "model": "gpt", "prompt": "ab", "stop": ["\\udc00"]}')
    assert request.error is not None and request.error.code == "bad_text"


def test_stream_messages_read_back_and_the_final_one_is_a_result() -> None:
    part = StreamMessage(id="r", model="gpt", seq=3, start=3, tokens=[104], text="h", version=2)
    assert decode_stream(encode_stream(part)) == part
    final = StreamMessage(
        id="r", model="gpt", seq=4, start=0, tokens=[1, 2], text=None, final=True, version=2,
        status="error", error_code="deadline_exceeded", error_message="late",
        finish_reason="deadline", usage={"prompt_tokens": 5}, prefix={"reused_tokens": 0},
        timings={"total_ms": 1.0},
    )  # fmt: skip
    value = encode_stream(final)
    assert decode_stream(value) == final
    result = decode_result(value, [])
    assert (result.id, result.error_code, result.version) == ("r", "deadline_exceeded", 2)


def test_a_plain_error_result_reads_as_a_final_message() -> None:
    msg = decode_stream(
        json.dumps({"id": "r", "model": "x", "status": "error",
                    "error": {"code": "unknown_model", "message": "no"}}).encode()
    )  # fmt: skip
    assert msg is not None and msg.final and msg.error_code == "unknown_model" and not msg.ok
    assert decode_stream(b"not json") is None and decode_stream(b"[1]") is None


def _msg(seq: int, start: int, tokens: list[int], final: bool = False) -> StreamMessage:
    return StreamMessage(id="r", model="m", seq=seq, start=start, tokens=tokens, final=final)


def test_the_assembler_yields_each_token_once_whatever_arrives_twice() -> None:
    asm = StreamAssembler()
    got = [asm.add(_msg(0, 0, [104])), asm.add(_msg(1, 1, [105]))]
    got += [asm.add(_msg(0, 0, [104])), asm.add(_msg(1, 1, [105]))]  # a redelivery's stream
    got += [asm.add(_msg(3, 3, [33]))]  # after a gap (seq 2 lost): waits for the final
    got += [asm.add(_msg(4, 0, [104, 105, 32, 33], final=True))]
    assert [g.tokens if g else None for g in got] == [[104], [105], None, None, None, [32, 33]]
    assert "".join(g.text for g in got if g) == "hi !"
    last = got[-1]
    assert last is not None and last.final is not None and asm.done
    assert asm.add(_msg(5, 0, [1], final=True)) is None  # a second final: ignored


def test_the_assembler_joins_a_multibyte_character_split_over_messages() -> None:
    asm = StreamAssembler()
    data = "é".encode()
    a, b = asm.add(_msg(0, 0, [data[0]])), asm.add(_msg(1, 1, [data[1]]))
    assert a is not None and b is not None and a.text + b.text == "é"
