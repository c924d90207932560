"""Issue #16's "Done means": two ``relayrace serve`` processes and one real ``redis-server``.

A provider failing for process A is benched for B without B sending it a request; a manual
bench through A's admin API is honoured by B; the retry budget holds across both during an
outage; Redis SIGKILLed mid-run costs no request and the state re-converges after its restart;
a paused Redis (SIGSTOP) makes no request slower than its budget.

Each process talks to its own mock provider, so that the mock's log says who sent what.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from relayrace.testing import MockProvider, serve_mock_provider

from .redis_server import RedisServer, running_redis
from .reliability import GatewayProcess, run_gateway_process

pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <function MemoryObject:pytest.PytestUnraisableExceptionWarning"
)

ADMIN_TOKEN = "shared-serve-admin-token"
FLAKY = "unavailable,tag=flaky"
OUTAGE = "unavailable,tag=outage"
MANUAL = "ok,tag=manual"
RATIO, FLOOR = 0.1, 3

CONFIG = """
[server]
http_port = 0
ws_port = 0
admin_tokens_env = ["RR_SHARED_ADMIN"]

[state]
backend = "redis"
url = "{redis}"
prefix = "serve"
operation_timeout = 0.2
connect_timeout = 0.5
sync_interval = 0.3
backoff_min = 0.05
backoff_max = 0.3

[[providers]]
name = "flaky"
kind = "mock"
base_url = "{mock}/v1"
model = "{flaky}"

[[providers]]
name = "manual"
kind = "mock"
base_url = "{mock}/v1"
model = "{manual}"

[[providers]]
name = "outage"
kind = "mock"
base_url = "{mock}/v1"
model = "{outage}"
exempt = true

[[providers]]
name = "backup"
kind = "mock"
base_url = "{mock}/v1"
model = "ok,tag=backup"

[[routes]]
model = "down"
chain = ["flaky", "backup"]

[[routes]]
model = "bench"
chain = ["manual", "backup"]

[[routes]]
model = "outage"
chain = ["outage", "backup"]

[policies.retry]
max_attempts = 4
backoff_base = 0.001
backoff_cap = 0.002

[policies.health]
failure_threshold = 2
cooldown_base = 60.0

