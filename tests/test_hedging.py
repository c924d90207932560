"""Hedged first attempts (``Route.hedge``) through a real supervisor on MockClock: the hedge
fires at its delay, the first output wins and the loser's call is cancelled in the same trio
instant, only the winner's output reaches the caller, hedges draw from the retry budget, never
after the first token, and a request still ends exactly once."""

from __future__ import annotations

import pytest
import trio

from relayrace import (
    Action,
    Budgets,
    Category,
    Config,
    ConfigError,
    Hedge,
    Outcome,
    Policies,
    ProviderConfig,
    Request,
    RetryBudgetPolicy,
    RetryPolicy,
    Route,
    ToolCall,
    load_config,
)
from relayrace import open_supervisor as open_sup
from relayrace.actors import OpenAIClient
from relayrace.testing import Answer, Fail, serve_mock_provider

from .support import client, request, scripted_provider

SLOW = Answer(chunks=3, first_delay=5.0, delay=0.5)
QUICK = Answer(chunks=3, first_delay=0.1, delay=0.01)
NO_RETRY = Policies(retry=RetryPolicy(max_attempts=1))


def hedged(*steps, after=1.0, policies=NO_RETRY, **route):
    names = "abc"[: len(steps)]
    providers = [scripted_provider(name, *step) for name, step in zip(names, steps, strict=True)]
    return Config(
        providers=providers,
        routes=[Route(model="m", chain=list(names), hedge=Hedge(after=after), **route)],
        policies=policies,
    )


def hedges(reply_or_error):
    return [d for d in reply_or_error.decisions if d.action is Action.HEDGE]


async def test_the_hedge_fires_at_its_delay_and_the_loser_is_cancelled_when_the_winner_speaks(
    autojump_clock,
):
    cfg = hedged([SLOW], [QUICK])
    async with open_sup(cfg) as sup:
        start = trio.current_time()
        reply = await sup.complete(request())
        assert reply.provider == "b"
        [hedge] = hedges(reply)
        assert str(hedge.rule) == "config:route.hedge.after=1.0" and hedge.actor == "b"
        first, second = sorted(reply.attempts, key=lambda a: a.started_at)
        assert (first.actor, first.outcome) == ("a", Outcome.CANCELLED)
        assert (second.actor, second.outcome) == ("b", Outcome.OK)
        assert second.started_at - start == pytest.approx(1.0)
        # The loser's upstream call was closed in the very instant the winner's output came.
        [a_call] = client(cfg, "a").calls
        [b_call] = client(cfg, "b").calls
        assert a_call.outcome == "cancelled"
        assert a_call.ended_at == b_call.ended_at == second.first_delta_at
        assert first.ended_at == second.first_delta_at
        stats = sup.statistics()
        assert (stats.completed, stats.failed) == (1, 0)


async def test_a_stream_gets_only_the_winners_deltas(autojump_clock):
    slow = Answer(chunks=4, first_delay=1.5, delay=0.01, text="slow slow slow slow")
    cfg = hedged([slow], [Answer(chunks=3, first_delay=1.0, delay=0.01)])
    async with open_sup(cfg) as sup:
        async with sup.stream(request()) as s:
            deltas = [d async for d in s]
        # b was hedged at 1.0 s (its first delta would come at 2.0 s); a spoke first, at 1.5 s.
        assert {d.provider for d in deltas} == {"a"}
        assert "".join(d.text for d in deltas) == "slow slow slow slow"
        assert [d.seq for d in deltas] == list(range(len(deltas)))
        assert s.reply.provider == "a"
        b = [a for a in s.reply.attempts if a.actor == "b"]
        assert [a.outcome for a in b] == [Outcome.CANCELLED]
        assert client(cfg, "b").calls[0].outcome == "cancelled"
        assert client(cfg, "b").calls[0].chunks_sent == 0


async def test_a_tool_call_is_output_that_wins_the_race(autojump_clock):
    call = ToolCall(index=0, id="call_1", name="lookup", arguments='{"q": "fox"}')
    # a answers with only a tool call at 1.5 s; b, hedged at 1.0 s, would answer at 2.0 s.
    tool_only = Answer(text="", first_delay=1.5, tool_calls=(call,))
    cfg = hedged([tool_only], [Answer(chunks=3, first_delay=1.0)])
    async with open_sup(cfg) as sup:
        start = trio.current_time()
        reply = await sup.complete(request())
    assert reply.provider == "a" and reply.text == ""
    assert reply.tool_calls == (call,)
    [b_call] = client(cfg, "b").calls
    assert b_call.outcome == "cancelled" and b_call.ended_at - start == pytest.approx(1.5)


async def test_no_hedge_once_the_first_token_has_come(autojump_clock):
    # The first delta comes at 0.5 s, then the stream is slow: no hedge ever.
    cfg = hedged([Answer(chunks=3, first_delay=0.5, delay=3.0)], [QUICK])
    async with open_sup(cfg) as sup:
        async with sup.stream(request()) as s:
            deltas = [d async for d in s]
        assert {d.provider for d in deltas} == {"a"}
        assert hedges(s.reply) == []
        assert client(cfg, "b").calls == []


async def test_no_hedge_without_retry_budget_and_a_decision_says_so(autojump_clock):
    policies = Policies(
        retry=RetryPolicy(max_attempts=1), retry_budget=RetryBudgetPolicy(ratio=0.0, floor=0)
    )
    cfg = hedged([SLOW], [QUICK], policies=policies)
    async with open_sup(cfg) as sup:
        reply = await sup.complete(request())
    assert reply.provider == "a"
    assert client(cfg, "b").calls == []
    [skip] = [d for d in reply.decisions if d.action is Action.SKIP]
    assert str(skip.rule) == "default:retry_budget.hedge=spent"
    assert "retry budget" in skip.reason


