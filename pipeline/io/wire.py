"""Request and result codecs: the bytes on the Kafka topics (DESIGN.md, "Wire format").

Decoding sorts every message into one of three outcomes: a good :class:`Request`; a request
that was read but cannot be answered as asked (``Request.error`` set, answered with an error
result); or :class:`UnreadableMessage` (no id to answer to: it goes to the dead-letter topic).
What a request carries is checked by :mod:`pipeline.io.inputs`; V2 bodies are read and written
by :mod:`pipeline.io.oip` and generation requests by :mod:`pipeline.io.stream`, dispatched here.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from pipeline.config import LimitSettings
from pipeline.errors import KvpipeError, RequestError, UnreadableMessage
from pipeline.io.inputs import (
    MAX_ECHO_CHARS,
    MAX_INT64,
    check_id,
    check_ids,
    check_inputs,
    check_model,
    check_named,
    check_version,
    safe_text,
)
from pipeline.io.npy import from_npy, to_npy
from pipeline.io.oip import H_METHOD as H_OIP_METHOD
from pipeline.io.oip import H_MODEL as H_OIP_MODEL
from pipeline.io.oip import H_VERSION as H_OIP_VERSION
from pipeline.io.oip import OIP, error_body, read_request, read_response, read_version
from pipeline.io.oip import response_body as oip_response_body
from pipeline.io.stream import GenerationSpec, parse_generation

JSON = "application/json"
NPY = "application/x-npy"
_JSON_B = JSON.encode()

H_CONTENT_TYPE = "content-type"
H_ID = "kvpipe-id"
H_MODEL = "kvpipe-model"
H_VERSION = "kvpipe-version"
H_REPLY_TO = "kvpipe-reply-to"
H_DEADLINE = "kvpipe-deadline"
H_RESULT = "kvpipe-result"
H_DLQ_REASON = "kvpipe-dlq-reason"
H_DLQ_SOURCE = "kvpipe-dlq-source"

Headers = Sequence[tuple[str, bytes]]
Array = npt.NDArray[np.float32]

_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
MAX_HEADER_BYTES = 1024


@dataclass(slots=True)
class Request:
    """One inference request as the worker sees it."""

    id: str
    model: str
    inputs: npt.NDArray[Any] | None  # float32 inputs, or int64 ids for embedding models
    version: int | None = None
    #: Named inputs (``"inputs": {"name": matrix}``), rows on the first axis; the runner packs
    #: them into ``inputs`` in the model's own layout (``Model.pack_inputs``).
    named: dict[str, npt.NDArray[Any]] | None = None
    content_type: str = JSON
    reply_to: str | None = None
    deadline_ms: int | None = None
    error: KvpipeError | None = None
    #: A generation request (``prompt``): answered by a stream, not by the batcher.
    generation: GenerationSpec | None = None
    #: Open Inference Protocol (V2) requests: the outputs asked for by name (None: all).
    wanted_outputs: tuple[str, ...] | None = None

    @property
    def rows(self) -> int:
        if self.inputs is not None:
            return int(self.inputs.shape[0])
        if self.named:
            return int(next(iter(self.named.values())).shape[0])
        return 0


class Status(StrEnum):
    """Whether a result carries outputs (``ok``) or an error code and message (``error``)."""

    OK = "ok"
    ERROR = "error"


class CacheSource(StrEnum):
    """Where an ok result's answer came from: parameters as the cache gave them, or a memo.

    ``hit``, ``loaded`` and ``stale`` are the values of the parameter cache's ``Source`` (the
    worst of the batch's pieces); ``memo`` is an output the result cache already held.
    """

    HIT = "hit"
    LOADED = "loaded"
    STALE = "stale"
    MEMO = "memo"


@dataclass(slots=True)
class Result:
    """The answer to one request; ``outputs`` is set when ``status`` is ``Status.OK``."""

    id: str
    model: str
    status: Status
    version: int | None = None
    outputs: Array | None = None
    error_code: str | None = None
    error_message: str | None = None
    cache: CacheSource | None = None
    stale: bool = False
    worker: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    #: Every output by name in its own dtype and shape (rows first), for models whose outputs
    #: have names (ONNX); ``outputs`` holds the same values side by side as float32.
    named: dict[str, npt.NDArray[Any]] | None = None

    @property
    def ok(self) -> bool:
        return self.status == Status.OK

    def meta(self) -> dict[str, Any]:
        """Everything but the outputs, as JSON-able values."""
        return {
            "id": self.id,
            "model": self.model,
            "version": self.version,
            "status": self.status,
            "error": None
            if self.error_code is None
            else {"code": self.error_code, "message": self.error_message},
            "cache": self.cache,
            "stale": self.stale,
            "worker": self.worker,
            "timings": self.timings,
        }

    def to_json(self) -> dict[str, Any]:
        out = self.meta()
        out["outputs"] = None if self.outputs is None else self.outputs.tolist()
        if self.named is not None:
            out["named_outputs"] = {k: v.tolist() for k, v in self.named.items()}
        return out


def error_result(request: Request, exc: KvpipeError, *, worker: str = "") -> Result:
    """An error result answering ``request`` with the error's stable code."""
    return Result(
        id=request.id,
        model=request.model,
        status=Status.ERROR,
        version=request.version,
        error_code=exc.code,
        error_message=str(exc),
        worker=worker,
    )