[policies.retry_budget]
ratio = {ratio}
floor = {floor}
window = 120.0
"""


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    yield from running_redis(tmp_path)


@asynccontextmanager
async def gateway(
    tmp_path: Path, name: str, redis: RedisServer, mock: MockProvider
) -> AsyncIterator[tuple[GatewayProcess, httpx.AsyncClient]]:
    path = tmp_path / f"{name}.toml"
    path.write_text(
        CONFIG.format(
            redis=redis.url,
            mock=mock.base_url,
            flaky=FLAKY,
            manual=MANUAL,
            outage=OUTAGE,
            ratio=RATIO,
            floor=FLOOR,
        )
    )
    async with run_gateway_process(str(path)) as process:
        base = process.http_url.removesuffix("/").removesuffix("/v1")
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            yield process, http


@asynccontextmanager
async def two_gateways(
    tmp_path: Path, redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[httpx.AsyncClient, MockProvider, httpx.AsyncClient, MockProvider]]:
    monkeypatch.setenv("RR_SHARED_ADMIN", ADMIN_TOKEN)
    async with AsyncExitStack() as stack:
        mock_a = await stack.enter_async_context(serve_mock_provider())
        mock_b = await stack.enter_async_context(serve_mock_provider())
        # Started one after the other: two interpreters importing at once on a busy machine
        # would only make both slower.
        _, a = await stack.enter_async_context(gateway(tmp_path, "a", redis, mock_a))
        _, b = await stack.enter_async_context(gateway(tmp_path, "b", redis, mock_b))
        yield a, mock_a, b, mock_b


async def chat(http: httpx.AsyncClient, route: str) -> tuple[int, float]:
    """One chat completion: its status and how long it took (seconds)."""
    start = time.perf_counter()
    response = await http.post(
        "/v1/chat/completions",
        json={"model": route, "messages": [{"role": "user", "content": "hi"}]},
    )
    return response.status_code, time.perf_counter() - start


async def admin(http: httpx.AsyncClient, method: str, path: str) -> Any:
    response = await http.request(
        method, f"/admin/{path}", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    assert response.status_code == 200, response.text
    return response.json()


async def fleet_benches(http: httpx.AsyncClient, provider: str) -> dict[str, Any]:
    providers = (await admin(http, "GET", "providers"))["providers"]
    found: dict[str, Any] = next(p for p in providers if p["name"] == provider)["fleet_benches"]
    return found


async def eventually(check: Callable[[], Any], within: float = 10.0) -> None:
    with trio.fail_after(within):
        for _ in itertools.count():
            if await check():
                return
            await trio.sleep(0.02)


def sent(mock: MockProvider, model: str) -> int:
    return sum(1 for a in mock.log if a.model == model)


async def test_two_processes_share_benches_and_the_retry_budget(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with two_gateways(tmp_path, redis_server, monkeypatch) as (a, mock_a, b, mock_b):
        requests = 0
        # A provider failing for A (two 503s: the threshold) is benched for B ...
        for _ in range(2):
            assert (await chat(a, "down"))[0] == 200
            requests += 1
        assert sent(mock_a, FLAKY) >= 2
        await eventually(lambda: _has(b, "flaky", FLAKY))
        # ... without B sending it a request.
        for _ in range(5):
            assert (await chat(b, "down"))[0] == 200
            requests += 1
        assert sent(mock_b, FLAKY) == 0

        # A manual bench through A's admin API is honoured by B, and lifted by A's unbench.
        answer = await admin(a, "POST", "providers/manual/bench")
        assert answer["scope"] == "fleet"
        await eventually(lambda: _has(b, "manual", ""))
        before = sent(mock_b, MANUAL)
        for _ in range(3):
            assert (await chat(b, "bench"))[0] == 200
            requests += 1
        assert sent(mock_b, MANUAL) == before
        assert (await admin(a, "POST", "providers/manual/unbench"))["scope"] == "fleet"
        await eventually(lambda: _lacks(b, "manual"))
        assert (await chat(b, "bench"))[0] == 200
        requests += 1
        assert sent(mock_b, MANUAL) == before + 1
        # ?scope=instance: this process only.
        answer = await admin(a, "POST", "providers/manual/bench?scope=instance")
        assert answer["scope"] == "instance"
        await trio.sleep(0.3)
        assert await fleet_benches(b, "manual") == {}

        # An outage (an exempt provider answering 503, never benched): both processes retry
        # as fast as they can; their retries together stay within the one shared budget.
        per_process = 30
        async with trio.open_nursery() as nursery:
            for http in (a, b):
                nursery.start_soon(_burst, http, "outage", per_process)
        requests += 2 * per_process
        retries = sent(mock_a, OUTAGE) + sent(mock_b, OUTAGE) - 2 * per_process
        # (the flaky provider's retries before its bench drew on the same budget)
        assert 1 <= retries <= RATIO * requests + FLOOR


async def test_redis_killed_or_paused_costs_no_request(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with two_gateways(tmp_path, redis_server, monkeypatch) as (a, mock_a, b, mock_b):
        # SIGKILL mid-run: every request is still answered.
        statuses = []
        for i in range(10):
            if i == 3:
                redis_server.kill()
            statuses += [(await chat(a, "bench"))[0], (await chat(b, "down"))[0]]
        assert statuses == [200] * 20
        # A bench made while Redis is away reaches B once Redis is back.
        await admin(a, "POST", "providers/manual/bench")
        redis_server.start()
        await eventually(lambda: _has(b, "manual", ""), within=15)
        before = sent(mock_b, MANUAL)
        assert (await chat(b, "bench"))[0] == 200
        assert sent(mock_b, MANUAL) == before
        await admin(a, "POST", "providers/manual/unbench")
        await eventually(lambda: _lacks(b, "manual"))

        # SIGSTOP: Redis accepts and never answers; no request waits for it (each would be
        # answered in a few ms by the mock; 1 s is far below any budget and far above noise).
        redis_server.pause()
        try:
            took = []
            for _ in range(10):
                for http, route in ((a, "bench"), (b, "down"), (a, "outage")):
                    status, seconds = await chat(http, route)
                    assert status == 200
                    took.append(seconds)
            assert max(took) < 1.0, sorted(took)[-3:]
        finally:
            redis_server.resume()


async def _has(http: httpx.AsyncClient, provider: str, model: str) -> bool:
    return model in await fleet_benches(http, provider)


async def _lacks(http: httpx.AsyncClient, provider: str) -> bool:
    return not await fleet_benches(http, provider)


async def _burst(http: httpx.AsyncClient, route: str, n: int) -> None:
    for _ in range(n):
        assert (await chat(http, route))[0] == 200
