"""Publishing under concurrency and failure, on the in-memory KV (issue 10, cases 5 and 8).

The pointer only moves forward on publish, retention never retires the current version or a
newer one, and a publish that fails half-way leaves only keys that expire.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pipeline.errors import StoreOutOfMemory
from pipeline.io.kv.memory import MemoryKV
from pipeline.params.models import preset
from pipeline.params.store import PENDING_TTL_S, ParamStore


class SlowKV:
    """Delegates to ``inner`` (any KeyValue) and sleeps ``delay_s`` after every reply (a slow
    publisher); ``took_version`` is set as soon as its INCR (the version number) came back."""

    def __init__(self, inner: Any, delay_s: float) -> None:
        self._inner = inner
        self.delay_s = delay_s
        self.took_version = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not asyncio.iscoroutinefunction(attr):
            return attr

        async def slowed(*args: Any, **kwargs: Any) -> Any:
            result = await attr(*args, **kwargs)
            if name == "incr":
                self.took_version.set()
            await asyncio.sleep(self.delay_s)
            return result

        return slowed


def version_ttls(kv: MemoryKV, version: int) -> dict[str, float | None]:
    live = kv.keys()  # (MemoryKV's own listing, not a dict)
    return {k: kv.ttl(k) for k in live if k.startswith(f"t:m:v{version}:")}


async def test_a_slower_publisher_never_moves_the_pointer_back() -> None:
    kv = MemoryKV()
    slow = SlowKV(kv, delay_s=0.05)
    a = ParamStore(slow, prefix="t", retention_s=60.0)  # type: ignore[arg-type]
    b = ParamStore(kv, prefix="t", retention_s=60.0)
    model = preset("mlp")
    await b.publish("m", model.arch, model.init(0))  # v1
    task_a = asyncio.create_task(a.publish("m", model.arch, model.init(1)))
    await slow.took_version.wait()
    published_b = await b.publish("m", model.arch, model.init(2))
    published_a = await task_a  # A took v2 first and finishes last
    assert (published_a.version, published_b.version) == (2, 3)
    assert await b.current_version("m") == 3  # before the fix: 2
    assert published_b.is_current and not published_a.is_current
    assert published_a.current == 3
    rows = {r.version: r for r in await b.versions("m")}
    assert rows[3].expires_at is None and rows[2].expires_at is None  # current, previous
    assert rows[1].expires_at is not None
    assert set(version_ttls(kv, 3).values()) == {None}  # before the fix: all expiring
    assert set(version_ttls(kv, 2).values()) == {None}  # refused, complete, kept as previous


async def test_a_stale_retention_pass_never_retires_the_current_or_a_newer_version() -> None:
    kv = MemoryKV()
    store = ParamStore(kv, prefix="t", retention_s=60.0)
    model = preset("mlp")
    for seed in range(4):
        await store.publish("m", model.arch, model.init(seed))
    # A pass computed when v1 was current (keep v1) runs after v4 was published.
    await store.expire_old("m", keep=(1,))
    assert set(version_ttls(kv, 4).values()) == {None}  # current: before the fix, expiring
    assert set(version_ttls(kv, 3).values()) == {None}  # the previous one
    assert None not in version_ttls(kv, 2).values()


async def test_a_rollback_keeps_the_versions_it_steps_back_from() -> None:
    kv = MemoryKV()
    store = ParamStore(kv, prefix="t", retention_s=60.0)
    model = preset("mlp")
    for seed in range(4):
        await store.publish("m", model.arch, model.init(seed))
    await store.set_current("m", 2)  # a plain SET: moving back is the point of a rollback
    assert await store.current_version("m") == 2
    for version in (2, 3, 4):  # before the fix: v3 scheduled to expire
        assert set(version_ttls(kv, version).values()) == {None}, version
    published = await store.publish("m", model.arch, model.init(9))  # moves on: v5
    assert published.is_current and await store.current_version("m") == 5
    assert set(version_ttls(kv, 4).values()) == {None}
    assert None not in version_ttls(kv, 3).values()
    assert None not in version_ttls(kv, 2).values()


@pytest.mark.parametrize("fails_at", ["hset_many", "set_if_greater"])
async def test_a_publish_that_fails_half_way_leaves_only_expiring_keys(fails_at: str) -> None:
    kv = MemoryKV()
    store = ParamStore(kv, prefix="t")
    model = preset("mlp")
    await store.publish("m", model.arch, model.init(0))

    async def out_of_memory(*args: Any, **kwargs: Any) -> Any:
        raise StoreOutOfMemory("Redis at redis://h:1/0 is out of memory")

    setattr(kv, fails_at, out_of_memory)
    with pytest.raises(StoreOutOfMemory):
        await store.publish("m", model.arch, model.init(1))
    written = version_ttls(kv, 2)
    assert len(written) == 5  # the manifest and four tensors made it
    assert all(t is not None and 0 < t <= PENDING_TTL_S for t in written.values()), written
    assert await store.current_version("m") == 1
    assert set(version_ttls(kv, 1).values()) == {None}