def header(headers: Headers | None, name: str) -> bytes | None:
    """The last value of header ``name`` (case-insensitive), or None."""
    found = None
    for key, value in headers or ():
        if key.lower() == name:
            found = value
    return found


def _header_map(headers: Headers | None) -> dict[str, bytes]:
    return {k.lower(): v for k, v in headers or ()}


def _text_header(headers: dict[str, bytes], name: str) -> str | None:
    raw = headers.get(name)
    if raw is None:
        return None
    if len(raw) > MAX_HEADER_BYTES:
        raise RequestError(f"header {name} is over {MAX_HEADER_BYTES} bytes", code="bad_request")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError(f"header {name} is not UTF-8", code="bad_request") from None


def _json_body(value: bytes, limits: LimitSettings) -> Any:
    """A JSON request's value parsed within the size limit, or UnreadableMessage (no id can be
    read from it). NaN/Infinity literals parse (the checks after refuse them as non-finite)."""
    if len(value) > limits.max_request_bytes:
        raise UnreadableMessage(
            f"request of {len(value)} bytes is over the limit of {limits.max_request_bytes}",
            code="too_large",
        )
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        try:  # the slow path: NaN/Infinity literals, which orjson refuses, and a precise error
            return json.loads(value)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise UnreadableMessage(f"not a JSON request: {exc}", code="unreadable") from None


def decode_request(
    value: bytes | None,
    raw_headers: Headers | None,
    limits: LimitSettings,
    key: bytes | None = None,
    position: str | None = None,
) -> Request:
    """Read one request message; see the module docstring for the three outcomes. A message
    with an ``mlserver-model`` header (or content type :data:`OIP`) is an Open Inference
    Protocol (V2) request, whose id is its ``key`` when it has one, else its body's ``id``,
    else ``position`` (where it was read: the same id again after a redelivery)."""
    headers = _header_map(raw_headers)
    try:
        ctype = (_text_header(headers, H_CONTENT_TYPE) or JSON).split(";")[0].strip().lower()
    except RequestError as exc:
        raise UnreadableMessage(str(exc)) from None
    if value is None:
        raise UnreadableMessage("message has no value (tombstone)", code="unreadable")
    if ctype == NPY:
        return _decode_npy(value, headers, limits)
    if ctype == OIP or (ctype == JSON and H_OIP_MODEL in headers):
        return _decode_oip(value, headers, limits, key, position)
    if ctype != JSON:
        raise UnreadableMessage(f"unsupported content-type {ctype!r}", code="unreadable")
    body = _json_body(value, limits)
    if not isinstance(body, dict):
        raise UnreadableMessage("a JSON request must be an object", code="unreadable")
    rid = check_id(body.get("id"))
    request = Request(id=rid, model=safe_text(body.get("model"), MAX_ECHO_CHARS), inputs=None)
    try:
        request.model = check_model(body.get("model"))
        request.version = check_version(body.get("version"))
        request.reply_to, request.deadline_ms = _routing(headers)
        if "prompt" in body:
            request.generation = parse_generation(body, limits)
        elif isinstance(body.get("inputs"), dict):
            request.named = check_named(body["inputs"], limits)
        elif "inputs" in body:
            request.inputs = check_inputs(body["inputs"], limits)
        elif "ids" in body:
            request.inputs = check_ids(body["ids"], limits)
        else:
            raise RequestError("request has neither inputs nor ids", code="bad_request")
    except RequestError as exc:
        request.error = exc
    return request


