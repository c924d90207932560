"""``Unsent``: this process's consecutive-failure counts and usage counts not yet sent to
Redis (they are sent in batches), and the fleet's figures with them added, so that what Redis
publishes or a full read returns never hides them from this process's mirror."""

from __future__ import annotations

import attrs

from ._model import Usage


@attrs.define
class Unsent:
    #: failure counts: field -> [a success came first (reset), failures counted after it, the
    #: threshold its caller benches at (0: none)]
    fails: dict[str, list[bool | int]] = attrs.Factory(dict)
    #: whether ``fails`` holds a change the other instances' decisions may wait for: a reset,
    #: or a failure that found the count below its threshold (the rest can wait)
    urgent: bool = False
    #: usage: (field, minute) -> [requests, tokens]
    usage: dict[tuple[str, int], list[int]] = attrs.Factory(dict)

    def failure(self, field: str, threshold: int, *, urgent: bool) -> None:
        pending = self.fails.get(field)
        if pending is None:
            self.fails[field] = [False, 1, threshold]
        else:
            pending[1] += 1
            pending[2] = threshold
        self.urgent = self.urgent or urgent

    def success(self, field: str) -> None:
        self.fails[field] = [True, 0, 0]
        self.urgent = True

    def count(self, field: str, minute: int, requests: int, tokens: int) -> None:
        pending = self.usage.setdefault((field, minute), [0, 0])
        pending[0] += requests
        pending[1] += tokens

    def take_fails(self) -> list[str]:
        """The ``FAILS`` script's arguments after the channel (field, reset, failures,
        threshold per deployment), forgetting them: they are being sent."""
        pending, self.fails, self.urgent = self.fails, {}, False
        args: list[str] = []
        for field, (reset, failures, threshold) in pending.items():
            args += [field, "1" if reset else "0", str(failures), str(threshold)]
        return args

    def take_usage(self) -> dict[tuple[str, int], list[int]]:
        pending, self.usage = self.usage, {}
        return pending

    def failures_plus(self, field: str, count: int) -> int:
        """The fleet's failure count as Redis has it, with this process's changes not yet sent
        (a success not yet sent: only the failures counted after it)."""
        unsent = self.fails.get(field)
        if unsent is None:
            return count
        reset, failures, _ = unsent
        return int(failures) if reset else count + int(failures)

    def usage_plus(self, field: str, minute: int, requests: int, tokens: int) -> Usage:
        """The fleet's usage as Redis counts it, plus this process's own not yet sent."""
        unsent = self.usage.get((field, minute))
        if unsent is not None:
            requests, tokens = requests + unsent[0], tokens + unsent[1]
        return Usage(minute=minute, requests=requests, tokens=tokens)
