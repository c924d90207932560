"""Two supervisors in one process sharing one real ``redis-server``: RPM/TPM admission counted
fleet-wide, learned provider limits, affinity pins, fleet benches in ``health()`` and the
per-provider drain. Real clock (Redis is real I/O), short policies; each instance talks to its
own mock provider, so that the mock's log says which instance sent what.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from relayrace import (
    Config,
    Policies,
    ProviderConfig,
    Reply,
    Request,
    RetryPolicy,
    Route,
    Supervisor,
)
from relayrace.actors import OpenAIClient, State
from relayrace.state import Deployment
from relayrace.testing import MockProvider, serve_mock_provider

from .operating import CHAT, ENV, gateway, gateway_file
from .redis_server import RedisServer
from .test_shared_state import eventually, instance, redis_server, sent, state_config

__all__ = ["redis_server"]  # the fixture, imported

pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <function MemoryObject:pytest.PytestUnraisableExceptionWarning"
)

PRIMARY = "ok,tag=primary"
BACKUP = "ok,tag=backup"
MESSAGES = [{"role": "user", "content": "hi"}]


def make_config(
    mock: MockProvider,
    state: Any,
    *,
    primary: str = PRIMARY,
    rpm: int | None = None,
    affinity: str | None = None,
) -> Config:
    client = OpenAIClient(base_url=f"{mock.base_url}/v1", max_connections=8)
    return Config(
        providers=[
            ProviderConfig(name="primary", client=client, model=primary, rpm=rpm),
            ProviderConfig(name="backup", client=client, model=BACKUP),
        ],
        routes=[
            Route(
                model="chat",
                chain=["primary", "backup"],
                strategy="round_robin" if affinity else "priority",
                affinity=affinity,
            )
        ],
        policies=Policies(retry=RetryPolicy(max_attempts=1)),
        state=state,
    )


@asynccontextmanager
async def two_instances(
    server: RedisServer, **kwargs: Any
) -> AsyncIterator[tuple[Supervisor, MockProvider, Supervisor, MockProvider]]:
    state = state_config(server, f"t{uuid.uuid4().hex[:8]}")
    async with serve_mock_provider() as mock_a, serve_mock_provider() as mock_b:
        async with (
            instance(make_config(mock_a, state, **kwargs)) as a,
            instance(make_config(mock_b, state, **kwargs)) as b,
        ):
            yield a, mock_a, b, mock_b


async def same_minute(room: float = 5.0) -> None:
    """Counts are per wall-clock minute: start a test well inside one."""
    left = 60.0 - time.time() % 60.0
    if left < room:
        await trio.sleep(left + 0.05)


async def ask(sup: Supervisor, **metadata: Any) -> Reply:
    return await sup.complete(Request("chat", MESSAGES, metadata=metadata))


def rate_skips(reply: Reply) -> list[str]:
    return [str(d.rule) for d in reply.decisions if d.actor == "primary" and d.wait is not None]


async def test_rpm_is_counted_fleet_wide(redis_server: RedisServer) -> None:
    await same_minute()
    async with two_instances(redis_server, rpm=3) as (a, mock_a, b, mock_b):
        for _ in range(3):
            assert (await ask(a)).provider == "primary"
        state_b = b.shared_state
        assert state_b is not None
        deployment = Deployment("primary", PRIMARY)
        await eventually(lambda: state_b.mirror.usage_of(deployment, time.time()).requests == 3)
        reply = await ask(b)
        assert reply.provider == "backup"  # the fleet's 3 a minute are spent: skipped, no 429
        assert rate_skips(reply) == ["config:providers.rpm=3 fleet-wide"]
        assert sent(mock_b, PRIMARY) == 0


async def test_a_limit_learned_by_one_instance_is_honoured_by_the_other(
    redis_server: RedisServer,
) -> None:
    model = "ok,rl_remaining=0,rl_reset=30"  # the provider says: nothing left for 30 s
    async with two_instances(redis_server, primary=model) as (a, mock_a, b, mock_b):
        assert (await ask(a)).provider == "primary"
        state_b = b.shared_state
        assert state_b is not None
        await eventually(lambda: state_b.mirror.limits_of(Deployment("primary", model)) is not None)
        reply = await ask(b)
        assert reply.provider == "backup"
        assert rate_skips(reply) == ["provider:headers.x-ratelimit-remaining-requests=0"]
        assert sent(mock_b, model) == 0


async def test_a_429_with_retry_after_on_one_instance_is_honoured_by_the_other(
    redis_server: RedisServer,
) -> None:
    model = "rate-limit,retry_after=30"
    async with two_instances(redis_server, primary=model) as (a, mock_a, b, mock_b):
        assert (await ask(a)).provider == "backup"  # the 429 benches it for 30 s, fleet-wide
        await eventually(lambda: b.health()["primary"].state is State.BENCHED)
        assert b.health()["primary"].bench_reason == "rate_limit"
        assert (await ask(b)).provider == "backup"
        assert sent(mock_b, model) == 0


async def test_redis_away_admission_counts_locally_and_no_request_fails(
    redis_server: RedisServer,
) -> None:
    await same_minute()
    async with two_instances(redis_server, rpm=4) as (a, mock_a, b, mock_b):
        state_a = a.shared_state
        assert state_a is not None
        await eventually(lambda: state_a.mirror.instances == 2)
        redis_server.kill()
        await eventually(lambda: state_a.statistics().degraded)
        # Nothing counts the two together now: each takes its half of the fleet's 4 a minute.
        replies = [await ask(a) for _ in range(3)]
        assert [r.provider for r in replies] == ["primary", "primary", "backup"]
        assert rate_skips(replies[2]) == ["config:providers.rpm=4/2 instances, state away"]
        assert sent(mock_a, PRIMARY) == 2


async def test_a_pin_made_by_one_instance_is_honoured_by_the_other(
    redis_server: RedisServer,
) -> None:
    async with two_instances(redis_server, affinity="user") as (a, mock_a, b, mock_b):
        first = (await ask(a)).provider  # round robin: where each instance's first goes
        pinned = (await ask(a, user="u1")).provider  # the other one: u1 pinned to it
        assert pinned != first
        state_b = b.shared_state
        assert state_b is not None
        await eventually(lambda: bool(state_b.mirror.pins))
        # Alone, B's round robin would start at ``first`` and alternate.
        replies = [await ask(b, user="u1") for _ in range(3)]
        assert [r.provider for r in replies] == [pinned] * 3
        assert all(any("affinity key last" in d.reason for d in r.decisions) for r in replies)
        # Keys without a pin: round robin as usual.
        assert {(await ask(b, user=f"u{n}")).provider for n in (2, 3)} == {"primary", "backup"}


async def test_a_bench_made_by_one_instance_shows_in_the_others_health(
    redis_server: RedisServer,
) -> None:
    async with two_instances(redis_server) as (a, mock_a, b, mock_b):
        assert b.health()["primary"].state is State.OK
        a.bench("primary", 600)
        await eventually(lambda: b.health()["primary"].state is State.BENCHED)
        seen = b.health()["primary"]
        assert (seen.benched_by, seen.bench_reason, seen.manual) == ("fleet", "manual", True)
        assert not seen.serving and seen.to_dict()["benched_by"] == "fleet"
        assert a.health()["primary"].benched_by is None  # A's own bench
        a.drain_provider("primary", fleet=False)  # this instance only
        assert a.health()["primary"].bench_reason == "drained"
        a.unbench("primary")
        await eventually(lambda: b.health()["primary"].state is State.OK)
        assert b.health()["primary"].bench_reason is None
        assert a.health()["primary"].bench_reason is None


async def test_a_provider_drained_through_one_admin_api_is_avoided_by_every_instance(
    redis_server: RedisServer, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    prefix = f"t{uuid.uuid4().hex[:8]}"
    state = f'\n[state]\nbackend = "redis"\nurl = "{redis_server.url}"\nprefix = "{prefix}"\n'
    slow, fast = "ok,chunks=2,delay=0.3,tag=a", "ok,tag=b"

    async def served(gw: Any) -> str:
        reply = await gw.api.post("/v1/chat/completions", json=CHAT)
        assert reply.status_code == 200, reply.text
        return str(reply.headers["x-relayrace-provider"])

    async with serve_mock_provider() as mock_a, serve_mock_provider() as mock_b:
        text_a = gateway_file(mock_a.base_url, {"a": slow, "b": fast}) + state
        text_b = gateway_file(mock_b.base_url, {"a": slow, "b": fast}) + state
        async with gateway(tmp_path / "a.toml", text_a) as gw_a:
            async with gateway(tmp_path / "b.toml", text_b) as gw_b:
                in_flight: list[str] = []

                async def first() -> None:
                    in_flight.append(await served(gw_a))

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(first)
                    await eventually(lambda: sent(mock_a, slow) == 1)
                    drained = await gw_a.admin.post("/admin/providers/a/drain")
                    assert drained.status_code == 200, drained.text
                    assert drained.json()["scope"] == "fleet"
                    view = drained.json()["provider"]
                    assert view["state"] == "benched" and view["bench_reason"] == "drained"
                assert in_flight == ["a"]  # the request in flight on it finished there

                def drained_on_b() -> bool:
                    return gw_b.running.sup.health()["a"].bench_reason == "drained"

                await eventually(drained_on_b)
                assert await served(gw_b) == "b" and await served(gw_a) == "b"
                await eventually(lambda: gw_b.running.sup.shared_state.mirror.instances == 2)
                seen = (await gw_b.admin.get("/admin/providers")).json()["shared_state"]
                assert seen["backend"] == "redis" and seen["connected"] and seen["instances"] == 2
                assert sent(mock_b, slow) == 0
                metrics_url = gw_b.running.metrics_url
                assert metrics_url is not None
                scrape = (await gw_b.anonymous.get(metrics_url)).text
                assert 'relayrace_provider_drained{provider="a"} 1.0' in scrape

                lifted = await gw_a.admin.post("/admin/providers/a/unbench")
                assert lifted.status_code == 200
                await eventually(lambda: not drained_on_b())
                assert await served(gw_b) == "a"
