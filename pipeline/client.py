"""The client side: produce requests, stream results, and request-reply on top of both."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from typing import Any, Self, TypeVar

import numpy.typing as npt
import structlog
from opentelemetry import propagate

from pipeline.config import KafkaSettings
from pipeline.errors import ConfigError, KvpipeError, UnreadableMessage
from pipeline.io.kafka import Consumer, Producer, delete_topics, ensure_topics, list_topics
from pipeline.io.stream import Generated, StreamAssembler, StreamReader, encode_generation
from pipeline.io.wire import (
    H_CONTENT_TYPE,
    H_DEADLINE,
    H_REPLY_TO,
    JSON,
    Result,
    decode_result,
    encode_request,
)
from pipeline.names import check_name
from pipeline.resource import AsyncResource

log = structlog.get_logger("kvpipe.client")
#: The trace headers a request carries when its caller is inside a span.
_TRACE_HEADERS = ("traceparent", "tracestate")


def trace_context() -> list[tuple[str, bytes]]:
    """The caller's current trace as request headers (none outside a span), so the workers'
    spans continue it; the globally configured propagator writes them (W3C by default)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return [(k, v.encode()) for k, v in carrier.items() if k in _TRACE_HEADERS]


T = TypeVar("T")


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
    client.infer(...)`` to wait for one answer (request-reply).

    Request-reply answers arrive on a reply topic. By default each client creates its own
    (``PREFIX.replies.<random>``, one partition) on its first ``infer`` and deletes it on
    close. With ``reply_topic`` (or ``KVPIPE_REPLY_TOPIC``) every client shares one topic,
    reads it from its end and keeps the answers to its own ids: nothing is deleted, and the
    topic is created only when it does not exist, so no admin rights are needed once it does.
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
        shared = reply_topic if reply_topic is not None else settings.reply_topic
        #: True when the reply topic is this client's own: created by it, deleted on close.
        self.owns_reply_topic = not shared
        self.reply_topic = shared or f"{settings.topic_prefix}.replies.{uuid.uuid4().hex[:12]}"
        self._producer = Producer(settings)
        self._replies: ResultStream | None = None
        self._reader: asyncio.Task[None] | None = None
        self._streams: StreamReader | None = None  # generation messages, by request id
        self._waiters: dict[str, asyncio.Future[Result]] = {}
        self._reply_lock = asyncio.Lock()
        self._created_reply_topic = False
        self._closing: asyncio.Future[None] | None = None

    async def start(self) -> None:
        await self._producer.start()

    async def aclose(self) -> None:
        """Stop the reply reader and the producer, and delete the reply topic this client
        created; safe to call twice. Cancelling the caller does not stop the clean-up half
        way: it finishes first (every step is bounded by the Kafka timeouts)."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        closing = self._closing
        try:
            await asyncio.shield(closing)
        except asyncio.CancelledError:
            if not closing.done():
                await asyncio.wait([closing])
            raise

    async def _close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(ResultTimeout("the client was closed before the result came"))
        try:
            if self._streams is not None:
                await self._streams.aclose()
            if self._replies is not None:
                # Stop reading first: a reader's metadata refresh names the topic, and
                # brokers that create topics on demand would bring it back.
                await self._replies.aclose()
            if self._created_reply_topic:
                try:
                    await delete_topics(self.settings, [self.reply_topic])
                    self._created_reply_topic = False
                except KvpipeError as exc:
                    log.warning("reply_topic_not_deleted", topic=self.reply_topic, error=str(exc))
        finally:
            await self._producer.aclose()

    async def submit(
        self,
        model: str,
        inputs: npt.ArrayLike | Mapping[str, npt.ArrayLike] | None = None,
        *,
        ids: npt.ArrayLike | None = None,
        id: str | None = None,
        version: int | None = None,
        reply_to: str | None = None,
        deadline_ms: int | None = None,
        content_type: str | None = None,
        wait: bool = True,
    ) -> str:
        """Produce one request (``inputs`` rows, a mapping of input names to rows, or ``ids``
        for an embedding model); returns its id. ``wait=False`` returns once it is queued; an
        invalid model name is a ConfigError. Named inputs always travel as JSON."""
        check_name(model)
        if isinstance(inputs, Mapping):
            content_type = JSON
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
        headers += trace_context()
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
        inputs: npt.ArrayLike | Mapping[str, npt.ArrayLike] | None = None,
        *,
        ids: npt.ArrayLike | None = None,
        version: int | None = None,
        timeout: float = 30.0,
    ) -> Result:
        """Submit one request (``inputs`` rows or named rows, or ``ids`` for an embedding
        model) and wait
        for its result on the reply topic; :class:`ResultTimeout` after ``timeout`` s."""
        if self._closing is not None:
            raise ConfigError("the client is closed")
        await self._ensure_reply_reader()
        rid = uuid.uuid4().hex
        fut: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiters[rid] = fut
        try:
            await self.submit(
                model,
                inputs,
                ids=ids,
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

    async def generate(
        self,
        model: str,
        prompt: str | Sequence[int],
        *,
        max_tokens: int = 16,
        version: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        deadline_ms: int | None = None,
        timeout: float = 60.0,
        id: str | None = None,
    ) -> AsyncIterator[Generated]:
        """Generate from a transformer model: yields new tokens (and their text) as they
        arrive on the reply topic, duplicates dropped by (id, seq); the last item carries the
        final message (``final.ok``, ``finish_reason``, usage, prefix provenance, timings).
        :class:`ResultTimeout` when ``timeout`` s pass without a message."""
        if self._closing is not None:
            raise ConfigError("the client is closed")
        check_name(model)
        value = encode_generation(
            id=(rid := id or uuid.uuid4().hex),
            model=model,
            prompt=prompt,
            max_tokens=max_tokens,
            version=version,
            temperature=temperature,
            top_k=top_k,
            seed=seed,
            stop=stop,
        )
        headers = [(H_CONTENT_TYPE, JSON.encode()), (H_REPLY_TO, self.reply_topic.encode())]
        if deadline_ms is not None:
            headers.append((H_DEADLINE, str(int(deadline_ms)).encode()))
        headers += trace_context()
        streams = await self._ensure_stream_reader()
        queue, assembler = streams.watch(rid), StreamAssembler()
        try:
            fut = await self._producer.enqueue(
                self.settings.requests_topic, value, key=rid.encode(), headers=headers
            )
            await self._producer.wait_acked([fut])
            while not assembler.done:
                try:
                    msg = await asyncio.wait_for(queue.get(), timeout)
                except TimeoutError:
                    raise ResultTimeout(f"generation {rid}: nothing for {timeout} s") from None
                out = assembler.add(msg)
                if out is not None:
                    yield out
        finally:
            streams.forget(rid)

    async def _ensure_stream_reader(self) -> StreamReader:
        await self._ensure_reply_reader()  # the reply topic exists from here on
        async with self._reply_lock:
            if self._streams is None:
                streams = StreamReader(
                    self.settings, self.reply_topic, from_beginning=self.owns_reply_topic
                )
                try:
                    await streams.start()
                except BaseException:
                    await streams.aclose()
                    raise
                self._streams = streams
            return self._streams

    async def _ensure_reply_reader(self) -> None:
        async with self._reply_lock:
            if self._reader is not None:
                return
            if not self.settings.reply_allowed(self.reply_topic):
                raise ConfigError(
                    f"reply topic {self.reply_topic!r} does not match KVPIPE_REPLY_TOPICS "
                    f"({','.join(self.settings.reply_topics)}): the workers would not answer there"
                )
            if self.owns_reply_topic:
                self._created_reply_topic = True  # set first: a half-done create is deleted too
                await ensure_topics(self.settings, [self.reply_topic], partitions=1)
            elif self.reply_topic not in await list_topics(self.settings):
                await ensure_topics(self.settings, [self.reply_topic])
            # A shared topic is read from its end, as it is when assigned: answers to this
            # client's requests, all sent after that, are all read.
            self._replies = ResultStream(
                self.settings, self.reply_topic, from_beginning=self.owns_reply_topic
            )
            await self._replies.start()
            self._reader = asyncio.get_running_loop().create_task(self._read_replies())

    async def _read_replies(self) -> None:
        assert self._replies is not None
        while True:
            try:
                batch = await self._replies.next_batch(0.2)
            except KvpipeError as exc:  # the broker away for a while: waiters time out
                log.warning("reply_read_failed", topic=self.reply_topic, error=str(exc))
                await asyncio.sleep(0.5)
                continue
            for result in batch:
                fut = self._waiters.get(result.id)
                if fut is not None and not fut.done():
                    fut.set_result(result)


class SyncClient:
    """A blocking :class:`InferenceClient` for scripts and notebooks.

    ``with SyncClient(settings) as client: result = client.infer("demo", [[0.1] * 32])``.
    The client lives on an event loop in a thread of its own for the whole ``with`` block,
    so its connections and reply topic are set up once, not per call; methods may be called
    from any thread, and a call blocks until its answer (or error) is there.
    """

    def __init__(self, settings: KafkaSettings, **options: Any) -> None:
        self._settings = settings
        self._options = options
        self._client: InferenceClient | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="kvpipe-sync-client", daemon=True
        )
        self._state = "new"  # new -> open -> closed

    @property
    def reply_topic(self) -> str:
        return self._open_client().reply_topic

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Start the loop thread and the client (closed again if the start fails)."""
        if self._state != "new":
            raise ConfigError(f"the client is {self._state}; make a new one")
        self._thread.start()
        self._state = "open"
        try:
            self._client = self._call(self._open())
        except BaseException:
            self.close()
            raise

    def infer(
        self,
        model: str,
        inputs: npt.ArrayLike | None = None,
        *,
        ids: npt.ArrayLike | None = None,
        version: int | None = None,
        timeout: float = 30.0,
    ) -> Result:
        """:meth:`InferenceClient.infer`, blocking."""
        client = self._open_client()
        return self._call(client.infer(model, inputs, ids=ids, version=version, timeout=timeout))

    def submit(self, model: str, inputs: npt.ArrayLike | None = None, **kwargs: Any) -> str:
        """:meth:`InferenceClient.submit`, blocking until the broker has the request."""
        return self._call(self._open_client().submit(model, inputs, **kwargs))

    def close(self) -> None:
        """Close the client (its reply topic deleted) and stop the thread; safe twice."""
        if self._state == "closed":
            return
        if self._state == "new":
            self._state = "closed"
            self._loop.close()
            return
        self._state = "closed"
        try:
            if self._client is not None:
                asyncio.run_coroutine_threadsafe(self._client.aclose(), self._loop).result()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    async def _open(self) -> InferenceClient:
        # aiokafka's clients want the loop they run on to be running when they are made
        client = InferenceClient(self._settings, **self._options)
        await client.start()
        return client

    def _open_client(self) -> InferenceClient:
        if self._state != "open" or self._client is None:
            raise ConfigError("the client is not open; use `with SyncClient(...) as client:`")
        return self._client

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._state != "open":
            coro.close()
            raise ConfigError("the client is not open; use `with SyncClient(...) as client:`")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # Ctrl-C in the caller: the call stops, the client stays usable
            raise
