"""The records of a request's history: each attempt and each routing decision, with the rule
that made it. ``RequestFailed`` carries them, so this module needs nothing from ``_errors``.
"""

from __future__ import annotations

import enum
from typing import Any

import attrs

from ._failure import Failure
from ._usage import Usage


class Outcome(enum.Enum):
    """How one attempt ended."""

    OK = "ok"
    FAILED = "failed"
    CANCELLED = "cancelled"


@attrs.frozen(kw_only=True)
class Attempt:
    """One try of one actor.

    ``number`` counts the tries on this actor within the request (1 = first try).
    Times are ``trio.current_time()`` values; ``first_delta_at`` is ``None`` if nothing arrived.
    ``usage`` is what the provider reported for this try (a failed or cancelled one included,
    where it reported any before it ended), so that spend is never under-counted.
    """

    actor: str
    number: int
    outcome: Outcome
    failure: Failure | None
    started_at: float
    ended_at: float
    first_delta_at: float | None = None
    deltas: int = 0
    probe: bool = False
    continuation: bool = False
    usage: Usage | None = None

    @property
    def duration(self) -> float:
        return self.ended_at - self.started_at

    def to_dict(self) -> dict[str, Any]:
        return {
            "actor": self.actor,
            "number": self.number,
            "outcome": self.outcome.value,
            "failure": None if self.failure is None else self.failure.to_dict(),
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "first_delta_at": self.first_delta_at,
            "deltas": self.deltas,
            "probe": self.probe,
            "continuation": self.continuation,
            "usage": None if self.usage is None else self.usage.to_dict(),
        }


@attrs.frozen
class Rule:
    """The rule that made a decision: where it came from (``default`` or ``config``), which
    policy, which rule inside it, and the value that matched."""

    source: str
    policy: str
    rule: str
    value: str

    def __str__(self) -> str:
        return f"{self.source}:{self.policy}.{self.rule}={self.value}"


class Scope(enum.Enum):
    SAME_ACTOR = "same_actor"
    NEXT_ACTOR = "next_actor"
    REQUEST = "request"


class Action(enum.Enum):
    RETRY = "retry"
    FAILOVER = "failover"
    SKIP = "skip"
    STOP = "stop"
    #: routing put an actor first (prompt-cache affinity), before any attempt
    PREFER = "prefer"
    #: a strategy chose the first actor to try (``latency``: with the estimates it used)
    PICK = "pick"
    #: a second attempt started beside the first, which had produced nothing yet
    HEDGE = "hedge"


@attrs.frozen(kw_only=True)
class Decision:
    """One routing decision: what was done after a failure (or before an actor was tried), why,
    and the rule that matched.

    ``wait`` is the pause before a retry, in seconds.
    """

    scope: Scope
    action: Action
    reason: str
    rule: Rule
    actor: str | None = None
    category: str | None = None
    wait: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "scope": self.scope.value,
            "action": self.action.value,
            "reason": self.reason,
            "rule": attrs.asdict(self.rule),
            "actor": self.actor,
            "category": self.category,
            "wait": self.wait,
        }