def _decode_npy(value: bytes, headers: dict[str, bytes], limits: LimitSettings) -> Request:
    try:
        rid = check_id(_text_header(headers, H_ID))
    except RequestError as exc:
        raise UnreadableMessage(str(exc), code="missing_id") from None
    request = Request(id=rid, model="", inputs=None, content_type=NPY)
    try:
        raw_model = _text_header(headers, H_MODEL)
        request.model = safe_text(raw_model, MAX_ECHO_CHARS)
        request.model = check_model(raw_model)
        raw_version = _text_header(headers, H_VERSION)
        if raw_version is not None:
            try:
                request.version = check_version(int(raw_version))
            except ValueError:
                raise RequestError(
                    "version must be a positive integer", code="bad_request"
                ) from None
        request.reply_to, request.deadline_ms = _routing(headers)
        try:
            arr = from_npy(
                value, max_bytes=limits.max_request_bytes, max_elements=limits.max_elements
            )
        except ValueError as exc:
            code = "too_large" if "over the limit" in str(exc) else "bad_input"
            raise RequestError(str(exc), code=code) from None
        if arr.dtype.kind in "iu":
            request.inputs = check_ids(arr, limits)
        else:
            request.inputs = check_inputs(arr, limits)
    except RequestError as exc:
        request.error = exc
    return request


def _routing(headers: dict[str, bytes]) -> tuple[str | None, int | None]:
    reply_to = _text_header(headers, H_REPLY_TO)
    if reply_to is not None and not _TOPIC.match(reply_to):
        raise RequestError(f"reply-to {reply_to[:80]!r} is not a topic name", code="bad_request")
    raw_deadline = _text_header(headers, H_DEADLINE)
    deadline = None
    if raw_deadline is not None:
        try:
            deadline = int(raw_deadline)
        except ValueError:
            deadline = -1
        if not 0 <= deadline <= MAX_INT64:
            raise RequestError("deadline must be epoch milliseconds", code="bad_request")
    return reply_to, deadline


