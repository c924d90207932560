"""``Mirror``: this process's copy of the shared state, in plain dicts that routing reads
synchronously (never waiting on the backend), and ``RetryWindow``, the retry budget's sliding
window. Both are pure: every method that depends on time takes ``now`` (wall-clock seconds).
"""

from __future__ import annotations

import collections

import attrs

from .._policy import RetryBudgetPolicy
from ._model import (
    BenchRecord,
    Deployment,
    LearnedLimits,
    Pin,
    ProbeLease,
    Usage,
    merge_bench,
    minute_of,
)


@attrs.define
class Mirror:
    """The shared state as this process last saw it; fields are keyed by ``Deployment.field``
    (pins by their affinity key). Written by the backend that owns it; read by anyone."""

    benches: dict[str, BenchRecord] = attrs.Factory(dict)
    probes: dict[str, ProbeLease] = attrs.Factory(dict)
    failures: dict[str, int] = attrs.Factory(dict)
    usage: dict[str, Usage] = attrs.Factory(dict)
    limits: dict[str, LearnedLimits] = attrs.Factory(dict)
    pins: dict[str, Pin] = attrs.Factory(dict)
    #: the instances sharing the state at the last full read, this one included (each renews
    #: itself every ``sync_interval`` and counts until three have passed)
    instances: int = 1
    #: ``True`` while the shared store is out of reach (set by the backend that owns this)
    away: bool = False

    # -- reads (the request path) --------------------------------------------------------------

    def bench(self, deployment: Deployment, now: float) -> BenchRecord | None:
        """The bench that keeps ``deployment`` out of use at ``now``: its own or its provider's
        (whichever lasts longer), or ``None``."""
        benches = self.benches
        if not benches:
            return None
        own = benches.get(deployment.field)
        if own is not None and not own.active(now):
            own = None
        if deployment.model is None:
            return own
        wide = benches.get(deployment.provider_field)
        if wide is None or not wide.active(now):
            return own
        return wide if own is None else merge_bench(own, wide, now)

    def probe(self, deployment: Deployment, now: float) -> ProbeLease | None:
        """Who is probing ``deployment`` at ``now`` (the others wait for its verdict)."""
        lease = self.probes.get(deployment.field)
        return lease if lease is not None and lease.active(now) else None

    def failure_count(self, deployment: Deployment) -> int:
        return self.failures.get(deployment.field, 0)

    def usage_of(self, deployment: Deployment, now: float) -> Usage:
        minute = minute_of(now)
        usage = self.usage.get(deployment.field)
        return usage if usage is not None and usage.minute == minute else Usage(minute=minute)

    def limits_of(self, deployment: Deployment) -> LearnedLimits | None:
        return self.limits.get(deployment.field)

    def pin(self, key: str, now: float) -> Deployment | None:
        """The deployment requests with affinity ``key`` prefer at ``now``, if any."""
        pin = self.pins.get(key)
        return pin.deployment if pin is not None and pin.active(now) else None

    def admits(
        self,
        deployment: Deployment,
        now: float,
        *,
        tokens: int,
        rpm: int | None = None,
        tpm: int | None = None,
    ) -> bool:
        """Whether one more request of ``tokens`` estimated tokens stays within the configured
        ``rpm``/``tpm`` and what the provider last said was left."""
        usage = self.usage_of(deployment, now)
        if rpm is not None and usage.requests + 1 > rpm:
            return False
        if tpm is not None and usage.tokens + tokens > tpm:
            return False
        learned = self.limits.get(deployment.field)
        if learned is not None and (learned.reset_at is None or learned.reset_at > now):
            if learned.remaining_requests is not None and learned.remaining_requests < 1:
                return False
            if learned.remaining_tokens is not None and learned.remaining_tokens < tokens:
                return False
        return True

    # -- writes (by the owning backend) --------------------------------------------------------

    def merge_bench(self, field: str, record: BenchRecord, now: float) -> BenchRecord:
        merged = merge_bench(self.benches.get(field), record, now)
        self.benches[field] = merged
        return merged

    def lift_bench(self, field: str, *, manual: bool) -> bool:
        """Lift a bench; a manual one only when ``manual`` (an explicit unbench)."""
        record = self.benches.get(field)
        if record is None or (record.manual and not manual):
            return False
        del self.benches[field]
        return True

    def count(self, field: str, now: float, *, requests: int, tokens: int) -> Usage:
        minute = minute_of(now)
        usage = self.usage.get(field)
        if usage is None or usage.minute != minute:
            usage = Usage(minute=minute)
        usage = Usage(
            minute=minute, requests=usage.requests + requests, tokens=usage.tokens + tokens
        )
        self.usage[field] = usage
        return usage

    def prune(self, now: float) -> None:
        """Forget what has expired (benches, leases, pins, past minutes)."""
        minute = minute_of(now)
        for table in (self.benches, self.probes, self.pins):
            for key in [k for k, v in table.items() if not v.active(now)]:
                del table[key]
        for key in [k for k, v in self.usage.items() if v.minute != minute]:
            del self.usage[key]


class RetryWindow:
    """Retries within a sliding window may not exceed ``ratio`` × requests + ``floor``.

    Kept in ``buckets`` slices of the window, like the shared one in Redis (``_scripts``).
    """

    BUCKETS = 10

    def __init__(self, policy: RetryBudgetPolicy):
        self.policy = policy
        self.width = policy.window / self.BUCKETS
        self._slices: collections.deque[list[int]] = (
            collections.deque()
        )  # [index, requests, retries]

    def _current(self, now: float) -> list[int]:
        index = int(now // self.width)
        while self._slices and self._slices[0][0] <= index - self.BUCKETS:
            self._slices.popleft()
        if not self._slices or self._slices[-1][0] != index:
            self._slices.append([index, 0, 0])
        return self._slices[-1]

    def record_request(self, now: float) -> None:
        self._current(now)[1] += 1

    def room(self, now: float, share: int = 1) -> float:
        """Retries left now; ``share``: this many instances keep windows of their own for one
        fleet's budget (the shared one out of reach), so this one has its part of the floor
        (the ratio is of its own requests already)."""
        self._current(now)
        requests = sum(s[1] for s in self._slices)
        retries = sum(s[2] for s in self._slices)
        return self.policy.floor / share + self.policy.ratio * requests - retries

    def try_spend(self, now: float, share: int = 1) -> bool:
        if self.room(now, share) < 1:
            return False
        self._current(now)[2] += 1
        return True
