"""Pure routing decisions: what to do after a failed attempt, and the request-level ones.

``decide`` takes the failure and everything it depends on as arguments (time left, tries so
far, whether the caller already holds part of the answer) and returns a ``Decision`` naming the
rule that matched. The request-level decisions (the total budget, no provider left, skipping an
actor that cannot continue a partial answer or is not available, every actor benched, the cap on
benched actors) live here too, so that the supervisor and its routing only carry them out. Every
function here does no I/O, so it can be tested exhaustively.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Any

import attrs

from ._client import Capabilities
from ._failure import Category, Failure
from ._policy import (
    DEFAULT_RETRYABLE,
    AllBenched,
    FailoverAction,
    FailoverPolicy,
    HealthPolicy,
    Match,
    MidStream,
    Policies,
    RetryPolicy,
    StreamPolicy,
)
from ._values import Action, Decision, Request, Rule, Scope

#: Failure codes of attempts the actor itself could not finish (it crashed, was stopped or gave
#: up): never retried on the same actor, which is restarting or gone.
INTERRUPTED = frozenset({"actor_crashed", "actor_restarting", "actor_stopped", "actor_gave_up"})


@attrs.frozen(kw_only=True)
class Situation:
    """What a decision depends on besides the failure.

    Attributes:
        actor: the actor whose attempt failed.
        tries_on_actor: attempts made on this actor in this request (the failed one included).
        actors_tried: distinct actors tried in this request (this one included).
        remaining: seconds left in the request's budget.
        released: the caller already holds part of the answer (a stream past its first delta).
        text_kept: the supervisor still holds the text released (it did not grow past
            ``StreamPolicy.keep_text``): without it a ``continue`` has no prefill.
        continuation: the failed attempt was asked to continue a partial answer.
        tool_calls: the caller holds a tool call of the partial answer.
        retry_allowed: the supervisor-wide retry budget has room for one more retry.
    """

    actor: str
    tries_on_actor: int
    actors_tried: int
    remaining: float
    released: bool = False
    text_kept: bool = True
    continuation: bool = False
    tool_calls: bool = False
    retry_allowed: bool = True


def _matched(match: Match, failure: Failure, policy: str, prefix: str) -> Rule | None:
    hit = match.match(failure)
    if hit is None:
        return None
    return Rule("config", policy, f"{prefix}.{hit[0]}", hit[1])


def backoff(policy: RetryPolicy, tries: int, rng: random.Random) -> float:
    """Full-jitter exponential backoff before try ``tries + 1``."""
    ceiling = min(policy.backoff_cap, policy.backoff_base * 2 ** (tries - 1))
    return rng.uniform(0.0, ceiling)


def decide(
    failure: Failure, situation: Situation, policies: Policies, rng: random.Random
) -> Decision:
    """Decide what follows a failed attempt: retry the same actor, fail over, or stop.

    Args:
        failure: the classified failure of the attempt.
        situation: the request's state at that moment.
        policies: the configured policies.
        rng: the source of backoff jitter.

    Returns:
        A ``Decision``; ``wait`` is set on a retry.
    """
    s = situation
    category = failure.category.value

    def make(scope: Scope, action: Action, reason: str, rule: Rule, wait: float = 0.0) -> Decision:
        return Decision(
            scope=scope,
            action=action,
            reason=reason,
            rule=rule,
            actor=s.actor,
            category=category,
            wait=wait,
        )

    def stop(reason: str, rule: Rule) -> Decision:
        return make(Scope.REQUEST, Action.STOP, reason, rule)

    if failure.category is Category.CANCELLED:
        return stop("the caller went away", Rule("default", "cancellation", "category", category))

    rule = _matched(policies.hard_stop, failure, "hard_stop", "match")
    if rule is not None:
        return stop("a hard-stop rule matched", rule)

    if failure.code == "restart_diverged" and failure.category is Category.STREAM_ERROR:
        return stop(
            "the restarted answer differs from what the caller holds",
            Rule("default", "stream", "mid_stream.restart", "diverged"),
        )

    mode = policies.stream.mid_stream
    why_not_retry = ""
    if s.released:
        rule = Rule(policies.stream.source("mid_stream"), "stream", "mid_stream", mode.value)
        if mode is MidStream.ERROR:
            return stop("the stream broke after the caller received part of the answer", rule)
        if mode is MidStream.CONTINUE and s.tool_calls:
            # A model continues text, not a tool call half made (or made): a prefill cannot
            # hold one, and a continuation could call the tool again.
            return stop(
                "the stream broke after a tool call: a partial answer with a tool call is"
                " never continued",
                Rule("default", "stream", "mid_stream.continue", "tool_call"),
            )
        if mode is MidStream.CONTINUE and not s.text_kept:
            return stop(
                "the stream broke after more than keep_text characters: its text was not kept,"
                " so it cannot be continued",
                Rule(
                    policies.stream.source("keep_text"),
                    "stream",
                    "keep_text",
                    str(policies.stream.keep_text),
                ),
            )
    else:
        retry = _retry(failure, s, policies.retry, rng)
        if isinstance(retry, Decision):
            return attrs.evolve(retry, actor=s.actor, category=category)
        why_not_retry = retry

    if s.continuation and failure.category is Category.BAD_REQUEST:
        # The provider refused the continuation (an assistant prefill); that must not end the
        # request, nor hide the failure that made us ask for a continuation.
        return make(
            Scope.NEXT_ACTOR,
            Action.FAILOVER,
            "the provider refused to continue the partial answer",
            Rule("default", "stream", "continuation_rejected", category),
        )

    failover = _failover(failure, s, policies.failover)
    if not s.released and why_not_retry and failover.action is Action.FAILOVER:
        failover = attrs.evolve(failover, reason=f"{failover.reason} ({why_not_retry})")
    return attrs.evolve(failover, actor=s.actor, category=category)


def _retry(
    failure: Failure, s: Situation, policy: RetryPolicy, rng: random.Random
) -> Decision | str:
    """A retry decision, or the reason there is none."""
    if not policy.enabled:
        return "retry is disabled"
    if failure.code in INTERRUPTED:
        return f"the actor could not finish the attempt ({failure.code})"
    denied = _matched(policy.deny, failure, "retry", "deny")
    if denied is not None:
        return f"retry denied by {denied}"
    if failure.should_retry is False:
        return "the provider said x-should-retry: false"
    allowed = _matched(policy.allow, failure, "retry", "allow")
    if allowed is not None:
        rule = allowed
    elif failure.should_retry is True:
        rule = Rule("provider", "retry", "x-should-retry", "true")
    elif failure.category in DEFAULT_RETRYABLE:
        rule = Rule("default", "retry", "categories", failure.category.value)
    else:
        return f"{failure.category.value} is not retried"
    if s.tries_on_actor >= policy.max_attempts:
        return f"{s.tries_on_actor} of max_attempts={policy.max_attempts} tries used"
    if failure.retry_after is not None:
        wait = failure.retry_after
        told = "Retry-After"
    else:
        wait = backoff(policy, s.tries_on_actor, rng)
        told = "backoff"
    if wait > policy.max_wait:
        return f"{told} {wait:g}s exceeds max_wait={policy.max_wait:g}s"
    if wait >= s.remaining:
        return f"{told} {wait:g}s does not fit in the {s.remaining:.3g}s left"
    if not s.retry_allowed:
        return "the supervisor's retry budget is spent"
    return Decision(
        scope=Scope.SAME_ACTOR,
        action=Action.RETRY,
        reason=f"retry after {wait:.3g}s ({told}), try {s.tries_on_actor + 1} of {policy.max_attempts}",
        rule=rule,
        wait=wait,
    )


def _failover(failure: Failure, s: Situation, policy: FailoverPolicy) -> Decision:
    category = failure.category.value

    def stop(reason: str, rule: Rule) -> Decision:
        return Decision(scope=Scope.REQUEST, action=Action.STOP, reason=reason, rule=rule)

    if not policy.enabled:
        return stop("failover is disabled", Rule("config", "failover", "enabled", "false"))
    denied = _matched(policy.deny, failure, "failover", "deny")
    if denied is not None:
        return stop("failover denied", denied)
    rule = _matched(policy.allow, failure, "failover", "allow")
    if rule is None:
        action, source = policy.action_for(failure.category)
        rule = Rule(source, "failover", f"actions.{category}", action.value)
        if action is FailoverAction.STOP:
            return stop(f"{category} is not fixed by another provider", rule)
    if policy.max_providers and s.actors_tried >= policy.max_providers:
        return stop(
            f"{s.actors_tried} of max_providers={policy.max_providers} providers tried",
            Rule(
                policy.source("max_providers"),
                "failover",
                "max_providers",
                str(policy.max_providers),
            ),
        )
    if s.remaining <= 0:
        return budget_spent(policy)
    return Decision(
        scope=Scope.NEXT_ACTOR,
        action=Action.FAILOVER,
        reason=f"{category}: try the next provider",
        rule=rule,
    )


# --- request-level decisions ------------------------------------------------------------------


def budget_spent(policy: FailoverPolicy, category: str | None = None) -> Decision:
    """Stop: the request's total time budget is spent."""
    return Decision(
        scope=Scope.REQUEST,
        action=Action.STOP,
        reason="the request's time budget is spent",
        rule=Rule(
            policy.source("total_budget"), "failover", "total_budget", f"{policy.total_budget:g}"
        ),
        category=category,
    )


