"""Redis Cluster specifics on real clusters: forming one (redis-cli and plain RESP), ``kvpipe
local up --redis-cluster``, calls whose keys span slots, and where a publish's keys land."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from pipeline.bench.cluster_rows import bench_cluster
from pipeline.config import RedisSettings, Settings, with_values
from pipeline.dev.cluster import SLOTS, ClusterNode, LocalRedisCluster, migrate_slot, topology
from pipeline.dev.daemon import _pid_alive, local_down, local_up
from pipeline.dev.local import RedisServer, free_port
from pipeline.errors import KvpipeError, StoreUnavailable
from pipeline.io.kv import open_kv
from pipeline.io.kv.protocol import hash_slot
from pipeline.params.models import build_model, preset
from pipeline.params.store import ParamStore

pytestmark = pytest.mark.integration


def covered(nodes: list[ClusterNode]) -> int:
    return sum(hi - lo + 1 for n in nodes if n.primary for lo, hi in n.slots)


def node_dirs(state_dir: Path) -> list[str]:
    return [p.name for p in state_dir.iterdir() if p.is_dir() and p.name.startswith("redis-")]


async def test_a_cluster_formed_from_python_without_redis_cli() -> None:
    async with LocalRedisCluster(2, replicas=1, use_redis_cli=False) as cluster:
        nodes = await cluster.topology()
        assert sum(n.primary for n in nodes) == 2 and covered(nodes) == SLOTS
        primaries = {n.node_id for n in nodes if n.primary}
        assert {n.primary_id for n in nodes if not n.primary} == primaries  # one each
        async with open_kv(RedisSettings(url=cluster.url)) as kv:
            keys = [f"py:{i}" for i in range(50)]
            await kv.set_many({k: k.encode() for k in keys})
            assert await kv.mget(keys) == [k.encode() for k in keys]
    assert all(not node.running for node in cluster.nodes)


async def test_local_up_starts_a_cluster_and_down_stops_every_node(tmp_path: Path) -> None:
    state = local_up(tmp_path, redis_cluster=3, replicas=1)
    try:
        url = state["KVPIPE_REDIS"]
        assert url.startswith("redis+cluster://") and len(state["redis_cluster_ports"]) == 6
        nodes = await topology(state["redis_cluster_ports"][0])
        assert sum(n.primary for n in nodes) == 3 and covered(nodes) == SLOTS
        assert sum(not n.primary for n in nodes) == 3
        assert local_up(tmp_path, redis_cluster=3, replicas=1) == state  # already up: kept
        async with open_kv(RedisSettings(url=url)) as kv:
            await kv.set("k", b"v")
            assert await kv.get("k") == b"v"
    finally:
        pids = [state["redis_pid"], *state["redis_cluster_pids"], state["kafka_pid"]]
        assert local_down(tmp_path)
    assert not any(_pid_alive(pid) for pid in pids)
    assert node_dirs(tmp_path) == []


@pytest.mark.parametrize("redis_url", ["cluster"], indirect=True)
async def test_calls_over_many_slots(redis_url: str) -> None:
    async with open_kv(RedisSettings(url=redis_url)) as kv:
        assert kv.cluster
        tag = uuid.uuid4().hex[:8]
        keys = [f"spread:{tag}:{i}" for i in range(200)]
        assert len({hash_slot(k) for k in keys}) > 100
        await kv.set_many({k: k.encode() for k in keys}, ex=60)
        got = await kv.mget([*keys, f"spread:{tag}:absent"])
        assert got == [*(k.encode() for k in keys), None]
        assert await kv.delete(*keys) == 200
        with pytest.raises(KvpipeError, match="one hash slot") as caught:
            await kv.set_if_greater(f"a:{tag}", 1, persist=[f"b:{tag}"])
        assert caught.value.code == "store_error" and not caught.value.retryable
        assert await kv.set_if_greater(f"a:{{{tag}}}", 1, persist=[f"b:{{{tag}}}"])
        await kv.delete(f"a:{{{tag}}}")


@pytest.mark.parametrize("redis_url", ["cluster"], indirect=True)
async def test_a_publish_spreads_over_the_primaries(
    redis_url: str, redis_cluster: LocalRedisCluster
) -> None:
    nodes = [n for n in await redis_cluster.topology() if n.primary]

    def owner(key: str) -> int:
        slot = hash_slot(key)
        return next(n.port for n in nodes if n.serves(slot))

    async with open_kv(RedisSettings(url=redis_url)) as kv:
        store = ParamStore(kv, prefix=f"c{uuid.uuid4().hex[:8]}", emb_partitions=6)
        model = preset("mlp")
        published = await store.publish("m", model.arch, model.init(0))
        tensors = [store.tensor_key("m", 1, t) for t in published.manifest.tensors]
        assert owner(store.current_key("m")) == owner(store.manifest_key("m", 1))
        arch = {"kind": "embedding", "users": 500, "items": 400, "dim": 8}
        scorer = build_model(arch)
        assert scorer.kind == "embedding"
        tables = scorer.init_tables(1)
        await store.publish("rec", arch, scorer.init(1), tables=tables)
        partitions = [store.table_key("rec", "user", i) for i in range(6)]
        assert len({owner(k) for k in tensors + partitions}) == len(nodes)  # every primary
        ids = list(range(0, 500, 7))
        rows = await store.read_rows("rec", "user", ids, tables["user"].shape[1])
        np.testing.assert_array_equal(np.stack([rows[i] for i in ids]), tables["user"][ids])


@pytest.mark.parametrize("redis_url", ["cluster"], indirect=True)
async def test_reads_during_a_slot_migration_all_succeed(
    redis_url: str, redis_cluster: LocalRedisCluster
) -> None:
    # redis-py 8.2 alone sends ASKING and the command on two pooled connections: concurrent
    # reads of a half-migrated slot bounce until "TTL exhausted" (4-17 of ~2,000 here).
    tag = uuid.uuid4().hex[:8]
    keys = [f"mig:{tag}:{{{tag}:{i}}}" for i in range(4)]
    failures: list[str] = []
    reads = 0
    async with open_kv(RedisSettings(url=redis_url, pool_size=4)) as kv:
        for key in keys:
            await kv.hset_many(key, {str(j): b"v" * 36 for j in range(200)})
        done = asyncio.Event()

        async def read() -> None:
            nonlocal reads
            while not done.is_set():
                for key in keys:
                    try:
                        assert await kv.hmget(key, ["1", "199"]) == [b"v" * 36] * 2
                        reads += 1
                    except KvpipeError as exc:
                        failures.append(str(exc))
                await asyncio.sleep(0)

        readers = [asyncio.create_task(read()) for _ in range(6)]
        try:
            primaries = sorted(n.port for n in await redis_cluster.topology() if n.primary)
            for key in keys:
                slot = hash_slot(key)
                nodes = await redis_cluster.topology()
                owner = next(n.port for n in nodes if n.primary and n.serves(slot))
                target = primaries[(primaries.index(owner) + 1) % len(primaries)]
                await migrate_slot(slot, owner, target, batch=1, pause_s=0.2)
        finally:
            done.set()
            await asyncio.gather(*readers)
        await kv.delete(*keys)
    assert reads > 100 and failures == []


async def test_bench_cluster_measures_both_sides_and_checks_every_row(
    redis_server: RedisServer,
) -> None:
    lines: list[str] = []
    base = with_values(Settings(), {"redis.url": redis_server.url})
    result = await bench_cluster(base, uuid.uuid4().hex[:8], 1024, 1, lines.append)
    assert result.passed, lines
    assert result.first.rate and result.second.rate and result.reference
    assert result.reference.rate
    assert all(run.ok == 1024 and run.wrong == 0 for run in result.first.runs)
    doc = result.as_dict()
    assert doc["ratio_of"] == "three/one" and doc["reference"]["side"] == "single"
    assert any("ratio 3/1" in line for line in lines)


async def test_a_missing_cluster_fails_fast_without_showing_the_password() -> None:
    url = f"redis+cluster://:s3cret@127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as caught:
        async with open_kv(RedisSettings(url=url, timeout_s=1.0, connect_timeout_s=1.0)):
            pass
    assert time.monotonic() - started < 5.0
    message = str(caught.value)
    assert "s3cret" not in message and ":***@" in message and "\n" not in message


@pytest.mark.parametrize("redis_url", ["cluster"], indirect=True)
async def test_many_concurrent_calls_wait_for_a_connection(redis_url: str) -> None:
    # redis-py's cluster pools raise MaxConnectionsError when full; the adapter makes calls wait.
    tag = uuid.uuid4().hex[:8]
    async with open_kv(RedisSettings(url=redis_url, pool_size=1)) as kv:
        keys = [f"many:{tag}:{i}" for i in range(300)]
        await asyncio.gather(*(kv.set(k, k.encode()) for k in keys))
        assert await asyncio.gather(*(kv.get(k) for k in keys)) == [k.encode() for k in keys]
        assert await kv.delete(*keys) == 300