async def test_the_percentile_delay_learns_from_the_actors_own_first_tokens(autojump_clock):
    # a's first tokens come at 0.19, 0.18 ... 0.10 s: each under the delay in force (the 1 s
    # fallback, then the p95 of the samples so far: 0.19 s), so no hedge while a learns.
    a = [Answer(first_delay=(19 - k) / 100) for k in range(10)] + [Answer(first_delay=10.0)]
    cfg = hedged(a, [QUICK], after="p95")
    async with open_sup(cfg) as sup:
        for _ in range(10):
            reply = await sup.complete(request())
            assert reply.provider == "a" and hedges(reply) == []
        start = trio.current_time()
        reply = await sup.complete(request())
    assert reply.provider == "b"
    [hedge] = hedges(reply)
    assert str(hedge.rule) == "config:route.hedge.after=p95"
    assert "in 0.19s" in hedge.reason
    b_attempt = next(x for x in reply.attempts if x.actor == "b")
    assert b_attempt.started_at - start == pytest.approx(0.19)


async def test_one_failing_before_output_leaves_the_other_running(autojump_clock):
    # b is hedged at 1 s and fails at 1.5 s; a keeps going and answers at 5 s.
    cfg = hedged([SLOW], [Fail(category=Category.PROVIDER_5XX, status=503, delay=0.5)])
    async with open_sup(cfg) as sup:
        reply = await sup.complete(request())
        assert reply.provider == "a"
        assert reply.text
        outcomes = {(x.actor, x.outcome) for x in reply.attempts}
        assert outcomes == {("a", Outcome.OK), ("b", Outcome.FAILED)}
        assert sup.statistics().completed == 1


async def test_after_both_fail_normal_failover_resumes(autojump_clock):
    fail = Fail(category=Category.PROVIDER_5XX, status=503, delay=2.0)
    cfg = hedged([fail], [Fail(category=Category.PROVIDER_5XX, status=503, delay=2.0)], [QUICK])
    async with open_sup(cfg) as sup:
        reply = await sup.complete(request())
        assert reply.provider == "c"
        assert [x.actor for x in reply.attempts] == ["a", "b", "c"]
        assert len(client(cfg, "b").calls) == 1  # not tried again after the hedge
        assert sup.statistics().completed == 1


@pytest.mark.parametrize("stream", [False, True])
async def test_over_http_the_losers_upstream_call_is_closed_when_the_winner_speaks(
    autojump_clock, stream
):
    """Through the mock provider on loopback: the stalled first provider's request is closed
    by the client in the instant the hedged one's first token arrives."""
    stalled, quick = "ok,first_delay=5,chunks=4", "ok,first_delay=0.2,chunks=4,delay=0.01"
    async with serve_mock_provider() as mock:
        providers = [
            ProviderConfig(
                name=name,
                client=OpenAIClient(base_url=f"{mock.base_url}/v1", max_connections=4),
                model=model,
                budgets=Budgets(first_token=30.0),
            )
            for name, model in (("a", stalled), ("b", quick))
        ]
        cfg = Config(
            providers=providers,
            routes=[Route(model="chat", chain=["a", "b"], hedge=Hedge(after=1.0))],
            policies=NO_RETRY,
        )
        async with open_sup(cfg) as sup:
            request = Request("chat", [{"role": "user", "content": "hi"}])
            if stream:
                async with sup.stream(request) as s:
                    deltas = [d async for d in s]
                reply = s.reply
                assert deltas and {d.provider for d in deltas} == {"b"}
            else:
                reply = await sup.complete(request)
            await trio.testing.wait_all_tasks_blocked()  # let the mock see the close
        assert reply.provider == "b" and reply.text
        (lost,) = mock.attempts(stalled)
        (won,) = mock.attempts(quick)
        assert lost.outcome == "cancelled" and lost.chunks == 0
        assert won.outcome != "cancelled"
        winner = next(x for x in reply.attempts if x.actor == "b")
        loser = next(x for x in reply.attempts if x.actor == "a")
        assert loser.outcome is Outcome.CANCELLED
        assert winner.started_at == pytest.approx(1.0 + lost.started_at, abs=0.01)
        assert lost.client_closed_at == winner.first_delta_at == loser.ended_at


def test_the_hedge_is_read_from_config_and_checked():
    data = {
        "providers": [{"name": "a", "kind": "scripted"}, {"name": "b", "kind": "scripted"}],
        "routes": [{"model": "m", "chain": ["a", "b"], "hedge": {"after": "p90"}}],
    }
    assert load_config(data).routes[0].hedge == Hedge(after="p90", max=1, fallback=1.0)
    data["routes"][0]["hedge"] = {"after": 0.25}
    assert load_config(data).routes[0].hedge == Hedge(after=0.25)
    assert load_config({**data, "routes": [{"model": "m", "chain": ["a"]}]}).routes[0].hedge is None
    for bad, path in [({"after": "fast"}, "after"), ({"after": -1}, "after"), ({"max": 2}, "max")]:
        data["routes"][0]["hedge"] = bad
        with pytest.raises(ConfigError, match=rf"routes\[0\]\.hedge\.{path}"):
            load_config(data)
