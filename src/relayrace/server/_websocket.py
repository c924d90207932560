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
from collections.abc import Mapping
from typing import Any

import trio
from trio_websocket import (
    ConnectionClosed,
    Endpoint,
    WebSocketConnection,
    WebSocketRequest,
    serve_websocket,
)
from wsproto.events import TextMessage

from .._errors import BadRequest, RequestFailed
from .._events import Event
from .._values import Request
from ..supervisor import RequestStream, Supervisor
from ._common import (
    Gate,
    ShuttingDown,
    Stop,
    Ticket,
    authorized,
    dumps,
    dumps_str,
    failure_trace,
)
from ._settings import ServerSettings

log = logging.getLogger("relayrace.server")

_MAX_ID_LENGTH = 256
_REQUEST_FIELDS = frozenset({"type", "id", "model", "messages", "params", "metadata", "events"})
# The close code for "going away" (RFC 6455 §7.4.1): the server is shutting down.
_GOING_AWAY = 1001

RequestId = str | int


class _FrameError(Exception):
    """A frame the client sent cannot be served; becomes one ``error`` frame."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        request_id: RequestId | None = None,
        category: str = "bad_request",
        field: str | None = None,
    ):
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id
        self.category = category
        self.field = field

    def frame(self) -> dict[str, Any]:
        frame: dict[str, Any] = {
            "type": "error",
            "id": self.request_id,
            "category": self.category,
            "code": self.code,
            "message": self.message,
            "attempts": [],
            "decisions": [],
        }
        if self.field is not None:
            frame["field"] = self.field
        return frame


def _request_id(frame: Mapping[str, Any]) -> RequestId:
    if "id" not in frame:
        raise _FrameError("missing_id", f"a {frame['type']!r} frame needs an 'id'", field="id")
    value = frame["id"]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _FrameError("invalid_id", "'id' must be a string or an integer", field="id")
    if isinstance(value, str) and not 0 < len(value) <= _MAX_ID_LENGTH:
        raise _FrameError(
            "invalid_id", f"'id' must have 1 to {_MAX_ID_LENGTH} characters", field="id"
        )
    return value


def _error_frame(request_id: RequestId, exc: RequestFailed) -> dict[str, Any]:
    trace = failure_trace(exc)
    return {
        "type": "error",
        "id": request_id,
        "category": trace["category"],
        "code": exc.failure.code or trace["category"],
        "message": exc.failure.message,
        "provider": trace["provider"],
        "attempts": trace["attempts"],
        "decisions": trace["decisions"],
    }


class WebsocketEndpoint:
    """The websocket surface of ``serve``: accepts connections until ``stop_accepting``."""

    def __init__(self, sup: Supervisor, settings: ServerSettings, gate: Gate):
        self.sup = sup
        self.settings = settings
        self.gate = gate
        self._listen_scope = trio.CancelScope()
        self._open = 0
        # Set when shutdown begins: connections close once their requests have ended.
        self.stopping = trio.Event()

    def stop_accepting(self) -> None:
        """Close the listener; connections already open finish their requests, then close."""
        self.stopping.set()
        self._listen_scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, and serve connections until ``stop_accepting`` and every connection ended."""
        async with trio.open_nursery() as connections:
            port = await connections.start(self._listen, connections)
            task_status.started(port)

    async def _listen(
        self, connections: trio.Nursery, *, task_status: trio.TaskStatus[int]
    ) -> None:
        with self._listen_scope:
            await serve_websocket(
                self._handshake,
                self.settings.ws_host,
                self.settings.ws_port or 0,
                None,
                handler_nursery=connections,
                max_message_size=self.settings.max_frame_bytes,
                task_status=_PortStatus(task_status),
            )

    async def _handshake(self, request: WebSocketRequest) -> None:
        remote = request.remote
        if self.stopping.is_set():
            await _reject(request, 503, "server_shutdown", "the server is shutting down")
            return
        if self._open >= self.settings.max_connections:
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
        self._open += 1  # counted before the accept awaits, so the limit cannot be overshot
        try:
            ws = await request.accept()
            log.debug("websocket connection from %s", remote)
            await _Connection(self, ws).run()
        finally:
            self._open -= 1


