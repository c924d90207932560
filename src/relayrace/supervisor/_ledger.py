"""The ``Ledger``: what the requests of one supervisor share and write, and the supervisor's
``statistics`` read."""

from __future__ import annotations

import random
import time
from typing import Protocol

import attrs
import trio

from .._config import Route
from .._errors import RequestFailed
from .._failure import Category, Failure
from .._policy import Policies
from .._record import Attempt, Decision
from .._values import Reply, Request
from ._admission import Admission
from ._affinity import AffinityMap
from ._budget import RetryBudget
from ._latency import LatencyBook
from ._observer import Hooks, RequestInfo, request_timing
from ._steer import Steering


@attrs.frozen(kw_only=True)
class SupervisorStatistics:
    """Counters since the supervisor started."""

    requests: int
    in_flight: int
    completed: int
    failed: int
    retries: int
    failovers: int
    restarts: int
    events_dropped: int
    #: retries the supervisor-wide retry budget would allow now.
    retry_tokens: float = 0.0



def supervisor_closed(*, refused: bool = False) -> Failure:
    """The failure of a request the supervisor's shutdown ended (``refused``: it arrived after
    the shutdown began, and never started)."""
    return Failure(
        category=Category.LOCAL_CAPACITY,
        code="supervisor_closed",
        message="the supervisor is shutting down" if refused else "the supervisor shut down",
    )

class CallerLeft(Exception):
    """Raised by ``Run.execute`` when a stream's caller left (``Run.leave``) before the
    request ended: no outcome to give, and no one's failure."""


class Stoppable(Protocol):
    """A request in flight, as the ledger sees it: something the shutdown can end."""

    def shut_down(self) -> None: ...


class Observed(Stoppable, Protocol):
    """A request in flight, as the ledger's observer hooks see it."""

    request_id: int
    surface: str
    route: Route
    request: Request
    streaming: bool
    observed: RequestInfo | None
    attempts: list[Attempt]
    decisions: list[Decision]

    def failed_by_shutdown(self) -> RequestFailed: ...


class Ledger:
    """What the requests of one supervisor share and write: the counters, the requests in
    flight, the retry budget, the per-route turns of round-robin, and whether new requests are
    still taken.

    Runs write it, through its methods; the supervisor reads its statistics from it.
    """

    __slots__ = (
        "policies",
        "rng",
        "budget",
        "latency",
        "turns",
        "running",
        "closed",
        "shut_down",
        "requests",
        "completed",
        "failed",
        "retries",
        "failovers",
        "restarts",
        "hooks",
        "admission",
        "affinity",
        "_next_id",
        "_idle",
    )

    def __init__(
        self,
        policies: Policies,
        rng: random.Random,
        routes: list[str],
        hooks: Hooks | None = None,
    ):
        self.policies = policies
        self.rng = rng
        self.budget = RetryBudget(policies.retry_budget)
        #: the latency estimates of every deployment (the ``latency`` strategy, hedging)
        self.latency = LatencyBook()
        self.turns = dict.fromkeys(routes, 0)
        #: every request running, so that a shutdown can end them (``complete`` runs outside
        #: the supervisor's nursery, in its caller's task).
        self.running: set[Stoppable] = set()
        #: no new request is taken (``drain``, or the shutdown).
        self.closed = False
        #: ``open_supervisor``'s block ended: the actors are being cancelled, so a failed
        #: attempt is the shutdown's doing, and there is no one left to fail over to.
        self.shut_down = False
        self.requests = 0
        self.completed = 0
        self.failed = 0
        self.retries = 0
        self.failovers = 0
        self.restarts = 0
        #: the supervisor's observers (``_observer``), called by the hooks below.
        self.hooks = hooks if hooks is not None else Hooks()
        #: the deployments' rate limits (``_admission``) and the affinity pins (``_affinity``)
        self.admission = Admission()
        self.affinity = AffinityMap()
        self._next_id = 0
        #: set when the last request in flight ends, once ``drain`` waits for it.
        self._idle: trio.Event | None = None

    def next_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def admit(self, run: Stoppable, now: float) -> None:
        """Count a request that starts."""
        self.requests += 1
        self.running.add(run)
        self.budget.record_request(now)

    def release(self, run: Observed) -> None:
        """A request ended (its outcome counted apart)."""
        if run.observed is not None:
            # Ended without an outcome: its caller went away, or the shutdown cancelled it.
            self.request_ended(run, run.failed_by_shutdown() if self.shut_down else _gone(run))
        running = self.running
        running.discard(run)
        if not running and self._idle is not None:
            self._idle.set()

    async def drain(self) -> None:
        """Take no new request, and wait until every request in flight has ended."""
        self.closed = True
        if self.running:
            if self._idle is None or self._idle.is_set():
                self._idle = trio.Event()
            await self._idle.wait()
        else:
            await trio.lowlevel.checkpoint()

    def end_all(self) -> None:
        """The supervisor shuts down: take no new request, end every request in flight."""
        self.closed = True
        self.shut_down = True
        for run in list(self.running):
            run.shut_down()

    # --- observer hooks: each costs a call and a test when no observer listens -------------

    def request_started(self, run: Observed, now: float) -> RequestInfo | None:
        """Tell the observers a request started; return its info (``None``: nobody listens)."""
        hooks = self.hooks
        if not hooks.any:
            return None
        # ``tuple.__new__``: half the cost of the named tuple's own constructor (measured).
        info = _tuple_new(
            RequestInfo,
            (
                run.request_id,
                run.surface,
                run.route.model,
                run.request.model,
                run.streaming,
                now,
                time.time(),
            ),
        )
        for hook in hooks.request_started:
            hook(info)
        return info

    def steering(self, route: Route, request: Request) -> Steering:
        """One request's affinity pin and rate-limit admission (``_steer``)."""
        return Steering(self.admission, self.affinity, route, request)

    def attempt_ended(self, run: Observed, attempt: Attempt) -> None:
        info = run.observed
        if info is not None:
            for hook in self.hooks.attempt_ended:
                hook(attempt, info)

    def decided(self, run: Observed, *decisions: Decision) -> None:
        info = run.observed
        if info is not None:
            for hook in self.hooks.decision:
                for decision in decisions:
                    hook(decision, info)

    def request_ended(self, run: Observed, outcome: Reply | RequestFailed) -> None:
        """Tell the observers a request ended (once: later calls do nothing)."""
        info = run.observed
        if info is None:
            return
        run.observed = None
        hooks = self.hooks.request_ended
        if hooks:
            timing = request_timing(outcome, info, trio.current_time())
            for hook in hooks:
                hook(outcome, info, timing)

    def statistics(self, events_dropped: int) -> SupervisorStatistics:
        return SupervisorStatistics(
            requests=self.requests,
            in_flight=len(self.running),
            completed=self.completed,
            failed=self.failed,
            retries=self.retries,
            failovers=self.failovers,
            restarts=self.restarts,
            events_dropped=events_dropped,
            retry_tokens=self.budget.tokens(trio.current_time()),
        )


_tuple_new = tuple.__new__


def _gone(run: Observed) -> RequestFailed:
    """The outcome, for the observers, of a request whose caller went away."""
    failure = Failure(
        category=Category.CANCELLED, code="cancelled", message="the caller went away"
    )
    return RequestFailed(failure, run.attempts, run.decisions, request_id=run.request_id)
