"""``StateBackend``: what the actors and the supervisor call to read and change the state shared
between relayrace processes, and ``LocalState``, the in-process backend (the default).

Every method but ``acquire_probe`` is synchronous and answers from this process's ``Mirror`` at
once; a shared backend sends the change on from a background task.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import trio

from .._policy import RetryBudgetPolicy
from ._mirror import Mirror, RetryWindow
from ._model import (
    BenchRecord,
    Deployment,
    LearnedLimits,
    Pin,
    ProbeLease,
    StateEvent,
    StateStatistics,
)

WallClock = Callable[[], float]
DEFAULT_RETRY_BUDGET = RetryBudgetPolicy()
EventHook = Callable[[StateEvent], None]


@runtime_checkable
class StateBackend(Protocol):
    """The state shared between processes, as one process sees and changes it.

    ``mirror`` is read synchronously by routing; every change is applied to it at once.
    """

    @property
    def mirror(self) -> Mirror: ...

    def now(self) -> float:
        """Wall-clock seconds, the time every record's deadline is written in."""
        ...

    def bench(
        self, deployment: Deployment, *, until: float, reason: str, manual: bool = False
    ) -> BenchRecord:
        """Bench ``deployment`` until the absolute wall-clock ``until``; returns the merged bench
        (never shorter than one already recorded)."""
        ...

    def unbench(self, deployment: Deployment, *, manual: bool = False) -> bool:
        """Lift a bench (a manual bench only with ``manual=True``); returns whether one was."""
        ...

    def record_failure(self, deployment: Deployment, *, threshold: int | None = None) -> int:
        """Count a consecutive failure; returns the count as far as this process knows.

        ``threshold``: the count the caller benches at. Failures past it decide nothing more,
        so a shared backend may tell them to the other instances later and more cheaply (the
        count reaching it, and every reset, are told as soon as any change)."""
        ...

    def record_success(self, deployment: Deployment) -> None:
        """Reset the consecutive-failure count."""
        ...

    async def acquire_probe(self, deployment: Deployment, *, ttl: float) -> bool:
        """Take the probe lease for ``ttl`` seconds; ``False``: another instance probes."""
        ...

    def release_probe(self, deployment: Deployment) -> None: ...

    def record_request(self) -> None:
        """Count a request towards the retry budget."""
        ...

    def try_retry(self) -> bool:
        """Take one retry from the (shared) retry budget; ``False``: spent."""
        ...

    def admit(
        self, deployment: Deployment, *, tokens: int, rpm: int | None = None, tpm: int | None = None
    ) -> bool:
        """Count a request of ``tokens`` estimated tokens if ``deployment`` has room for it."""
        ...

    def count(self, deployment: Deployment, *, requests: int, tokens: int) -> None:
        """Count usage the caller admitted by its own check (no check here)."""
        ...

    def reconcile(self, deployment: Deployment, *, estimated: int, actual: int) -> None:
        """Correct an admitted request's token estimate with its real usage."""
        ...

    def learn_limits(self, deployment: Deployment, limits: LearnedLimits) -> None: ...

    def pin(self, key: str, deployment: Deployment, *, ttl: float) -> None:
        """Pin affinity ``key`` to ``deployment`` for ``ttl`` seconds."""
        ...

    def statistics(self) -> StateStatistics: ...


class LocalState:
    """The in-process backend: the state lives in this process's ``Mirror`` only.

    Also the fallback a shared backend answers from when its store is away.

    Args:
        retry_budget: the retry budget's ratio, floor and window.
        wall_clock: wall-clock seconds (``time.time``); tests pass their own.
        instance: this process's name in probe leases.
    """

    def __init__(
        self,
        *,
        retry_budget: RetryBudgetPolicy = DEFAULT_RETRY_BUDGET,
        wall_clock: WallClock = time.time,
        instance: str = "local",
    ):
        self._mirror = Mirror()
        self._retries = RetryWindow(retry_budget)
        self._clock = wall_clock
        self.instance = instance

    @property
    def mirror(self) -> Mirror:
        return self._mirror

    def now(self) -> float:
        return self._clock()

    def bench(
        self, deployment: Deployment, *, until: float, reason: str, manual: bool = False
    ) -> BenchRecord:
        # Deadlines are kept to the millisecond: what Redis stores (Lua's cjson keeps 14 digits)
        # then reads back equal.
        record = BenchRecord(until=round(until, 3), reason=reason, manual=manual)
        return self._mirror.merge_bench(deployment.field, record, self.now())

    def unbench(self, deployment: Deployment, *, manual: bool = False) -> bool:
        return self._mirror.lift_bench(deployment.field, manual=manual)

    def record_failure(self, deployment: Deployment, *, threshold: int | None = None) -> int:
        count = self._mirror.failures.get(deployment.field, 0) + 1
        self._mirror.failures[deployment.field] = count
        return count

    def record_success(self, deployment: Deployment) -> None:
        self._mirror.failures.pop(deployment.field, None)

    def take_probe(self, deployment: Deployment, ttl: float) -> bool:
        """The lease decided locally (what ``acquire_probe`` does without a shared store)."""
        now = self.now()
        lease = self._mirror.probe(deployment, now)
        if lease is not None and lease.holder != self.instance:
            return False
        self._mirror.probes[deployment.field] = ProbeLease(holder=self.instance, until=now + ttl)
        return True

    async def acquire_probe(self, deployment: Deployment, *, ttl: float) -> bool:
        await trio.lowlevel.checkpoint()
        return self.take_probe(deployment, ttl)

    def release_probe(self, deployment: Deployment) -> None:
        lease = self._mirror.probes.get(deployment.field)
        if lease is not None and lease.holder == self.instance:
            del self._mirror.probes[deployment.field]

    def record_request(self) -> None:
        self._retries.record_request(self.now())

    def try_retry(self, share: int = 1) -> bool:
        """Take one retry from this process's window; ``share``: see ``RetryWindow.room``."""
        return self._retries.try_spend(self.now(), share)

    def admit(
        self, deployment: Deployment, *, tokens: int, rpm: int | None = None, tpm: int | None = None
    ) -> bool:
        now = self.now()
        if not self._mirror.admits(deployment, now, tokens=tokens, rpm=rpm, tpm=tpm):
            return False
        self._mirror.count(deployment.field, now, requests=1, tokens=tokens)
        return True

    def count(self, deployment: Deployment, *, requests: int, tokens: int) -> None:
        self._mirror.count(deployment.field, self.now(), requests=requests, tokens=tokens)

    def reconcile(self, deployment: Deployment, *, estimated: int, actual: int) -> None:
        self._mirror.count(deployment.field, self.now(), requests=0, tokens=actual - estimated)

    def learn_limits(self, deployment: Deployment, limits: LearnedLimits) -> None:
        old = self._mirror.limits.get(deployment.field)
        if old is None or limits.observed_at >= old.observed_at:
            self._mirror.limits[deployment.field] = limits

    def pin(self, key: str, deployment: Deployment, *, ttl: float) -> None:
        self._mirror.pins[key] = Pin(deployment=deployment, until=self.now() + ttl)

    def statistics(self) -> StateStatistics:
        return StateStatistics(backend="local", connected=False, degraded=False)
