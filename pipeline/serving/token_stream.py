"""A generation's messages: a progress message per token, then the final one."""

from __future__ import annotations

from typing import Any

import numpy as np
import structlog

from pipeline.errors import KvpipeError
from pipeline.io.stream import StreamMessage, encode_stream
from pipeline.io.wire import H_CONTENT_TYPE, JSON, Result, Status
from pipeline.params.prefix import Reuse
from pipeline.params.transformer import EOS, sample
from pipeline.serving.delivery import Delivery, Outgoing
from pipeline.serving.sequence import Generation, elapsed_ms

log = structlog.get_logger("kvpipe.generation")

_JSON_HEADERS = [(H_CONTENT_TYPE, JSON.encode())]


class TokenStream:
    """Samples each token and sends it at once on the request's topic and partition, not
    waited for; the final message carries every token (a lost progress message costs
    nothing) and its acknowledgement finishes the request's offset (:meth:`Delivery.deliver`)."""

    def __init__(self, delivery: Delivery, *, worker_id: str) -> None:
        self.delivery = delivery
        self.worker_id = worker_id

    async def advance(self, seq: Generation, logits: np.ndarray[Any, Any]) -> None:
        """Sample the next token, stream it, and decide whether the sequence is finished."""
        spec = seq.spec
        token = sample(logits, temperature=spec.temperature, top_k=spec.top_k, rng=seq.rng)
        if not seq.tokens:
            seq.timings["ttft_ms"] = elapsed_ms(seq.started)
        seq.tokens.append(token)
        piece = seq.text.decode(bytes([token])) if token < 256 else ""
        await self._progress(seq, [token], piece)
        if token == EOS:
            seq.finish = "eos"
        elif spec.stop and any(seq.generated().endswith(s) for s in spec.stop):
            seq.finish = "stop"
        elif len(seq.tokens) >= spec.max_tokens:
            seq.finish = "length"
        elif seq.past_deadline():
            seq.finish = "deadline"
            seq.error = seq.deadline_error()

    async def _progress(self, seq: Generation, tokens: list[int], text: str) -> None:
        """One progress message, sent without waiting for its acknowledgement."""
        msg = StreamMessage(
            id=seq.id,
            model=seq.resolved.name,
            version=seq.resolved.version,
            seq=seq.seq,
            start=len(seq.tokens) - len(tokens),
            tokens=tokens,
            text=text if seq.spec.text else None,
            worker=self.worker_id,
        )
        seq.seq += 1
        try:
            fut = await self.delivery.producer.enqueue(
                seq.topic,
                encode_stream(msg),
                key=seq.id.encode(),
                headers=_JSON_HEADERS,
                partition=seq.partition,
            )
        except KvpipeError as exc:  # the final message carries every token anyway
            log.debug("progress_not_sent", request_id=seq.id, error=str(exc))
            return
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def final(self, seq: Generation) -> None:
        """The last message: every token, why it stopped, usage, provenance, timings; its
        acknowledgement finishes the request's offset."""
        reuse = seq.reuse or Reuse(keys=[])
        chunk = seq.model.kv_chunk
        seq.timings.update(queue_ms=round(seq.queue_ms, 3), total_ms=elapsed_ms(seq.started))
        text = seq.generated().decode("utf-8", "replace") if seq.spec.text else None
        error = seq.error
        msg = StreamMessage(
            id=seq.id,
            model=seq.resolved.name,
            version=seq.resolved.version,
            seq=seq.seq,
            start=0,
            tokens=list(seq.tokens),
            text=text,
            final=True,
            status="ok" if error is None else "error",
            error_code=None if error is None else error.code,
            error_message=None if error is None else str(error),
            finish_reason=seq.finish,
            usage={
                "prompt_tokens": len(seq.spec.prompt),
                "completion_tokens": len(seq.tokens),
            },
            prefix={
                "reused_tokens": (reuse.local + reuse.redis) * chunk,
                "local_tokens": reuse.local * chunk,
                "redis_tokens": reuse.redis * chunk,
                "joined_tokens": seq.joined,
                "computed_tokens": seq.computed,
                "damaged_chunks": reuse.damaged,
                "bytes_read": reuse.bytes_read,
            },
            timings={k: round(v, 3) for k, v in seq.timings.items()},
            worker=self.worker_id,
        )
        result = Result(
            id=seq.id,
            model=seq.resolved.name,
            status=Status.OK if error is None else Status.ERROR,
            version=seq.resolved.version,
            error_code=msg.error_code,
            error_message=msg.error_message,
            worker=self.worker_id,
            timings=msg.timings,
        )
        try:
            self.delivery.count([result])  # stats and metrics, as for every answer
        except Exception:  # counting must never cost an answer
            log.exception("count_failed")
        seq.item.answered = True
        out = Outgoing(
            seq.item, seq.topic, encode_stream(msg), _JSON_HEADERS, result, seq.id.encode()
        )
        log.debug(
            "generation_done",
            request_id=seq.id,
            model=seq.resolved.name,
            tokens=len(seq.tokens),
            finish=seq.finish,
            **msg.prefix,
        )
        await self.delivery.deliver([out])
