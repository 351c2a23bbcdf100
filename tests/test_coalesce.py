"""Concurrent reloads coalesce: calls made while one runs share one more run."""

from __future__ import annotations

import asyncio

import pytest

from flux.coalesce import Coalescer


async def test_calls_during_a_run_share_the_next_run() -> None:
    coalescer: Coalescer[int] = Coalescer()
    gate = asyncio.Event()
    runs = 0

    async def job() -> int:
        nonlocal runs
        runs += 1
        await gate.wait()
        return runs

    first = asyncio.create_task(coalescer.run(job))
    await asyncio.sleep(0)  # the first run has started
    waiting = [asyncio.create_task(coalescer.run(job)) for _ in range(5)]
    await asyncio.sleep(0)
    gate.set()
    assert await first == 1
    assert await asyncio.gather(*waiting) == [2] * 5
    assert runs == 2


async def test_a_caller_that_gives_up_does_not_cancel_the_shared_run() -> None:
    coalescer: Coalescer[str] = Coalescer()
    gate = asyncio.Event()

    async def job() -> str:
        await gate.wait()
        return "done"

    impatient = asyncio.create_task(coalescer.run(job))
    patient = asyncio.create_task(coalescer.run(job))
    await asyncio.sleep(0)
    impatient.cancel()
    gate.set()
    assert await patient == "done"
    with pytest.raises(asyncio.CancelledError):
        await impatient


async def test_a_failing_run_fails_every_caller_that_shared_it() -> None:
    coalescer: Coalescer[None] = Coalescer()

    async def job() -> None:
        raise ValueError("broken")

    results = await asyncio.gather(coalescer.run(job), coalescer.run(job), return_exceptions=True)
    assert [type(r) for r in results] == [ValueError, ValueError]


async def test_exclusive_waits_for_the_queued_run() -> None:
    coalescer: Coalescer[int] = Coalescer()
    order: list[str] = []

    async def job() -> int:
        await asyncio.sleep(0.01)
        order.append("run")
        return 1

    task = asyncio.create_task(coalescer.run(job))
    await asyncio.sleep(0)
    async with coalescer.exclusive():
        order.append("closed")
    await task
    assert order == ["run", "closed"]
