"""The supervisor-wide retry budget: retries may not exceed a share of recent requests plus a
small floor, so that a provider answering 503 to everything never sees several times the real
traffic."""

from __future__ import annotations

import collections

from .._policy import RetryBudgetPolicy

_BUCKETS = 10


class RetryBudget:
    """A sliding window of request and retry counts, in ``_BUCKETS`` time buckets.

    Pure: every method takes ``now``.
    """

    def __init__(self, policy: RetryBudgetPolicy):
        self._policy = policy
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

    def try_spend(self, now: float) -> bool:
        """Take one retry from the budget if there is room; return whether there was."""
        bucket = self._bucket(now)
        if self._retries >= self._policy.floor + self._policy.ratio * self._requests:
            return False
        bucket[2] += 1
        self._retries += 1
        return True

    def tokens(self, now: float) -> float:
        """The retries the budget would allow now (for metrics)."""
        self._bucket(now)
        return max(0.0, self._policy.floor + self._policy.ratio * self._requests - self._retries)
