"""The store's key layout on a Redis Cluster (MemoryKV in cluster mode keeps the one-slot rule
of set_if_greater), and the single-Redis layout left as it was."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import KvpipeError
from pipeline.io.kv.memory import MemoryKV
from pipeline.io.kv.protocol import hash_slot
from pipeline.params.models import build_model, preset
from pipeline.params.store import ParamStore


def test_hash_slot_matches_redis() -> None:
    assert hash_slot("foo") == 12182  # CLUSTER KEYSLOT foo
    assert hash_slot("{user1000}.following") == hash_slot("{user1000}.followers")
    assert hash_slot("a{}b") != hash_slot("a{}c")  # an empty tag is no tag
    assert hash_slot("{}{x}") != hash_slot("{}{x}y")  # the first '{' opens an empty tag


async def test_single_redis_keys_are_unchanged() -> None:
    kv = MemoryKV()
    store = ParamStore(kv, prefix="p")
    arch = {"kind": "embedding", "users": 20, "items": 30, "dim": 4}
    scorer = build_model(arch)
    assert scorer.kind == "embedding"
    await store.publish("rec", arch, scorer.init(0), tables=scorer.init_tables(0))
    assert kv.keys() == [
        "p:rec:current",
        "p:rec:emb:item",
        "p:rec:emb:user",
        "p:rec:seq",
        "p:rec:v1:manifest",
        "p:rec:v1:t:bias",
        "p:rec:versions",
    ]


async def test_cluster_pointer_and_manifest_share_a_slot_tensors_spread() -> None:
    kv = MemoryKV(cluster=True)
    store = ParamStore(kv, prefix="p")
    model = preset("mlp")
    published = await store.publish("m", model.arch, model.init(0))
    assert store.current_key("m") == "p:{m}:current"
    assert hash_slot(store.current_key("m")) == hash_slot(store.manifest_key("m", 1))
    tensor_slots = {hash_slot(store.tensor_key("m", 1, t)) for t in published.manifest.tensors}
    assert len(tensor_slots) == len(published.manifest.tensors)  # untagged: each its own slot
    live = kv.keys()  # (MemoryKV's own listing, not a dict)
    for key in live:  # the pointer move persisted every key of the version
        assert kv.ttl(key) is None, key
    await store.publish("m", model.arch, model.init(1))
    await store.set_current("m", 1)  # rollback on the cluster layout too
    _, params = await store.load("m")
    assert np.array_equal(params["w0"], model.init(0)["w0"])


async def test_cluster_refuses_a_script_over_two_slots() -> None:
    kv = MemoryKV(cluster=True)
    with pytest.raises(KvpipeError, match="CROSSSLOT"):
        await kv.set_if_greater("a:{x}", 1, persist=["b:{y}"])
    assert await kv.set_if_greater("a:{x}", 1, persist=["b:{x}"])


@pytest.mark.parametrize("partitions", [1, 3, 8])
async def test_cluster_tables_are_partitioned_hashes(partitions: int) -> None:
    kv = MemoryKV(cluster=True)
    store = ParamStore(kv, prefix="p", emb_partitions=partitions)
    arch = {"kind": "embedding", "users": 50, "items": 70, "dim": 4}
    scorer = build_model(arch)
    assert scorer.kind == "embedding"
    tables = scorer.init_tables(3)
    await store.publish("rec", arch, scorer.init(0), tables=tables)
    live = kv.keys()
    user_keys = [k for k in live if k.startswith("p:rec:emb:user:")]
    assert user_keys == sorted(f"p:rec:emb:user:{{rec:user:{i}}}" for i in range(partitions))
    assert len({hash_slot(k) for k in user_keys}) == partitions
    ids = [49, 0, 7, 7, 123, 16]  # a repeat and an absent row
    kv.calls.clear()
    width = tables["user"].shape[1]
    rows = await store.read_rows("rec", "user", ids, width)
    assert sorted(rows) == [0, 7, 16, 49]
    for i in rows:
        np.testing.assert_array_equal(rows[i], tables["user"][i])
    assert kv.calls["hmget"] == len({i % partitions for i in ids})  # one per partition
    await store.write_rows("rec", "user", [7], np.full((1, width), 2.5, np.float32))
    assert (await store.read_rows("rec", "user", [7], width))[7].tolist() == [2.5] * width


async def test_partitions_apply_to_a_cluster_only() -> None:
    store = ParamStore(MemoryKV(), prefix="p", emb_partitions=8)
    assert store.emb_partitions == 1
    assert store.table_key("m", "t", 5) == "p:m:emb:t"