def encode_request(
    *,
    id: str,
    model: str,
    inputs: npt.ArrayLike | Mapping[str, npt.ArrayLike] | None = None,
    ids: npt.ArrayLike | None = None,
    version: int | None = None,
    content_type: str = JSON,
    reply_to: str | None = None,
    deadline_ms: int | None = None,
) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The value and headers of a request message: ``inputs`` (floats; a mapping of names to
    arrays for named inputs, JSON only) or ``ids`` (integers)."""
    if (inputs is None) == (ids is None):
        raise ValueError("give exactly one of inputs and ids")
    if isinstance(inputs, Mapping):
        if content_type != JSON:
            raise ValueError("named inputs travel as JSON; use content_type=JSON")
        inputs = {str(k): np.ascontiguousarray(v) for k, v in inputs.items()}
    headers: list[tuple[str, bytes]] = [(H_CONTENT_TYPE, content_type.encode())]
    if reply_to is not None:
        headers.append((H_REPLY_TO, reply_to.encode()))
    if deadline_ms is not None:
        headers.append((H_DEADLINE, str(int(deadline_ms)).encode()))
    if content_type == NPY:
        headers += [(H_ID, id.encode()), (H_MODEL, model.encode())]
        if version is not None:
            headers.append((H_VERSION, str(version).encode()))
        if ids is not None:
            return to_npy(np.asarray(ids, dtype=np.int64)), headers
        return to_npy(np.asarray(inputs, dtype=np.float32)), headers
    body: dict[str, Any] = {"id": id, "model": model}
    if version is not None:
        body["version"] = version
    field, data = ("inputs", inputs) if ids is None else ("ids", ids)
    if isinstance(data, Mapping):
        body[field] = data
        return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), headers
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data)
    body[field] = data
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), headers


def encode_result(
    result: Result, content_type: str = JSON, wanted: tuple[str, ...] | None = None
) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The value and headers of a result message; npy outputs when the request came as npy,
    a V2 response (the ``wanted`` outputs, all when None) when it came as V2."""
    if content_type == OIP:
        return _encode_oip(result, wanted)
    if content_type == NPY and result.outputs is not None:
        meta = orjson.dumps(result.meta())
        return to_npy(result.outputs), [
            (H_CONTENT_TYPE, NPY.encode()),
            (H_ID, result.id.encode()),
            (H_RESULT, meta),
        ]
    body = result.meta()
    body["outputs"] = None if result.outputs is None else np.ascontiguousarray(result.outputs)
    if result.named is not None:
        body["named_outputs"] = {k: np.ascontiguousarray(v) for k, v in result.named.items()}
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), [(H_CONTENT_TYPE, _JSON_B)]


