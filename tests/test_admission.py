"""Rate-limit-aware admission: configured ``rpm`` / ``tpm`` and the limits a provider reports
in its headers skip a deployment at its limit (a decision says so, no call, no 429), the token
estimate is reconciled with the real usage, and a request's priority orders an actor's inbox.
Scripted providers on the MockClock, and the mock provider over real HTTP."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from relayrace import (
    Category,
    Config,
    ConfigError,
    ProviderConfig,
    Request,
    RequestFailed,
    Route,
    Usage,
    load_config,
)
from relayrace import open_supervisor as open_sup
from relayrace.actors import OpenAIClient, read_rate_limits
from relayrace.testing import Answer, Hang, mock_model

from .support import client, scripted_provider


def config(*providers: ProviderConfig) -> Config:
    return Config(providers=providers, routes=[Route(model="m", chain=[p.name for p in providers])])


def ask(text: str = "hi", **params: Any) -> Request:
    return Request("m", [{"role": "user", "content": text}], params=params)


def skips(reply: Any) -> list[tuple[str | None, str]]:
    return [(d.actor, str(d.rule)) for d in reply.decisions if d.action.value == "skip"]


async def test_configured_rpm_skips_the_deployment_once_spent_and_admits_after_the_window(
    autojump_clock,
):
    cfg = config(scripted_provider("a", rpm=2), scripted_provider("b"))
    async with open_sup(cfg) as sup:
        assert [(await sup.complete(ask())).provider for _ in range(2)] == ["a", "a"]
        third = await sup.complete(ask())
        assert third.provider == "b"
        assert skips(third) == [("a", "config:providers.rpm=2")]
        assert "whole again in 60s" in third.decisions[0].reason
        await trio.sleep(30)
        assert (await sup.complete(ask())).provider == "b"  # the window still holds both
        await trio.sleep(30)
        after = await sup.complete(ask())
        assert after.provider == "a" and skips(after) == []
    assert len(client(cfg, "a").calls) == 3  # never sent past its limit


async def test_every_deployment_at_its_limit_fails_locally_with_the_earliest_reset(
    autojump_clock,
):
    cfg = config(scripted_provider("a", rpm=1), scripted_provider("b", rpm=1))
    async with open_sup(cfg) as sup:
        await sup.complete(ask())
        await trio.sleep(10)
        await sup.complete(ask())
        with pytest.raises(RequestFailed) as caught:
            await sup.complete(ask())
    failure = caught.value.failure
    assert failure.category is Category.LOCAL_CAPACITY
    assert failure.code == "rate_limited_locally"
    assert failure.retry_after == pytest.approx(50.0)  # a's minute ends first
    assert caught.value.attempts == ()


@pytest.mark.parametrize("reported", [True, False])
async def test_the_token_estimate_is_reconciled_with_the_real_usage(autojump_clock, reported):
    # Each request is estimated at 50 (200 characters / 4) + 40 (max_tokens) = 90 tokens; the
    # provider reports 15 used. With tpm = 200 the estimates alone admit two requests a minute;
    # reconciled, the third is admitted too.
    usage = Usage(prompt_tokens=10, completion_tokens=5) if reported else None
    cfg = config(scripted_provider("a", Answer(usage=usage), tpm=200), scripted_provider("b"))
    async with open_sup(cfg) as sup:
        served = [(await sup.complete(ask("x" * 200, max_tokens=40))).provider for _ in range(3)]
        if reported:
            assert served == ["a", "a", "a"]
        else:
            assert served == ["a", "a", "b"]
            last = await sup.complete(ask("x" * 200, max_tokens=40))
            assert skips(last) == [("a", "config:providers.tpm=200")]


async def test_priority_orders_the_inbox_higher_first_fifo_within(autojump_clock):
    gate = trio.Event()
    order: list[str] = []
    cfg = config(scripted_provider("a", Hang(), Answer(), max_concurrency=1, inbox_size=10))
    async with open_sup(cfg) as sup, trio.open_nursery() as nursery:

        async def send(name: str, priority: int | None) -> None:
            metadata = {} if priority is None else {"priority": priority}
            request = Request("m", [{"role": "user", "content": name}], metadata=metadata)
            await sup.complete(request)
            order.append(name)

        blocker = trio.CancelScope()

        async def hold() -> None:
            with blocker:
                await sup.complete(ask("first"))  # hangs in a's only slot
            gate.set()

        nursery.start_soon(hold)
        await wait_all_tasks_blocked()
        for name, priority in [("low1", None), ("high1", 5), ("low2", 0), ("mid", 2), ("high2", 5)]:
            nursery.start_soon(send, name, priority)
            await wait_all_tasks_blocked()
        blocker.cancel()  # the slot comes free: the inbox is served in priority order
        await gate.wait()
    assert order == ["high1", "high2", "mid", "low1", "low2"]


def test_rpm_and_tpm_are_validated_and_read_from_toml():
    with pytest.raises(ConfigError, match="rpm"):
        scripted_config = config(scripted_provider("a", rpm=0))
        del scripted_config
    cfg = load_config(
        {"providers": [{"name": "a", "kind": "scripted", "rpm": 60, "tpm": 90_000}]}
    )
    assert (cfg.providers[0].rpm, cfg.providers[0].tpm) == (60, 90_000)


def test_rate_limit_headers_are_read_in_both_formats():
    openai_limits = read_rate_limits(
        {"X-RateLimit-Remaining-Requests": "0", "x-ratelimit-reset-requests": "1m30s",
         "x-ratelimit-remaining-tokens": "1200", "x-ratelimit-reset-tokens": "250ms"}
    )
    assert openai_limits is not None
    assert (openai_limits.remaining_requests, openai_limits.reset_requests) == (0, 90.0)
    assert (openai_limits.remaining_tokens, openai_limits.reset_tokens) == (1200, 0.25)
    anthropic = read_rate_limits(
        {"anthropic-ratelimit-requests-remaining": "3",
         "anthropic-ratelimit-requests-reset": "2026-01-01T00:00:10Z"},
        now=1767225600.0,  # 2026-01-01T00:00:00Z
    )
    assert anthropic is not None
    assert (anthropic.remaining_requests, anthropic.reset_requests) == (3, 10.0)
    assert read_rate_limits({"content-type": "application/json"}) is None


# --- over HTTP: limits the provider reports -----------------------------------------------------


async def test_learned_remaining_zero_skips_until_the_reset(autojump_clock, mock):
    def provider(name: str, model: str) -> ProviderConfig:
        return ProviderConfig(
            name=name,
            client=OpenAIClient(base_url=f"{mock.base_url}/v1", api_key="sk-test"),
            model=model,
        )

    cfg = config(
        provider("a", mock_model("ok", rl_remaining=0, rl_reset=30, tag="a")),
        provider("b", mock_model("ok", tag="b")),
    )
    async with open_sup(cfg) as sup:
        first = await sup.complete(ask())
        assert first.provider == "a"  # nothing known yet: sent, and its headers say "0 left"
        second = await sup.complete(ask())
        assert second.provider == "b"
        assert skips(second) == [("a", "provider:headers.x-ratelimit-remaining-requests=0")]
        await trio.sleep(31)
        third = await sup.complete(ask())
        assert third.provider == "a" and skips(third) == []
    sent = [attempt.model for attempt in mock.log]
    assert sum("tag=a" in model for model in sent) == 2
