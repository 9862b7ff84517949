"""Intake: a consumed message read as a request, with every reason to refuse it set."""

from __future__ import annotations

import structlog

from pipeline.config import Settings
from pipeline.errors import RequestError, UnreadableMessage
from pipeline.io.kafka import Message
from pipeline.io.wire import decode_request
from pipeline.serving.item import Item

log = structlog.get_logger("kvpipe.worker")


def read_item(msg: Message, settings: Settings, now_ms: float) -> Item:
    """The request in ``msg``; ``request.error`` says why it will be refused (a reply-to
    topic not allowed, a deadline passed). Raises :class:`UnreadableMessage` for the DLQ."""
    if msg.problem is not None:
        raise UnreadableMessage(msg.problem, code="corrupt_record")
    try:
        position = f"{msg.partition.topic}-{msg.partition.partition}@{msg.offset}"
        request = decode_request(msg.value, msg.headers, settings.limits, msg.key, position)
    except UnreadableMessage:
        raise
    except Exception as exc:  # a decoder bug must not stop the worker
        log.exception("decode_failed", source=f"{msg.partition}@{msg.offset}")
        raise UnreadableMessage(
            f"internal error: {type(exc).__name__}: {exc}", code="internal"
        ) from None
    if request.reply_to is not None and not settings.kafka.reply_allowed(request.reply_to):
        refused, request.reply_to = request.reply_to, None  # answered on the results topic
        request.error = request.error or RequestError(
            f"reply-to topic {refused!r} is not allowed (KVPIPE_REPLY_TOPICS)",
            code="bad_reply_to",
        )
    late = request.deadline_ms is not None and now_ms > request.deadline_ms
    if request.error is None and late:
        request.error = RequestError(
            "deadline passed before the request was run", code="deadline_exceeded"
        )
    return Item(msg, request)
