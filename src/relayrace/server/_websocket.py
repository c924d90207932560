"""The websocket endpoint: many requests multiplexed on one connection by a client-chosen id.

Each connection has one reader task (parses frames, starts and cancels requests), one writer
task (the only one that writes to the socket) and one task per request in flight. Requests hand
frames to the writer through a bounded channel, so a client that reads slowly slows its own
requests (and, through the supervisor's zero-buffer channels, their provider reads) and nothing
else. The wire protocol is described in ``docs/servers.md``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    wrap_server_stream,
)

from .. import BadRequest, Event, Request, RequestFailed, RequestStream, Supervisor
from ._batch import Batcher
from ._common import Gate, ShuttingDown, Stop, Ticket, authorized, dumps, dumps_str
from ._settings import ServerSettings
from ._stream import HeldStream, IdleSockets, accept_capped
from ._wire import WireError, encodable, safe_dumps, unencodable_field

log = logging.getLogger("relayrace.server")

_MAX_ID_LENGTH = 256
_REQUEST_FIELDS = frozenset(
    {"type", "id", "model", "messages", "params", "metadata", "events", "text"}
)
# The close code for "going away" (RFC 6455 §7.4.1): the server is shutting down.
_GOING_AWAY = 1001
# The close code for "internal error" (RFC 6455 §7.4.1): the server failed this connection.
_INTERNAL_ERROR = 1011
# How long a closing handshake may take before the TCP connection is cut.
_CLOSE_SECONDS = 10.0
# accept() errors that mean "out of file descriptors or memory for now": wait, then go on.
RequestId = str | int


class _FrameError(Exception):
    """A frame the client sent cannot be served; becomes one ``error`` frame."""

    def __init__(self, error: WireError, request_id: RequestId | None = None):
        super().__init__(error.message)
        self.error = error
        self.request_id = request_id


def _bad(
    code: str, message: str, *, request_id: RequestId | None = None, field: str | None = None
) -> _FrameError:
    return _FrameError(WireError.bad_request(code, message, field=field), request_id)


def _request_id(frame: Mapping[str, Any]) -> RequestId:
    if "id" not in frame:
        raise _bad("missing_id", f"a {frame['type']!r} frame needs an 'id'", field="id")
    value = frame["id"]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _bad("invalid_id", "'id' must be a string or an integer", field="id")
    if isinstance(value, str):
        if not 0 < len(value) <= _MAX_ID_LENGTH:
            raise _bad("invalid_id", f"'id' must have 1 to {_MAX_ID_LENGTH} characters", field="id")
        if not encodable(value):
            # It cannot be echoed back: the error frame says id null.
            raise _bad("invalid_id", "'id' is not valid Unicode (a lone surrogate)", field="id")
    return value


class WebsocketEndpoint:
    """The websocket surface of ``serve``: accepts connections until ``stop_accepting``.

    Args:
        sup: the supervisor that serves the requests.
        settings: the websocket settings and limits.
        gate: the gate of the surrounding ``serve`` (requests in flight, shutdown).
        max_sockets: TCP connections open at once on this listener, handshakes included;
            the next one waits in the kernel's accept queue.
        encode_json: writes every frame but the deltas.
        listeners: listen on these (``serve --workers``' shared sockets) instead of binding.
    """

    def __init__(
        self,
        sup: Supervisor,
        settings: ServerSettings,
        gate: Gate,
        *,
        max_sockets: int,
        encode_json: Callable[[Any], str] = dumps,
        listeners: list[trio.SocketListener] | None = None,
    ):
        self._listeners = listeners
        self.sup = sup
        self.settings = settings
        self.gate = gate
        self.encode_json = encode_json
        self._listen_scope = trio.CancelScope()
        self._sockets = trio.Semaphore(max_sockets)
        self._open = 0
        self._idle = IdleSockets(settings.handshake_timeout)
        # Set when shutdown begins: connections close once their requests have ended.
        self.stopping = trio.Event()

    def stop_accepting(self) -> None:
        """Close the listener; connections already open finish their requests, then close."""
        self.stopping.set()
        self._listen_scope.cancel()
        self._idle.close()  # a socket that sent nothing has nothing to finish

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, and serve connections until ``stop_accepting`` and every connection ended."""
        async with trio.open_nursery() as connections:
            port = await connections.start(self._listen, connections)
            task_status.started(port)

    async def _listen(
        self, connections: trio.Nursery, *, task_status: trio.TaskStatus[int]
    ) -> None:
        listeners = self._listeners or await trio.open_tcp_listeners(
            self.settings.ws_port or 0, host=self.settings.ws_host
        )
        try:
            with self._listen_scope:
                async with trio.open_nursery() as accepting:
                    accepting.start_soon(self._idle.run)
                    for listener in listeners:
                        accepting.start_soon(self._accept, listener, connections)
                    task_status.started(listeners[0].socket.getsockname()[1])
        finally:
            for listener in listeners:
                with trio.CancelScope(shield=True):
                    await listener.aclose()

    async def _accept(self, listener: trio.SocketListener, connections: trio.Nursery) -> None:
        await accept_capped(listener, self._sockets, connections, self._connection, "websocket")

    async def _connection(self, stream: trio.SocketStream) -> None:
        """One TCP connection: its handshake (bounded in time), then its websocket."""
        self._open += 1  # counted from the accept: unfinished handshakes count too
        try:
            held = HeldStream(stream)
            async with held:
                # Nothing of trio-websocket's is built until the client sends a byte: an idle
                # socket (a flood of them) costs this sleeping task, and its end one close.
                deadline, waiting = self._idle.watch()
                opened = False
                with waiting:
                    opened = await held.receive_first()
                if not opened:
                    return
                async with trio.open_nursery() as nursery:
                    request = None
                    with trio.move_on_at(deadline) as held.handshake_scope:
                        request = await wrap_server_stream(
                            nursery, held, max_message_size=self.settings.max_frame_bytes
                        )
                    held.handshake_scope = None
                    if request is not None:
                        await self._handshake(request, held, _remote(stream))
                    nursery.cancel_scope.cancel()
        except Exception:
            # Whatever went wrong belongs to this connection only, never to the server.
            log.exception("websocket connection failed")
        finally:
            self._open -= 1
            self._sockets.release()

    async def _handshake(self, request: WebSocketRequest, stream: HeldStream, remote: str) -> None:
        if self.stopping.is_set():
            await _reject(request, 503, "server_shutdown", "the server is shutting down")
            return
        if self._open > self.settings.max_connections:
            log.warning("websocket connection from %s refused: too many connections", remote)
            await _reject(request, 503, "too_many_connections", "too many connections")
            return
        if not authorized(self.settings.tokens, request.headers):
            log.info("websocket connection from %s refused: missing or invalid token", remote)
            await _reject(
                request,
                401,
                "invalid_api_key",
                "missing or invalid bearer token",
                [(b"www-authenticate", b'Bearer realm="relayrace"')],
            )
            return
        ws = await request.accept()
        log.debug("websocket connection from %s", remote)
        try:
            await _Connection(self, ws, stream).run()
        except Exception:
            log.exception("websocket connection from %s failed", remote)
            with trio.move_on_after(_CLOSE_SECONDS):
                await ws.aclose(_INTERNAL_ERROR, "internal error")
        finally:
            with trio.move_on_after(_CLOSE_SECONDS):
                await ws.aclose()


def _remote(stream: trio.SocketStream) -> str:
    try:
        host, port, *_ = stream.socket.getpeername()
    except (OSError, ValueError):
        return "(unknown)"
    return f"{host}:{port}"


async def _reject(
    request: WebSocketRequest,
    status: int,
    code: str,
    message: str,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = dumps(
        {"error": {"message": message, "type": "websocket_error", "param": None, "code": code}}
    )
    await request.reject(
        status,
        extra_headers=[(b"content-type", b"application/json"), *(headers or [])],
        body=body.encode(),
    )


class _Connection:
    def __init__(self, endpoint: WebsocketEndpoint, ws: WebSocketConnection, stream: HeldStream):
        self.endpoint = endpoint
        self.stream = stream
        self.sup = endpoint.sup
        self.settings = endpoint.settings
        self.encode_json = endpoint.encode_json
        self.ws = ws
        self._outbox = Batcher[str](self.settings.send_queue_frames)
        self._requests: dict[RequestId, Ticket] = {}
        self._idle = trio.Event()
        self._idle.set()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write, nursery.cancel_scope)
            nursery.start_soon(self._close_when_done)
            await self._read(nursery)
            # The client closed (or broke) the connection: nobody is left to answer, so every
            # request of this connection is cancelled now, upstream calls included.
            nursery.cancel_scope.cancel()

    # --- the writer ---------------------------------------------------------------------------

    async def _write(self, connection_scope: trio.CancelScope) -> None:
        ws, stream = self.ws, self.stream

        async def write(frames: list[str]) -> None:
            if len(frames) == 1:
                await ws.send_message(frames[0])
                return
            # A batch goes out in one write (one syscall): each ``send_message`` only appends.
            stream.hold()
            try:
                for frame in frames:
                    await ws.send_message(frame)
            finally:
                await stream.release()

        try:
            await self._outbox.run(write)
            # The outbox was closed by a graceful shutdown, and every frame is out.
            await ws.aclose(_GOING_AWAY, "server shutting down")
        except ConnectionClosed:
            pass
        except Exception:
            # This connection cannot be written to any more: it ends, and only it.
            log.exception("websocket writer failed")
            with trio.move_on_after(_CLOSE_SECONDS):
                await ws.aclose(_INTERNAL_ERROR, "internal error")
        connection_scope.cancel()

    async def _put(self, frame: dict[str, Any]) -> None:
        """Queue a frame written by ``encode_json``; one it cannot write goes out escaped."""
        try:
            text = self.encode_json(frame)
        except Exception:
            log.exception("a websocket frame could not be encoded")
            text = safe_dumps(WireError.internal().frame(frame.get("id")))
        if not encodable(text):
            text = safe_dumps(frame)
        await self._outbox.put(text)

    async def _close_when_done(self) -> None:
        await self.endpoint.stopping.wait()
        await self._idle.wait()
        self._outbox.close()

    # --- the reader ---------------------------------------------------------------------------

    async def _read(self, nursery: trio.Nursery) -> None:
        while True:
            try:
                message = await self.ws.get_message()
            except ConnectionClosed:
                return
            try:
                await self._dispatch(message, nursery)
            except _FrameError as exc:
                await self._put(exc.error.frame(exc.request_id))
            except Exception:
                log.exception("a websocket frame could not be handled")
                await self._put(WireError.internal().frame(None))

    async def _dispatch(self, message: str | bytes, nursery: trio.Nursery) -> None:
        if not isinstance(message, str):
            raise _bad("not_text", "expected a JSON text frame, got a binary frame")
        try:
            frame = json.loads(message)
        except ValueError as exc:
            raise _bad("invalid_json", f"the frame is not valid JSON: {exc}") from None
        except RecursionError:
            # JSON nested deeper than the decoder's recursion limit ("[[[[…"): not a ValueError,
            # and uncaught it would crash the connection's nursery and, through it, ``serve``.
            raise _bad("invalid_json", "the frame is JSON nested too deeply") from None
        if not isinstance(frame, dict):
            raise _bad("invalid_frame", "expected a JSON object")
        bad = unencodable_field(message, frame)
        if bad is not None:
            # A lone surrogate (``"\ud800"``) is valid JSON but cannot be written back out.
            request_id = None
            if bad != "id" and isinstance(frame.get("type"), str) and encodable(frame["type"]):
                try:
                    request_id = _request_id(frame)
                except _FrameError:
                    pass
            raise _bad(
                "invalid_text",
                f"{bad}: not valid Unicode (a lone surrogate)",
                request_id=request_id,
                field=bad,
            )
        kind = frame.get("type")
        if kind == "request":
            self._start(frame, nursery)
        elif kind == "cancel":
            ticket = self._requests.get(_request_id(frame))
            # Cancelling a request that already ended is not an error: its terminal frame may
            # have crossed the cancel on the wire. The request's own terminal frame answers.
            if ticket is not None:
                ticket.cancel(Stop.CLIENT_CANCELLED)
        elif kind == "health":
            health = self.sup.health()
            reply: dict[str, Any] = {
                "type": "health",
                "actors": {name: snapshot.to_dict() for name, snapshot in health.items()},
            }
            if "id" in frame:
                # Checked like a request's id: echoing any JSON value back sent ``NaN`` (which
                # ``json.loads`` accepts but is not JSON) or a huge nested value to the client.
                reply["id"] = _request_id(frame)
            await self._put(reply)
        elif isinstance(kind, str):
            raise _bad(
                "unknown_type",
                f"unknown frame type {kind[:64]!r} (expected request, cancel or health)",
                field="type",
            )
        else:
            raise _bad("missing_type", "a frame needs a string 'type'", field="type")

    def _start(self, frame: dict[str, Any], nursery: trio.Nursery) -> None:
        request_id = _request_id(frame)
        if request_id in self._requests:
            # The error frame cannot carry this id: the client would take it for the terminal
            # frame of the request that is still running under it.
            raise _bad(
                "duplicate_id", f"a request with id {request_id!r} is already in flight", field="id"
            )
        unknown = sorted(set(frame) - _REQUEST_FIELDS)
        if unknown:
            raise _bad(
                "unknown_field",
                f"unknown field {unknown[0][:64]!r} in a request frame",
                request_id=request_id,
                field=unknown[0][:64],
            )
        events = frame.get("events", False)
        if not isinstance(events, bool):
            raise _bad(
                "invalid_request", "'events' must be true or false", request_id=request_id
            )
        with_text = frame.get("text", False)
        if not isinstance(with_text, bool):
            raise _bad(
                "invalid_request",
                "'text' must be true or false",
                request_id=request_id,
                field="text",
            )
        if self.endpoint.stopping.is_set():
            raise _FrameError(
                WireError.unavailable("server_shutdown", "the server is shutting down"),
                request_id,
            )
        if len(self._requests) >= self.settings.max_in_flight_per_connection:
            raise _FrameError(
                WireError.unavailable(
                    "too_many_requests",
                    f"at most {self.settings.max_in_flight_per_connection} requests may be in "
                    "flight on one connection",
                ),
                request_id,
            )
        try:
            request = Request(
                frame.get("model"),  # type: ignore[arg-type]  # Request checks it
                frame.get("messages"),  # type: ignore[arg-type]
                params=frame.get("params"),
                metadata=frame.get("metadata"),
            )
            stream = self.sup.stream(request, surface="websocket")
        except BadRequest as exc:
            raise _bad(
                "invalid_request", str(exc), request_id=request_id, field=exc.field
            ) from None
        try:
            ticket = self.endpoint.gate.issue()
        except ShuttingDown:
            raise _FrameError(
                WireError.unavailable("server_shutdown", "the server is shutting down"),
                request_id,
            ) from None
        self._requests[request_id] = ticket
        self._idle = trio.Event()
        nursery.start_soon(self._serve, request_id, stream, ticket, events, with_text)

    # --- one request --------------------------------------------------------------------------

    async def _serve(
        self,
        request_id: RequestId,
        stream: RequestStream,
        ticket: Ticket,
        events: bool,
        with_text: bool,
    ) -> None:
        try:
            terminal: dict[str, Any] | None = None
            with ticket.scope:
                try:
                    if events:
                        terminal = await self._relay_with_events(request_id, stream, with_text)
                    else:
                        terminal = await self._relay(request_id, stream, with_text)
                except Exception:
                    # A fault of this request (a bug, a text that cannot be written) ends it
                    # with an error frame; the connection and its other requests go on.
                    log.exception("websocket request failed")
                    terminal = WireError.internal().frame(request_id)
            if terminal is None:
                terminal = WireError.stopped(ticket.stop or Stop.CLIENT_CANCELLED).frame(request_id)
            await self._put(terminal)
        finally:
            del self._requests[request_id]
            self.endpoint.gate.release(ticket)
            if not self._requests:
                self._idle.set()

    async def _relay(
        self, request_id: RequestId, stream: RequestStream, with_text: bool
    ) -> dict[str, Any]:
        """Send the deltas; return the terminal frame."""
        # ``{"type":"delta","id":…,"seq":…,"text":…}``, as ``dumps`` writes it, without building
        # and encoding a dict per delta.
        head = '{"type":"delta","id":' + dumps(request_id) + ',"seq":'
        put = self._outbox.put
        sent = False
        try:
            async with stream:
                async for delta in stream:
                    text = delta.text
                    if not text.isascii() and not encodable(text):
                        raise ValueError(f"delta {delta.seq} from {delta.provider} is not UTF-8")
                    if delta.tool_calls:
                        # Rare: built as a dict (the fragments in OpenAI's shape).
                        fragments = [f.to_dict() for f in delta.tool_calls]
                        await self._put(
                            {
                                "type": "delta",
                                "id": request_id,
                                "seq": delta.seq,
                                "text": text,
                                "tool_calls": fragments,
                            }
                        )
                    else:
                        await put(f'{head}{delta.seq},"text":{dumps_str(text)}}}')
                    sent = True
            reply = stream.reply
        except RequestFailed as exc:
            return WireError.from_failure(exc).frame(request_id)
        done: dict[str, Any] = {
            "type": "done",
            "id": request_id,
            "provider": reply.provider,
            "model": reply.model,
            "usage": None if reply.usage is None else reply.usage.to_dict(),
            "finish_reason": reply.finish_reason,
            "tool_calls": [c.to_dict() for c in reply.tool_calls],
            "refusal": reply.refusal,
            "attempts": [a.to_dict() for a in reply.attempts],
            "decisions": [d.to_dict() for d in reply.decisions],
        }
        if reply.logprobs is not None:
            done["logprobs"] = reply.logprobs
        # The deltas carried the text already: repeating it would hold every answer twice.
        if with_text or not sent:
            done["text"] = reply.text
        return done

    async def _relay_with_events(
        self, request_id: RequestId, stream: RequestStream, with_text: bool
    ) -> dict[str, Any]:
        async with self.sup.subscribe() as subscription, trio.open_nursery() as nursery:
            relay = _EventRelay(self, request_id, stream.request_id, subscription)
            nursery.start_soon(relay.run)
            try:
                return await self._relay(request_id, stream, with_text)
            finally:
                # Every event of this request was published before its stream ended; the relay
                # sends what is still queued, then stops.
                relay.finish()


class _EventRelay:
    """Forwards the supervisor's events about one request as ``event`` frames."""

    def __init__(
        self,
        connection: _Connection,
        request_id: RequestId,
        supervisor_id: int,
        subscription: trio.MemoryReceiveChannel[Event],
    ):
        self._connection = connection
        self._request_id = request_id
        self._supervisor_id = supervisor_id
        self._subscription = subscription
        self._waiting = trio.CancelScope()
        self._finished = False

    def finish(self) -> None:
        self._finished = True
        self._waiting.cancel()

    async def run(self) -> None:
        while not self._finished:
            # Only the wait for the next event is cancelled by ``finish``, never a send.
            with trio.CancelScope() as self._waiting:
                if self._finished:
                    break
                event = await self._subscription.receive()
            if self._waiting.cancelled_caught:
                break
            await self._forward(event)
        while True:
            try:
                event = self._subscription.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return
            await self._forward(event)

    async def _forward(self, event: Event) -> None:
        if event.request_id == self._supervisor_id:
            await self._connection._put(
                {"type": "event", "id": self._request_id, **event.to_dict()}
            )
