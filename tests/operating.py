"""What the operating tests share: ``relayrace serve``'s ``run_gateway`` in this process, on a
config file, in front of a real mock provider, with httpx clients for the API and the admin API.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from relayrace import read_gateway
from relayrace._cli import Running, run_gateway

TOKEN = "api-s3cret-token-1"
ADMIN_TOKEN = "admin-s3cret-token-2"
API_KEY = "sk-upstream-s3cret-3"
SECRETS = (TOKEN, ADMIN_TOKEN, API_KEY)
ENV = {"RR_TOKEN": TOKEN, "RR_ADMIN_TOKEN": ADMIN_TOKEN, "RR_KEY": API_KEY}
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}

SERVER = """
[server]
http_port = 0
ws_port = 0
metrics_port = 0
tokens_env = ["RR_TOKEN"]
{admin}
shutdown_grace = 5
"""

PROVIDER = """
[[providers]]
name = "{name}"
kind = "mock"
base_url = "{base}/v1"
api_key_env = "RR_KEY"
model = "{model}"
{extra}
"""

ROUTE = """
[[routes]]
model = "chat"
chain = [{chain}]

[policies.retry]
max_attempts = 1
"""


def gateway_file(
    base: str,
    providers: dict[str, str],
    *,
    admin: bool = True,
    extra: dict[str, str] | None = None,
) -> str:
    """A gateway config: ``providers`` (name → mock model scenario) in one route ``chat``."""
    admin_line = 'admin_tokens_env = ["RR_ADMIN_TOKEN"]' if admin else ""
    text = SERVER.format(admin=admin_line)
    for name, model in providers.items():
        text += PROVIDER.format(name=name, base=base, model=model, extra=(extra or {}).get(name, ""))
    return text + ROUTE.format(chain=", ".join(f'"{n}"' for n in providers))


@attrs.frozen
class Gateway:
    running: Running
    api: httpx.AsyncClient
    admin: httpx.AsyncClient
    anonymous: httpx.AsyncClient
    path: Path


@asynccontextmanager
async def gateway(
    path: Path, text: str, overrides: dict[str, Any] | None = None
) -> AsyncIterator[Gateway]:
    """``run_gateway`` on ``text`` written to ``path`` (its ``config_path``, for reloads).
    The environment must hold ``ENV`` (monkeypatch it)."""
    await trio.Path(path).write_text(text)
    config = read_gateway(path)
    async with trio.open_nursery() as nursery:
        running: Running = await nursery.start(
            lambda task_status: run_gateway(
                config, config_path=str(path), overrides=overrides, task_status=task_status
            )
        )
        url = running.server.http_url
        assert url is not None
        clients: list[Any] = [
            httpx.AsyncClient(base_url=url, timeout=30, headers={"authorization": f"Bearer {t}"})
            for t in (TOKEN, ADMIN_TOKEN)
        ]
        clients.append(httpx.AsyncClient(base_url=url, timeout=30))
        try:
            yield Gateway(running, *clients, path=path)
        finally:
            for client in clients:
                await client.aclose()
            nursery.cancel_scope.cancel()
