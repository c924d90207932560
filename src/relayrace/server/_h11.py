"""An HTTP/1.1 server of our own: h11 over trio streams, serving an ASGI-shaped application.

The application gets what an ASGI server gives it — ``scope`` (``type``, ``http_version``,
``method``, ``path``, ``query_string``, ``headers``, …), ``receive`` (``http.request`` messages,
then ``http.disconnect``) and ``send`` (``http.response.start`` / ``http.response.body``) — so
routes can be written without knowing this module. What the server does on its own:

- keep-alive and pipelining (one request at a time per connection, answered in order; bytes of
  the next request wait in h11's buffer), chunked request bodies, ``Expect: 100-continue`` (sent
  when the application first reads the body);
- a header-size limit (431), request smuggling refused (conflicting ``content-length`` /
  ``transfer-encoding``: h11 refuses them, 400), a read timeout on a request's head and body
  (a slowloris client is cut), an idle keep-alive timeout;
- an idle-connection flood costs little: nothing is built nor read for a connection until it is
  readable (it is one sleeping task, its first request's idle deadline one entry on a timer
  shared by all, ``IdleSockets``), and a socket cap keeps the rest of the process's descriptors
  free (connections past it wait in the kernel's accept queue);
- client disconnect detection without a task per request: the connection's reader (the task
  that reads request heads) watches the socket once the application has read the body, and a
  client that goes away before its response is complete calls the hook the application left in
  ``scope[ON_DISCONNECT]`` (``_asgi.CancelOnDisconnect``: it cancels the request's upstream
  call) and ends ``receive``'s wait with ``http.disconnect``; a pipelined next request is
  buffered, not a disconnect. The application runs in the connection's responder task, one per
  connection, so the reader is free to watch;
- one writer task per connection (``_batch.Batcher``): ``send`` hands the bytes over (at once
  while there is room) and every piece handed over during a write goes out in the next one; a
  streamed body's chunks are framed here once h11 has shown the body is chunked;
- graceful shutdown: ``stop_accepting`` closes the listeners and idle connections (those that
  never sent a byte at once); requests in
  flight finish, their connections close after the response;
- HTTP/2 is not served: a prior-knowledge HTTP/2 connection gets the application's answer to an
  ``http_version`` of ``"2"`` (its 505), written as one HTTP/2 response, and is closed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from http import HTTPStatus
from typing import Any

import h11
import trio

from ._batch import Batcher
from ._h2 import H2_PREFACE, refuse_http2
from ._head import ResponseHeads
from ._stream import IdleSockets, accept_capped

log = logging.getLogger("relayrace.server.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

_READ = 65536
#: A request body the application left unread is drained (to keep the connection) up to this.
_DRAIN_BYTES = 1 << 20
#: The scope key of a request's disconnect hook: ``scope[ON_DISCONNECT](callback)`` has
#: ``callback()`` called (once, at once, from the connection's reader) if the client goes away
#: before the response is complete; ``scope[ON_DISCONNECT](None)`` takes it back.
ON_DISCONNECT = "relayrace.on_disconnect"


class HTTPServer:
    """Serves ``app`` on listeners until ``stop_accepting`` and every connection has ended.

    Args:
        app: the ASGI-shaped application.
        max_header_bytes: the largest request head; a larger one gets 431.
        read_timeout: seconds a request's head (from its first byte) and its body may take to
            arrive; then the connection is closed.
        keep_alive_timeout: seconds an idle connection is kept for its next request (and a new
            one for its first).
        max_sockets: connections open at once; the next one waits in the kernel's accept queue.
        extra_headers: added to every response (``x-relayrace-worker``).
    """

    def __init__(
        self,
        app: App,
        *,
        max_header_bytes: int,
        read_timeout: float,
        keep_alive_timeout: float,
        max_sockets: int,
        extra_headers: Sequence[tuple[bytes, bytes]] = (),
    ):
        self.app = app
        self.max_header_bytes = max_header_bytes
        self.read_timeout = read_timeout
        self.keep_alive_timeout = keep_alive_timeout
        self.heads = ResponseHeads(extra_headers)
        self.stopping = False
        self._listen_scope = trio.CancelScope()
        self._idle: set[trio.CancelScope] = set()
        # New connections that have not sent a byte yet: one timer for all their deadlines.
        self._silent = IdleSockets(keep_alive_timeout)
        self._sockets = trio.Semaphore(max_sockets)

    def stop_accepting(self) -> None:
        """Close the listeners and the idle connections; requests in flight finish."""
        self.stopping = True
        self._listen_scope.cancel()
        for scope in self._idle:
            scope.cancel()
        self._silent.close()

    async def run(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept on ``listeners`` (closed when accepting stops) and serve each connection."""
        async with trio.open_nursery() as connections:
            try:
                with self._listen_scope:
                    async with trio.open_nursery() as accepting:
                        accepting.start_soon(self._silent.run)
                        for listener in listeners:
                            accepting.start_soon(self._accept, listener, connections)
                        task_status.started()
            finally:
                for listener in listeners:
                    with trio.CancelScope(shield=True):
                        await listener.aclose()

    async def _accept(self, listener: trio.SocketListener, connections: trio.Nursery) -> None:
        await accept_capped(listener, self._sockets, connections, self._connection, "HTTP")

    async def _connection(self, stream: trio.SocketStream) -> None:
        try:
            async with stream:
                # Nothing is built nor read until the client sends something (or closes): an
                # idle socket (a flood of them) costs this sleeping task, and its end (its
                # deadline, its close) one close. A receive tried at once would fail with
                # EAGAIN, a costly path in trio.
                _, waiting = self._silent.watch()
                with waiting:
                    await trio.lowlevel.wait_readable(stream.socket)
                if waiting.cancelled_caught:
                    return  # silent until its deadline, or the server is stopping
                first = await stream.receive_some(_READ)
                if first:
                    await _Connection(self, stream).run(first)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away
        except Exception:
            log.exception("HTTP connection failed")
        finally:
            self._sockets.release()


