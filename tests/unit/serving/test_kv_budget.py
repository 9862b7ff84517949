"""The key/value budget by hand: who starts, who waits, what is released."""

from __future__ import annotations

import asyncio

from pipeline.serving.kv_budget import KVBudget


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_sequence_waits_until_it_fits_beside_the_others() -> None:
    budget = KVBudget(100)
    await budget.reserve(60)
    waiting = asyncio.create_task(budget.reserve(50))
    await _settle()
    assert not waiting.done() and budget.used == 60  # 60 + 50 is over 100: it waits
    budget.release(60)
    await asyncio.wait_for(waiting, 5)
    assert budget.used == 50 and budget.peak == 60


async def test_a_sequence_over_the_whole_budget_runs_alone() -> None:
    budget = KVBudget(100)
    await budget.reserve(250)  # nothing else running: it starts
    assert budget.used == 250 and budget.peak == 250
    small = asyncio.create_task(budget.reserve(10))
    await _settle()
    assert not small.done()  # nothing fits beside it
    budget.release(250)
    await asyncio.wait_for(small, 5)
    budget.release(10)
    assert budget.used == 0 and budget.peak == 250


async def test_every_waiter_that_fits_starts_after_one_release() -> None:
    budget = KVBudget(100)
    await budget.reserve(100)
    waiters = [asyncio.create_task(budget.reserve(30)) for _ in range(4)]
    await _settle()
    assert not any(w.done() for w in waiters)
    budget.release(100)
    await _settle()
    assert sum(w.done() for w in waiters) == 3 and budget.used == 90  # the fourth is over 100
    budget.release(30)
    await asyncio.wait_for(asyncio.gather(*waiters), 5)
    assert budget.used == 90 and budget.peak == 100