def no_provider_left(route: str, failure: Failure) -> Decision:
    """Stop: every actor of route ``route`` was tried or skipped; ``failure`` is the last one."""
    return Decision(
        scope=Scope.REQUEST,
        action=Action.STOP,
        reason="no provider left to try",
        rule=Rule("config", "route", "chain", route),
        category=failure.category.value,
    )


def continues_partial(released: int, policy: StreamPolicy) -> bool:
    """Whether the next attempt must continue a partial answer: the caller holds ``released``
    characters of it and the policy says to continue rather than restart."""
    return bool(released) and policy.mid_stream is MidStream.CONTINUE


def skip_for_continuation(actor: str, *, continues: bool, continuation: bool) -> Decision | None:
    """Skip ``actor`` if the next attempt must continue a partial answer and it cannot."""
    if not continuation or continues:
        return None
    return Decision(
        scope=Scope.NEXT_ACTOR,
        action=Action.SKIP,
        reason="cannot continue a partial answer",
        rule=Rule("config", "stream", "accepts_continuation", "false"),
        actor=actor,
    )


def skip_unavailable(
    actor: str, *, alive: bool, restarting: bool, probing: bool, deployment: str | None = None
) -> Decision:
    """Skip an actor that routing found unavailable, saying why (``deployment``: the upstream
    model whose own health says so; ``None``: the provider's as a whole)."""
    if not alive:
        reason, value = "the actor gave up after repeated crashes", "gave_up"
    elif restarting:
        reason, value = "the actor is restarting after a crash", "restarting"
    elif probing:
        reason, value = "a probe is already in flight", "probing"
    else:
        reason, value = "benched", "benched"
    if deployment is not None and alive and not restarting:
        reason = f"deployment {deployment}: {reason}"
    return Decision(
        scope=Scope.NEXT_ACTOR,
        action=Action.SKIP,
        reason=reason,
        rule=Rule("default", "health", "state", value),
        actor=actor,
    )


