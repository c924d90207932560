"""Ordering a route's actors for one request: priority (with demotion), the route's strategy
over the healthy ones, benched ones skipped with a recorded decision, the terminus last; and
the actors that lack a capability the request needs (``capability_skips``)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from .._config import Route
from .._decide import (
    estimated_tokens,
    missing_capability,
    needed_capabilities,
    skip_for_capability,
    skip_unavailable,
    when_all_benched,
)
from .._errors import BadRequest
from .._failure import Failure
from .._policy import HealthPolicy
from .._values import Decision, Request
from ..actors import ProviderActor, State


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
    model: str | None = None,
    latency: Callable[[list[ProviderActor]], tuple[list[ProviderActor], Decision]] | None = None,
) -> RoutePlan:
    """Order ``actors`` (the route's chain, resolved) for one request.

    Args:
        route: the route (its strategy).
        actors: the route's actors in chain order.
        now: the current time.
        turn: a per-route counter for round-robin.
        rng: randomness for the weighted strategy.
        policy: the health policy (what to do when every actor is benched).
        model: the request's model: each actor is asked whether the deployment it would use
            for it (its own model, or this one passed through) is available.
        latency: the ``latency`` strategy's ordering of the healthy actors (and its decision).
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
        if actor.available(now, model):
            healthy.append(actor)
        else:
            benched.append(actor)
    if route.strategy == "latency" and latency is not None and len(healthy) > 1:
        healthy, picked = latency(healthy)
        decisions.append(picked)
    else:
        healthy = _apply_strategy(route.strategy, healthy, turn, rng)
    for actor in benched:
        decisions.append(_skip(actor, now, model))
    if healthy or not benched:
        return RoutePlan(healthy + terminus, decisions)

    # Every actor of the route (but the terminus) is benched.
    choice = when_all_benched(
        policy,
        has_terminus=bool(terminus),
        next_change=min(a.next_change(now, model) for a in benched),
        now=now,
    )
    decisions.append(choice.decision)
    if choice.failure is not None:
        return RoutePlan([], decisions, choice.failure)
    actors_to_try: list[ProviderActor] = []
    if choice.try_benched:
        actors_to_try = [a for a in benched if a.alive and not a.manually_benched(now, model)]
        actors_to_try.sort(key=lambda a: a.next_change(now, model))
    if choice.try_terminus:
        actors_to_try += terminus
    return RoutePlan(actors_to_try, decisions)


def _skip(actor: ProviderActor, now: float, model: str | None) -> Decision:
    deployment, state = actor.unavailable_record(now, model)
    if actor.model is not None:
        deployment = None  # the provider's only deployment: its name would add nothing
    return skip_unavailable(
        actor.name,
        alive=actor.alive,
        restarting=actor.restarting,
        probing=state is State.PROBING,
        deployment=deployment,
    )


def _apply_strategy(
    strategy: str, healthy: list[ProviderActor], turn: int, rng: random.Random
) -> list[ProviderActor]:
    if len(healthy) < 2 or strategy in ("priority", "latency"):
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


def capability_skips(
    request: Request,
    route: str,
    chain: list[ProviderActor],
    *,
    embed: bool = False,
) -> dict[str, Decision]:
    """The skip decision of each actor of ``chain`` that cannot serve ``request`` (``embed``:
    an embeddings call, which needs ``embeddings`` and nothing of a chat request).

    Raises:
        BadRequest: no actor of the route can serve it (naming the first capability missing).
    """
    limited = [a for a in chain if not a.capabilities.everything]
    if not limited:
        return {}  # the common case: nothing to work out
    needs = ("embeddings",) if embed else needed_capabilities(request)
    tokens = (
        None
        if embed
        else estimated_tokens(request)
        if any(a.capabilities.max_context_tokens is not None for a in limited)
        else None
    )
    skips: dict[str, Decision] = {}
    for actor in limited:
        missing = missing_capability(actor.capabilities, needs, tokens)
        if missing is not None:
            skips[actor.name] = skip_for_capability(actor.name, actor.capabilities, missing)
    if chain and len(skips) == len(chain):
        first = skips[chain[0].name].rule
        field = "messages" if first.rule in ("vision", "max_context_tokens") else "params"
        if first.rule == "tools" and not request.params.get("tools"):
            field = "messages"
        elif first.rule == "embeddings":
            field = "model"
        elif field == "params":
            field = {"json_schema": "params.response_format"}.get(
                first.rule, f"params.{first.rule}"
            )
        raise BadRequest(
            field,
            f"no provider of route {route!r} can serve it ("
            + ", ".join(f"{name}: {skip.rule}" for name, skip in skips.items())
            + ")",
        )
    return skips
