"""Provider limits learned from an error answer's rate-limit headers, as from a success's: the
error mapping puts them on the ``Failure`` (``Failure.limits``), the admission spends them and
skips the deployment until the reset (the skip names the provider's header), and a shared state
backend carries them to the other instances. Unreadable headers teach nothing. The mock
provider over real HTTP, on the MockClock (the fleet test: a real ``redis-server``)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import trio

from relayrace import (
    Category,
    Config,
    Policies,
    ProviderConfig,
    ProviderError,
    Reply,
    Request,
    RetryPolicy,
    Route,
    Supervisor,
    ToolCallDelta,
)
from relayrace import open_supervisor as open_sup
from relayrace.actors import ClientCall, OpenAIClient, RateLimits
from relayrace.state import Deployment
from relayrace.testing import MockProvider, mock_model

from .redis_server import RedisServer
from .test_shared_limits import two_instances
from .test_shared_state import eventually, redis_server, sent

__all__ = ["redis_server"]  # the fixture, imported

pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <function MemoryObject:pytest.PytestUnraisableExceptionWarning"
)

LEARNED = "provider:headers.x-ratelimit-remaining-requests=0"
BACKUP = mock_model("ok", tag="backup")
MESSAGES = [{"role": "user", "content": "hi"}]
# A 429 saying nothing is left for 30 s; its Retry-After (1 s) benches the deployment only that
# long, so what keeps it skipped past the bench is what the headers taught the admission.
SPENT_429 = mock_model("rate-limit", retry_after=1, rl_remaining=0, rl_reset=30, tag="primary")


class _Sink:
    async def delta(self, text: str) -> None:
        pass

    async def tool_calls(self, fragments: Sequence[ToolCallDelta]) -> None:
        pass

    def progress(self) -> None:
        pass


def client_of(mock: MockProvider) -> OpenAIClient:
    return OpenAIClient(base_url=f"{mock.base_url}/v1", api_key="sk-test")


def config(mock: MockProvider, primary: str) -> Config:
    client = client_of(mock)
    return Config(
        providers=[
            ProviderConfig(name="primary", client=client, model=primary),
            ProviderConfig(name="backup", client=client, model=BACKUP),
        ],
        routes=[Route(model="m", chain=["primary", "backup"])],
        policies=Policies(retry=RetryPolicy(max_attempts=1)),  # fail over at once
    )


async def ask(sup: Supervisor, model: str = "m") -> Reply:
    return await sup.complete(Request(model, MESSAGES))


def rate_skips(reply: Reply) -> list[str]:
    """The rules of ``primary``'s skips at a rate limit (they carry the wait)."""
    return [
        str(d.rule)
        for d in reply.decisions
        if d.actor == "primary" and d.action.value == "skip" and d.wait is not None
    ]


def sent_to(mock: MockProvider, model: str) -> int:
    return sum(attempt.model == model for attempt in mock.log)


async def failure_of(mock: MockProvider, model: str) -> ProviderError:
    client = client_of(mock)
    try:
        with pytest.raises(ProviderError) as caught:
            call = ClientCall(request=Request(model, MESSAGES), actor="primary")
            await client.call(call, _Sink())
    finally:
        await client.aclose()
    return caught.value


async def test_an_error_answer_s_rate_limit_headers_are_on_its_failure(autojump_clock, mock):
    error = await failure_of(mock, mock_model("rate-limit", rl_remaining=0, rl_reset=30))
    failure = error.failure
    assert failure.category is Category.RATE_LIMIT and failure.status == 429
    assert failure.limits == RateLimits(
        remaining_requests=0, remaining_tokens=0, reset_requests=30.0, reset_tokens=30.0
    )
    # A 500 with them: learned all the same (the provider's word, whatever the status).
    error = await failure_of(mock, mock_model("server-error", rl_remaining=3, rl_reset=20))
    assert error.failure.category is Category.PROVIDER_5XX
    assert error.failure.limits == RateLimits(
        remaining_requests=3, remaining_tokens=3000, reset_requests=20.0, reset_tokens=20.0
    )
    # Without them, or with unreadable ones: nothing.
    assert (await failure_of(mock, "rate-limit")).failure.limits is None
    garbage = await failure_of(mock, mock_model("rate-limit", rl_garbage=1))
    assert garbage.failure.limits is None and garbage.failure.retry_after is None


