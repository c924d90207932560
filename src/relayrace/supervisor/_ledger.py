"""The ``Ledger``: what the requests of one supervisor share and write, and the supervisor's
``statistics`` read."""

from __future__ import annotations

import random
from typing import Protocol

import attrs
import trio

from .._policy import Policies
from ._budget import RetryBudget


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


class Stoppable(Protocol):
    """A request in flight, as the ledger sees it: something the shutdown can end."""

    def shut_down(self) -> None: ...


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
        "_next_id",
        "_idle",
    )

    def __init__(self, policies: Policies, rng: random.Random, routes: list[str]):
        self.policies = policies
        self.rng = rng
        self.budget = RetryBudget(policies.retry_budget)
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

    def release(self, run: Stoppable) -> None:
        """A request ended (its outcome counted apart)."""
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
        )
