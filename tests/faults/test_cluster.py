"""Redis Cluster faults under load, with a worker process serving through the broker: a
primary with a replica SIGKILLed (failover), and the slots holding the models' keys migrated
to other primaries (ASK, then MOVED)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest_asyncio

from pipeline.client import InferenceClient
from pipeline.config import Settings, with_values
from pipeline.dev.cluster import LocalRedisCluster, migrate_slot, topology
from pipeline.errors import LocalServiceError
from pipeline.io.kafka import ensure_topics
from pipeline.io.kv import open_kv
from pipeline.io.kv.protocol import hash_slot
from pipeline.io.wire import Result
from pipeline.params.models import build_model, preset
from pipeline.params.store import ParamStore
from tests.conftest import BrokerFactory
from tests.faults.conftest import Fleet

#: How long a primary may be silent before its replica takes over (a short one: a fast test).
NODE_TIMEOUT_MS = 1000
EMB_ARCH = {"kind": "embedding", "users": 4000, "items": 4000, "dim": 8}

ClusterFleet = Callable[..., Awaitable[tuple[Fleet, LocalRedisCluster]]]


@pytest_asyncio.fixture
async def cluster_fleet(broker_factory: BrokerFactory) -> AsyncIterator[ClusterFleet]:
    """``await cluster_fleet(replicas, **env)``: a fresh local cluster and broker, topics
    made, a Fleet to start workers on them; everything stopped at teardown."""
    made: list[tuple[Fleet, LocalRedisCluster]] = []

    async def make(replicas: int, **extra_env: str) -> tuple[Fleet, LocalRedisCluster]:
        cluster = LocalRedisCluster(3, replicas=replicas, node_timeout_ms=NODE_TIMEOUT_MS)
        await cluster.__aenter__()
        broker = await broker_factory()
        tag = uuid.uuid4().hex[:8]
        settings = with_values(Settings(), {
            "redis.url": cluster.url, "kafka.bootstrap": broker.bootstrap,
            "kafka.topic_prefix": f"c{tag}", "kafka.group_id": f"c{tag}",
            "kafka.session_timeout_ms": 2000, "kafka.heartbeat_interval_ms": 300,
        })  # fmt: skip
        k = settings.kafka
        await ensure_topics(k, [k.requests_topic, k.results_topic, k.dlq_topic, k.updates_topic])
        fleet = Fleet(settings, cluster.nodes[0], broker, dict(extra_env))
        made.append((fleet, cluster))
        return fleet, cluster

    try:
        yield make
    finally:
        for fleet, cluster in made:
            try:
                await fleet.stop_all()
            finally:
                await cluster.aclose()


class Models:
    """An mlp ``m`` and an embedding model ``rec`` published on the cluster, with answers."""

    def __init__(self) -> None:
        self.mlp = preset("mlp")
        self.mlp_params = {1: self.mlp.init(1), 2: self.mlp.init(2)}
        scorer = build_model(EMB_ARCH)
        assert scorer.kind == "embedding"
        self.scorer = scorer
        self.tables = scorer.init_tables(0)
        self.emb_params = scorer.init(0)

    async def publish(self, settings: Settings, mlp_version: int = 1) -> None:
        async with open_kv(settings.redis) as kv:
            store = ParamStore(kv, prefix=settings.redis.key_prefix)
            await store.publish("m", self.mlp.arch, self.mlp_params[mlp_version])
            if mlp_version == 1:
                await store.publish("rec", EMB_ARCH, self.emb_params, tables=self.tables)

    def check(self, r: Result, x: npt.NDArray[np.float32], ids: npt.NDArray[np.int64]) -> None:
        assert r.ok, (r.id, r.error_code, r.error_message)
        if r.model == "m":
            assert r.version in self.mlp_params
            expected = self.mlp.forward(self.mlp_params[r.version], x)
        else:
            rows = {"user": self.tables["user"][ids[:, 0]], "item": self.tables["item"][ids[:, 1]]}
            params = {**rows, "bias": self.emb_params["bias"]}
            expected = self.scorer.forward(params, ids)  # type: ignore[arg-type]
        np.testing.assert_allclose(r.outputs, expected, rtol=1e-4, atol=1e-5)  # type: ignore[arg-type]


class Load:
    """Requests at a steady rate, alternating the two models; every result kept by id."""

    def __init__(self, client: InferenceClient, stream: Any, models: Models, users: int) -> None:
        self.client, self.stream, self.models = client, stream, models
        self.users = users
        self.got: dict[str, Result] = {}
        self.arrived: dict[str, float] = {}
        self.inputs: dict[str, tuple[Any, Any]] = {}
        self.rng = np.random.default_rng(5)
        self.sent = 0

    async def send(self, count: int, rate: float, prefix: str, *, every_row: bool = False) -> None:
        """``count`` requests at ``rate`` per second; ``every_row``: the embedding requests
        walk every row of both tables (so all are cached), else rows at random."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i in range(count):
            rid = f"{prefix}{i}"
            x = self.rng.standard_normal((1, 32)).astype(np.float32)
            ids = self.rng.integers(0, self.users, size=(1, 2))
            if every_row:
                ids = np.array([[(i // 2) % self.users, (i // 2 * 5 + 1) % self.users]])
            self.inputs[rid] = (x, ids)
            if i % 2:
                await self.client.submit("m", x, id=rid, wait=False)
            else:
                await self.client.submit("rec", ids=ids, id=rid, wait=False)
            self.sent += 1
            if i % 20 == 19:
                await self.client.flush()
                await asyncio.sleep(max(0.0, start + (i + 1) / rate - loop.time()))
        await self.client.flush()

    async def read_until(self, count: int, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.got) < count and loop.time() < deadline:
            for r in await self.stream.next_batch(0.1):
                if r.id not in self.got:
                    self.got[r.id] = r
                    self.arrived[r.id] = loop.time()

    def check_all(self) -> Counter[str]:
        missing = set(self.inputs) - set(self.got)
        assert not missing, f"{len(missing)} of {len(self.inputs)} requests never answered"
        for rid, r in self.got.items():
            self.models.check(r, *self.inputs[rid])
        return Counter(str(r.cache) for r in self.got.values())


async def test_a_primary_killed_under_load_fails_over(cluster_fleet: ClusterFleet) -> None:
    fleet, cluster = await cluster_fleet(
        1, KVPIPE_VERSION_TTL="0.5", KVPIPE_REDIS_TIMEOUT="0.5", KVPIPE_EMB_PARTITIONS="8"
    )
    models = Models()
    await models.publish(fleet.settings)
    store_prefix = fleet.settings.redis.key_prefix
    pointer_slot = hash_slot(f"{store_prefix}:{{m}}:current")
    nodes = await cluster.topology()
    victim = next(n for n in nodes if n.primary and n.serves(pointer_slot))
    replica = next(n for n in nodes if n.primary_id == victim.node_id)
    await fleet.start("w")
    loop = asyncio.get_running_loop()
    async with (
        InferenceClient(fleet.settings.kafka) as client,
        client.stream(from_beginning=True) as stream,
    ):
        load = Load(client, stream, models, users=64)  # 64 rows a table: all warm early
        await load.send(600, rate=300.0, prefix="warm", every_row=True)
        await load.read_until(600, timeout=60)
        assert all(r.ok for r in load.got.values())
        cluster.node(victim.port).kill()
        killed_at = loop.time()

        async def failed_over() -> float:
            """Seconds from the kill until the replica serves the pointer's slot."""
            while True:
                with contextlib.suppress(LocalServiceError):
                    now = await topology(replica.port)
                    promoted = next(n for n in now if n.node_id == replica.node_id)
                    if promoted.primary and promoted.serves(pointer_slot):
                        return loop.time() - killed_at
                assert loop.time() - killed_at < 30, "no failover within 30 s"
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(failed_over())
        reader = asyncio.create_task(load.read_until(600 + 1800, timeout=90))
        await load.send(1800, rate=300.0, prefix="fail")  # ~6 s: through the failover
        await asyncio.wait_for(reader, 100)
        failed_over_s = await asyncio.wait_for(watcher, 30)
        await models.publish(fleet.settings, mlp_version=2)  # writes land on the new primary
        await asyncio.sleep(2.5)  # the pointer TTL and the longest failure back-off (2 s)
        await load.send(400, rate=300.0, prefix="after")
        await load.read_until(600 + 1800 + 400, timeout=60)
    sources = load.check_all()
    during = [load.got[f"fail{i}"] for i in range(1800)]
    fresh = [load.got[f"after{i}"] for i in range(400)]
    stale = sum(r.stale for r in during)
    assert stale > 0, "nothing was served stale: the killed primary held nothing read"
    assert not any(r.stale for r in fresh)
    assert all(r.version == 2 for r in fresh if r.model == "m")
    print(
        f"\nfailover: primary :{victim.port} SIGKILLed, replica :{replica.port} serving its "
        f"slots {failed_over_s:.1f} s later (node timeout {NODE_TIMEOUT_MS} ms); "
        f"{load.sent} requests, {len(load.got)} answered, 0 errors; during the failover "
        f"{stale} of {len(during)} stale; after it {len(fresh)} of {len(fresh)} fresh "
        f"(m at v2); by source {dict(sources)}"
    )


async def test_slots_migrated_under_load_answer_every_request(
    cluster_fleet: ClusterFleet,
) -> None:
    fleet, cluster = await cluster_fleet(
        0, KVPIPE_VERSION_TTL="0.2", KVPIPE_REDIS_TIMEOUT="1.0", KVPIPE_EMB_PARTITIONS="8"
    )
    models = Models()
    await models.publish(fleet.settings)
    prefix = fleet.settings.redis.key_prefix
    async with open_kv(fleet.settings.redis) as kv:
        store = ParamStore(kv, prefix=prefix)
        manifest = await store.manifest("m", 1)
        keys = [store.current_key("m"), store.current_key("rec")]
        keys += [store.tensor_key("m", 1, t) for t in manifest.tensors]
        keys += [store.table_key("rec", t, i) for t in ("user", "item") for i in range(8)]
    slots = sorted({hash_slot(k) for k in keys})
    await fleet.start("w")
    moved_keys = 0
    window = [0.0, 0.0]
    loop = asyncio.get_running_loop()
    async with (
        InferenceClient(fleet.settings.kafka) as client,
        client.stream(from_beginning=True) as stream,
    ):
        load = Load(client, stream, models, users=4000)  # mostly row misses: reads go on
        await load.send(300, rate=300.0, prefix="warm")
        await load.read_until(300, timeout=60)

        async def migrate() -> None:
            nonlocal moved_keys
            window[0] = loop.time()
            primaries = sorted(n.port for n in await cluster.topology() if n.primary)
            for slot in slots:
                nodes = await cluster.topology()
                owner = next(n.port for n in nodes if n.primary and n.serves(slot))
                target = primaries[(primaries.index(owner) + 1) % len(primaries)]
                moved_keys += await migrate_slot(slot, owner, target, batch=1, pause_s=0.1)
            window[1] = loop.time()

        reader = asyncio.create_task(load.read_until(300 + 2400, timeout=120))
        mover = asyncio.create_task(migrate())
        await load.send(2400, rate=300.0, prefix="mig")  # ~8 s, the migration inside it
        await asyncio.wait_for(mover, 60)
        await asyncio.wait_for(reader, 130)
    sources = load.check_all()
    errors = sum(not r.ok for r in load.got.values())
    assert errors == 0
    assert moved_keys >= len(keys)
    stale = sum(r.stale for r in load.got.values())
    inside = sum(window[0] <= t <= window[1] for t in load.arrived.values())
    assert inside > 0, "no answer arrived while the slots moved"
    print(
        f"\nslot migration: {len(slots)} slots ({moved_keys} keys: pointers, manifests, tensors, "
        f"16 table partitions) moved between primaries in {window[1] - window[0]:.1f} s under "
        f"load, {inside} answers inside that window; {load.sent} requests, "
        f"{len(load.got)} answered, {errors} errors, {stale} stale; by source {dict(sources)}"
    )