@attrs.frozen(kw_only=True)
class AllBenchedChoice:
    """What to do when every actor of a route (but the terminus) is benched.

    Attributes:
        decision: the recorded decision.
        try_benched: try the benched actors anyway (those that may be tried).
        try_terminus: try the terminus.
        failure: the request fails at once with this, if set.
    """

    decision: Decision
    try_benched: bool = False
    try_terminus: bool = False
    failure: Failure | None = None


def when_all_benched(
    policy: HealthPolicy, *, has_terminus: bool, next_change: float, now: float
) -> AllBenchedChoice:
    """Decide for a route whose every actor (but the terminus) is benched.

    Args:
        policy: the health policy (``when_all_benched``).
        has_terminus: the route has a terminus.
        next_change: when the first benched actor's state changes (``inf``: never by itself).
        now: the current time.
    """
    mode = policy.when_all_benched
    rule = Rule(policy.source("when_all_benched"), "health", "when_all_benched", mode.value)
    if mode is AllBenched.TRY_ANYWAY:
        return AllBenchedChoice(
            decision=Decision(
                scope=Scope.REQUEST,
                action=Action.FAILOVER,
                reason="every provider is benched: trying them anyway",
                rule=rule,
            ),
            try_benched=True,
            try_terminus=True,
        )
    if mode is AllBenched.TERMINUS and has_terminus:
        return AllBenchedChoice(
            decision=Decision(
                scope=Scope.REQUEST,
                action=Action.FAILOVER,
                reason="every provider is benched: trying the terminus",
                rule=rule,
            ),
            try_terminus=True,
        )
    # A manual bench or a long one may end later than this: the caller is told at most the cap.
    wait = (
        None if math.isinf(next_change) else min(policy.cooldown_cap, max(0.0, next_change - now))
    )
    return AllBenchedChoice(
        decision=Decision(
            scope=Scope.REQUEST, action=Action.STOP, reason="every provider is benched", rule=rule
        ),
        failure=Failure(
            category=Category.LOCAL_CAPACITY,
            code="all_benched",
            message="every provider of this route is benched"
            + ("" if wait is None else f"; the first returns in {wait:.3g}s"),
            retry_after=wait,
        ),
    )


