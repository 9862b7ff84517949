"""The update listener a worker runs beside its request loop: announcements -> cache."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

import structlog

from pipeline.config import Settings
from pipeline.params.registry import ModelRegistry
from pipeline.params.updates import UpdateListener

log = structlog.get_logger("kvpipe.updates")


async def start_listener(
    stack: AsyncExitStack, settings: Settings, registry: ModelRegistry, stop: asyncio.Event
) -> UpdateListener | None:
    """Open the listener on ``stack`` and run it until ``stop``; None when switched off."""
    if not settings.worker.listen_updates:
        log.info("update_listener_off", reason="KVPIPE_LISTEN_UPDATES=0")
        return None
    listener = await stack.enter_async_context(UpdateListener(settings.kafka, registry))
    task = asyncio.create_task(listener.run(stop), name="kvpipe-updates")

    async def finish() -> None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    stack.push_async_callback(finish)
    return listener