class _PortStatus:
    """Turns the started value of ``serve_websocket`` (a ``WebSocketServer``) into its port."""

    def __init__(self, status: trio.TaskStatus[int]):
        self._status = status

    def started(self, server: Any = None) -> None:
        endpoint = server.listeners[0]
        assert isinstance(endpoint, Endpoint)
        self._status.started(endpoint.port)


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
    def __init__(self, endpoint: WebsocketEndpoint, ws: WebSocketConnection):
        self.endpoint = endpoint
        self.sup = endpoint.sup
        self.settings = endpoint.settings
        self.ws = ws
        self._send, self._outbox = trio.open_memory_channel[str](self.settings.send_queue_frames)
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
        outbox = self._outbox
        sink = _FrameSink(self.ws)
        most = self.settings.send_queue_frames
        try:
            async with outbox:
                while True:
                    # Every frame already queued goes out in the same write (one syscall),
                    # up to one queue's worth: under load the batches grow, idle they are 1.
                    try:
                        frames = [outbox.receive_nowait()]
                    except trio.WouldBlock:
                        try:
                            frames = [await outbox.receive()]
                        except trio.EndOfChannel:
                            break
                    except trio.EndOfChannel:
                        break
                    while len(frames) < most:
                        try:
                            frames.append(outbox.receive_nowait())
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                    await sink.send(frames)
            # The outbox was closed by a graceful shutdown, and every frame is out.
            await self.ws.aclose(_GOING_AWAY, "server shutting down")
        except ConnectionClosed:
            pass
        connection_scope.cancel()

    async def _put(self, frame: dict[str, Any]) -> None:
        await self._put_text(dumps(frame))

    async def _put_text(self, text: str) -> None:
        # No schedule point when the queue has room: a request relaying deltas that are ready
        # hands them all to the writer in one go. A full queue waits (backpressure).
        try:
            self._send.send_nowait(text)
        except trio.WouldBlock:
            try:
                await self._send.send(text)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the connection is closing: there is no one to tell

    async def _close_when_done(self) -> None:
        await self.endpoint.stopping.wait()
        await self._idle.wait()
        self._send.close()

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
                await self._put(exc.frame())

    async def _dispatch(self, message: str | bytes, nursery: trio.Nursery) -> None:
        if not isinstance(message, str):
            raise _FrameError("not_text", "expected a JSON text frame, got a binary frame")
        try:
            frame = json.loads(message)
        except ValueError as exc:
            raise _FrameError("invalid_json", f"the frame is not valid JSON: {exc}") from None
        except RecursionError:
            # JSON nested deeper than the decoder's recursion limit ("[[[[…"): not a ValueError,
            # and uncaught it would crash the connection's nursery and, through it, ``serve``.
            raise _FrameError("invalid_json", "the frame is JSON nested too deeply") from None
        if not isinstance(frame, dict):
            raise _FrameError("invalid_frame", "expected a JSON object")
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
            raise _FrameError(
                "unknown_type",
                f"unknown frame type {kind[:64]!r} (expected request, cancel or health)",
                field="type",
            )
        else:
            raise _FrameError("missing_type", "a frame needs a string 'type'", field="type")

    def _start(self, frame: dict[str, Any], nursery: trio.Nursery) -> None:
        request_id = _request_id(frame)
        if request_id in self._requests:
            # The error frame cannot carry this id: the client would take it for the terminal
            # frame of the request that is still running under it.
            raise _FrameError(
                "duplicate_id",
                f"a request with id {request_id!r} is already in flight",
                field="id",
            )
        unknown = sorted(set(frame) - _REQUEST_FIELDS)
        if unknown:
            raise _FrameError(
                "unknown_field",
                f"unknown field {unknown[0][:64]!r} in a request frame",
                request_id=request_id,
                field=unknown[0][:64],
            )
        events = frame.get("events", False)
        if not isinstance(events, bool):
            raise _FrameError(
                "invalid_request", "'events' must be true or false", request_id=request_id
            )
        if self.endpoint.stopping.is_set():
            raise _FrameError(
                "server_shutdown",
                "the server is shutting down",
                request_id=request_id,
                category="local_capacity",
            )
        if len(self._requests) >= self.settings.max_in_flight_per_connection:
            raise _FrameError(
                "too_many_requests",
                f"at most {self.settings.max_in_flight_per_connection} requests may be in "
                "flight on one connection",
                request_id=request_id,
                category="local_capacity",
            )
        try:
            request = Request(
                frame.get("model"),  # type: ignore[arg-type]  # Request checks it
                frame.get("messages"),  # type: ignore[arg-type]
                params=frame.get("params"),
                metadata=frame.get("metadata"),
            )
            stream = self.sup.stream(request)
        except BadRequest as exc:
            raise _FrameError(
                "invalid_request", str(exc), request_id=request_id, field=exc.field
            ) from None
        try:
            ticket = self.endpoint.gate.issue()
        except ShuttingDown:
            raise _FrameError(
                "server_shutdown",
                "the server is shutting down",
                request_id=request_id,
                category="local_capacity",
            ) from None
        self._requests[request_id] = ticket
        self._idle = trio.Event()
        nursery.start_soon(self._serve, request_id, stream, ticket, events)

    # --- one request --------------------------------------------------------------------------

    async def _serve(
        self, request_id: RequestId, stream: RequestStream, ticket: Ticket, events: bool
    ) -> None:
        try:
            terminal: dict[str, Any] | None = None
            with ticket.scope:
                if events:
                    terminal = await self._relay_with_events(request_id, stream)
                else:
                    terminal = await self._relay(request_id, stream)
            if terminal is None:
                why = ticket.stop or Stop.CLIENT_CANCELLED
                terminal = {
                    "type": "error",
                    "id": request_id,
                    "category": "cancelled",
                    "code": "server_shutdown" if why is Stop.SHUTDOWN else "cancelled",
                    "message": why.value,
                    "attempts": [],
                    "decisions": [],
                }
            await self._put(terminal)
        finally:
            del self._requests[request_id]
            self.endpoint.gate.release(ticket)
            if not self._requests:
                self._idle.set()

    async def _relay(self, request_id: RequestId, stream: RequestStream) -> dict[str, Any]:
        """Send the deltas; return the terminal frame."""
        # ``{"type":"delta","id":…,"seq":…,"text":…}``, as ``dumps`` writes it, without building
        # and encoding a dict per delta.
        head = '{"type":"delta","id":' + dumps(request_id) + ',"seq":'
        put = self._put_text
        try:
            async with stream:
                async for delta in stream:
                    await put(f'{head}{delta.seq},"text":{dumps_str(delta.text)}}}')
            reply = stream.reply
        except RequestFailed as exc:
            return _error_frame(request_id, exc)
        return {
            "type": "done",
            "id": request_id,
            "provider": reply.provider,
            "model": reply.model,
            "usage": None if reply.usage is None else reply.usage.to_dict(),
            "finish_reason": reply.finish_reason,
            "attempts": [a.to_dict() for a in reply.attempts],
            "decisions": [d.to_dict() for d in reply.decisions],
            "text": reply.text,
        }

    async def _relay_with_events(
        self, request_id: RequestId, stream: RequestStream
    ) -> dict[str, Any]:
        async with self.sup.subscribe() as subscription, trio.open_nursery() as nursery:
            relay = _EventRelay(self, request_id, stream.request_id, subscription)
            nursery.start_soon(relay.run)
            try:
                return await self._relay(request_id, stream)
            finally:
                # Every event of this request was published before its stream ended; the relay
                # sends what is still queued, then stops.
                relay.finish()


