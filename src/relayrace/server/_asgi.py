"""The ASGI plumbing the HTTP routes share: the writer of a streamed body and the watch that
cancels a request when its client disconnects."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ._common import Stop, Ticket

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

class Body:
    """The content chunks of one streamed response, each written as it comes, from the request's
    own task.

    No writer task of its own: measured (``benchmarks/gateway_http_cpu.py``, see
    ``benchmarks/README.md``), a task and a queue per request, to batch chunks that became
    ready during a write, cost more than the writes they saved, at c=1 and at c=32 alike.
    Backpressure is the socket's: a slow client makes ``put`` wait, and the deltas wait in the
    supervisor's bounded stream.
    """

    __slots__ = ("_send",)

    def __init__(self, send: Send):
        self._send = send

    async def put(self, data: bytes) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": True})

    async def end(self, data: bytes) -> None:
        """The last bytes of the body: the response is complete."""
        await self._send({"type": "http.response.body", "body": data, "more_body": False})


async def watch_disconnect(receive: Receive, ticket: Ticket) -> None:
    """Cancel the request (and its upstream call) as soon as the client disconnects."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            ticket.cancel(Stop.CLIENT_GONE)
            return


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
