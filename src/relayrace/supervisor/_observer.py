"""Observers: objects a supervisor calls inline, synchronously, as requests start and end, as
attempts end, as decisions are made and as actors' health changes (``open_supervisor(config,
observers=[...])``). Metrics, traces and the access log are observers (``relayrace.observe``).

Unlike ``subscribe``, nothing is ever dropped: an observer sees every request. It runs in the
request's task, so it must be quick and must not raise (an observer that raises fails the
request it was observing, like any bug on the request's path).

Cheap when there are none: the supervisor builds a ``RequestInfo`` only when some observer
listens, and calls only the callbacks an observer defines (a subclass of ``Observer`` overrides
the ones it wants; the others are never called). ``RequestInfo`` and ``RequestTiming`` are
named tuples rather than attrs classes: they are built once per request on the hot path, and a
named tuple is built in a third of the time (measured), while staying immutable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

from .._access import SURFACES
from .._errors import RequestFailed
from .._events import Event
from .._record import Action, Attempt, Decision
from .._values import Reply
from ..actors import HealthSnapshot
from ..state import StateBackend

__all__ = ["SURFACES", "Hooks", "Observer", "RequestInfo", "RequestTiming", "SupervisorView"]


class RequestInfo(NamedTuple):
    """What an observer knows of a request from its start.

    Attributes:
        request_id: the supervisor's id of the request.
        surface: ``python``, ``http`` or ``websocket``.
        route: the name of the route that serves it (``*`` for the catch-all): one of the
            configured routes, so a bounded set.
        model: the model the caller asked for: free text, never a metric label.
        streaming: a streamed request.
        started: ``trio.current_time()`` when the request started.
        wall_started: ``time.time()`` when it started.
    """

    request_id: int
    surface: str
    route: str
    model: str
    streaming: bool
    started: float
    wall_started: float


class RequestTiming(NamedTuple):
    """Where a finished request's time went, in seconds.

    Attributes:
        latency: from the request's start to its end.
        first_token: from the start to the first delta the caller got (``None``: none came).
        provider_time: the sum of its attempts' durations (waiting on providers).
        backoff_time: the sum of the pauses before retries.
    """

    latency: float
    first_token: float | None
    provider_time: float
    backoff_time: float

    @property
    def overhead(self) -> float:
        """The gateway's own time: neither waiting on a provider nor pausing before a retry."""
        return max(0.0, self.latency - self.provider_time - self.backoff_time)


class SupervisorView(Protocol):
    """What an observer may read from the supervisor it watches (``supervisor_started``)."""

    def health(self) -> dict[str, HealthSnapshot]: ...

    def statistics(self) -> Any: ...

    def inbox_depths(self) -> dict[str, int]: ...

    #: the state shared with other processes (``None``: ``[state] backend = "local"``)
    shared_state: StateBackend | None

    @property
    def routes(self) -> Mapping[str, Any]: ...


class Observer:
    """The callbacks of an observer, all doing nothing: subclass and override those you need.

    Each is called inline, synchronously, in the task where the thing happened. An observer
    with an ``enabled`` attribute that is ``False`` is never called.
    """

    def supervisor_started(self, supervisor: SupervisorView) -> None:
        """The supervisor's actors are running; ``supervisor`` may be read from now on."""

    def request_started(self, info: RequestInfo) -> None:
        """A request was admitted."""

    def attempt_ended(self, attempt: Attempt, info: RequestInfo) -> None:
        """An attempt of the request ended (ok, failed or cancelled)."""

    def decision(self, decision: Decision, info: RequestInfo) -> None:
        """A routing decision was made for the request (skip, retry, failover, stop)."""

    def request_ended(
        self, outcome: Reply | RequestFailed, info: RequestInfo, timing: RequestTiming
    ) -> None:
        """The request ended: its reply or its error, and where its time went. Called once
        for every request ``request_started`` saw, also when its caller went away
        (a ``RequestFailed`` of category ``cancelled``)."""

    def health_changed(self, event: Event) -> None:
        """An actor was benched, probed, recovered, restarted or gave up (an ``Event`` of
        kind ``actor_*``)."""


_HOOKS = (
    "supervisor_started",
    "request_started",
    "attempt_ended",
    "decision",
    "request_ended",
    "health_changed",
)


class Hooks:
    """The observers of one supervisor, as one tuple of bound callbacks per hook, holding only
    the observers that define (override) that hook."""

    __slots__ = ("any", *_HOOKS)

    supervisor_started: tuple[Callable[[SupervisorView], None], ...]
    request_started: tuple[Callable[[RequestInfo], None], ...]
    attempt_ended: tuple[Callable[[Attempt, RequestInfo], None], ...]
    decision: tuple[Callable[[Decision, RequestInfo], None], ...]
    request_ended: tuple[Callable[[Reply | RequestFailed, RequestInfo, RequestTiming], None], ...]
    health_changed: tuple[Callable[[Event], None], ...]

    def __init__(self, observers: Iterable[object] = ()) -> None:
        # An observer whose ``enabled`` is False (``Tracing`` without OpenTelemetry) is skipped.
        observers = tuple(o for o in observers if getattr(o, "enabled", True))
        for name in _HOOKS:
            base = getattr(Observer, name)
            setattr(
                self,
                name,
                tuple(
                    getattr(o, name)
                    for o in observers
                    if getattr(type(o), name, base) is not base
                ),
            )
        #: some observer watches requests (else no ``RequestInfo`` is built).
        self.any = bool(
            self.request_started or self.attempt_ended or self.decision or self.request_ended
        )


def request_timing(
    outcome: Reply | RequestFailed, info: RequestInfo, now: float
) -> RequestTiming:
    """Where the time of a request that ended at ``now`` went (pure)."""
    attempts: Sequence[Attempt] = outcome.attempts
    provider_time = 0.0
    first: float | None = None
    if info.streaming:
        for a in attempts:
            provider_time += a.ended_at - a.started_at
            # A stream's caller got the deltas of any attempt that had some (a stream fails
            # over invisibly only before its first delta).
            at = a.first_delta_at
            if at is not None and (first is None or at < first):
                first = at
    else:
        for a in attempts:
            provider_time += a.ended_at - a.started_at
        if attempts and type(outcome) is Reply:
            first = attempts[-1].first_delta_at  # a whole answer is the served attempt's
    backoff = 0.0
    for d in outcome.decisions:
        if d.action is _RETRY:
            backoff += d.wait
    started = info.started
    # ``tuple.__new__``: half the cost of the named tuple's own constructor (measured).
    return _tuple_new(
        RequestTiming,
        (now - started, None if first is None else first - started, provider_time, backoff),
    )


_RETRY = Action.RETRY
_tuple_new = tuple.__new__