def capped_wait(failure: Failure, policy: HealthPolicy) -> Failure:
    """``failure`` with the wait the provider sent (``retry_after``) capped by
    ``policy.cooldown_cap``; a wait that is not a positive number (NaN, 0, negative) is dropped.

    Applied where a provider's failure enters its actor, so that what the bench, the retry
    decision and the caller (``RequestFailed.failure.retry_after``, the HTTP ``retry-after``)
    are told is never the provider's ``Retry-After: 99999999``.
    """
    wait = failure.retry_after
    if wait is None or (wait > 0 and wait <= policy.cooldown_cap):
        return failure
    return attrs.evolve(failure, retry_after=min(wait, policy.cooldown_cap) if wait > 0 else None)


def may_bench(policy: HealthPolicy, *, benched_others: int, actors: int) -> bool:
    """Whether one more actor may be benched: at most ``max_benched_share`` of all ``actors``
    are benched at once (``benched_others``: those benched now, the candidate aside)."""
    share = policy.max_benched_share
    return share >= 1.0 or benched_others + 1 <= share * actors


# --- capabilities -------------------------------------------------------------------------------

_IMAGE_PARTS = frozenset({"image_url", "image", "input_image"})


def needed_capabilities(request: Request) -> tuple[str, ...]:
    """The capabilities (``Capabilities`` flags) that ``request`` needs, in flag order."""
    params = request.params
    tools = bool(params.get("tools"))
    vision = False
    for message in request.messages:
        content = message.get("content")
        if type(content) is not str and isinstance(content, list):
            vision = vision or any(
                isinstance(part, Mapping) and part.get("type") in _IMAGE_PARTS for part in content
            )
        if not tools and (message.get("role") == "tool" or message.get("tool_calls")):
            tools = True
    needs = []
    if tools:
        needs.append("tools")
    if vision:
        needs.append("vision")
    if params:
        if _type_of(params.get("response_format")) in ("json_object", "json_schema"):
            needs.append("json_schema")
        n = params.get("n")
        if isinstance(n, int) and n > 1:
            needs.append("n")
        if params.get("logprobs") is True:
            needs.append("logprobs")
    return tuple(needs)


def _type_of(value: Any) -> Any:
    return value.get("type") if isinstance(value, Mapping) else None


def estimated_tokens(request: Request) -> int:
    """A rough size of the prompt: 4 characters a token, over its text."""
    chars = 0
    for message in request.messages:
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(
                len(part["text"])
                for part in content
                if isinstance(part, Mapping) and isinstance(part.get("text"), str)
            )
    return chars // 4


def missing_capability(
    capabilities: Capabilities, needs: tuple[str, ...], tokens: int | None
) -> tuple[str, str] | None:
    """The first capability ``needs`` (or a prompt of ``tokens``) asks of a provider with
    ``capabilities`` that it lacks, as ``(name, the value that is short)``; ``None`` if it
    can serve the request."""
    for name in needs:
        if not getattr(capabilities, name):
            return name, "false"
    limit = capabilities.max_context_tokens
    if limit is not None and tokens is not None and tokens > limit:
        return "max_context_tokens", str(limit)
    return None


