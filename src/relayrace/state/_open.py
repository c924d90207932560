"""``open_state``: the backend a ``StateConfig`` names, opened and closed."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from .._policy import RetryBudgetPolicy
from ._backend import DEFAULT_RETRY_BUDGET, EventHook, LocalState, StateBackend, WallClock
from ._config import StateConfig


@asynccontextmanager
async def open_state(
    config: StateConfig,
    *,
    retry_budget: RetryBudgetPolicy = DEFAULT_RETRY_BUDGET,
    on_event: EventHook | None = None,
    wall_clock: WallClock = time.time,
) -> AsyncIterator[StateBackend]:
    """Open the backend ``config`` names, and close it (its background tasks) on exit.

    ``"redis"`` imports coredis here and only here. ``on_event`` is told ``state_degraded`` /
    ``state_restored`` (see ``StateEvent``); it must not block.
    """
    if config.backend == "local":
        await trio.lowlevel.checkpoint()
        yield LocalState(retry_budget=retry_budget, wall_clock=wall_clock)
        return
    from ._redis import open_redis_state

    async with open_redis_state(
        config, retry_budget=retry_budget, on_event=on_event, wall_clock=wall_clock
    ) as state:
        yield state
