"""Events published by a supervisor to its subscribers (``Supervisor.subscribe``)."""

from __future__ import annotations

import datetime
import enum
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from time import time as _wall_clock
from typing import Any

import attrs
import trio

from ._failure import Failure
from ._values import Decision


class EventKind(enum.Enum):
    ATTEMPT_STARTED = "attempt_started"
    ATTEMPT_FAILED = "attempt_failed"
    RETRYING = "retrying"
    FAILOVER = "failover"
    STOPPED = "stopped"
    COMPLETED = "completed"
    FAILED = "failed"
    ACTOR_BENCHED = "actor_benched"
    ACTOR_PROBING = "actor_probing"
    ACTOR_RECOVERED = "actor_recovered"
    ACTOR_RESTARTED = "actor_restarted"
    ACTOR_GAVE_UP = "actor_gave_up"
    #: an operator acted through the admin API or a signal: ``detail`` says what (``bench``,
    #: ``unbench``, ``drain``, ``reload``, ``reload_refused``), ``actor`` on whom.
    ADMIN_ACTION = "admin_action"
    #: the shared state's store (Redis) went away / came back: ``detail`` says why
    #: (an exception's class name or ``timeout``); requests go on on local state meanwhile.
    STATE_DEGRADED = "state_degraded"
    STATE_RESTORED = "state_restored"
    #: a bench another instance made reached this one (``[state] backend = "redis"``): ``actor``
    #: and ``model`` say which deployment, ``detail`` the bench's reason; this process's own
    #: benches are ``actor_benched``.
    FLEET_BENCHED = "fleet_benched"
    #: a bench another instance lifted (an unbench, a recovery) reached this one.
    FLEET_UNBENCHED = "fleet_unbenched"


@attrs.frozen(kw_only=True)
class Event:
    """Something that happened. Fields that do not apply to ``kind`` are ``None``.

    ``time`` is ``trio.current_time()`` (monotonic: for ordering and durations); ``wall_time``
    is ``time.time()`` when the event was made (for people: ``to_dict`` gives it as ISO 8601
    UTC). ``model`` is the deployment (upstream model) an actor's health event concerns;
    ``None`` for the provider as a whole (an account-level failure, a provider-wide bench).
    """

    kind: EventKind
    time: float
    request_id: int | None = None
    actor: str | None = None
    failure: Failure | None = None
    decision: Decision | None = None
    until: float | None = None
    detail: str | None = None
    model: str | None = None
    wall_time: float = attrs.field(factory=_wall_clock)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "time": self.time,
            "wall_time": iso_utc(self.wall_time),
            "request_id": self.request_id,
            "actor": self.actor,
            "model": self.model,
            "failure": None if self.failure is None else self.failure.to_dict(),
            "decision": None if self.decision is None else self.decision.to_dict(),
            "until": self.until,
            "detail": self.detail,
        }


def iso_utc(wall_time: float) -> str:
    """A ``time.time()`` value as ISO 8601 UTC with milliseconds: ``2026-12-01T14:40:27.123Z``."""
    moment = datetime.datetime.fromtimestamp(wall_time, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class Subscribers:
    """The subscribers of one supervisor, and the one way events reach them.

    ``publish`` builds the event only if someone listens, so publishing costs a call and a test
    when no one does. A subscriber that falls more than its buffer behind loses the newest
    events (counted in ``dropped``) rather than slowing requests down.
    """

    __slots__ = ("_channels", "dropped")

    def __init__(self) -> None:
        self._channels: list[trio.MemorySendChannel[Event]] = []
        self.dropped = 0

    def publish(
        self,
        kind: EventKind,
        *,
        request_id: int | None = None,
        actor: str | None = None,
        failure: Failure | None = None,
        decision: Decision | None = None,
        until: float | None = None,
        detail: str | None = None,
    ) -> None:
        """Publish an event of ``kind`` stamped with the current time, if anyone listens."""
        if self._channels:
            self.deliver(
                Event(
                    kind=kind,
                    time=trio.current_time(),
                    request_id=request_id,
                    actor=actor,
                    failure=failure,
                    decision=decision,
                    until=until,
                    detail=detail,
                )
            )

    @property
    def listening(self) -> bool:
        """Someone subscribes."""
        return bool(self._channels)

    def deliver(self, event: Event) -> None:
        """Hand a built event to every subscriber that has room for it."""
        for channel in self._channels:
            try:
                channel.send_nowait(event)
            except trio.WouldBlock:
                self.dropped += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    @asynccontextmanager
    async def subscribe(self, buffer: int) -> AsyncIterator[trio.MemoryReceiveChannel[Event]]:
        """Receive the events published while the block runs."""
        send, receive = trio.open_memory_channel[Event](buffer)
        self._channels.append(send)
        try:
            async with receive:
                yield receive
        finally:
            self._channels.remove(send)
            send.close()
