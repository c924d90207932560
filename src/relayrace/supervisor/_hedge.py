"""Hedging a request's first attempt before its first token.

The first attempt runs in a nursery; if it has produced nothing (no delta, no tool-call
fragment) by the hedge delay, and the retry budget has room, a second attempt starts beside it
on the next actor. Each attempt's output passes through its ``Leg``'s gate: the first output of
either claims the race, and the other's cancel scope is cancelled in that same step, so only
the winner's output ever reaches the caller. An attempt that fails before output leaves the
other running; the request's normal failover resumes after both have failed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

import attrs
import trio

from .._config import Hedge
from .._decide import hedge_decision
from .._failure import Failure
from .._values import Reply, ToolCallDelta
from ..actors import Emit, EmitNowait, ProviderActor
from ._latency import Key, LatencyBook, deployment
from ._ledger import Ledger, Observed

Outcome = Reply | Failure
EmitTools = Callable[[tuple[ToolCallDelta, ...]], Awaitable[None]]


class Race:
    """Which leg produced output first (``winner``); ``settled`` when a leg won or ended."""

    __slots__ = ("winner", "legs", "settled", "_on_win")

    def __init__(self, on_win: Callable[[ProviderActor], None]):
        self.winner: Leg | None = None
        self.legs: list[Leg] = []
        self.settled = trio.Event()
        self._on_win = on_win

    def claim(self, leg: Leg) -> bool:
        """``leg`` has output: it wins unless the other did; the other is cancelled at once."""
        if self.winner is None:
            self.winner = leg
            for other in self.legs:
                if other is not leg:
                    other.scope.cancel()
            self._on_win(leg.actor)
            self.settled.set()
        return self.winner is leg


class Leg:
    """One attempt of a hedged request: its actor, cancel scope and outcome."""

    __slots__ = ("actor", "race", "scope", "outcome")

    def __init__(self, actor: ProviderActor, race: Race):
        self.actor = actor
        self.race = race
        self.scope = trio.CancelScope()
        self.outcome: Outcome | None = None
        race.legs.append(self)

    @property
    def won(self) -> bool:
        return self.race.winner is self

    def gate(self, emit: Emit, emit_nowait: EmitNowait, tools: EmitTools) -> tuple[Emit, EmitNowait, EmitTools]:
        """The attempt's sinks, passing output on only if this leg won the race (a loser's
        output is dropped: it is being cancelled)."""
        claim = self.race.claim

        async def gated(text: str) -> None:
            if claim(self):
                await emit(text)
            else:
                await trio.lowlevel.checkpoint()

        def gated_nowait(text: str) -> bool:
            return emit_nowait(text) if claim(self) else True

        async def gated_tools(fragments: tuple[ToolCallDelta, ...]) -> None:
            if claim(self):
                await tools(fragments)
            else:
                await trio.lowlevel.checkpoint()

        return gated, gated_nowait, gated_tools


def hedge_delay(hedge: Hedge, book: LatencyBook, key: Key) -> float:
    """The delay before hedging: a fixed one, or the percentile of the deployment's own times
    to first token (the fallback while it has too few)."""
    if not isinstance(hedge.after, str):
        return float(hedge.after)
    value = book.percentile(key, float(hedge.after[1:]))
    return hedge.fallback if value is None else value


class Host(Observed, Protocol):
    """The run a hedge is part of, as the hedge sees it."""

    ledger: Ledger
    tools_actor: str


async def hedge_first(
    run: Host,
    first: ProviderActor,
    spare: ProviderActor | None,
    attempt: Callable[[ProviderActor, Leg], Awaitable[Outcome]],
) -> tuple[ProviderActor, Outcome, bool]:
    """Run ``first``'s attempt (``attempt``), hedged on ``spare`` if it has produced nothing by
    the hedge's delay and the retry budget has room; every hedge (or its refusal) a decision.

    Returns the actor whose outcome counts (the winner; else the last to fail), the outcome,
    and whether ``spare`` was tried (the failover loop then moves past it).
    """
    hedge, ledger = run.route.hedge, run.ledger
    assert hedge is not None
    delay = hedge_delay(hedge, ledger.latency, deployment(first, run.request))

    def on_win(actor: ProviderActor) -> None:
        run.tools_actor = actor.name

    race = Race(on_win)
    legs = [Leg(first, race)]

    async def race_leg(leg: Leg) -> None:
        with leg.scope:
            leg.outcome = await attempt(leg.actor, leg)
        if isinstance(leg.outcome, Reply):
            race.claim(leg)  # an answer without output (empty) wins too
        race.settled.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(race_leg, legs[0])
        with trio.move_on_after(delay):
            await race.settled.wait()
        if not race.settled.is_set():
            budget = spare is not None and ledger.budget.try_spend(trio.current_time())
            name = None if spare is None else spare.name
            decision = hedge_decision(first.name, name, delay=delay, after=str(hedge.after), budget=budget)
            run.decisions.append(decision)
            ledger.decided(run, decision)
            if budget:
                assert spare is not None
                legs.append(Leg(spare, race))
                nursery.start_soon(race_leg, legs[1])
    winner = race.winner
    if winner is not None and winner.outcome is not None:
        outcome = winner.outcome
        if isinstance(outcome, Reply):  # with the loser's attempt, recorded as it ended
            outcome = attrs.evolve(outcome, attempts=tuple(run.attempts))
        return winner.actor, outcome, len(legs) > 1
    last = legs[-1]
    assert last.outcome is not None
    return last.actor, last.outcome, len(legs) > 1
