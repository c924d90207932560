"""Events published by a supervisor to its subscribers (``Supervisor.subscribe``)."""

from __future__ import annotations

import enum
from typing import Any

import attrs

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


@attrs.frozen(kw_only=True)
class Event:
    """Something that happened. Fields that do not apply to ``kind`` are ``None``."""

    kind: EventKind
    time: float
    request_id: int | None = None
    actor: str | None = None
    failure: Failure | None = None
    decision: Decision | None = None
    until: float | None = None
    detail: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "time": self.time,
            "request_id": self.request_id,
            "actor": self.actor,
            "failure": None if self.failure is None else self.failure.to_dict(),
            "decision": None if self.decision is None else self.decision.to_dict(),
            "until": self.until,
            "detail": self.detail,
        }
