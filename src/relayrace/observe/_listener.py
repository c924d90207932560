"""``serve_metrics``: a tiny HTTP/1.1 listener (h11 over trio) that answers ``GET /metrics``
with a ``Metrics``' registry in the Prometheus text format, and 404 to anything else.

Unauthenticated, as Prometheus scrapes usually are: bind it to loopback (the default) or to a
network only the scraper reaches. Bounded: a request's head may not pass ``MAX_HEAD`` bytes,
its body is not read past ``MAX_BODY``, a request must arrive within ``READ_TIMEOUT`` seconds
and a connection serves at most ``MAX_REQUESTS`` requests.
"""

from __future__ import annotations

from typing import NoReturn

import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST

from ._metrics import Metrics

MAX_HEAD = 16 * 1024
MAX_BODY = 64 * 1024
READ_TIMEOUT = 10.0
MAX_REQUESTS = 100
_RECEIVE = 16 * 1024


async def serve_metrics(
    metrics: Metrics,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve ``metrics`` on ``http://host:port/metrics`` until cancelled::

        bound_port = await nursery.start(serve_metrics, metrics, "127.0.0.1", 9464)

    Reports the bound port to ``nursery.start`` once listening (``port=0`` picks a free one).

    Raises:
        OSError: the address cannot be bound.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    try:
        bound = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:

            async def handle(stream: trio.SocketStream) -> None:
                await _serve_connection(metrics, stream)

            await nursery.start(trio.serve_listeners, handle, listeners)
            task_status.started(bound)
            await trio.sleep_forever()
    finally:
        for listener in listeners:
            await trio.aclose_forcefully(listener)


async def _serve_connection(metrics: Metrics, stream: trio.SocketStream) -> None:
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    try:
        for _ in range(MAX_REQUESTS):
            try:
                with trio.move_on_after(READ_TIMEOUT) as scope:
                    request = await _read_request(connection, stream)
            except _Malformed:
                await _respond(connection, stream, 400, b"bad request\n", close=True)
                return
            if scope.cancelled_caught or request is None:
                return
            method, target = request
            if target.split(b"?", 1)[0] != b"/metrics":
                await _respond(connection, stream, 404, b"not found\n")
            elif method not in (b"GET", b"HEAD"):
                await _respond(connection, stream, 405, b"method not allowed\n")
            else:
                body = metrics.render()
                await _respond(
                    connection,
                    stream,
                    200,
                    b"" if method == b"HEAD" else body,
                    content_type=CONTENT_TYPE_LATEST.encode(),
                    length=len(body),
                )
            if connection.our_state is not h11.DONE or connection.their_state is not h11.DONE:
                return
            connection.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


class _Malformed(Exception):
    """A request h11 cannot read, or one too big."""


async def _read_request(
    connection: h11.Connection, stream: trio.SocketStream
) -> tuple[bytes, bytes] | None:
    """The next request's method and target (its body read and dropped); ``None`` when the
    client closed the connection.

    Raises:
        _Malformed: the request is malformed or too big.
    """
    head: tuple[bytes, bytes] | None = None
    body = 0
    while True:
        try:
            event = connection.next_event()
        except h11.RemoteProtocolError:
            raise _Malformed from None
        if event is h11.NEED_DATA:
            data = await stream.receive_some(_RECEIVE)
            if not data and head is None:
                return None
            connection.receive_data(data)
        elif isinstance(event, h11.Request):
            head = (event.method, event.target)
        elif isinstance(event, h11.Data):
            body += len(event.data)
            if body > MAX_BODY:
                raise _Malformed
        elif isinstance(event, h11.EndOfMessage):
            return head
        else:  # ConnectionClosed, or anything unexpected
            return None


async def _respond(
    connection: h11.Connection,
    stream: trio.SocketStream,
    status: int,
    body: bytes,
    *,
    content_type: bytes = b"text/plain; charset=utf-8",
    length: int | None = None,
    close: bool = False,
) -> None:
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body) if length is None else length).encode()),
    ]
    if close:
        headers.append((b"connection", b"close"))
    out = connection.send(h11.Response(status_code=status, headers=headers))
    if body:
        out += connection.send(h11.Data(data=body))
    out += connection.send(h11.EndOfMessage())
    await stream.send_all(out)
