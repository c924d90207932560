"""The ASGI plumbing the HTTP routes share: the writer of a streamed body and the hook that
cancels a request when its client disconnects."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ._common import Stop, Ticket
from ._h11 import ON_DISCONNECT

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

class Body:
    """The content chunks of one streamed response, each handed to ``send`` as it comes.

    No writer task per request: the HTTP server's connection has one (``_h11``), which takes
    every piece handed over while it was writing in its next write, so deltas that arrive
    together still cost one syscall. Measured (``benchmarks/gateway_http_cpu.py``, see
    ``benchmarks/README.md``): a task and a queue per request cost more than they saved.
    """

    __slots__ = ("_send",)

    def __init__(self, send: Send):
        self._send = send

    async def put(self, data: bytes) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": True})

    async def end(self, data: bytes) -> None:
        """The last bytes of the body: the response is complete."""
        await self._send({"type": "http.response.body", "body": data, "more_body": False})


class CancelOnDisconnect:
    """``with CancelOnDisconnect(scope, ticket):`` a client that goes away meanwhile cancels
    ``ticket`` (its request's upstream call) with ``Stop.CLIENT_GONE``.

    No task per request: the HTTP server's connection reader notices the disconnect and calls
    the hook offered in ``scope[ON_DISCONNECT]`` (``_h11``). A task spawned and cancelled per
    request to wait on ``receive`` for ``http.disconnect`` cost more (``benchmarks/README.md``),
    so the routes need the server's hook: they are served by ``_h11.HTTPServer`` only.
    """

    __slots__ = ("_hook", "_ticket")

    def __init__(self, scope: MutableMapping[str, Any], ticket: Ticket):
        self._hook: Callable[[Callable[[], None] | None], None] = scope[ON_DISCONNECT]
        self._ticket = ticket

    def __enter__(self) -> None:
        self._hook(self._gone)

    def __exit__(self, *exc_info: object) -> None:
        self._hook(None)

    def _gone(self) -> None:
        self._ticket.cancel(Stop.CLIENT_GONE)


async def send_whole(
    send: Send,
    status: int,
    data: bytes,
    headers: list[tuple[bytes, bytes]] | tuple[tuple[bytes, bytes], ...] = (),
) -> None:
    """A whole JSON response: ``data`` is the encoded body."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": data, "more_body": False})


async def start_event_stream(send: Send, provider: str) -> None:
    """The head of a server-sent-events answer, sent with its first delta: it names the provider
    that serves it (before it, failover is invisible to the client)."""
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache"),
                (b"x-relayrace-provider", provider.encode()),
            ],
        }
    )


class TrackedSend:
    """A ``send`` that remembers whether the response has begun (its head is out): a fault after
    that is answered with an error event in the body, before it with a whole error response."""

    __slots__ = ("_send", "started")

    def __init__(self, send: Send):
        self._send = send
        self.started = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)
