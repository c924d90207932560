"""Routing, retries and failover through a real supervisor with scripted providers."""

from __future__ import annotations

import collections

import pytest
import trio

from relayrace import (
    Action,
    BadRequest,
    Budgets,
    Category,
    FailoverAction,
    FailoverPolicy,
    HealthPolicy,
    Match,
    MidStream,
    Policies,
    RequestFailed,
    RetryPolicy,
    StreamPolicy,
    open_supervisor,
)
from relayrace.testing import SCRIPTED_ANSWER, Answer, Fail, Hang

from .support import client, config, request, scripted_provider

C = Category


async def test_priority_order_and_reply_says_who_served(autojump_clock):
    cfg = config(
        scripted_provider("low", priority=5),
        scripted_provider("high", Answer(model="upstream-x"), priority=0),
    )
    async with open_supervisor(cfg) as sup:
        reply = await sup.complete(request())
    assert reply.provider == "high"
    assert reply.model == "upstream-x"
    assert reply.text == SCRIPTED_ANSWER
    assert [a.actor for a in reply.attempts] == ["high"]
    assert client(cfg, "low").calls == []


async def test_failover_on_5xx_retries_same_actor_then_moves_on(autojump_clock):
    cfg = config(
        scripted_provider("a", Fail(category=C.PROVIDER_5XX, status=503)),
        scripted_provider("b"),
    )
    async with open_supervisor(cfg) as sup:
        reply = await sup.complete(request())
    assert reply.provider == "b"
    assert [(a.actor, a.number, a.outcome.value) for a in reply.attempts] == [
        ("a", 1, "failed"),
        ("a", 2, "failed"),
        ("b", 1, "ok"),
    ]
    retry, failover = reply.decisions
    assert retry.action is Action.RETRY and str(retry.rule) == "default:retry.categories=provider_5xx"
    assert 0 <= retry.wait <= 0.2  # full jitter under the base for the first retry
    assert failover.action is Action.FAILOVER
    assert str(failover.rule) == "default:failover.actions.provider_5xx=next"
    calls = client(cfg, "a").calls
    # The second try started after exactly the jittered wait.
    assert calls[1].started_at - calls[0].ended_at == pytest.approx(retry.wait)


async def test_retry_after_is_honoured_on_the_same_actor(autojump_clock):
    cfg = config(
        scripted_provider("a", Fail(category=C.RATE_LIMIT, status=429, retry_after=2.5), Answer()),
        scripted_provider("b"),
    )
    async with open_supervisor(cfg) as sup:
        reply = await sup.complete(request())
    assert reply.provider == "a"
    first, second = client(cfg, "a").calls
    assert second.started_at - first.ended_at == pytest.approx(2.5)
    assert reply.decisions[0].wait == 2.5
    assert client(cfg, "b").calls == []


async def test_retry_after_longer_than_max_wait_fails_over_at_once(autojump_clock):
    cfg = config(
        scripted_provider("a", Fail(category=C.RATE_LIMIT, status=429, retry_after=60)),
        scripted_provider("b"),
    )
    async with open_supervisor(cfg) as sup:
        reply = await sup.complete(request())
        assert trio.current_time() == 0  # no sleeping at all
    assert reply.provider == "b"
    assert "exceeds max_wait" in reply.decisions[0].reason


async def test_retry_wait_that_does_not_fit_the_request_budget_fails_over(autojump_clock):
    policies = Policies(failover=FailoverPolicy(total_budget=5))
    cfg = config(
        scripted_provider("a", Fail(category=C.RATE_LIMIT, retry_after=8)),
        scripted_provider("b"),
        policies=policies,
    )
    async with open_supervisor(cfg) as sup:
        reply = await sup.complete(request())
    assert reply.provider == "b"
    assert "exceeds max_wait" not in reply.decisions[0].reason


async def test_max_attempts(autojump_clock):
    policies = Policies(retry=RetryPolicy(max_attempts=4))
    cfg = config(scripted_provider("a", Fail(category=C.NETWORK)), scripted_provider("b"), policies=policies)
    async with open_supervisor(cfg) as sup:
        reply = await sup.complete(request())
    assert len(client(cfg, "a").calls) == 4
    assert reply.provider == "b"


