"""The supervisor-wide retry budget: retries may not exceed a share of recent requests plus a
small floor, so that a provider answering 503 to everything never sees several times the real
traffic.

With a shared state backend ([state] backend = "redis") the budget is the fleet's: every
request is counted there too, and a retry is granted only if the shared bucket has a token
(``StateBackend.try_retry``, which never waits; the backend answers from its local window while
Redis is away). The local window still counts, for the metrics."""

from __future__ import annotations

import collections

from .._policy import RetryBudgetPolicy
from ..state import StateBackend

_BUCKETS = 10


class RetryBudget:
    """A sliding window of request and retry counts, in ``_BUCKETS`` time buckets.

    Pure without ``shared``: every method takes ``now``.

    Args:
        policy: ratio, floor and window.
        shared: the state shared between processes, whose retry budget decides (``None``:
            this process's window decides).
    """

    def __init__(self, policy: RetryBudgetPolicy, shared: StateBackend | None = None):
        self._policy = policy
        self.shared = shared
        self._width = policy.window / _BUCKETS
        # (bucket index, requests, retries), oldest first
        self._buckets: collections.deque[list[float]] = collections.deque()
        self._requests = 0
        self._retries = 0

    def _bucket(self, now: float) -> list[float]:
        index = now // self._width
        buckets = self._buckets
        while buckets and buckets[0][0] <= index - _BUCKETS:
            _, requests, retries = buckets.popleft()
            self._requests -= int(requests)
            self._retries -= int(retries)
        if not buckets or buckets[-1][0] != index:
            buckets.append([index, 0, 0])
        return buckets[-1]

    def record_request(self, now: float) -> None:
        self._bucket(now)[1] += 1
        self._requests += 1
        if self.shared is not None:
            self.shared.record_request()

    def try_spend(self, now: float) -> bool:
        """Take one retry from the budget if there is room; return whether there was."""
        bucket = self._bucket(now)
        if self.shared is not None:
            if not self.shared.try_retry():
                return False
        elif self._retries >= self._policy.floor + self._policy.ratio * self._requests:
            return False
        bucket[2] += 1
        self._retries += 1
        return True

    def tokens(self, now: float) -> float:
        """The retries the budget would allow now (for metrics)."""
        self._bucket(now)
        return max(0.0, self._policy.floor + self._policy.ratio * self._requests - self._retries)