#: Pieces of responses that may wait for the connection's writer before ``send`` waits too.
_OUTBOX = 16


class _Connection:
    """One client connection: its requests, one after another."""

    __slots__ = ("server", "stream", "conn", "client", "outbox", "broken")

    def __init__(self, server: HTTPServer, stream: trio.SocketStream):
        self.server = server
        self.stream = stream
        # Everything the connection writes goes through one writer task (as the websocket's
        # frames): what is handed over while a write is in progress goes out in the next one,
        # so a burst of deltas costs one syscall, and no task is started per request.
        self.outbox = Batcher[bytes](_OUTBOX, most=1 << 30)
        self.broken = False
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=server.max_header_bytes)
        self.client: tuple[str, int] | None
        try:
            self.client = stream.socket.getpeername()[:2]
        except (OSError, ValueError):
            self.client = None

    async def run(self, first: bytes) -> None:
        """Serve the requests that begin with ``first``, the connection's first bytes.

        Three tasks per connection, none per request: this one reads (request heads, then the
        socket while a response is in progress: a disconnect, a pipelined next request), the
        responder runs the application for each request, the writer writes.
        """
        exchanges, queued = trio.open_memory_channel[_Exchange](1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.outbox.run, self._write)
            nursery.start_soon(self._respond, queued)
            with exchanges:
                refused = await self._serve(first, exchanges)
        if refused is not None:
            await self._refuse(refused)

    async def _respond(self, queued: trio.MemoryReceiveChannel[_Exchange]) -> None:
        """Run the application for each request handed over, one after another."""
        try:
            async with queued:
                async for exchange in queued:
                    keep = False
                    try:
                        await exchange.run()
                        keep = await exchange.finish()
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass  # the client went away while a body left unread was drained
                    finally:
                        exchange.end(keep)
        finally:
            # Every response handed over is written before the connection closes.
            self.outbox.close()

    async def _write(self, pieces: list[bytes]) -> None:
        if self.broken:
            return
        try:
            await self.stream.send_all(pieces[0] if len(pieces) == 1 else b"".join(pieces))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.broken = True  # the client went away: the rest goes nowhere

    async def _serve(
        self, first: bytes, exchanges: trio.MemorySendChannel[_Exchange]
    ) -> h11.RemoteProtocolError | None:
        """The requests, one after another; a head to refuse ends them (returned)."""
        server, conn = self.server, self.conn
        while not server.stopping:
            try:
                request = await self._next_request(first)
            except h11.RemoteProtocolError as exc:
                return exc
            first = b""
            if request is None:
                return None
            # h11 limits a head that arrives in pieces; one that came in a single read is
            # measured here.
            size = len(request.target) + sum(len(n) + len(v) + 4 for n, v in request.headers)
            if size > server.max_header_bytes:
                return h11.RemoteProtocolError("head too large", 431)
            names = {name for name, _ in request.headers}
            if b"content-length" in names and b"transfer-encoding" in names:
                # Which one frames the body is where proxies and servers disagree (request
                # smuggling): refused outright, as RFC 9112 allows, and the connection closed.
                return h11.RemoteProtocolError("both framings", 400)
            exchange = _Exchange(self, request)
            exchanges.send_nowait(exchange)  # the responder is waiting for it
            if not await self._watch(exchange):
                return None
            conn.start_next_cycle()
        return None

    async def _watch(self, exchange: _Exchange) -> bool:
        """Wait for ``exchange`` to end; whether the connection goes on.

        Once its body is read, the socket is watched meanwhile: what arrives is a pipelined next
        request (kept in h11's buffer, up to about one head), and its end a client gone, which
        cancels the request (``_Exchange.disconnected``). The wait for readability is the one
        for the next request too: an ended exchange sets its keep-alive deadline (or cancels it).
        """
        await exchange.reading.wait()
        if exchange.ended:
            return exchange.keep
        server, stream, conn = self.server, self.stream, self.conn
        limit = server.max_header_bytes + _READ
        waiting = 0
        watch = exchange.watch
        exchange.watching = True
        # Bytes of a next request that came with this one's: the end goes straight on to it.
        exchange.pipelined = bool(conn.trailing_data[0])
        try:
            with watch:
                while not exchange.ended:
                    if waiting > limit:
                        # A pipelining client sent more than one request head ahead: stop
                        # reading until this answer is out.
                        exchange.done = done = trio.Event()
                        await done.wait()
                        break
                    try:
                        # Readable first (a receive that finds nothing is costly in trio): a
                        # client waiting for its answer sends nothing, so this is where every
                        # request waits.
                        await trio.lowlevel.wait_readable(stream.socket)
                        data = await stream.receive_some(_READ)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        data = b""
                    if not data:
                        exchange.disconnected()
                        return False
                    waiting += len(data)
                    exchange.pipelined = True
                    conn.receive_data(data)  # the next pipelined request, kept for later
        finally:
            exchange.watching = False
            server._idle.discard(watch)
        # Cancelled: closed (not kept), idle too long, or woken for a pipelined next request.
        return exchange.keep and (exchange.pipelined or not watch.cancelled_caught)

    async def _next_request(self, first: bytes) -> h11.Request | None:
        """The next request's head, or ``None``: the client closed, or stayed idle too long.
        ``first``: the connection's first bytes, for its first request (else empty)."""
        server, conn, stream = self.server, self.conn, self.stream
        if first.startswith(H2_PREFACE[:14]):
            await refuse_http2(server.app, stream, first)
            return None
        idle = trio.CancelScope()
        if first:
            # The head has begun: it gets the read timeout, and shutdown waits.
            conn.receive_data(first)
            idle.deadline = trio.current_time() + server.read_timeout
        else:
            idle.deadline = trio.current_time() + server.keep_alive_timeout
            server._idle.add(idle)
        try:
            with idle:
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        # Readable first: the next request of a keep-alive connection is rarely
                        # there yet, and a receive that finds nothing (EAGAIN) is costly in trio.
                        await trio.lowlevel.wait_readable(stream.socket)
                        data = await stream.receive_some(_READ)
                        if data and idle in server._idle:
                            # The head has begun: it gets the read timeout, and shutdown waits.
                            server._idle.discard(idle)
                            idle.deadline = trio.current_time() + server.read_timeout
                        conn.receive_data(data)
                        continue
                    if isinstance(event, h11.Request):
                        return event
                    return None  # ConnectionClosed (or PAUSED after a close)
        finally:
            server._idle.discard(idle)
        return None  # idle for too long, or shutting down

    async def _refuse(self, exc: h11.RemoteProtocolError) -> None:
        """Answer a malformed or oversized request head (400, 431, 501); the caller closes."""
        status = exc.error_status_hint
        reason = HTTPStatus(status).phrase.encode() if status in _STATUSES else b"Error"
        body = reason + b"\n"
        stream = self.stream
        with trio.move_on_after(self.server.read_timeout):
            await stream.send_all(
                b"HTTP/1.1 %d %s\r\ncontent-type: text/plain\r\nconnection: close\r\n"
                b"content-length: %d\r\n\r\n%s" % (status, reason, len(body), body)
            )
            # A lingering close: closing with unread bytes would reset the connection, and the
            # reset can overtake the answer. Say we are done, and read what is left (bounded).
            await stream.send_eof()
            left = _DRAIN_BYTES
            while left > 0 and (data := await stream.receive_some(_READ)):
                left -= len(data)


