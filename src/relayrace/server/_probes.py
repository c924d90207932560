"""``GET /livez`` and ``GET /readyz``: the load balancer's probes, answered without a token.

``/livez`` says the process serves HTTP (always 200). ``/readyz`` says whether a request would
find a provider: 200 when at least one route has a provider that is neither benched nor gave up
and the server takes requests; 503 with the reason otherwise (every provider benched, draining,
shutting down). Neither names a provider: they are unauthenticated. ``/healthz`` keeps the
detailed, authenticated answer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import attrs

from .. import Supervisor
from ._common import Gate, dumps

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

async def send_json(
    send: Send, status: int, body: Any, headers: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    """One whole JSON response."""
    data = dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                (b"cache-control", b"no-store"),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": data, "more_body": False})


def not_ready(sup: Supervisor, gate: Gate) -> str | None:
    """Why a request would find no provider now, or ``None`` when it would (pure but for the
    reads)."""
    if gate.closed:
        return "draining: new requests are refused"
    health = sup.health()
    for route in sup.routes.values():
        for name in route.chain:
            snapshot = health.get(name)
            if snapshot is not None and snapshot.serving:
                return None
    return f"every provider of every route is benched or gave up ({len(health)} providers)"


@attrs.define(eq=False)
class Probes:
    """The two probe handlers of one ``serve`` (ASGI-shaped: ``scope, receive, send``)."""

    sup: Supervisor
    gate: Gate

    async def livez(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_json(send, 200, {"status": "alive"})

    async def readyz(self, scope: Scope, receive: Receive, send: Send) -> None:
        reason = not_ready(self.sup, self.gate)
        if reason is None:
            await send_json(send, 200, {"status": "ready"})
        else:
            await send_json(send, 503, {"status": "unavailable", "reason": reason})
