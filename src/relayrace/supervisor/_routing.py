"""Ordering a route's actors for one request: priority (with demotion), the route's strategy
over the healthy ones, benched ones skipped with a recorded decision, the terminus last."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from .._config import Route
from .._failure import Category, Failure
from .._policy import AllBenched, HealthPolicy
from .._values import Action, Decision, Rule, Scope
from ..actors._actor import ProviderActor
from ..actors._health import State


class RoutePlan:
    """The result of ordering: the actors to try, the skip decisions, or a failure if the
    "all benched" policy says to fail at once."""

    __slots__ = ("actors", "decisions", "failure")

    def __init__(
        self, actors: list[ProviderActor], decisions: list[Decision], failure: Failure | None = None
    ):
        self.actors = actors
        self.decisions = decisions
        self.failure = failure


def plan_route(
    route: Route,
    actors: Sequence[ProviderActor],
    *,
    now: float,
    turn: int,
    rng: random.Random,
    policy: HealthPolicy,
) -> RoutePlan:
    """Order ``actors`` (the route's chain, resolved) for one request.

    Args:
        route: the route (its strategy).
        actors: the route's actors in chain order.
        now: the current time.
        turn: a per-route counter for round-robin.
        rng: randomness for the weighted strategy.
        policy: the health policy (what to do when every actor is benched).
    """
    ranked = sorted(
        ((a.priority + a.demotion, i, a) for i, a in enumerate(actors) if not a.terminus),
        key=lambda t: (t[0], t[1]),
    )
    terminus = [a for a in actors if a.terminus]
    healthy: list[ProviderActor] = []
    benched: list[ProviderActor] = []
    decisions: list[Decision] = []
    for _, _, actor in ranked:
        if actor.available(now):
            healthy.append(actor)
        else:
            benched.append(actor)
    healthy = _apply_strategy(route.strategy, healthy, turn, rng)
    for actor in benched:
        decisions.append(_skip(actor, now))
    if healthy or not benched:
        return RoutePlan(healthy + terminus, decisions)

    # Every actor of the route (but the terminus) is benched.
    rule_value = policy.when_all_benched.value
    source = "default" if policy.when_all_benched is AllBenched.TRY_ANYWAY else "config"
    rule = Rule(source, "health", "when_all_benched", rule_value)
    if policy.when_all_benched is AllBenched.TRY_ANYWAY:
        tryable = [a for a in benched if a.alive and not a.health.snapshot(now, a.name, 0).manual]
        tryable.sort(key=lambda a: a.health.next_change())
        decisions.append(
            Decision(
                scope=Scope.REQUEST,
                action=Action.FAILOVER,
                reason="every provider is benched: trying them anyway",
                rule=rule,
            )
        )
        return RoutePlan(tryable + terminus, decisions)
    if policy.when_all_benched is AllBenched.TERMINUS and terminus:
        decisions.append(
            Decision(
                scope=Scope.REQUEST,
                action=Action.FAILOVER,
                reason="every provider is benched: trying the terminus",
                rule=rule,
            )
        )
        return RoutePlan(terminus, decisions)
    earliest = min(a.health.next_change() for a in benched)
    wait = None if math.isinf(earliest) else max(0.0, earliest - now)
    decisions.append(
        Decision(
            scope=Scope.REQUEST, action=Action.STOP, reason="every provider is benched", rule=rule
        )
    )
    failure = Failure(
        category=Category.LOCAL_CAPACITY,
        code="all_benched",
        message="every provider of this route is benched"
        + ("" if wait is None else f"; the first returns in {wait:.3g}s"),
        retry_after=wait,
    )
    return RoutePlan(
        terminus if policy.when_all_benched is AllBenched.TERMINUS else [], decisions, failure
    )


def _skip(actor: ProviderActor, now: float) -> Decision:
    if not actor.alive:
        reason, value = "the actor gave up after repeated crashes", "gave_up"
    elif actor.restarting:
        reason, value = "the actor is restarting after a crash", "restarting"
    elif actor.health.state(now) is State.PROBING:
        reason, value = "a probe is already in flight", "probing"
    else:
        reason, value = "benched", "benched"
    return Decision(
        scope=Scope.NEXT_ACTOR,
        action=Action.SKIP,
        reason=reason,
        rule=Rule("default", "health", "state", value),
        actor=actor.name,
    )


def _apply_strategy(
    strategy: str, healthy: list[ProviderActor], turn: int, rng: random.Random
) -> list[ProviderActor]:
    if len(healthy) < 2 or strategy == "priority":
        return healthy
    if strategy == "round_robin":
        k = turn % len(healthy)
        return healthy[k:] + healthy[:k]
    if strategy == "least_busy":
        # Stable sort: ties keep the priority order.
        return sorted(healthy, key=lambda a: a.in_flight / a.max_concurrency)
    if strategy == "weighted":
        first = rng.choices(range(len(healthy)), weights=[a.weight for a in healthy])[0]
        return [healthy[first], *healthy[:first], *healthy[first + 1 :]]
    raise AssertionError(f"unknown strategy {strategy}")
