"""Generation through the worker's real path (decode -> scheduler -> prefix cache -> stream ->
deliver -> commit), with Kafka and Redis replaced at the boundary by in-memory fakes."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from pipeline.config import Settings, with_values
from pipeline.io.kafka import Partition
from pipeline.io.kv.memory import MemoryKV
from pipeline.io.stream import StreamMessage, decode_stream, encode_generation
from pipeline.io.wire import H_CONTENT_TYPE, H_DEADLINE
from pipeline.params.models import preset
from pipeline.params.prefix import chunk_keys, chunk_shape, decode_chunk
from pipeline.params.store import ParamStore
from pipeline.params.transformer import transformer_of
from pipeline.serving.worker import Worker
from tests.unit.kafka_fakes import FakeBroker, fake_worker

MODEL = preset("gen-tiny")
T = transformer_of(MODEL)
assert T is not None
PARAMS = MODEL.init(0)
SYSTEM = "You are a terse assistant. Answer in one line; never apologise. " * 2  # 130 bytes


def _settings() -> Settings:
    return with_values(
        Settings(),
        {
            "worker.max_wait_ms": 1.0,
            "worker.commit_interval_s": 0.01,
            "worker.watchdog_s": 0.0,
            "worker.shutdown_timeout_s": 5.0,
            "worker.listen_updates": False,
            "worker.topic_check_s": 0.05,
        },
    )


def greedy(params: Any, prompt: bytes, n: int, t: Any = T) -> list[int]:
    state = t.new_state()
    logits = t.prefill(params, list(prompt), state)
    out: list[int] = []
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        if len(out) < n:
            logits = t.decode(params, [out[-1]], [state])[0]
    return out


class Fleet:
    """Workers on fakes sharing one broker and one Redis (each with its own local caches)."""

    def __init__(self) -> None:
        self.settings = _settings()
        self.broker = FakeBroker()
        k = self.settings.kafka
        self.broker.create(k.requests_topic, k.results_topic, k.dlq_topic)
        self.kv = MemoryKV()
        self.store = ParamStore(self.kv, prefix="t")
        self.workers: list[Worker] = []
        self.running: Worker | None = None  # the worker serve() runs now

    def send(self, rid: str, prompt: str, *, partition: int = 0, **extra: Any) -> None:
        headers = [(H_CONTENT_TYPE, b"application/json")]
        deadline = extra.pop("deadline_ms", None)
        if deadline is not None:
            headers.append((H_DEADLINE, str(deadline).encode()))
        body = json.loads(encode_generation(id=rid, model=extra.pop("model", "gpt"),
                                            prompt=prompt, **extra))  # fmt: skip
        value = json.dumps(body).encode()
        self.broker.append(self.settings.kafka.requests_topic, partition, value, headers)

    async def serve(
        self,
        until: Callable[[], bool],
        *,
        timeout: float = 30.0,
        max_batch: int = 64,
        kv_budget: int = 1 << 30,
    ) -> Worker:
        """Run one more worker (fresh caches) until ``until()``; return it."""
        worker = fake_worker(self.settings, self.broker, self.store, version_ttl_s=2.0)
        worker.generation.max_batch = max_batch
        worker.generation.kv_budget_bytes = kv_budget
        stop = asyncio.Event()
        self.running = worker
        async with worker:
            task = asyncio.create_task(worker.run(stop))
            deadline = asyncio.get_running_loop().time() + timeout
            while not until() and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            stop.set()
            await asyncio.wait_for(task, 30)
        self.workers.append(worker)
        return worker

    def messages(self) -> list[StreamMessage]:
        out = []
        for r in self.broker.records(self.settings.kafka.results_topic):
            msg = decode_stream(r.value)
            assert msg is not None
            out.append(msg)
        return out

    def finals(self) -> dict[str, StreamMessage]:
        return {m.id: m for m in self.messages() if m.final}

    def committed(self) -> bool:
        ends = self.broker.end(self.settings.kafka.requests_topic)
        return all(self.broker.committed.get(p, 0) == end for p, end in ends.items() if end)


async def test_tokens_stream_in_order_and_equal_generation_from_scratch() -> None:
    fleet = Fleet()
    await fleet.store.publish("gpt", MODEL.arch, PARAMS)
    fleet.send("a", SYSTEM + "Q: first?", max_tokens=12)
    await fleet.serve(fleet.committed)
    final = fleet.finals()["a"]
    prompt = (SYSTEM + "Q: first?").encode()
    assert final.ok and final.finish_reason == "length" and final.version == 1
    assert final.tokens == greedy(PARAMS, prompt, 12)
    progress = [m for m in fleet.messages() if m.id == "a" and not m.final]
    assert [m.seq for m in progress] == list(range(12)) and final.seq == 12
    assert [m.start for m in progress] == list(range(12))
    assert [t for m in progress for t in m.tokens] == final.tokens
    assert final.usage == {"prompt_tokens": len(prompt), "completion_tokens": 12}
    assert final.prefix["reused_tokens"] == 0 and final.prefix["computed_tokens"] == len(prompt)
    assert {"ttft_ms", "total_ms", "queue_ms", "lookup_ms", "prefill_ms"} <= set(final.timings)


async def test_a_second_worker_reuses_what_the_first_computed_through_redis() -> None:
    fleet = Fleet()
    await fleet.store.publish("gpt", MODEL.arch, PARAMS)
    fleet.send("a", SYSTEM + "Q: first?", max_tokens=8)
    await fleet.serve(lambda: "a" in fleet.finals())
    chunks_written = [k for k in list(fleet.kv.keys()) if ":kv:" in k]
    assert len(chunks_written) == len(SYSTEM + "Q: first?") // T.kv_chunk
    fleet.send("b", SYSTEM + "Q: second, please?", max_tokens=8)
    worker_b = await fleet.serve(lambda: "b" in fleet.finals())  # fresh local caches
    final = fleet.finals()["b"]
    shared = (len(SYSTEM) // T.kv_chunk) * T.kv_chunk  # whole chunks of the common prefix
    assert final.prefix["redis_tokens"] == shared and final.prefix["local_tokens"] == 0
    assert final.prefix["bytes_read"] > 0
    assert final.tokens == greedy(PARAMS, (SYSTEM + "Q: second, please?").encode(), 8)
    assert worker_b.generation.prefix.stats.redis_chunks == shared // T.kv_chunk


async def test_a_new_version_reuses_nothing_of_the_old_one() -> None:
    fleet = Fleet()
    await fleet.store.publish("gpt", MODEL.arch, PARAMS)
    fleet.send("a", SYSTEM, max_tokens=4)
    await fleet.serve(lambda: "a" in fleet.finals())
    new = MODEL.init(1)
    await fleet.store.publish("gpt", MODEL.arch, new)
    fleet.send("b", SYSTEM, max_tokens=4)
    await fleet.serve(lambda: "b" in fleet.finals())
    final = fleet.finals()["b"]
    assert final.version == 2 and final.prefix["reused_tokens"] == 0
    assert final.tokens == greedy(new, SYSTEM.encode(), 4)


async def test_concurrent_generations_decode_together_and_share_a_prefix() -> None:
    fleet = Fleet()
    await fleet.store.publish("gpt", MODEL.arch, PARAMS)
    for i in range(6):
        fleet.send(f"r{i}", SYSTEM + f"Q{i}", max_tokens=20, partition=i % 3)
    worker = await fleet.serve(fleet.committed)
    finals = fleet.finals()
    for i in range(6):
        assert finals[f"r{i}"].tokens == greedy(PARAMS, (SYSTEM + f"Q{i}").encode(), 20)
    gen = worker.generation
    assert gen.stepped_sequences == 6 * 19  # every token after the first came from a step
    assert gen.steps < gen.stepped_sequences  # several sequences per numpy step
    stats = gen.prefix.stats
    # the shared prefix's chunks were computed once and joined or reused by the others
    assert stats.computed == len(SYSTEM) // T.kv_chunk
    for i in range(6):  # each partition's answers stay in order per request
        mine = [m.seq for m in fleet.messages() if m.id == f"r{i}"]
        assert mine == sorted(mine)


async def test_bad_requests_get_stable_codes_and_everything_is_committed() -> None:
    fleet = Fleet()
    await fleet.store.publish("gpt", MODEL.arch, PARAMS)
    await fleet.store.publish("mlp", preset("mlp").arch, preset("mlp").init(0))
    fleet.send("long", "x" * 500, max_tokens=20)  # 520 > n_ctx 512
    fleet.send("dense", "hi", model="mlp")
    fleet.send("nobody", "hi", model="nope")
    fleet.send("late", "hi", deadline_ms=int(time.time() * 1000) - 1000)
    fleet.send("ok", "hi", max_tokens=2)
    await fleet.serve(fleet.committed)
    codes = {rid: m.error_code for rid, m in fleet.finals().items()}
    assert codes == {
        "long": "context_too_long",
        "dense": "not_generative",
        "nobody": "unknown_model",
        "late": "deadline_exceeded",
        "ok": None,
    }


async def test_a_deadline_stops_a_running_generation_and_says_so() -> None:
    fleet = Fleet()
    await fleet.store.publish("gpt", MODEL.arch, PARAMS)
    fleet.send("slow", "hi", max_tokens=500, deadline_ms=int(time.time() * 1000) + 60)
    await fleet.serve(fleet.committed)
    final = fleet.finals()["slow"]
    assert final.error_code == "deadline_exceeded" and len(final.tokens) < 500
    if final.tokens:  # stopped while generating (on a loaded machine it may not have started)
        assert final.finish_reason == "deadline"
        assert "generation stopped" in (final.error_message or "")
    else:
        assert "deadline passed before the request was run" in (final.error_message or "")


async def test_a_damaged_chunk_in_redis_is_recomputed_and_written_again() -> None:
    fleet = Fleet()
    await fleet.store.publish("gpt", MODEL.arch, PARAMS)
    fleet.send("a", SYSTEM + "Q: first?", max_tokens=6)
    await fleet.serve(lambda: "a" in fleet.finals())
    keys = chunk_keys("gpt", 1, T.kv_chunk, list(SYSTEM.encode()), 3)
    redis_key = f"{fleet.settings.redis.key_prefix}:gpt:v1:kv:{keys[2].digest}"
    good = await fleet.kv.get(redis_key)
    assert good is not None
    await fleet.kv.set(redis_key, good[:100] + bytes([good[100] ^ 0xFF]) + good[101:])
    fleet.send("b", SYSTEM + "Q: second?", max_tokens=6)
    await fleet.serve(lambda: "b" in fleet.finals())
    final = fleet.finals()["b"]
    assert final.prefix["damaged_chunks"] == 1 and final.prefix["redis_tokens"] == 2 * 16
    assert final.tokens == greedy(PARAMS, (SYSTEM + "Q: second?").encode(), 6)
    healed = await fleet.kv.get(redis_key)
    assert healed is not None
    np.testing.assert_allclose(
        decode_chunk(keys[2], healed, chunk_shape(T)), decode_chunk(keys[2], good, chunk_shape(T))
    )


async def test_seeded_sampling_repeats_and_the_seed_matters() -> None:
    fleet = Fleet()
    await fleet.store.publish("gpt", MODEL.arch, PARAMS)
    for rid, seed in (("s1", 11), ("s1-again", 11), ("s2", 12)):
        fleet.send(rid, "Once upon a time", max_tokens=24, temperature=1.5, seed=seed)
    await fleet.serve(fleet.committed)
    finals = fleet.finals()
    assert finals["s1"].tokens == finals["s1-again"].tokens
    assert finals["s1"].tokens != finals["s2"].tokens
    assert finals["s1"].tokens != greedy(PARAMS, b"Once upon a time", 24)


async def test_more_sequences_than_one_step_takes_all_advance_in_turn() -> None:
    fleet = Fleet()
    await fleet.store.publish("gpt", MODEL.arch, PARAMS)
    for i in range(5):
        fleet.send(f"r{i}", f"Q{i}: go", max_tokens=20)
    worker = await fleet.serve(fleet.committed, max_batch=2)
    finals = fleet.finals()
    for i in range(5):
        assert finals[f"r{i}"].tokens == greedy(PARAMS, f"Q{i}: go".encode(), 20)
    gen = worker.generation
    assert gen.stepped_sequences == 5 * 19 and gen.steps >= 5 * 19 / 2
    # Taking turns, a joined sequence waits at most 3 steps of 2 (6 messages) plus the others'
    # first and final messages (8) between two of its tokens; waiting for others to finish
    # first, it would wait 2 x 19 messages or more.
    ids = [m.id for m in fleet.messages()]
    for i in range(5):
        mine = [k for k, rid in enumerate(ids) if rid == f"r{i}"]
        assert max(b - a - 1 for a, b in itertools.pairwise(mine)) <= 14


async def test_running_sequences_keys_and_values_stay_within_their_budget() -> None:
    fleet = Fleet()
    await fleet.store.publish("gpt", MODEL.arch, PARAMS)
    for i in range(6):
        fleet.send(f"r{i}", f"Q{i}: {'x' * 40}", max_tokens=30, partition=i % 3)
    each = (len("Q0: ") + 40 + 30) * T.kv_bytes_per_token
    worker = await fleet.serve(fleet.committed, kv_budget=2 * each)
    finals = fleet.finals()
    for i in range(6):
        assert finals[f"r{i}"].tokens == greedy(PARAMS, f"Q{i}: {'x' * 40}".encode(), 30)
    gen = worker.generation
    assert gen.kv_peak_bytes == 2 * each and gen.kv_bytes == 0  # two at a time, all released
    assert gen.steps < gen.stepped_sequences  # still batched: two per step


async def test_a_revoked_partition_s_generation_stops_and_is_left_to_its_next_owner() -> None:
    fleet = Fleet()
    fleet.settings = with_values(fleet.settings, {"worker.shutdown_timeout_s": 0.05})
    await fleet.store.publish("gpt", MODEL.arch, PARAMS)
    fleet.send("long", "a long one", max_tokens=480, partition=0)
    fleet.send("short", "a short one", max_tokens=4, partition=1)
    revoked: list[int] = []

    def revoke_when_streaming() -> bool:
        worker = fleet.running
        ids = [m.id for m in fleet.messages()]
        if worker is not None and not revoked and ids.count("long") >= 3:
            part = Partition(fleet.settings.kafka.requests_topic, 0)
            revoked.append(1)
            asyncio.get_running_loop().create_task(worker._on_revoked([part]))
        return (
            bool(revoked)
            and "short" in fleet.finals()
            and worker is not None
            and (worker.generation.active == 0)
        )

    worker = await fleet.serve(revoke_when_streaming)
    assert revoked and "long" not in fleet.finals()  # no answer from here: the next owner's
    assert 3 <= [m.id for m in fleet.messages()].count("long") < 480
    assert fleet.finals()["short"].ok
    gen = worker.generation
    assert gen.active == 0 and gen.kv_bytes == 0 and not gen._running
