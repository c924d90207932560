"""``POST /v1/messages``: the Anthropic Messages API as an inbound endpoint of the HTTP gateway.

The request is translated into a ``Request`` once (``relayrace.providers.anthropic_inbound``),
served by the same supervisor as a chat completion (``model`` names a route; any provider kind
serves it), and answered in Anthropic's shape with the Anthropic encoders of
``relayrace.providers.anthropic``: a whole ``message``, or a stream of ``message_start``,
``content_block_*``, ``ping``, ``message_delta`` and ``message_stop`` events. Errors are
Anthropic's (``{"type": "error", "error": {"type", "message"}}``, ``WireError.anthropic``): a
response status before the first event, an ``error`` event (and no ``message_stop``) after it.

As on the chat route, the response headers wait for the first delta: the supervisor fails over
before it without the caller seeing anything.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from .. import BadRequest, Reply, Request, RequestFailed, Supervisor, Usage
from ..providers import anthropic, anthropic_inbound, encode_event
from ._asgi import Body, CancelOnDisconnect, TrackedSend, send_whole, start_event_stream
from ._common import Gate, ShuttingDown, Stop, Ticket, reply_trace
from ._wire import WireError, encodable, safe_dumps

log = logging.getLogger("relayrace.server")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

PATH = "/v1/messages"


class _Refused(Exception):
    """Ends a request with an error in Anthropic's shape."""

    def __init__(self, error: WireError):
        super().__init__(error.message)
        self.error = error