async def test_deny_beats_allow(autojump_clock):
    policies = Policies(
        retry=RetryPolicy(allow=Match(codes=["flaky"]), deny=Match(statuses=[500]), max_attempts=3)
    )
    cfg = config(
        scripted_provider("a", Fail(category=C.PROVIDER_5XX, status=500, code="flaky")),
        scripted_provider("b"),
        policies=policies,
    )
    async with open_supervisor(cfg) as sup:
        reply = await sup.complete(request())
    assert len(client(cfg, "a").calls) == 1
    assert "retry denied by config:retry.deny.statuses=500" in reply.decisions[0].reason


async def test_allow_list_retries_a_category_not_retried_by_default(autojump_clock):
    policies = Policies(retry=RetryPolicy(allow=Match(categories=["timeout"])))
    cfg = config(scripted_provider("a", Fail(category=C.TIMEOUT), Answer()), policies=policies)
    async with open_supervisor(cfg) as sup:
        reply = await sup.complete(request())
    assert reply.provider == "a"
    assert str(reply.decisions[0].rule) == "config:retry.allow.categories=timeout"


async def test_x_should_retry_false_is_honoured(autojump_clock):
    cfg = config(scripted_provider("a", Fail(category=C.PROVIDER_5XX, should_retry=False)), scripted_provider("b"))
    async with open_supervisor(cfg) as sup:
        reply = await sup.complete(request())
    assert len(client(cfg, "a").calls) == 1
    assert reply.provider == "b"


async def test_hard_stop_ends_the_request_at_once(autojump_clock):
    policies = Policies(hard_stop=Match(keywords=["account suspended"]))
    cfg = config(
        scripted_provider("a", Fail(category=C.AUTH, status=403, message="Your Account Suspended for abuse")),
        scripted_provider("b"),
        policies=policies,
    )
    async with open_supervisor(cfg) as sup:
        with pytest.raises(RequestFailed) as caught:
            await sup.complete(request())
    assert caught.value.failure.category is C.AUTH
    assert str(caught.value.decisions[-1].rule) == "config:hard_stop.match.keywords=account suspended"
    assert client(cfg, "b").calls == []


@pytest.mark.parametrize("category", [C.CONTENT_POLICY, C.BAD_REQUEST])
async def test_stop_categories_do_not_fail_over(autojump_clock, category):
    cfg = config(scripted_provider("a", Fail(category=category, status=400)), scripted_provider("b"))
    async with open_supervisor(cfg) as sup:
        with pytest.raises(RequestFailed) as caught:
            await sup.complete(request())
        health = sup.health()
    assert caught.value.failure.category is category
    assert caught.value.failure.provider == "a"
    assert len(client(cfg, "a").calls) == 1  # never retried
    assert client(cfg, "b").calls == []
    assert health["a"].consecutive_failures == 0  # no penalty


async def test_failover_action_per_category_is_configurable(autojump_clock):
    policies = Policies(failover=FailoverPolicy(actions={C.CONTENT_POLICY: FailoverAction.NEXT, C.AUTH: FailoverAction.STOP}))
    cfg = config(scripted_provider("a", Fail(category=C.CONTENT_POLICY)), scripted_provider("b"), policies=policies)
    async with open_supervisor(cfg) as sup:
        reply = await sup.complete(request())
    assert reply.provider == "b"
    assert str(reply.decisions[0].rule) == "config:failover.actions.content_policy=next"


async def test_failover_deny_stops(autojump_clock):
    policies = Policies(failover=FailoverPolicy(deny=Match(categories=["overloaded"])))
    cfg = config(scripted_provider("a", Fail(category=C.OVERLOADED, status=529)), scripted_provider("b"), policies=policies)
    async with open_supervisor(cfg) as sup:
        with pytest.raises(RequestFailed) as caught:
            await sup.complete(request())
    assert caught.value.failure.category is C.OVERLOADED
    assert client(cfg, "b").calls == []


@pytest.mark.parametrize("category", [C.MODEL_NOT_FOUND, C.CONTEXT_LENGTH])
async def test_advance_without_penalty_and_without_retry(autojump_clock, category):
    cfg = config(scripted_provider("a", Fail(category=category, status=404)), scripted_provider("b"))
    async with open_supervisor(cfg) as sup:
        reply = await sup.complete(request())
        health = sup.health()
    assert reply.provider == "b"
    assert len(client(cfg, "a").calls) == 1
    assert health["a"].consecutive_failures == 0
    assert health["a"].state.value == "ok"