def skip_for_capability(
    actor: str, capabilities: Capabilities, missing: tuple[str, str]
) -> Decision:
    """Skip ``actor``: it lacks a capability the request needs (no call is made)."""
    name, value = missing
    return Decision(
        scope=Scope.NEXT_ACTOR,
        action=Action.SKIP,
        reason=f"the provider cannot serve {name}"
        if value == "false"
        else f"the prompt is estimated over its context of {value} tokens",
        rule=Rule(capabilities.source(name), "capabilities", name, value),
        actor=actor,
    )


def affinity_rule(affinity: str) -> Rule:
    """The rule of a route's prompt-cache affinity (``config:route.affinity=user``)."""
    return Rule("config", "route", "affinity", affinity)


def affinity_pin(actor: str, affinity: str) -> Decision:
    """Put ``actor`` first: it served the request's affinity key last."""
    return Decision(
        scope=Scope.NEXT_ACTOR,
        action=Action.PREFER,
        reason="it served this affinity key last (soft pin)",
        rule=affinity_rule(affinity),
        actor=actor,
    )


def affinity_break(actor: str, affinity: str, why: str) -> Decision:
    """The key's pinned ``actor`` cannot take the request (``why``): routing goes on in its
    usual order, and whoever serves is pinned next."""
    return Decision(
        scope=Scope.NEXT_ACTOR,
        action=Action.SKIP,
        reason=f"the affinity pin yields: {why}",
        rule=affinity_rule(affinity),
        actor=actor,
    )


def skip_at_rate_limit(actor: str, rule: Rule, wait: float) -> Decision:
    """Skip ``actor``: sending would pass its rate limit (``rule``: ours or the provider's),
    which is whole again in ``wait`` seconds. No call is made, so no 429 is earned."""
    return Decision(
        scope=Scope.NEXT_ACTOR,
        action=Action.SKIP,
        reason=f"at its rate limit, whole again in {max(0.0, wait):.3g}s",
        rule=rule,
        actor=actor,
        category=Category.LOCAL_CAPACITY.value,
        wait=max(0.0, wait),
    )


def rate_limited_locally(wait: float) -> Failure:
    """The failure of a request every deployment of whose route is at its rate limit: it
    fails at once (no call made), ``retry_after`` the earliest reset."""
    wait = max(0.0, wait)
    return Failure(
        category=Category.LOCAL_CAPACITY,
        code="rate_limited_locally",
        message=f"every provider of the route is at its rate limit; the first is whole again in {wait:.3g}s",
        retry_after=wait,
    )


def latency_pick(chosen: str, *, best: str, other: str, explored: bool, share: float) -> Decision:
    """The ``latency`` strategy's pick: the two candidates drawn, with their estimates."""
    if explored:
        reason = f"exploring {chosen} ({share:.0%} of picks); best of two was {best} over {other}"
    else:
        reason = f"fastest of two: {best} over {other}"
    return Decision(
        scope=Scope.REQUEST,
        action=Action.PICK,
        reason=reason,
        rule=Rule("config", "route", "strategy", "latency"),
        actor=chosen,
    )


def hedge_decision(first: str, second: str | None, *, delay: float, after: str, budget: bool) -> Decision:
    """A hedge at ``delay`` after ``first`` started with nothing from it: on ``second``, or
    none (no actor left, or the retry budget is spent)."""
    rule = Rule("config", "route", "hedge.after", after)
    if second is not None and budget:
        return Decision(
            scope=Scope.NEXT_ACTOR,
            action=Action.HEDGE,
            reason=f"{first} produced nothing in {delay:.3g}s: hedging on {second}",
            rule=rule,
            actor=second,
        )
    why = "the retry budget is spent" if second is not None else "no other provider to hedge on"
    return Decision(
        scope=Scope.REQUEST,
        action=Action.SKIP,
        reason=f"{first} produced nothing in {delay:.3g}s, but no hedge: {why}",
        rule=rule if second is None else Rule("default", "retry_budget", "hedge", "spent"),
        actor=second,
    )
