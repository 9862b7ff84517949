"""The client side: produce requests, stream results, and request-reply on top of both."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence

import numpy.typing as npt

from pipeline.config import KafkaSettings
from pipeline.errors import KvpipeError, UnreadableMessage
from pipeline.io.kafka import Consumer, Producer, ensure_topics
from pipeline.io.wire import JSON, Result, decode_result, encode_request
from pipeline.names import check_name
from pipeline.resource import AsyncResource


class ResultTimeout(KvpipeError):
    """No result arrived for a request within the time allowed."""

    code = "result_timeout"
    retryable = True


class ResultStream(AsyncResource):
    """Results read from a topic (every partition, no consumer group), in arrival order."""

    def __init__(self, settings: KafkaSettings, topic: str, *, from_beginning: bool) -> None:
        self._consumer = Consumer(
            settings, [topic], group_id=None, assign_from="start" if from_beginning else "end"
        )
        self._buffer: list[Result] = []
        self.skipped = 0

    async def start(self) -> None:
        await self._consumer.start()

    async def aclose(self) -> None:
        await self._consumer.aclose()

    async def next_batch(self, timeout_s: float = 0.5) -> list[Result]:
        """Whatever results arrive within ``timeout_s`` (possibly none)."""
        messages = await self._consumer.getmany(timeout_ms=int(timeout_s * 1000), max_records=2000)
        out: list[Result] = []
        for m in messages:
            try:
                out.append(decode_result(m.value or b"", m.headers))
            except UnreadableMessage:
                self.skipped += 1
        return out

    async def __aiter__(self) -> AsyncIterator[Result]:
        while True:
            for result in await self.next_batch():
                yield result


class InferenceClient(AsyncResource):
    """Submit requests and read their results.

    ``async with InferenceClient(settings) as client:`` then ``await client.submit(...)`` to
    fire and forget, ``client.stream()`` to read the results topic, or ``await
    client.infer(...)`` to wait for one answer (request-reply on a reply topic of its own).
    """

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        content_type: str = JSON,
        reply_topic: str | None = None,
    ) -> None:
        self.settings = settings
        self.content_type = content_type
        self.reply_topic = reply_topic or f"{settings.topic_prefix}.replies.{uuid.uuid4().hex[:12]}"
        self._producer = Producer(settings)
        self._replies: ResultStream | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiters: dict[str, asyncio.Future[Result]] = {}
        self._reply_lock = asyncio.Lock()
        self._closed = False

    async def start(self) -> None:
        await self._producer.start()

    async def aclose(self) -> None:
        """Stop the reply reader and the producer; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        try:
            if self._replies is not None:
                await self._replies.aclose()
        finally:
            await self._producer.aclose()

    async def submit(
        self,
        model: str,
        inputs: npt.ArrayLike | None = None,
        *,
        ids: npt.ArrayLike | None = None,
        id: str | None = None,
        version: int | None = None,
        reply_to: str | None = None,
        deadline_ms: int | None = None,
        content_type: str | None = None,
        wait: bool = True,
    ) -> str:
        """Produce one request (``inputs`` rows, or ``ids`` for an embedding model); returns
        its id. ``wait=False`` returns once it is queued; an invalid model name is a ConfigError."""
        check_name(model)
        rid = id or uuid.uuid4().hex
        value, headers = encode_request(
            id=rid,
            model=model,
            inputs=inputs,
            ids=ids,
            version=version,
            content_type=content_type or self.content_type,
            reply_to=reply_to,
            deadline_ms=deadline_ms,
        )
        fut = await self._producer.enqueue(
            self.settings.requests_topic, value, key=rid.encode(), headers=headers
        )
        if wait:
            await self._producer.wait_acked([fut])
        return rid

    async def submit_raw(
        self, value: bytes, *, key: bytes | None = None, headers: Sequence[tuple[str, bytes]] = ()
    ) -> None:
        """Produce bytes as they are (for tests of malformed input and other clients' output)."""
        await self._producer.send(self.settings.requests_topic, value, key=key, headers=headers)

    async def flush(self) -> None:
        await self._producer.flush()

    def stream(self, *, from_beginning: bool = False, topic: str | None = None) -> ResultStream:
        """A stream of the results topic (or ``topic``); use as an async context manager."""
        return ResultStream(
            self.settings, topic or self.settings.results_topic, from_beginning=from_beginning
        )

    async def infer(
        self,
        model: str,
        inputs: npt.ArrayLike,
        *,
        version: int | None = None,
        timeout: float = 30.0,
    ) -> Result:
        """Submit one request and wait for its result on this client's reply topic."""
        await self._ensure_reply_reader()
        rid = uuid.uuid4().hex
        fut: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiters[rid] = fut
        try:
            await self.submit(
                model,
                inputs,
                id=rid,
                version=version,
                reply_to=self.reply_topic,
                deadline_ms=None,
            )
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise ResultTimeout(f"no result for request {rid} within {timeout} s") from None
        finally:
            self._waiters.pop(rid, None)

    async def _ensure_reply_reader(self) -> None:
        async with self._reply_lock:
            if self._reader is not None:
                return
            await ensure_topics(self.settings, [self.reply_topic], partitions=1)
            self._replies = ResultStream(self.settings, self.reply_topic, from_beginning=True)
            await self._replies.start()
            self._reader = asyncio.get_running_loop().create_task(self._read_replies())

    async def _read_replies(self) -> None:
        assert self._replies is not None
        while True:
            for result in await self._replies.next_batch(0.2):
                fut = self._waiters.get(result.id)
                if fut is not None and not fut.done():
                    fut.set_result(result)