async def test_max_providers(autojump_clock):
    policies = Policies(failover=FailoverPolicy(max_providers=2), retry=RetryPolicy(enabled=False))
    cfg = config(
        scripted_provider("a", Fail(category=C.PROVIDER_5XX)),
        scripted_provider("b", Fail(category=C.PROVIDER_5XX)),
        scripted_provider("c"),
        policies=policies,
    )
    async with open_supervisor(cfg) as sup:
        with pytest.raises(RequestFailed) as caught:
            await sup.complete(request())
    assert [a.actor for a in caught.value.attempts] == ["a", "b"]
    assert str(caught.value.decisions[-1].rule) == "config:failover.max_providers=2"
    assert client(cfg, "c").calls == []


async def test_total_budget_covers_every_retry_and_failover(autojump_clock):
    policies = Policies(failover=FailoverPolicy(total_budget=12))
    cfg = config(scripted_provider("a", Hang()), scripted_provider("b", Hang()), policies=policies)
    async with open_supervisor(cfg) as sup:
        with pytest.raises(RequestFailed) as caught:
            await sup.complete(request())
        assert trio.current_time() == 12
        health = sup.health()
    failure = caught.value.failure
    assert (failure.category, failure.code) == (C.TIMEOUT, "request_budget")
    # a: first-token budget (30 s default) is longer than the request budget: cut at 12 s,
    # cancelled, without penalty; b never reached.
    assert [(a.actor, a.outcome.value) for a in caught.value.attempts] == [("a", "cancelled")]
    assert client(cfg, "a").calls[0].outcome == "cancelled"
    assert health["a"].consecutive_failures == 0
    assert str(caught.value.decisions[-1].rule) == "config:failover.total_budget=12"


@pytest.mark.parametrize(
    ("total_budget", "rule"),
    [
        (None, "default:failover.total_budget=600"),
        (600.0, "default:failover.total_budget=600"),  # configured as the default: the default
        (900.0, "config:failover.total_budget=900"),
    ],
)
async def test_the_budget_rule_says_whether_the_budget_was_configured(
    autojump_clock, total_budget, rule
):
    failover = FailoverPolicy() if total_budget is None else FailoverPolicy(total_budget=total_budget)
    cfg = config(
        scripted_provider("a", Hang(), budgets=Budgets(first_token=10_000.0, idle=10_000.0, attempt=10_000.0)),
        policies=Policies(failover=failover),
    )
    async with open_supervisor(cfg) as sup:
        with pytest.raises(RequestFailed) as caught:
            await sup.complete(request())
        assert trio.current_time() == failover.total_budget
    assert str(caught.value.decisions[-1].rule) == rule
    assert caught.value.decisions[-1].category == "timeout"


def test_policy_values_say_which_fields_hold_their_class_default():
    assert FailoverPolicy().is_default("total_budget")
    assert FailoverPolicy(total_budget=600).source("total_budget") == "default"
    assert FailoverPolicy(total_budget=30).source("total_budget") == "config"
    assert FailoverPolicy(max_providers=2).source("max_providers") == "config"
    assert FailoverPolicy(max_providers=2).source("total_budget") == "default"
    # Fields with a factory default compare with what the factory makes.
    assert HealthPolicy().is_default("bench_immediately")
    assert HealthPolicy(bench_immediately=["quota_exhausted", "auth"]).is_default("bench_immediately")
    assert not HealthPolicy(bench_immediately=["auth"]).is_default("bench_immediately")
    assert FailoverPolicy().is_default("actions")
    assert not FailoverPolicy(actions={C.AUTH: FailoverAction.STOP}).is_default("actions")
    assert StreamPolicy(mid_stream=MidStream.RESTART).source("mid_stream") == "config"
    assert not Policies(retry=RetryPolicy(max_attempts=3)).is_default("retry")
    with pytest.raises(KeyError):
        FailoverPolicy().is_default("no_such_field")


async def test_silent_provider_is_abandoned_at_the_first_token_budget(autojump_clock):

    cfg = config(
        scripted_provider("a", Hang(), budgets=Budgets(first_token=3)),
        scripted_provider("b"),
    )
    async with open_supervisor(cfg) as sup:
        reply = await sup.complete(request())
        assert trio.current_time() == 3  # timeouts are not retried: straight to b
    first = reply.attempts[0]
    assert (first.failure.category, first.failure.code) == (C.TIMEOUT, "first_token_timeout")
    assert first.duration == 3
    assert reply.provider == "b"


async def test_idle_budget_between_chunks(autojump_clock):

    cfg = config(
        scripted_provider("a", Answer(chunks=5, stall_after=2, stall=100), budgets=Budgets(idle=2)),
        scripted_provider("b"),
    )
    async with open_supervisor(cfg) as sup:
        async with sup.stream(request()) as s:
            # nothing released? a released 2 chunks before stalling: that is mid-stream.
            with pytest.raises(RequestFailed) as caught:
                async for _ in s:
                    pass
    assert caught.value.failure.category is C.STREAM_ERROR
    assert caught.value.attempts[0].failure.code == "idle_timeout"
    assert trio.current_time() == 2


