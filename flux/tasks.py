"""Stopping background tasks: every component that runs a loop of its own stops it the
same way on its way out."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel ``tasks`` (``None`` ones are skipped) and wait until each has ended. What they
    raise on the way out is dropped, since they are being stopped; a cancellation of the
    caller itself still reaches the caller."""
    running = [task for task in tasks if task is not None]
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)


__all__ = ["cancel_and_wait"]
