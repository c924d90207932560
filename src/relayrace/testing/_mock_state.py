"""What the mock provider records and keeps between requests: the log of attempts
(``MockAttempt``), the per-model counters and the parsed scenarios."""

from __future__ import annotations

from typing import Any

import attrs
import trio

from ._scenarios import MockScenario
from ._scripted import SCRIPTED_ANSWER, split_text

_SPEC_CACHE_LIMIT = 4096


@attrs.frozen(kw_only=True)
class MockAttempt:
    """One request the mock saw, and how it ended.

    Attributes:
        seq: its place in the log (0 for the first since the server started or ``reset()``).
        connection: the connection it came on (1 for the first accepted).
        format: ``openai``, ``anthropic``, ``gemini``, or ``other`` for an unknown path.
        path: the request target without its query.
        model: the model name asked for (``""`` if none).
        scenario: the scenario that ran (its name as written, e.g. ``flaky``), ``""`` if none.
        attempt: how many requests this model name (or ``x-mock-scenario``) has had, this one
            included.
        stream: whether a stream was asked for.
        started_at: ``trio.current_time()`` when the request had arrived.
        ended_at: when the mock was done with it (``None`` while pending).
        outcome: see the module docstring; ``pending`` while it runs.
        status: the HTTP status sent, ``None`` if none was.
        chunks: the text chunks (deltas) sent.
        client_closed_at: when the client closed the connection, if it did before the end.
        request: the parsed JSON body (not compared, not shown).
    """

    seq: int
    connection: int
    format: str
    path: str
    model: str
    scenario: str
    attempt: int
    stream: bool
    started_at: float
    ended_at: float | None = None
    outcome: str = "pending"
    status: int | None = None
    chunks: int = 0
    client_closed_at: float | None = None
    request: Any = attrs.field(default=None, eq=False, repr=False)


class Plan:
    """A parsed scenario and its answer, cached per model name."""

    __slots__ = ("scenario", "text", "pieces", "words")

    def __init__(self, scenario: MockScenario) -> None:
        self.scenario = scenario
        self.text = " ".join([SCRIPTED_ANSWER] * scenario.repeat)
        self.pieces = split_text(self.text, scenario.chunks)
        self.words = len(self.text.split())


class MockState:
    """What a mock provider keeps: the log, the per-model counters and the connection counts
    (``MockProvider`` serves it; each connection writes to it)."""

    def __init__(self) -> None:
        self.log: list[MockAttempt] = []
        self.open_connections = 0
        self.accepted = 0
        self.errors: list[str] = []
        self._counters: dict[str, int] = {}
        self._plans: dict[str, Plan] = {}
        self._epoch = 0.0

    def reset(self) -> None:
        """Start a new log and new per-model counters, and restart the ``flapping`` clock.

        The connection counts are not touched; attempts still running are written to the old log.
        """
        self.log = []
        self._counters = {}
        self._epoch = trio.current_time()

    def attempts(self, model: str | None = None) -> list[MockAttempt]:
        """The log, or the attempts for one model name."""
        return [a for a in self.log if model is None or a.model == model]

    # --- called by connections ---

    def _plan(self, spec: str) -> Plan:
        plan = self._plans.get(spec)
        if plan is None:
            plan = Plan(MockScenario.parse(spec))
            if len(self._plans) >= _SPEC_CACHE_LIMIT:
                self._plans.clear()
            self._plans[spec] = plan
        return plan

    def _count(self, spec: str) -> int:
        n = self._counters.get(spec, 0) + 1
        self._counters[spec] = n
        return n