async def test_bad_request_is_raised_before_any_provider_is_called(autojump_clock):
    cfg = config(scripted_provider("a"))
    async with open_supervisor(cfg) as sup:
        with pytest.raises(BadRequest, match="model"):
            await sup.complete(request(model="nope"))
        with pytest.raises(BadRequest, match="model"):
            sup.stream(request(model="nope"))
    assert client(cfg, "a").calls == []


async def test_round_robin_over_healthy_actors(autojump_clock):
    cfg = config(scripted_provider("a"), scripted_provider("b"), scripted_provider("c"), strategy="round_robin")
    async with open_supervisor(cfg) as sup:
        served = [(await sup.complete(request())).provider for _ in range(6)]
    assert served == ["b", "c", "a", "b", "c", "a"]


async def test_weighted_strategy_follows_the_weights(autojump_clock):
    cfg = config(
        scripted_provider("a", weight=3), scripted_provider("b", weight=1), strategy="weighted", seed=7
    )
    async with open_supervisor(cfg) as sup:
        served = collections.Counter([(await sup.complete(request())).provider for _ in range(400)])
    assert 260 <= served["a"] <= 340  # 300 expected
    assert served["a"] + served["b"] == 400


async def test_least_busy_strategy(autojump_clock):
    cfg = config(
        scripted_provider("a", Answer(first_delay=10), max_concurrency=4),
        scripted_provider("b", max_concurrency=4),
        strategy="least_busy",
    )
    async with open_supervisor(cfg) as sup, trio.open_nursery() as nursery:
        nursery.start_soon(sup.complete, request())  # a is busy with this one
        await trio.testing.wait_all_tasks_blocked()
        reply = await sup.complete(request())
        assert reply.provider == "b"


async def test_local_capacity_moves_on_without_penalty(autojump_clock):
    cfg = config(
        scripted_provider("a", Answer(first_delay=10), max_concurrency=1, inbox_size=0),
        scripted_provider("b"),
    )
    async with open_supervisor(cfg) as sup, trio.open_nursery() as nursery:
        nursery.start_soon(sup.complete, request())
        await trio.testing.wait_all_tasks_blocked()
        reply = await sup.complete(request())
        assert reply.provider == "b"
        assert reply.attempts[0].failure.category is C.LOCAL_CAPACITY
        assert sup.health()["a"].consecutive_failures == 0


async def test_events_tell_the_story(autojump_clock):
    cfg = config(scripted_provider("a", Fail(category=C.AUTH, status=401)), scripted_provider("b"))
    async with open_supervisor(cfg) as sup:
        async with sup.subscribe() as events:
            await sup.complete(request())
            seen = []
            while True:
                try:
                    seen.append(events.receive_nowait())
                except trio.WouldBlock:
                    break
    kinds = [(e.kind.value, e.actor) for e in seen]
    assert kinds == [
        ("attempt_started", "a"),
        ("actor_benched", "a"),
        ("attempt_failed", "a"),
        ("failover", "a"),
        ("attempt_started", "b"),
        ("completed", "b"),
    ]


def test_the_supervisor_uses_only_public_names_of_the_actors():
    """The supervisor package imports ``relayrace.actors`` by its public face only, and exports
    just its own public names."""
    import ast
    import pathlib

    import relayrace.supervisor

    package = pathlib.Path(relayrace.supervisor.__file__).parent
    private = []
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 2 and node.module:
                if node.module.startswith("actors."):
                    private.append(f"{path.name}: {node.module}")
    assert private == []
    assert set(relayrace.supervisor.__all__) == {
        "MAX_RESTARTS",
        "RESTART_WINDOW",
        "STREAM_BUFFER",
        "RequestStream",
        "Supervisor",
        "SupervisorStatistics",
        "open_supervisor",
        # observers (issue #14)
        "SURFACES",
        "Observer",
        "RequestInfo",
        "RequestTiming",
        "SupervisorView",
        "Reloaded",  # what Supervisor.reload changed (issue #14)
        # the latency strategy's estimates and picker (issue #15)
        "Estimate",
        "LatencyBook",
        "Pick",
        "power_of_two",
    }
    assert all(hasattr(relayrace.supervisor, name) for name in relayrace.supervisor.__all__)
