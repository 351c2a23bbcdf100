"""Stopping background tasks: cancelled, awaited, their exit errors dropped."""

from __future__ import annotations

import asyncio

from flux.tasks import cancel_and_wait


async def test_tasks_are_cancelled_and_ended_and_none_is_skipped() -> None:
    loop = asyncio.create_task(asyncio.sleep(3600))
    done = asyncio.create_task(asyncio.sleep(0))
    await done
    await cancel_and_wait(loop, None, done)
    assert loop.cancelled() and done.done() and not done.cancelled()


async def test_an_error_raised_on_the_way_out_is_dropped() -> None:
    async def fails_when_cancelled() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise RuntimeError("cleanup failed") from None

    task = asyncio.create_task(fails_when_cancelled())
    await asyncio.sleep(0)
    await cancel_and_wait(task)
    assert isinstance(task.exception(), RuntimeError)

