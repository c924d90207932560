"""Two supervisors in one process sharing one real ``redis-server`` (``[state] backend =
"redis"``): benches (automatic and manual), failure counts and the retry budget are the
fleet's; Redis going away is an event and a metric, never a failed request.

Each supervisor talks to its own mock provider, so that the mock's log says which instance sent
what. Real clock (Redis is real I/O), short policies.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from relayrace import (
    Config,
    EventKind,
    HealthPolicy,
    Policies,
    ProviderConfig,
    Request,
    RetryBudgetPolicy,
    RetryPolicy,
    Route,
    Supervisor,
    load_config,
    open_supervisor,
)
from relayrace.actors import OpenAIClient
from relayrace.observe import AccessLog, Metrics
from relayrace.state import Deployment, RedisState, StateConfig
from relayrace.testing import MockProvider, serve_mock_provider

from .redis_server import RedisServer, running_redis

# See test_state_redis.py: coredis 6.9 leaves streams unclosed when a connect fails.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <function MemoryObject:pytest.PytestUnraisableExceptionWarning"
)

DOWN = "unavailable,tag=down"  # 503 to everything
UP = "ok,tag=backup"
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    yield from running_redis(tmp_path)


def state_config(server: RedisServer, prefix: str) -> StateConfig:
    return StateConfig(
        backend="redis",
        url=server.url,
        prefix=prefix,
        operation_timeout=0.2,
        connect_timeout=0.5,
        sync_interval=0.3,
        backoff_min=0.05,
        backoff_max=0.3,
    )


def make_config(
    mock: MockProvider,
    state: StateConfig,
    *,
    primary: str = DOWN,
    threshold: int = 2,
    attempts: int = 1,
    budget: RetryBudgetPolicy | None = None,
) -> Config:
    return Config(
        providers=[
            ProviderConfig(
                name=name,
                client=OpenAIClient(base_url=f"{mock.base_url}/v1", max_connections=8),
                model=model,
            )
            for name, model in (("primary", primary), ("backup", UP))
        ],
        routes=[Route(model="chat", chain=["primary", "backup"])],
        policies=Policies(
            retry=RetryPolicy(max_attempts=attempts, backoff_base=0.001, backoff_cap=0.002),
            health=HealthPolicy(failure_threshold=threshold, cooldown_base=30.0),
            retry_budget=budget or RetryBudgetPolicy(),
        ),
        state=state,
    )


@asynccontextmanager
async def instance(config: Config, observers: tuple[object, ...] = ()) -> AsyncIterator[Supervisor]:
    async with open_supervisor(config, observers=observers) as sup:
        state = sup.shared_state
        assert isinstance(state, RedisState)
        with trio.fail_after(5):
            await state.wait_connected()
        yield sup


@asynccontextmanager
async def two_instances(
    server: RedisServer, **kwargs: object
) -> AsyncIterator[tuple[Supervisor, MockProvider, Supervisor, MockProvider]]:
    state = state_config(server, f"t{uuid.uuid4().hex[:8]}")
    async with serve_mock_provider() as mock_a, serve_mock_provider() as mock_b:
        async with (
            instance(make_config(mock_a, state, **kwargs)) as a,  # type: ignore[arg-type]
            instance(make_config(mock_b, state, **kwargs)) as b,  # type: ignore[arg-type]
        ):
            yield a, mock_a, b, mock_b


async def eventually(condition: Callable[[], bool], within: float = 5.0) -> None:
    with trio.fail_after(within):
        for _ in itertools.count():
            if condition():
                return
            await trio.sleep(0.005)


def sent(mock: MockProvider, model: str) -> int:
    return sum(1 for a in mock.log if a.model == model)


def benched(sup: Supervisor, model: str = DOWN) -> bool:
    state = sup.shared_state
    assert state is not None
    return state.mirror.bench(Deployment("primary", model), time.time()) is not None


async def ask(sup: Supervisor, n: int) -> list[str]:
    return [(await sup.complete(Request("chat", MESSAGES))).provider for _ in range(n)]


async def test_the_state_section_is_read_and_local_is_the_default() -> None:
    base = {"providers": [{"name": "p", "kind": "scripted"}]}
    assert load_config(base).state == StateConfig()
    config = load_config({**base, "state": {"backend": "redis", "url": "redis://h:1/0"}})
    assert config.state.backend == "redis" and config.state.url == "redis://h:1/0"


async def test_local_state_shares_nothing() -> None:
    async with serve_mock_provider() as mock:
        async with open_supervisor(make_config(mock, StateConfig())) as sup:
            assert sup.shared_state is None
            assert await ask(sup, 3) == ["backup"] * 3


async def test_a_provider_failing_for_one_instance_is_benched_for_the_other(
    redis_server: RedisServer,
) -> None:
    async with two_instances(redis_server) as (a, mock_a, b, mock_b):
        assert await ask(a, 2) == ["backup", "backup"]  # two 503s: benched (threshold 2)
        assert sent(mock_a, DOWN) == 2
        await eventually(lambda: benched(b))
        assert await ask(b, 5) == ["backup"] * 5
        assert sent(mock_b, DOWN) == 0  # B never asked the provider A found down


async def test_failure_counts_are_the_fleets(redis_server: RedisServer) -> None:
    async with two_instances(redis_server, threshold=4) as (a, mock_a, b, mock_b):
        await ask(a, 2)
        assert not benched(a)
        state_b = b.shared_state
        assert state_b is not None
        await eventually(lambda: state_b.mirror.failure_count(Deployment("primary", DOWN)) == 2)
        await ask(b, 2)  # the fleet's 3rd and 4th failures: benched, not after 4 more on B
        await eventually(lambda: benched(a) and benched(b))
        assert sent(mock_a, DOWN) + sent(mock_b, DOWN) == 4
        await ask(a, 3)
        assert sent(mock_a, DOWN) == 2


async def test_a_manual_bench_and_unbench_reach_every_instance(redis_server: RedisServer) -> None:
    async with two_instances(redis_server, primary=UP) as (a, mock_a, b, mock_b):
        assert await ask(b, 1) == ["primary"]
        a.bench("primary")  # until unbench, fleet-wide
        await eventually(lambda: benched(b, UP))
        assert await ask(b, 3) == ["backup"] * 3
        a.unbench("primary")
        await eventually(lambda: not benched(b, UP))
        assert await ask(b, 1) == ["primary"]
        # This instance only: the other never hears of it.
        a.bench("primary", fleet=False)
        assert await ask(a, 1) == ["backup"]
        await trio.sleep(0.3)
        assert not benched(b, UP)
        assert await ask(b, 1) == ["primary"]


async def test_the_retry_budget_holds_across_instances(redis_server: RedisServer) -> None:
    budget = RetryBudgetPolicy(ratio=0.1, floor=2, window=30.0)
    # A long threshold: the outage keeps costing retries (no bench ends them).
    kwargs = {"attempts": 4, "threshold": 1000, "budget": budget}
    async with two_instances(redis_server, **kwargs) as (a, mock_a, b, mock_b):
        n = 20
        async with trio.open_nursery() as nursery:
            for sup in (a, b):
                nursery.start_soon(ask, sup, n)
        first_attempts = 2 * n  # each request's first attempt on the primary
        retries = sent(mock_a, DOWN) + sent(mock_b, DOWN) - first_attempts
        assert retries <= 0.1 * (2 * n) + 2
        assert retries >= 1


def metric(text: str, name: str) -> str:
    """The value of the unlabelled sample ``name`` in a metrics page."""
    (value,) = [line.split()[1] for line in text.splitlines() if line.startswith(name + " ")]
    return value


async def test_redis_away_is_an_event_and_a_metric_and_no_request_fails(
    redis_server: RedisServer,
) -> None:
    metrics = Metrics()
    state = state_config(redis_server, f"t{uuid.uuid4().hex[:8]}")
    async with serve_mock_provider() as mock:
        async with instance(make_config(mock, state), observers=(metrics,)) as sup:
            async with sup.subscribe() as events:
                redis_server.kill()
                assert await ask(sup, 3) == ["backup"] * 3  # benched on local state
                with trio.fail_after(5):
                    event = await events.receive()
                    while event.kind is not EventKind.STATE_DEGRADED:
                        event = await events.receive()
                assert event.detail and "redis://" not in event.detail
                assert b"relayrace_state_degraded 1.0" in metrics.render()
                assert b"relayrace_state_connected 0.0" in metrics.render()
                redis_server.start()
                with trio.fail_after(10):
                    while event.kind is not EventKind.STATE_RESTORED:
                        event = await events.receive()
                assert b"relayrace_state_degraded 0.0" in metrics.render()
                # The bench made while Redis was away is published again.
                await eventually(
                    lambda: redis_server.command("HLEN", f"{{{state.prefix}}}:bench") == b":1\r\n"
                )
                text = metrics.render().decode()
                assert "relayrace_state_connected 1.0" in text
                assert "relayrace_state_instances 1.0" in text
                assert float(metric(text, "relayrace_state_reconnects_total")) >= 1
                assert metric(text, "relayrace_state_writes_dropped_total") == "0.0"


async def test_only_the_probe_lease_holder_probes(redis_server: RedisServer) -> None:
    state = state_config(redis_server, f"t{uuid.uuid4().hex[:8]}")
    health = HealthPolicy(failure_threshold=1, cooldown_base=0.5, probe_interval=5.0)

    def config(mock: MockProvider) -> Config:
        client = OpenAIClient(base_url=f"{mock.base_url}/v1", max_connections=8, probe="completion")
        return Config(
            providers=[
                ProviderConfig(name="primary", client=client, model=DOWN),
                ProviderConfig(
                    name="backup", client=OpenAIClient(base_url=f"{mock.base_url}/v1"), model=UP
                ),
            ],
            routes=[Route(model="chat", chain=["primary", "backup"])],
            policies=Policies(retry=RetryPolicy(max_attempts=1), health=health),
            state=state,
        )

    async with serve_mock_provider() as mock_a, serve_mock_provider() as mock_b:
        async with instance(config(mock_a)) as a, instance(config(mock_b)) as b:
            # Both fail at once: each benches the primary on its own failure.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask, a, 1)
                nursery.start_soon(ask, b, 1)
            assert sent(mock_a, DOWN) == 1 and sent(mock_b, DOWN) == 1
            # The bench ends after 0.5 s; the probe (a 503) benches for 1 s more. Only one of
            # the two instances sent it.
            await trio.sleep(1.2)
            assert sent(mock_a, DOWN) + sent(mock_b, DOWN) == 3
            assert benched(a) and benched(b)


async def test_a_bench_from_another_instance_is_an_event_a_metric_and_a_log_line(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    state = state_config(redis_server, f"t{uuid.uuid4().hex[:8]}")
    async with serve_mock_provider() as mock_a, serve_mock_provider() as mock_b:
        async with (
            instance(make_config(mock_a, state, primary=UP)) as a,  # type: ignore[arg-type]
            instance(
                make_config(mock_b, state, primary=UP),  # type: ignore[arg-type]
                observers=(metrics, AccessLog()),
            ) as b,
            b.subscribe() as events,
        ):
            seen: list[object] = []
            async with a.subscribe() as own:
                a.bench("primary")
                with trio.fail_after(5):
                    event = await events.receive()
                    while event.kind is not EventKind.FLEET_BENCHED:
                        event = await events.receive()
                assert (event.actor, event.detail) == ("primary", "manual")
                a.unbench("primary")
                with trio.fail_after(5):
                    while event.kind is not EventKind.FLEET_UNBENCHED:
                        event = await events.receive()
                assert event.actor == "primary"
                await trio.sleep(0.2)  # its own publishes come back to a: no fleet event there
                while True:
                    try:
                        seen.append(own.receive_nowait().kind)
                    except trio.WouldBlock:
                        break
            assert EventKind.FLEET_BENCHED not in seen and EventKind.FLEET_UNBENCHED not in seen
            text = metrics.render().decode()
            assert 'relayrace_provider_health_events_total{kind="fleet_benched",provider="primary"} 1.0' in text
            assert 'relayrace_provider_health_events_total{kind="fleet_unbenched",provider="primary"} 1.0' in text
    lines = [r.getMessage() for r in caplog.records if r.name == "relayrace.health"]
    assert any(line.startswith("provider primary fleet benched") for line in lines), lines
