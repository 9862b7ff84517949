"""Single-flight semantics, exactly as DESIGN.md states them."""

from __future__ import annotations

import asyncio

import pytest

from pipeline.cache.singleflight import SingleFlight


class Boom(Exception):
    pass


async def test_concurrent_callers_share_one_load() -> None:
    sf: SingleFlight[str, int] = SingleFlight()
    calls = 0
    gate = asyncio.Event()

    async def load() -> int:
        nonlocal calls
        calls += 1
        await gate.wait()
        return 42

    tasks = [asyncio.create_task(sf.do("k", load)) for _ in range(50)]
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*tasks)
    assert calls == 1
    assert [v for v, _ in results] == [42] * 50
    assert sum(leader for _, leader in results) == 1


async def test_every_waiter_gets_the_same_exception_and_failure_is_not_cached() -> None:
    sf: SingleFlight[str, int] = SingleFlight()
    gate = asyncio.Event()
    calls = 0

    async def failing() -> int:
        nonlocal calls
        calls += 1
        await gate.wait()
        raise Boom("no")

    tasks = [asyncio.create_task(sf.do("k", failing)) for _ in range(5)]
    await asyncio.sleep(0)
    gate.set()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(o, Boom) for o in outcomes)
    assert len({id(o) for o in outcomes}) == 1
    assert not sf.in_flight("k")

    async def ok() -> int:
        return 7

    assert (await sf.do("k", ok))[0] == 7
    assert calls == 1


async def test_cancelled_waiter_does_not_cancel_the_load() -> None:
    sf: SingleFlight[str, str] = SingleFlight()
    gate = asyncio.Event()

    async def load() -> str:
        await gate.wait()
        return "value"

    first = asyncio.create_task(sf.do("k", load))
    second = asyncio.create_task(sf.do("k", load))
    await asyncio.sleep(0)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    gate.set()
    assert await second == ("value", False)


async def test_cancelled_leader_alone_still_finishes_the_load() -> None:
    sf: SingleFlight[str, str] = SingleFlight()
    finished = asyncio.Event()

    async def load() -> str:
        await asyncio.sleep(0.01)
        finished.set()
        return "v"

    task = asyncio.create_task(sf.do("k", load))
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.wait_for(finished.wait(), 1)


async def test_different_keys_load_independently() -> None:
    sf: SingleFlight[str, str] = SingleFlight()

    async def load_a() -> str:
        return "a"

    async def load_b() -> str:
        return "b"

    assert await asyncio.gather(sf.do("a", load_a), sf.do("b", load_b)) == [
        ("a", True),
        ("b", True),
    ]


async def test_aclose_cancels_running_loads_and_is_idempotent() -> None:
    sf: SingleFlight[str, str] = SingleFlight()

    async def forever() -> str:
        await asyncio.Event().wait()
        return ""

    task = asyncio.create_task(sf.do("k", forever))
    await asyncio.sleep(0)
    await sf.aclose()
    await sf.aclose()
    with pytest.raises(asyncio.CancelledError):
        await task