class MessagesEndpoint:
    """The handler of ``POST /v1/messages`` (``handle``: an ASGI callable, a route of ``OpenAIApp``).

    Args:
        sup: the supervisor that serves the requests.
        gate: the gate of the surrounding ``serve``.
        read_json: reads the request body as a JSON object; raises an exception with an
            ``error`` attribute (a ``WireError``) when it cannot.
        encode_json: writes every JSON body and event.
        models: the upstream model each provider is asked for (``None``: the route's name).
    """

    def __init__(
        self,
        sup: Supervisor,
        gate: Gate,
        *,
        read_json: Callable[[Scope, Receive], Awaitable[dict[str, Any]]],
        encode_json: Callable[[Any], str],
        models: Mapping[str, str | None],
    ):
        self.sup = sup
        self.gate = gate
        self._read_json = read_json
        self._encode_json = encode_json
        self._models = models

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        tracked = TrackedSend(send)
        try:
            await self._serve(scope, receive, tracked)
        except Exception as exc:
            # The app's own errors (a body too large, not JSON) carry their WireError.
            error = getattr(exc, "error", None)
            if not isinstance(error, WireError):
                log.exception("POST %s failed", PATH)
                error = WireError.internal()
            try:
                if tracked.started:
                    await self._send_error_event(send, error)
                else:
                    await self.send_error(send, error)
            except Exception:
                log.debug("the error response could not be sent either", exc_info=True)

    # --- writing ----------------------------------------------------------------------------

    def _json(self, body: Any) -> bytes:
        text = self._encode_json(body)
        return (text if encodable(text) else safe_dumps(body)).encode()

    async def _send_json(
        self, send: Send, status: int, body: Any, headers: tuple[tuple[bytes, bytes], ...] = ()
    ) -> None:
        data = self._json(body)
        await send_whole(send, status, data, headers)

    async def send_error(self, send: Send, error: WireError) -> None:
        """Answer with ``error`` in Anthropic's shape and status."""
        status, body = error.anthropic()
        await self._send_json(send, status, body, error.headers)

    async def _send_error_event(self, send: Send, error: WireError) -> None:
        """End a stream that has begun: an ``error`` event, never ``message_stop``."""
        _, body = error.anthropic()
        try:
            data = anthropic.event("error", body)
        except UnicodeEncodeError:
            data = encode_event(safe_dumps(body), "error")
        await send({"type": "http.response.body", "body": data, "more_body": False})

    # --- serving ----------------------------------------------------------------------------

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await self._read_json(scope, receive)
        try:
            request, stream = anthropic_inbound.request_of(body)
        except BadRequest as exc:
            raise _Refused(
                WireError.bad_request("invalid_request", exc.problem, field=exc.field)
            ) from None
        try:
            ticket = self.gate.issue()
        except ShuttingDown:
            raise _Refused(
                WireError.unavailable("server_shutdown", "the server is shutting down")
            ) from None
        try:
            with CancelOnDisconnect(scope, ticket):
                if stream:
                    await self._stream(request, ticket, send)
                else:
                    await self._complete(request, ticket, send)
        finally:
            self.gate.release(ticket)

    async def _complete(self, request: Request, ticket: Ticket, send: Send) -> None:
        reply: Reply | None = None
        with ticket.scope:
            try:
                reply = await self.sup.complete(request, surface="http")
            except BadRequest as exc:
                raise _unservable(exc) from None
            except RequestFailed as exc:
                raise _Refused(WireError.from_failure(exc)) from None
        if reply is None:
            if ticket.stop is Stop.SHUTDOWN:
                raise _Refused(WireError.stopped(Stop.SHUTDOWN))
            return  # the client is gone: nobody to answer
        text, finish = reply.text, reply.finish_reason or "stop"
        if reply.refusal and not text:
            text, finish = reply.refusal, "refusal"
        body = anthropic.message(
            id=_message_id(),
            model=reply.model,
            text=text,
            finish_reason=finish,
            usage=reply.usage or Usage(),
            tool_calls=reply.tool_calls,
        )
        body["relayrace"] = reply_trace(reply)
        await self._send_json(send, 200, body, ((b"x-relayrace-provider", reply.provider.encode()),))

    async def _stream(self, request: Request, ticket: Ticket, send: Send) -> None:
        message_id = _message_id()
        started = False
        last_block = 0  # the text block is 0, tool call i is block i + 1

        async def start(provider: str, model: str) -> bytes:
            """Send the head; the opening events go out with what follows them."""
            nonlocal started
            started = True
            await start_event_stream(send, provider)
            return anthropic.opening(id=message_id, model=model, prompt_tokens=0)

        reply: Reply | None = None
        failure: RequestFailed | None = None
        body = Body(send)
        with ticket.scope:
            try:
                async with self.sup.stream(request, surface="http") as stream:
                    async for delta in stream:
                        data = b""
                        if not started:
                            model = self._models.get(delta.provider) or request.model
                            data = await start(delta.provider, model)
                        if delta.text:
                            data += anthropic.text_delta(delta.text)
                        for fragment in delta.tool_calls:
                            block = fragment.index + 1
                            if fragment.id is not None and block > last_block:
                                data += anthropic.tool_use_start(block, fragment.id, fragment.name or "")
                                last_block = block
                            if fragment.arguments:
                                data += anthropic.input_json_delta(block, fragment.arguments)
                        if data:
                            await body.put(data)
                reply = stream.reply
            except BadRequest as exc:
                raise _unservable(exc) from None
            except RequestFailed as exc:
                failure = exc
        if reply is None and failure is None and ticket.stop is not Stop.SHUTDOWN:
            return  # the client is gone: nobody to answer
        if failure is not None or reply is None:
            error = (
                WireError.stopped(Stop.SHUTDOWN) if failure is None else WireError.from_failure(failure)
            )
            if not started:
                raise _Refused(error)
            # The answer is cut short: say so, and never send `message_stop`, so that no client
            # takes a truncated answer for a whole one.
            await self._send_error_event(send, error)
            return
        tail = b"" if started else await start(reply.provider, reply.model)
        finish = reply.finish_reason or "stop"
        if reply.refusal and not reply.text:
            # What the model said instead of an answer, as Anthropic says it.
            finish, tail = "refusal", tail + anthropic.text_delta(reply.refusal)
        usage = reply.usage or Usage()
        tail += anthropic.closing(
            finish,
            usage.completion_tokens,
            last_block=last_block,
            usage=usage,
            extra={"relayrace": reply_trace(reply)},
        )
        await body.end(tail)


def _unservable(exc: BadRequest) -> _Refused:
    """The supervisor refused the request before any call: no such route (404), or no
    provider of the route can serve it (400)."""
    if exc.field == "model":
        return _Refused(WireError.bad_request("model_not_found", str(exc), field=None, status=404))
    field = anthropic_inbound.body_field(exc.field)
    return _Refused(WireError.bad_request("invalid_request", exc.problem, field=field))


def _message_id() -> str:
    return "msg_" + secrets.token_hex(12)
