"""Issue #16 item 5: the workers of ``relayrace serve --workers 2`` share state through one real
``redis-server`` as separate instances do: a provider failing in one worker is benched for the
other without that one sending it a request, and a manual bench through one worker's admin API
is honoured by the other. Real processes, real clock; each client is pinned to one worker (a
keep-alive connection; every answer's ``x-relayrace-worker`` header is checked)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from relayrace.testing import MockProvider, serve_mock_provider

from .redis_server import RedisServer, running_redis

ADMIN_TOKEN = "workers-shared-admin-token"
FLAKY = "unavailable,tag=flaky"
MANUAL = "ok,tag=manual"

CONFIG = """
[server]
http_port = 0
ws_port = 0
shutdown_grace = 2.0
keep_alive_timeout = 120.0
admin_tokens_env = ["RR_WORKERS_ADMIN"]

[state]
backend = "redis"
url = {redis}
prefix = "workers"
operation_timeout = 0.2
connect_timeout = 0.5
sync_interval = 0.3

[[providers]]
name = "flaky"
kind = "mock"
base_url = {mock}
model = "{flaky}"

[[providers]]
name = "manual"
kind = "mock"
base_url = {mock}
model = "{manual}"

[[providers]]
name = "backup"
kind = "mock"
base_url = {mock}
model = "ok,tag=backup"

[[routes]]
model = "down"
chain = ["flaky", "backup"]

[[routes]]
model = "bench"
chain = ["manual", "backup"]

[policies.retry]
max_attempts = 4
backoff_base = 0.001
backoff_cap = 0.002

[policies.health]
failure_threshold = 2
cooldown_base = 60.0
"""


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    yield from running_redis(tmp_path)


def _start(config: Path, log: Path) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "relayrace._cli", "serve", "-c", str(config)]
    with log.open("w") as stderr:
        return subprocess.Popen(
            [*command, "--workers", "2", "--log-level", "WARNING"],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=os.environ | {"RR_WORKERS_ADMIN": ADMIN_TOKEN},
        )


@asynccontextmanager
async def two_workers(
    tmp_path: Path, redis: RedisServer
) -> AsyncIterator[tuple[str, MockProvider]]:
    """``serve --workers 2`` on one mock provider and ``redis``: its HTTP URL and the mock."""
    async with serve_mock_provider() as mock:
        config = tmp_path / "relayrace.toml"
        config.write_text(
            CONFIG.format(
                redis=json.dumps(redis.url),
                mock=json.dumps(mock.base_url + "/v1"),
                flaky=FLAKY,
                manual=MANUAL,
            )
        )
        process = _start(config, tmp_path / "serve.log")
        try:
            assert process.stdout is not None
            with trio.fail_after(60):
                while True:
                    line = await trio.to_thread.run_sync(process.stdout.readline)
                    assert line, "serve --workers exited before listening"
                    if line.startswith("relayrace: http on "):
                        break
            yield line.split()[3], mock
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            assert process.stdout is not None
            process.stdout.close()


class Pinned:
    """An HTTP client on one keep-alive connection (kept idle up to 300 s by both ends), so
    one worker: ``pid``."""

    def __init__(self, http: httpx.AsyncClient, pid: str):
        self.http, self.pid = http, pid

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = await self.http.request(method, path, **kwargs)
        assert response.headers["x-relayrace-worker"] == self.pid, "the connection moved"
        return response

    async def chat(self, route: str) -> int:
        body = {"model": route, "messages": [{"role": "user", "content": "hi"}]}
        return (await self.request("POST", "/v1/chat/completions", json=body)).status_code

    async def admin(self, method: str, path: str) -> Any:
        headers = {"authorization": f"Bearer {ADMIN_TOKEN}"}
        response = await self.request(method, f"/admin/{path}", headers=headers)
        assert response.status_code == 200, response.text
        return response.json()

    async def fleet_benches(self, provider: str) -> dict[str, Any]:
        providers = (await self.admin("GET", "providers"))["providers"]
        found: dict[str, Any] = next(p for p in providers if p["name"] == provider)["fleet_benches"]
        return found or {}


async def pin(stack: AsyncExitStack, url: str, other_than: str | None = None) -> Pinned:
    """A client pinned to a worker (other than the one ``other_than`` names)."""
    for _ in range(200):
        limits = httpx.Limits(max_connections=1, keepalive_expiry=300.0)
        http = httpx.AsyncClient(base_url=url, limits=limits, timeout=30)
        response = await http.get("/healthz")
        pid = response.headers["x-relayrace-worker"]
        if pid != other_than:
            stack.push_async_callback(http.aclose)
            return Pinned(http, pid)
        await http.aclose()
    raise AssertionError("no second worker answered")


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    with trio.fail_after(within):
        for _ in itertools.count():
            if await check():
                return
            await trio.sleep(0.02)


def sent(mock: MockProvider, model: str) -> int:
    return sum(1 for a in mock.log if a.model == model)


async def test_two_workers_share_benches_through_redis(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async with two_workers(tmp_path, redis_server) as (url, mock), AsyncExitStack() as stack:
        a = await pin(stack, url)
        b = await pin(stack, url, other_than=a.pid)
        # A provider failing in worker A (two 503s: the threshold) is benched for worker B ...
        for _ in range(2):
            assert await a.chat("down") == 200
        assert sent(mock, FLAKY) >= 2

        async def b_knows_flaky() -> bool:
            return FLAKY in await b.fleet_benches("flaky")

        await eventually(b_knows_flaky)
        # ... without B sending it a request (A sends nothing meanwhile).
        before = sent(mock, FLAKY)
        for _ in range(5):
            assert await b.chat("down") == 200
        assert sent(mock, FLAKY) == before

        # A manual bench through A's admin API is honoured by B, and lifted by A's unbench.
        assert (await a.admin("POST", "providers/manual/bench"))["scope"] == "fleet"

        async def b_knows_manual() -> bool:
            return "" in await b.fleet_benches("manual")

        await eventually(b_knows_manual)
        before = sent(mock, MANUAL)
        for _ in range(3):
            assert await b.chat("bench") == 200
        assert sent(mock, MANUAL) == before
        assert (await a.admin("POST", "providers/manual/unbench"))["scope"] == "fleet"

        async def b_forgot_manual() -> bool:
            return not await b.fleet_benches("manual")

        await eventually(b_forgot_manual)
        assert await b.chat("bench") == 200
        assert sent(mock, MANUAL) == before + 1