def decode_result(value: bytes, headers: Headers | None) -> Result:
    """Read a result message (JSON, or npy outputs with the metadata in a header)."""
    ctype = (header(headers, H_CONTENT_TYPE) or JSON.encode()).decode()
    try:
        outputs: Array | None
        if ctype == OIP:
            meta_raw = header(headers, H_RESULT)
            if meta_raw is None:
                raise ValueError("V2 result without its kvpipe-result header")
            meta = orjson.loads(meta_raw)
            outputs, meta["named_outputs"] = _oip_outputs(value, meta)
        elif ctype == NPY:
            meta_raw = header(headers, H_RESULT)
            if meta_raw is None:
                raise ValueError("npy result without its kvpipe-result header")
            meta = orjson.loads(meta_raw)
            outputs = from_npy(value).astype(np.float32, copy=False)
        else:
            meta = orjson.loads(value)
            raw = meta.get("outputs")
            outputs = None if raw is None else np.asarray(raw, dtype=np.float32)
        raw_named = meta.get("named_outputs")
        named = None if raw_named is None else {str(k): np.asarray(v) for k, v in raw_named.items()}
        err = meta.get("error") or {}
        cache = meta.get("cache")
        return Result(
            id=str(meta["id"]),
            model=str(meta.get("model", "")),
            status=Status(meta["status"]),
            version=meta.get("version"),
            outputs=outputs,
            error_code=err.get("code"),
            error_message=err.get("message"),
            cache=None if cache is None else CacheSource(cache),
            stale=bool(meta.get("stale", False)),
            worker=str(meta.get("worker", "")),
            timings=dict(meta.get("timings") or {}),
            named=named,
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UnreadableMessage(f"not a kvpipe result: {exc}") from None


# -- Open Inference Protocol (V2) bodies, with the codec of pipeline/io/oip.py --------------


def _decode_oip(
    value: bytes,
    headers: dict[str, bytes],
    limits: LimitSettings,
    key: bytes | None,
    position: str | None,
) -> Request:
    """A V2 request: the id from the message key (else the body, else where it was read,
    else a new one), the model and version from the ``mlserver-*`` headers, one 2-D input as
    ``inputs``, others named."""
    body = _json_body(value, limits)
    raw_id: object = body.get("id") if isinstance(body, dict) else None
    if key:
        try:
            raw_id = key.decode("utf-8")
        except UnicodeDecodeError:
            raise UnreadableMessage("message key is not UTF-8", code="missing_id") from None
    if raw_id is None:
        raw_id = position or uuid.uuid4().hex
    request = Request(id=check_id(raw_id), model="", inputs=None, content_type=OIP)
    try:
        raw_model = _text_header(headers, H_OIP_MODEL)
        request.model = safe_text(raw_model, MAX_ECHO_CHARS)
        if raw_model is None:
            raise RequestError(
                f"a V2 request names its model in the {H_OIP_MODEL} header", code="bad_request"
            )
        request.model = check_model(raw_model)
        method = _text_header(headers, H_OIP_METHOD)
        if method not in (None, "infer"):
            raise RequestError(f"{H_OIP_METHOD} {method[:20]!r} is not infer", code="bad_request")
        request.version = read_version(_text_header(headers, H_OIP_VERSION))
        request.reply_to, request.deadline_ms = _routing(headers)
        v2 = read_request(body, limits)
        request.wanted_outputs = v2.outputs
        # what kvpipe's models take: int64 (BOOL as 0/1) and float32 (FP16 widened exactly)
        tensors = {
            n: a.astype(np.int64 if a.dtype.kind in "iub" else np.float32, copy=False)
            if a.dtype.kind == "b" or a.dtype == np.float16
            else a
            for n, a in v2.inputs.items()
        }
        arr = next(iter(tensors.values())) if len(tensors) == 1 else None
        if arr is not None and arr.ndim == 2:
            if arr.dtype.kind in "iu":
                request.inputs = check_ids(arr, limits)
            else:
                request.inputs = check_inputs(arr, limits)
        else:
            request.named = check_named(tensors, limits)
    except RequestError as exc:
        request.error = exc
    return request


def _encode_oip(
    result: Result, wanted: tuple[str, ...] | None
) -> tuple[bytes, list[tuple[str, bytes]]]:
    """A V2 response (or error) body; kvpipe's fields (status, cache, timings) in a header."""
    value: bytes | None = None
    if result.ok:
        outputs = result.named
        if outputs is None:
            outputs = {} if result.outputs is None else {V2_OUTPUT: result.outputs}
        try:
            value = oip_response_body(
                model=result.model,
                version=result.version,
                id=result.id,
                outputs=outputs,
                wanted=wanted,
            )
        except RequestError as exc:  # an output asked for that the model does not have
            value = error_body(id=result.id, model=result.model, code=exc.code, message=str(exc))
    else:
        value = error_body(
            id=result.id,
            model=result.model,
            code=result.error_code or "internal",
            message=result.error_message or "",
        )
    return value, [
        (H_CONTENT_TYPE, OIP.encode()),
        (H_ID, result.id.encode()),
        (H_RESULT, orjson.dumps(result.meta())),
    ]


#: The name of the one output of a model whose outputs have no names (kvpipe's numpy models).
V2_OUTPUT = "output"


def unknown_outputs(request: Request, result: Result) -> RequestError | None:
    """The error for a V2 request that asked for outputs ``result`` does not have, or None."""
    if request.wanted_outputs is None:
        return None
    have = list(result.named) if result.named is not None else [V2_OUTPUT]
    missing = [n for n in request.wanted_outputs if n not in have]
    if not missing:
        return None
    return RequestError(
        f"output {missing[0][:64]!r} does not exist; this model's outputs are "
        f"{', '.join(have[:16])}",
        code="unknown_output",
    )


def _oip_outputs(value: bytes, meta: dict[str, Any]) -> tuple[Array | None, Any]:
    """A V2 body's outputs: side by side as float32 rows, and by name."""
    if meta.get("status") != Status.OK:
        return None, None
    _, named = read_response(value)
    if not named:
        return None, None
    rows = [a.reshape(a.shape[0], -1).astype(np.float32) for a in named.values()]
    return (rows[0] if len(rows) == 1 else np.concatenate(rows, axis=1)), named
