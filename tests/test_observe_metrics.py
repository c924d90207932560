"""Prometheus metrics over real HTTP: a supervisor whose providers are real OpenAI clients on
the mock provider, a ``Metrics`` observer, its ``serve_metrics`` listener, scraped with httpx.

The counters asserted are derived from what the reply itself reports (its attempts and its
decisions), so the metrics must agree with the request's own story.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from relayrace import (
    Action,
    BadRequest,
    Category,
    Config,
    ProviderConfig,
    Request,
    RequestFailed,
    Route,
    open_supervisor,
)
from relayrace.actors import OpenAIClient
from relayrace.observe import OTHER, Metrics, serve_metrics
from relayrace.supervisor import Observer, RequestInfo
from relayrace.testing import Answer, Fail, Hang, MockProvider, ScriptedClient, serve_mock_provider

KEY = "sk-mock-0123456789abcdef"
MESSAGES = [{"role": "user", "content": "what does the quick fox do"}]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
async def mock() -> AsyncIterator[MockProvider]:
    async with serve_mock_provider() as provider:
        provider.reset()
        yield provider


def provider(mock: MockProvider, name: str, model: str) -> ProviderConfig:
    client = OpenAIClient(base_url=f"{mock.base_url}/v1", api_key=KEY)
    return ProviderConfig(name=name, client=client, model=model)


def config(*providers: ProviderConfig) -> Config:
    return Config(
        providers=providers,
        routes=[Route(model="chat", chain=[p.name for p in providers])],
        seed=7,
    )


async def scrape(port: int) -> Samples:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"http://127.0.0.1:{port}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name`` over every label set that includes ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


async def test_a_failover_moves_the_counters_by_route_provider_outcome_category_and_rule(
    autojump_clock: trio.abc.Clock, mock: MockProvider
) -> None:
    metrics = Metrics()
    cfg = config(provider(mock, "a", "unavailable"), provider(mock, "b", "ok"))
    async with open_supervisor(cfg, observers=[metrics]) as sup, trio.open_nursery() as nursery:
        port = await nursery.start(serve_metrics, metrics, "127.0.0.1", 0)
        before = await scrape(port)
        assert value(before, "gen_ai_server_request_duration_seconds_count", route="chat",
                     provider="b", outcome="ok") == 0
        reply = await sup.complete(Request("chat", MESSAGES))
        after = await scrape(port)
        nursery.cancel_scope.cancel()

    assert reply.provider == "b"
    failed_on_a = [a for a in reply.attempts if a.actor == "a"]
    assert failed_on_a and all(a.failure is not None for a in failed_on_a)
    assert all(a.failure.category is Category.PROVIDER_5XX for a in failed_on_a if a.failure)
    # The request: one, by route, the provider that served it and its outcome.
    assert value(after, "gen_ai_server_request_duration_seconds_count", route="chat",
                 provider="b", outcome="ok") == 1
    # Each attempt, by provider, outcome and category.
    assert value(after, "gen_ai_client_operation_duration_seconds_count", provider="a",
                 outcome="failed", error_type="provider_5xx") == len(failed_on_a)
    assert value(after, "gen_ai_client_operation_duration_seconds_count", provider="b",
                 outcome="ok", error_type="") == 1
    # Each decision, by action, provider, category and the rule that made it.
    assert any(d.action is Action.FAILOVER for d in reply.decisions)
    expected: dict[tuple[str, str, str, str], int] = {}
    for d in reply.decisions:
        key = (d.action.value, d.actor or "none", d.category or "", f"{d.rule.policy}.{d.rule.rule}")
        expected[key] = expected.get(key, 0) + 1
    for (action, actor, category, rule), n in expected.items():
        assert value(after, "relayrace_decisions_total", action=action, provider=actor,
                     category=category, rule=rule) == n
    assert total(after, "relayrace_decisions_total") == len(reply.decisions)
    # Gateway overhead: one observation per request, apart from provider time.
    assert value(after, "relayrace_gateway_overhead_seconds_count", route="chat") == 1
    overhead = value(after, "relayrace_gateway_overhead_seconds_sum", route="chat")
    assert 0 <= overhead < value(after, "gen_ai_server_request_duration_seconds_sum",
                                 route="chat", provider="b", outcome="ok")
    # Time to first token and tokens, by provider.
    assert value(after, "gen_ai_server_time_to_first_token_seconds_count", route="chat",
                 provider="b") == 1
    assert reply.usage is not None
    assert value(after, "relayrace_tokens_total", route="chat", provider="b",
                 token_type="output") == reply.usage.completion_tokens
    assert value(after, "relayrace_tokens_total", route="chat", provider="b",
                 token_type="input") == reply.usage.prompt_tokens


async def test_the_health_gauge_flips_when_a_provider_is_benched_and_back(
    autojump_clock: trio.abc.Clock, mock: MockProvider
) -> None:
    metrics = Metrics()
    cfg = config(provider(mock, "a", "ok"), provider(mock, "b", "ok"))
    async with open_supervisor(cfg, observers=[metrics]) as sup, trio.open_nursery() as nursery:
        port = await nursery.start(serve_metrics, metrics, "127.0.0.1", 0)
        first = await scrape(port)
        sup.bench("a", 30)
        benched = await scrape(port)
        sup.unbench("a")
        back = await scrape(port)
        nursery.cancel_scope.cancel()
    assert value(first, "relayrace_provider_health_state", provider="a") == 0
    assert value(benched, "relayrace_provider_health_state", provider="a") == 2
    assert value(benched, "relayrace_provider_health_state", provider="b") == 0
    assert value(benched, "relayrace_provider_health_events_total", provider="a",
                 kind="actor_benched") == 1
    assert value(back, "relayrace_provider_health_state", provider="a") == 0
    assert value(back, "relayrace_provider_health_events_total", provider="a",
                 kind="actor_recovered") == 1
    assert ("relayrace_requests_in_flight", frozenset()) in back
    assert value(back, "relayrace_retry_budget_tokens") > 0


async def test_an_automatic_bench_shows_in_the_gauge(autojump_clock: trio.abc.Clock) -> None:
    failing = ScriptedClient([Fail(category=Category.PROVIDER_5XX, status=503)] * 20)
    cfg = Config(
        providers=[ProviderConfig(name="a", client=failing),
                   ProviderConfig(name="b", client=ScriptedClient([Answer()]))],
        routes=[Route(model="chat", chain=["a", "b"])],
        seed=1,
    )
    metrics = Metrics()
    async with open_supervisor(cfg, observers=[metrics]) as sup:
        for _ in range(6):
            await sup.complete(Request("chat", MESSAGES))
        state = sup.health()["a"].state.value
        samples = parse(metrics.render().decode())
    assert state == "benched"
    assert value(samples, "relayrace_provider_health_state", provider="a") == 2
    assert value(samples, "relayrace_provider_bench_count", provider="a") >= 1


async def test_the_listener_answers_404_elsewhere_and_bounds_the_request() -> None:
    metrics = Metrics()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_metrics, metrics, "127.0.0.1", 0)
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"http://127.0.0.1:{port}/")).status_code == 404
            assert (await http.get(f"http://127.0.0.1:{port}/metricsx")).status_code == 404
            assert (await http.post(f"http://127.0.0.1:{port}/metrics")).status_code == 405
            huge = {"x-big": "a" * 40_000}
            assert (await http.get(f"http://127.0.0.1:{port}/metrics", headers=huge)
                    ).status_code == 400
            ok = await http.get(f"http://127.0.0.1:{port}/metrics")
            assert ok.status_code == 200 and "relayrace_decisions_total" in ok.text
        nursery.cancel_scope.cancel()


async def test_two_supervisors_in_one_process_keep_their_own_metrics() -> None:
    cfg = Config(providers=[ProviderConfig(name="a", client=ScriptedClient([Answer()] * 3))])
    one, two = Metrics(), Metrics()
    async with open_supervisor(cfg, observers=[one]) as sup1:
        async with open_supervisor(cfg, observers=[two]) as sup2:
            await sup1.complete(Request("x", MESSAGES))
            await sup1.complete(Request("x", MESSAGES))
            await sup2.complete(Request("x", MESSAGES))
    count = "gen_ai_server_request_duration_seconds_count"
    labels = {"route": "*", "provider": "a", "outcome": "ok"}
    assert value(parse(one.render().decode()), count, **labels) == 2
    assert value(parse(two.render().decode()), count, **labels) == 1


class Recorder(Observer):
    def __init__(self) -> None:
        self.started: list[RequestInfo] = []
        self.ended: list[Any] = []
        self.decisions: list[Any] = []

    def request_started(self, info: RequestInfo) -> None:
        self.started.append(info)

    def decision(self, decision: Any, info: RequestInfo) -> None:
        self.decisions.append(decision)

    def request_ended(self, outcome: Any, info: RequestInfo, timing: Any) -> None:
        self.ended.append((outcome, info, timing))


async def test_observers_see_every_request_once_with_surface_and_timing(
    autojump_clock: trio.abc.Clock,
) -> None:
    script = [Fail(category=Category.PROVIDER_5XX, status=503), Answer(chunks=4, delay=0.5)]
    cfg = Config(
        providers=[ProviderConfig(name="a", client=ScriptedClient(script * 3))],
        routes=[Route(model="chat", chain=["a"])],
    )
    seen = Recorder()
    async with open_supervisor(cfg, observers=[seen]) as sup:
        reply = await sup.complete(Request("chat", MESSAGES), surface="http")
        async with sup.stream(Request("chat", MESSAGES), surface="websocket") as s:
            async for _ in s:
                pass
        with trio.move_on_after(0.1):  # the caller goes away mid-request
            await sup.complete(Request("chat", MESSAGES))
        with pytest.raises(ValueError, match="surface"):
            await sup.complete(Request("chat", MESSAGES), surface="carrier-pigeon")
    assert [i.surface for i in seen.started] == ["http", "websocket", "python"]
    assert [o.request_id for o, _, _ in seen.ended] == [i.request_id for i in seen.started]
    assert list(seen.decisions[: len(reply.decisions)]) == list(reply.decisions)
    outcome, info, timing = seen.ended[0]
    assert outcome is reply and info.streaming is False and info.route == "chat"
    assert timing.provider_time == pytest.approx(sum(a.duration for a in reply.attempts))
    assert timing.latency >= timing.provider_time + timing.backoff_time
    assert timing.backoff_time == sum(d.wait for d in reply.decisions if d.action is Action.RETRY)
    assert timing.first_token is not None and timing.first_token > 0
    gone = seen.ended[2][0]
    assert isinstance(gone, RequestFailed) and gone.failure.category is Category.CANCELLED


# --- bounded labels ----------------------------------------------------------------------------

hostile = st.text(min_size=1, max_size=40)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(models=st.lists(hostile, min_size=1, max_size=6), messages=st.lists(hostile, max_size=6))
def test_label_sets_stay_bounded_whatever_the_models_and_messages(
    models: list[str], messages: list[str]
) -> None:
    fails = [Fail(category=Category.PROVIDER_5XX, status=503, message=m, code=m) for m in messages]
    cfg = Config(
        providers=[
            ProviderConfig(name="a", client=ScriptedClient(fails or [Answer()])),
            ProviderConfig(name="b", client=ScriptedClient([Answer()])),
        ],
        routes=[Route(model="chat", chain=["a", "b"]), Route(model="*", chain=["b"])],
    )
    metrics = Metrics()

    async def main() -> None:
        async with open_supervisor(cfg, observers=[metrics]) as sup:
            for model in models:
                for route in (model, "chat"):
                    try:
                        await sup.complete(Request(route, [{"role": "user", "content": model}]))
                    except (RequestFailed, BadRequest):
                        pass

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    samples = parse(metrics.render().decode())
    allowed = {
        "route": {"chat", "*", OTHER},
        "provider": {"a", "b", "none", OTHER},
        "outcome": {"ok", "failed", "cancelled"} | {c.value for c in Category} | {OTHER},
        "category": {""} | {c.value for c in Category} | {OTHER},
        "error_type": {""} | {c.value for c in Category} | {OTHER},
        "action": {a.value for a in Action},
        "token_type": {"input", "output"},
        "model": {"", "chat", OTHER},  # a deployment: configured models only
    }
    rules = set()
    for (_, labels), v in samples.items():
        assert not math.isnan(v)
        for label, got in labels:
            if label in allowed:
                assert got in allowed[label], (label, got)
            elif label == "rule":  # policy.rule (from the code or the config), never a value
                assert "=" not in got and ":" not in got, got
                rules.add(got)
            elif label == "kind":
                assert got.startswith("actor_")
            else:
                assert label == "le", label
    assert len(rules) <= 10
    values = {v for _, ls in samples for _, v in ls}
    texts = {t for t in models + messages if len(t) > 3} - {"chat", "none", "other"}
    assert not texts & values


async def test_in_flight_and_inbox_depth_per_provider_are_gauges(
    autojump_clock: trio.abc.Clock,
) -> None:
    # One slot: the first request holds it (the provider hangs), the second waits in the inbox.
    hanging = ScriptedClient([Hang(), Hang()])
    cfg = Config(
        providers=[ProviderConfig(name="a", client=hanging, max_concurrency=1)],
        routes=[Route(model="chat", chain=["a"])],
    )
    metrics = Metrics()
    async with open_supervisor(cfg, observers=[metrics]) as sup, trio.open_nursery() as nursery:
        for _ in range(2):
            nursery.start_soon(sup.complete, Request("chat", MESSAGES))
        await trio.testing.wait_all_tasks_blocked()
        samples = parse(metrics.render().decode())
        nursery.cancel_scope.cancel()
    assert value(samples, "relayrace_provider_in_flight", provider="a") == 1
    assert value(samples, "relayrace_provider_inbox_depth", provider="a") == 1