class _FrameSink:
    """Writes a batch of text frames to a websocket connection in one ``send_all``.

    ``WebSocketConnection.send_message`` writes one frame per call (a lock, a syscall and two
    schedule points each); this encodes every frame of the batch with the connection's wsproto
    state, exactly as ``send_message`` does, and writes them together, under the same lock and
    with the same handling of a broken stream. It relies on trio-websocket's internals
    (``_wsproto``, ``_stream``, ``_stream_lock``, ``_close_reason``, ``_abort_web_socket``,
    checked by the tests); without them it falls back to ``send_message`` per frame.
    """

    def __init__(self, ws: WebSocketConnection):
        self._ws = ws
        self._fast = all(hasattr(ws, name) for name in _WS_INTERNALS)

    async def send(self, frames: list[str]) -> None:
        ws = self._ws
        if not self._fast:
            for frame in frames:
                await ws.send_message(frame)
            return
        internal: Any = ws
        if internal._close_reason:
            raise ConnectionClosed(internal._close_reason)
        encode = internal._wsproto.send
        if len(frames) == 1:
            data = encode(TextMessage(data=frames[0]))
        else:
            data = b"".join([encode(TextMessage(data=frame)) for frame in frames])
        lock: trio.Lock = internal._stream_lock
        try:
            lock.acquire_nowait()  # uncontended (the usual case): no schedule point
        except trio.WouldBlock:
            await lock.acquire()
        try:
            await internal._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await internal._abort_web_socket()
            raise ConnectionClosed(internal._close_reason) from None
        finally:
            lock.release()


_WS_INTERNALS = ("_wsproto", "_stream", "_stream_lock", "_close_reason", "_abort_web_socket")


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