_STATUSES = frozenset(s.value for s in HTTPStatus)


class _Exchange:
    """One request and its response: the ``receive`` and ``send`` of the application."""

    __slots__ = (
        "connection",
        "request",
        "body_done",
        "deadline",
        "gone",
        "started",
        "complete",
        "head",
        "chunked",
        "reading",
        "ended",
        "keep",
        "watch",
        "watching",
        "pipelined",
        "done",
        "on_gone",
        "disconnect",
    )

    def __init__(self, connection: _Connection, request: h11.Request):
        self.connection = connection
        self.request = request
        self.body_done = False
        self.deadline = math.inf
        self.gone = False
        self.started = False
        self.complete = False
        self.head: bytes | None = None  # the response head, written with the first body bytes
        # Whether h11 frames this response's body in chunks (learnt from its first body bytes):
        # then the next ones are framed here, without an h11 event each.
        self.chunked: bool | None = None
        # The socket is the reader's again (the body is read, or the exchange has ended).
        self.reading = trio.Event()
        self.ended = False
        self.keep = False  # once ended: whether the connection goes on
        # The reader's wait while the response is in progress (``_Connection._watch``).
        self.watch = trio.CancelScope()
        self.watching = False
        self.pipelined = False  # the reader holds bytes of a next request (in h11's buffer)
        self.done: trio.Event | None = None  # made by a reader that waits for the end
        self.on_gone: Callable[[], None] | None = None  # the application's disconnect hook
        self.disconnect: trio.Event | None = None  # made by a ``receive`` after the body

    def on_disconnect(self, callback: Callable[[], None] | None) -> None:
        """``scope[ON_DISCONNECT]``: ``callback`` is called (once, from the reader) when the
        client goes away before the response is complete — at once if it has; ``None``: no
        longer."""
        self.on_gone = callback
        if callback is not None and self.gone and not self.complete:
            self.on_gone = None
            callback()

    def disconnected(self) -> None:
        """The client went away (or can no longer be written to)."""
        if self.gone:
            return
        self.gone = True
        if self.complete:
            return  # the whole answer was handed over: nothing to cancel
        callback, self.on_gone = self.on_gone, None
        if callback is not None:
            callback()
        if self.disconnect is not None:
            self.disconnect.set()

    def end(self, keep: bool) -> None:
        """The responder is done with this exchange; ``keep``: the connection goes on."""
        self.ended = True
        self.keep = keep
        self.on_gone = None
        self.reading.set()
        if self.done is not None:
            self.done.set()
        if self.disconnect is not None:
            self.disconnect.set()
        if self.watching:
            server = self.connection.server
            if keep and not self.pipelined:
                # The reader's wait is now the idle wait for the next request.
                self.watch.deadline = trio.current_time() + server.keep_alive_timeout
                server._idle.add(self.watch)
            else:
                self.watch.cancel()  # close, or go on to the next request, already here

    async def run(self) -> None:
        request = self.request
        target = request.target
        path, _, query = target.partition(b"?")
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": request.http_version.decode(),
            "method": request.method.decode(),
            "scheme": "http",
            "path": path.decode("latin-1"),
            "raw_path": path,
            "query_string": query,
            "root_path": "",
            "headers": list(request.headers),
            "client": self.connection.client,
            "server": None,
            ON_DISCONNECT: self.on_disconnect,
        }
        try:
            await self.connection.server.app(scope, self.receive, self.send)
        except Exception:
            log.exception("HTTP application failed on %s %s", scope["method"], scope["path"])
        if not self.started and not self.gone:
            await self.send({"type": "http.response.start", "status": 500, "headers": []})
            await self.send({"type": "http.response.body", "body": b"", "more_body": False})
        if not self.complete and not self.gone:
            self.gone = True  # a response cut short: the connection closes

    async def finish(self) -> bool:
        """After the response: drain a body left unread; whether the connection goes on."""
        if self.gone or self.connection.server.stopping:
            return False
        conn = self.connection.conn
        if conn.their_state is h11.SEND_BODY:
            if conn.they_are_waiting_for_100_continue:
                return False  # never invited: the body will not come
            drained = 0
            with trio.move_on_after(self.connection.server.read_timeout):
                while drained <= _DRAIN_BYTES:
                    event = await self._next_event()
                    if isinstance(event, h11.Data):
                        drained += len(event.data)
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    else:
                        return False
                else:
                    return False
            if conn.their_state is not h11.DONE:
                return False
        # Not both done: Connection: close, an HTTP/1.0 client, a response cut short.
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE

    async def _next_event(self) -> Any:
        connection = self.connection
        conn, stream = connection.conn, connection.stream
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            conn.receive_data(await stream.receive_some(_READ))

    async def receive(self) -> Message:
        if not self.body_done:
            connection = self.connection
            conn = connection.conn
            if conn.they_are_waiting_for_100_continue:
                await self._write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
            try:
                # What h11 holds already (a small body comes with its head) needs no timer.
                event = conn.next_event()
                while isinstance(event, h11.Data) and not event.data:
                    event = conn.next_event()
                if event is h11.NEED_DATA:
                    if self.deadline == math.inf:
                        self.deadline = trio.current_time() + connection.server.read_timeout
                    with trio.fail_after(self.deadline - trio.current_time()):
                        event = await self._next_event()
                        while isinstance(event, h11.Data) and not event.data:
                            event = await self._next_event()
            except (trio.TooSlowError, h11.RemoteProtocolError, trio.BrokenResourceError):
                self.gone = True
                return {"type": "http.disconnect"}
            if isinstance(event, h11.Data):
                return {"type": "http.request", "body": bytes(event.data), "more_body": True}
            if isinstance(event, h11.EndOfMessage):
                self.body_done = True
                self.reading.set()  # the reader watches the socket from now on
                return {"type": "http.request", "body": b"", "more_body": False}
            self.gone = True  # ConnectionClosed before the body ended
            return {"type": "http.disconnect"}
        # After the body: wait for the client to go away (the reader sees it) or the end.
        if not self.gone and not self.complete:
            if self.disconnect is None:
                self.disconnect = trio.Event()
            await self.disconnect.wait()
        return {"type": "http.disconnect"}

    async def _send_head(self, status: int, headers: Sequence[tuple[bytes, bytes]]) -> None:
        connection = self.connection
        server = connection.server
        self.head = server.heads.head(connection.conn, status, headers, close=server.stopping)
        self.started = True

    async def send(self, message: Message) -> None:
        if self.gone:
            return  # the client went away: what is left to say goes nowhere
        kind = message["type"]
        if kind == "http.response.start":
            if self.started:
                raise RuntimeError("http.response.start sent twice")
            await self._send_head(message["status"], message.get("headers", ()))
            return
        if kind != "http.response.body":
            raise RuntimeError(f"unexpected ASGI message {kind!r}")
        if not self.started or self.complete:
            raise RuntimeError("http.response.body outside a response")
        conn = self.connection.conn
        body = message.get("body", b"")
        if not body:
            data = b""
        elif self.chunked:
            data = b"%x\r\n%b\r\n" % (len(body), body)
        else:
            data = conn.send(h11.Data(data=body)) or b""
            if self.chunked is None:
                # A streamed body is chunked (HTTP/1.1): the same bytes h11 writes for a Data
                # event (its chunked writer keeps no state between chunks), without the cost
                # of an event (its validation and state machine: ~2 µs per chunk, 20+ chunks
                # per answer). Learnt from what h11 wrote, so a body framed otherwise (a
                # content-length, an HTTP/1.0 client's close-delimited) always goes through h11.
                self.chunked = data == b"%x\r\n%b\r\n" % (len(body), body)
        if not message.get("more_body", False):
            self.complete = True
            data += conn.send(h11.EndOfMessage()) or b""
        if self.head is not None:
            data = self.head + data
            self.head = None
        if data:
            await self._write(data)

    async def _write(self, data: bytes) -> None:
        """Hand ``data`` to the connection's writer (at once while it has room)."""
        connection = self.connection
        if connection.broken or not await connection.outbox.put(data):
            self.disconnected()