async def test_a_429_saying_nothing_is_left_skips_the_deployment_until_its_reset(
    autojump_clock, mock
):
    async with open_sup(config(mock, SPENT_429)) as sup:
        first = await ask(sup)
        assert first.provider == "backup"  # the 429, failed over
        await trio.sleep(2)  # past the Retry-After bench: only the learned limit is left
        second = await ask(sup)
        assert second.provider == "backup"
        assert rate_skips(second) == [LEARNED]
        skip = next(d for d in second.decisions if d.action.value == "skip")
        assert skip.wait == pytest.approx(28, abs=0.5)
        await trio.sleep(20)
        assert rate_skips(await ask(sup)) == [LEARNED]
        await trio.sleep(9)  # 31 s after the 429: whole again, sent again
        after = await ask(sup)
        assert rate_skips(after) == []
        assert [a.actor for a in after.attempts] == ["primary", "backup"]
    assert sent_to(mock, SPENT_429) == 2


async def test_a_500_saying_nothing_is_left_skips_the_deployment_too(autojump_clock, mock):
    model = mock_model("server-error", rl_remaining=0, rl_reset=30, tag="primary")
    async with open_sup(config(mock, model)) as sup:
        assert (await ask(sup)).provider == "backup"
        second = await ask(sup)
        assert second.provider == "backup" and rate_skips(second) == [LEARNED]
    assert sent_to(mock, model) == 1


@pytest.mark.parametrize("stream", [False, True])
async def test_a_2xx_whose_body_then_fails_still_teaches_its_headers(autojump_clock, mock, stream):
    # `cut`: a 200 with the headers, then the body ends before the answer does (a stream: before
    # its first delta, so the failover is invisible).
    model = mock_model("cut", after=0, rl_remaining=0, rl_reset=30, tag="primary")
    async with open_sup(config(mock, model)) as sup:
        if stream:
            async with sup.stream(Request("m", MESSAGES)) as s:
                async for _ in s:
                    pass
            first = s.reply
        else:
            first = await ask(sup)
        assert first.provider == "backup"
        assert [a.actor for a in first.attempts] == ["primary", "backup"]
        second = await ask(sup)
        assert second.provider == "backup" and rate_skips(second) == [LEARNED]
    assert sent_to(mock, model) == 1


async def test_unreadable_rate_limit_headers_teach_nothing_and_fail_over_as_before(
    autojump_clock, mock
):
    model = mock_model("rate-limit", rl_garbage=1, tag="primary")
    async with open_sup(config(mock, model)) as sup:
        for _ in range(3):
            reply = await ask(sup)
            assert reply.provider == "backup"
            assert rate_skips(reply) == []
            assert [a.actor for a in reply.attempts] == ["primary", "backup"]
            await trio.sleep(1)
    assert sent_to(mock, model) == 3


async def test_a_limit_learned_from_a_429_by_one_instance_is_honoured_by_the_other(
    redis_server: RedisServer,
) -> None:
    model = SPENT_429
    async with two_instances(redis_server, primary=model) as (a, mock_a, b, mock_b):
        assert (await ask(a, "chat")).provider == "backup"  # the 429: its headers published
        state_b = b.shared_state
        assert state_b is not None
        learned = Deployment("primary", model)
        await eventually(lambda: state_b.mirror.limits_of(learned) is not None)
        limits = state_b.mirror.limits_of(learned)
        assert limits is not None and limits.remaining_requests == 0
        await trio.sleep(1.2)  # the fleet's Retry-After bench (1 s) is over
        reply = await ask(b, "chat")
        assert reply.provider == "backup"
        assert rate_skips(reply) == [LEARNED]
        assert sent(mock_b, model) == 0  # B never sent there
