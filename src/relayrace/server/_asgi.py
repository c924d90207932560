"""The ASGI plumbing the HTTP routes share: the writer of a streamed body (chunks ready together go
out in one body message) and the watch that cancels a request when its client disconnects."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import trio

from ._batch import Batcher
from ._common import Stop, Ticket

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: Chunks of a streamed body that may wait for the writer before the request waits too.
QUEUE = 16


class Body:
    """The content chunks of one streamed response, written by a task of their own.

    Chunks that became ready while a write was in progress go out together in one body message
    (the server's cost is per message, not per byte): when the deltas come faster than they can
    be written, the writes get bigger instead of falling behind. At most ``QUEUE`` chunks wait.
    """

    __slots__ = ("_send", "_queue", "_done", "_running")

    def __init__(self, send: Send):
        self._send = send
        self._queue = Batcher[bytes](QUEUE, most=1 << 30)
        self._done = trio.Event()
        self._running = False

    async def put(self, data: bytes) -> None:
        await self._queue.put(data)

    def start(self, nursery: trio.Nursery) -> None:
        self._running = True
        nursery.start_soon(self._run)

    async def _run(self) -> None:
        send = self._send

        async def write(chunks: list[bytes]) -> None:
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            await send({"type": "http.response.body", "body": data, "more_body": True})

        try:
            await self._queue.run(write)
        finally:
            self._done.set()

    async def close(self) -> None:
        """Wait until every chunk handed over is written (the writer then ends)."""
        self._queue.close()
        if self._running:
            await self._done.wait()


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
