"""Health per deployment: a provider x the upstream model it is asked for.

Proven over real HTTP against the mock provider, which picks its behaviour by model name: one
passthrough provider (no ``model`` in its config) behind a ``*`` route serves several model
names, and a failing one must not take the others down with it; a failure of the account
(auth) must. Plus the pure parts: which failures are the account's, the LRU cap.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from relayrace import (
    Action,
    Category,
    Config,
    Event,
    EventKind,
    Failure,
    HealthPolicy,
    Policies,
    ProviderConfig,
    Request,
    RequestFailed,
    RetryPolicy,
    Route,
    State,
    open_supervisor,
)
from relayrace.actors import Deployments, OpenAIClient, account_level
from relayrace.observe import OTHER, Metrics
from relayrace.testing import MockProvider, serve_mock_provider

MESSAGES = [{"role": "user", "content": "hi"}]
GOOD = "ok,tag=good"
BAD = "unavailable,tag=bad"


@pytest.fixture
async def mock() -> AsyncIterator[MockProvider]:
    async with serve_mock_provider() as server:
        yield server


def passthrough(mock: MockProvider, *, backup: bool = True, **client: Any) -> Config:
    """One passthrough provider ``up`` behind ``*`` (and a fixed-model ``backup`` after it)."""
    providers = [
        ProviderConfig(name="up", client=OpenAIClient(base_url=f"{mock.base_url}/v1", **client))
    ]
    if backup:
        providers.append(
            ProviderConfig(
                name="backup",
                client=OpenAIClient(base_url=f"{mock.base_url}/v1"),
                model="ok,tag=backup",
            )
        )
    return Config(
        providers=providers,
        routes=[Route(model="*", chain=[p.name for p in providers])],
        policies=Policies(retry=RetryPolicy(max_attempts=1)),
    )


def benches(channel: trio.MemoryReceiveChannel[Event]) -> list[Event]:
    """The ``actor_benched`` events received so far."""
    events = []
    while True:
        try:
            event = channel.receive_nowait()
        except trio.WouldBlock:
            return events
        if event.kind is EventKind.ACTOR_BENCHED:
            events.append(event)


async def test_a_failing_model_is_benched_and_the_others_keep_their_provider(
    autojump_clock: trio.abc.Clock, mock: MockProvider
) -> None:
    async with open_supervisor(passthrough(mock)) as sup, sup.subscribe() as channel:
        served = []
        for _ in range(6):
            served.append((await sup.complete(Request(BAD, MESSAGES))).provider)
            served.append((await sup.complete(Request(GOOD, MESSAGES))).provider)
        skipped = await sup.complete(Request(BAD, MESSAGES))
        health = sup.health()["up"]
        benched = benches(channel)
    # The bad model failed over to the backup; the good one was always served by `up`.
    assert served == ["backup", "up"] * 6
    assert len(mock.attempts(BAD)) == 3  # the threshold, then benched: no more calls
    assert [a.outcome for a in mock.attempts(GOOD)] == ["ok"] * 6
    # Routing skipped the bad deployment only, and said which one.
    skip = skipped.decisions[0]
    assert skip.action is Action.SKIP and skip.actor == "up"
    assert str(skip.rule) == "default:health.state=benched"
    assert skip.reason == f"deployment {BAD}: benched"
    assert skipped.provider == "backup"
    # Visible: the provider as a whole is the worst of its deployments, each its own.
    assert health.state is State.BENCHED
    assert health.deployments[BAD].state is State.BENCHED
    assert health.deployments[BAD].consecutive_failures == 3
    assert health.deployments[GOOD].state is State.OK
    assert health.to_dict()["deployments"][GOOD]["state"] == "ok"
    assert [(e.actor, e.model) for e in benched] == [("up", BAD)]
    assert benched[0].to_dict()["model"] == BAD


async def test_an_auth_failure_benches_every_deployment(
    autojump_clock: trio.abc.Clock, mock: MockProvider
) -> None:
    async with open_supervisor(passthrough(mock)) as sup, sup.subscribe() as channel:
        assert (await sup.complete(Request(GOOD, MESSAGES))).provider == "up"
        failed = await sup.complete(Request("unauthorized", MESSAGES))
        after = await sup.complete(Request(GOOD, MESSAGES))
        health = sup.health()["up"]
        (event,) = benches(channel)
    assert failed.attempts[0].failure is not None
    assert failed.attempts[0].failure.category is Category.AUTH
    assert failed.provider == "backup"
    # The account is out: the good model is not sent to `up` either.
    assert after.provider == "backup"
    assert after.decisions[0].reason == "benched"  # the provider's, not a deployment's
    assert len(mock.attempts(GOOD)) == 1
    assert health.state is State.BENCHED
    assert health.benched_until == HealthPolicy().long_bench
    assert health.deployments[GOOD].state is State.OK
    assert (event.kind, event.actor, event.model) == (EventKind.ACTOR_BENCHED, "up", None)


async def test_a_rate_limit_that_names_the_model_benches_that_deployment_only(
    autojump_clock: trio.abc.Clock, mock: MockProvider
) -> None:
    # The mock's OpenAI 429 says "Rate limit reached for requests to <model>.", like OpenAI.
    limited = "rate-limit,retry_after=30"
    async with open_supervisor(passthrough(mock)) as sup:
        assert (await sup.complete(Request(limited, MESSAGES))).provider == "backup"
        assert (await sup.complete(Request(GOOD, MESSAGES))).provider == "up"
        assert (await sup.complete(Request(limited, MESSAGES))).provider == "backup"
        health = sup.health()["up"]
    assert len(mock.attempts(limited)) == 1
    assert health.deployments[limited].state is State.BENCHED
    assert health.deployments[limited].benched_until == 30.0
    assert health.deployments[GOOD].state is State.OK


async def test_a_content_filtered_prompt_gets_the_refusal_not_the_fallback(
    autojump_clock: trio.abc.Clock, mock: MockProvider
) -> None:
    async with open_supervisor(passthrough(mock)) as sup:
        with pytest.raises(RequestFailed) as caught:
            await sup.complete(Request("content-policy", MESSAGES))
        refused = await sup.complete(Request("ok,refusal=1", MESSAGES))
        health = sup.health()["up"]
    failure = caught.value.failure
    assert failure.category is Category.CONTENT_POLICY and failure.provider == "up"
    assert [a.actor for a in caught.value.attempts] == ["up"]
    assert caught.value.decisions[-1].action is Action.STOP
    assert mock.attempts("ok,tag=backup") == []
    # A refusal in an answer is an answer, from the provider asked.
    assert refused.provider == "up" and refused.refusal
    # Neither costs the deployment anything.
    assert health.state is State.OK
    assert health.deployments["content-policy"].consecutive_failures == 0


async def test_the_deployment_cap_holds_against_invented_model_names(
    autojump_clock: trio.abc.Clock, mock: MockProvider
) -> None:
    async with open_supervisor(passthrough(mock, backup=False)) as sup:
        for _ in range(3):
            with pytest.raises(RequestFailed):
                await sup.complete(Request(BAD, MESSAGES))
        for i in range(300):
            with pytest.raises(RequestFailed) as caught:
                await sup.complete(Request(f"not-found,tag=invented{i}", MESSAGES))
            assert caught.value.failure.category is Category.MODEL_NOT_FOUND
        deployments = sup.health()["up"].deployments
    assert len(deployments) == 256
    # The benched one is never evicted; the oldest healthy ones went first.
    assert deployments[BAD].state is State.BENCHED
    assert "not-found,tag=invented299" in deployments
    assert "not-found,tag=invented44" not in deployments
    assert "not-found,tag=invented45" in deployments


def test_when_every_record_is_unhealthy_a_new_deployment_is_not_kept() -> None:
    policy = HealthPolicy()
    deployments = Deployments(policy, cap=2)
    for model in ("a", "b"):
        for _ in range(3):
            deployments.use(model, 0.0).record_failure(
                Failure(category=Category.PROVIDER_5XX), 0.0, probe=False
            )
    extra = deployments.use("c", 0.0)
    assert extra.available(0.0) and len(deployments) == 2 and deployments.get("c") is None
    assert [m for m, _ in deployments] == ["a", "b"]
    assert deployments.use("d", 0.0, keep=True) is deployments.get("d")  # a manual bench
    assert len(deployments) == 3


async def test_a_manual_bench_of_one_deployment(
    autojump_clock: trio.abc.Clock, mock: MockProvider
) -> None:
    cfg = passthrough(mock)
    async with open_supervisor(cfg) as sup:
        sup.bench("up", 30, model=BAD)
        assert (await sup.complete(Request(BAD, MESSAGES))).provider == "backup"
        assert (await sup.complete(Request(GOOD, MESSAGES))).provider == "up"
        snap = sup.health()["up"].deployments[BAD]
        sup.unbench("up", model=BAD)
        again = sup.health()["up"].deployments[BAD]
        with pytest.raises(ValueError, match="serves only model"):
            sup.bench("backup", 30, model=GOOD)
    assert snap.state is State.BENCHED and snap.manual and snap.benched_until == 30.0
    assert again.state is State.OK and not again.manual
    assert mock.attempts(BAD) == []


async def test_an_active_probe_probes_the_benched_deployment(
    autojump_clock: trio.abc.Clock, mock: MockProvider
) -> None:
    flapping = "flapping,down=7"
    async with open_supervisor(passthrough(mock, probe="completion")) as sup:
        mock.reset()
        for _ in range(3):
            await sup.complete(Request(flapping, MESSAGES))
            await sup.complete(Request(GOOD, MESSAGES))
        await trio.sleep(20)
        health = sup.health()["up"].deployments[flapping]
    # Benched at 0 for 5 s; the actor's own probe (one token of that model) fails at 5 s,
    # benched for 4 s; the one at 9 s finds it up.
    attempts = mock.attempts(flapping)
    probes = [a for a in attempts if a.request.get("max_tokens") == 1]
    assert [a.started_at for a in probes] == [5.0, 9.0]
    assert [a.outcome for a in probes] == ["error", "ok"]
    assert health.state is State.OK
    assert [a.outcome for a in mock.attempts(GOOD)] == ["ok"] * 3


def test_which_failures_concern_the_account() -> None:
    def fail(category: Category, message: str = "") -> Failure:
        return Failure(category=category, message=message)

    assert account_level(fail(Category.AUTH), "gpt-4o")
    assert account_level(fail(Category.QUOTA_EXHAUSTED), "gpt-4o")
    openai = "Rate limit reached for gpt-4o in organization org-x on tokens per min (TPM)."
    assert not account_level(fail(Category.RATE_LIMIT, openai), "gpt-4o")
    assert account_level(fail(Category.RATE_LIMIT, openai), "gpt-4o-mini")
    assert account_level(fail(Category.RATE_LIMIT, "limit for gpt-4o-mini."), "gpt-4o")
    gemini = "Quota exceeded for metric: x, limit: 15, model: gemini-1.5-flash"
    assert not account_level(fail(Category.RATE_LIMIT, gemini), "GEMINI-1.5-flash")
    assert account_level(fail(Category.RATE_LIMIT, "Too many requests"), "gpt-4o")
    assert account_level(fail(Category.RATE_LIMIT, "Too many requests"), None)
    for category in (Category.PROVIDER_5XX, Category.TIMEOUT, Category.OVERLOADED):
        assert not account_level(fail(category), "gpt-4o")


async def test_metrics_label_deployments_by_configured_models_only(
    autojump_clock: trio.abc.Clock, mock: MockProvider
) -> None:
    cfg = passthrough(mock)
    cfg = Config(
        providers=cfg.providers,
        routes=[*cfg.routes, Route(model=BAD, chain=["up", "backup"])],
        policies=cfg.policies,
    )
    metrics = Metrics()
    async with open_supervisor(cfg, observers=[metrics]) as sup:
        for model in (BAD, "unavailable,tag=invented"):
            for _ in range(3):
                await sup.complete(Request(model, MESSAGES))
        await sup.complete(Request(GOOD, MESSAGES))
        text = metrics.render().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    benched = "relayrace_deployment_health_events_total"
    assert value(benched, provider="up", model=BAD, kind="actor_benched") == 1
    assert value(benched, provider="up", model=OTHER, kind="actor_benched") == 1
    state = "relayrace_deployment_health_state"
    assert value(state, provider="up", model=BAD) == 2
    assert value(state, provider="up", model=OTHER) == 2  # the worst of those collapsed
    assert {labels for name, labels in samples if name == state} == {
        (("model", BAD), ("provider", "up")),
        (("model", OTHER), ("provider", "up")),
        (("model", "ok,tag=backup"), ("provider", "backup")),
    }


async def test_one_benched_deployment_leaves_the_provider_serving_but_an_auth_bench_does_not(
    mock: MockProvider, autojump_clock: trio.abc.Clock
) -> None:
    async with open_supervisor(passthrough(mock, backup=False)) as sup:
        await sup.complete(Request(GOOD, MESSAGES))
        sup.bench("up", 60.0, model=BAD)
        up = sup.health()["up"]
        # The worst record is the benched deployment; the provider still serves the other.
        assert up.state is State.BENCHED and up.provider_state is State.OK
        assert up.serving and up.to_dict()["serving"] is True
        # Every deployment it keeps benched: nothing is served.
        sup.bench("up", 60.0, model=GOOD)
        assert not sup.health()["up"].serving
        sup.unbench("up")
        assert sup.health()["up"].serving
        # A bench of the whole provider (as an auth failure gives) stops it for every model.
        sup.bench("up", 60.0)
        up = sup.health()["up"]
        assert up.provider_state is State.BENCHED and not up.serving
