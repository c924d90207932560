"""The supervisor's side of the state shared between processes (``relayrace.state``): the
backend opened for its lifetime, and what a ``StateEvent`` becomes (a log line and an event)."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import attrs

from .._config import Config
from .._events import EventKind
from ..actors import DeploymentSnapshot, HealthSnapshot, State
from ..state import (
    BenchRecord,
    Deployment,
    EventHook,
    StateBackend,
    StateEvent,
    StateEventKind,
    open_state,
)

log = logging.getLogger("relayrace.state")


@asynccontextmanager
async def shared_state(
    config: Config, on_event: EventHook, wall_clock: Callable[[], float]
) -> AsyncIterator[StateBackend | None]:
    """Open ``config.state``'s backend; yield it, or ``None`` for ``"local"`` (nothing shared:
    the actors' own records and the supervisor's own retry budget are today's behaviour)."""
    async with open_state(
        config.state,
        retry_budget=config.policies.retry_budget,
        on_event=on_event,
        wall_clock=wall_clock,
    ) as state:
        yield None if config.state.backend == "local" else state


def state_event(event: StateEvent) -> tuple[EventKind, Deployment | None]:
    """The supervisor event's kind of a ``StateEvent`` (the store's comings and goings logged
    here), and the deployment of a fleet bench (``None`` for the store's).

    The reason is an exception's class name, ``timeout`` or a bench's reason: never the URL
    (it may carry a password)."""
    if event.kind is StateEventKind.DEGRADED:
        log.warning("shared state degraded (%s): serving on local state", event.reason)
        return EventKind.STATE_DEGRADED, None
    if event.kind is StateEventKind.RESTORED:
        log.warning("shared state restored (%s)", event.reason)
        return EventKind.STATE_RESTORED, None
    # A fleet bench is a health change like this process's own: the access log's health
    # lines (``relayrace.health``) say it, as they say ``actor_benched``.
    deployment = Deployment.from_field(event.field or "")
    if event.kind is StateEventKind.FLEET_BENCHED:
        return EventKind.FLEET_BENCHED, deployment
    return EventKind.FLEET_UNBENCHED, deployment


def fleet_benches(state: StateBackend | None, provider: str) -> dict[str, BenchRecord] | None:
    """The benches the fleet shares of ``provider``'s deployments, by upstream model (``""``:
    the provider as a whole), as this process's mirror has them; ``None``: nothing shared."""
    if state is None:
        return None
    now = state.now()
    found: dict[str, BenchRecord] = {}
    for field, record in list(state.mirror.benches.items()):
        deployment = Deployment.from_field(field)
        if deployment.provider == provider and record.active(now):
            found[deployment.model or ""] = record
    return found


def fleet_health(
    state: StateBackend | None,
    snapshot: HealthSnapshot,
    now: float,
    drained: bool = False,
) -> HealthSnapshot:
    """``snapshot`` (this process's records of one actor) with the benches the fleet shares
    of its provider: a bench made by another instance shows as benched (``benched_by="fleet"``)
    with its ``reason``, ``manual`` and deadline; ``drained``: drained on this process alone.

    ``now`` is trio's clock; the shared deadlines are wall-clock seconds."""
    if drained and snapshot.bench_reason is None:
        snapshot = attrs.evolve(snapshot, bench_reason="drained")
    if state is None or not state.mirror.benches:
        return snapshot
    wall = state.now()
    for model, record in (fleet_benches(state, snapshot.name) or {}).items():
        until = math.inf if record.manual else now + (record.until - wall)
        if not model:
            if snapshot.provider_state is State.BENCHED:
                if snapshot.bench_reason is None:
                    snapshot = attrs.evolve(snapshot, bench_reason=record.reason)
                continue
            snapshot = attrs.evolve(
                snapshot,
                state=State.BENCHED,
                provider_state=State.BENCHED,
                benched_until=until,
                manual=record.manual,
                bench_reason=record.reason,
                benched_by="fleet",
            )
            continue
        own = snapshot.deployments.get(model)
        if own is not None and own.state is State.BENCHED:
            if snapshot.bench_reason is None:
                snapshot = attrs.evolve(snapshot, bench_reason=record.reason)
            continue
        deployment = DeploymentSnapshot(
            model=model,
            state=State.BENCHED,
            benched_until=until,
            consecutive_failures=0 if own is None else own.consecutive_failures,
            manual=record.manual,
            probe_in_flight=False,
            bench_count=0 if own is None else own.bench_count,
        )
        changes: dict[str, object] = {"deployments": {**snapshot.deployments, model: deployment}}
        if snapshot.state is not State.BENCHED:
            changes.update(
                state=State.BENCHED,
                benched_until=until,
                manual=record.manual,
                bench_reason=record.reason,
                benched_by="fleet",
            )
        snapshot = attrs.evolve(snapshot, **changes)  # type: ignore[arg-type]
    return snapshot
