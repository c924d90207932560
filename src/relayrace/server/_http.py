"""The OpenAI-compatible HTTP endpoint, as an ASGI application (served by ``_h11.HTTPServer``).

Routes: ``POST /v1/chat/completions`` (with and without ``stream``; tool calls, refusals,
logprobs, ``n`` choices and full usage, written by ``relayrace.providers.openai``),
``GET /v1/models`` and ``GET /v1/models/{id}`` (the supervisor's routes) and ``GET /healthz``
(actor health) need a bearer token when tokens are configured; ``/livez``, ``/readyz``
(``_probes``) need none, ``/admin/`` (``_admin``) its own. Errors use OpenAI's shape, ``{"error": {"message", "type", "param",
"code"}}``, plus a ``relayrace`` object saying why. See ``docs/servers.md``.

A streamed answer holds back its response headers until the first delta: before it, the
supervisor fails over transparently, and a request that fails outright gets a real HTTP error
status rather than a ``200`` with an error inside.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .. import BadRequest, Reply, Request, RequestFailed, State, Supervisor, ToolCallDelta
from ..providers import openai
from ._admin import AdminAPI, Operations
from ._asgi import Body, CancelOnDisconnect, TrackedSend, send_whole, start_event_stream
from ._common import (
    Gate,
    ShuttingDown,
    Stop,
    Ticket,
    affinity_headers,
    authorized,
    dumps,
    reply_trace,
)
from ._embeddings import embeddings_route
from ._messages import PATH as MESSAGES_PATH
from ._messages import MessagesEndpoint
from ._models import MODEL_PATH, model_object, model_objects
from ._probes import Probes
from ._settings import ServerSettings
from ._wire import WireError, encodable, safe_dumps, unencodable_field

log = logging.getLogger("relayrace.server")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# Keys of a chat completion body that are not generation parameters for the provider.
_NOT_PARAMS = frozenset({"model", "messages", "stream", "stream_options"})


class _HTTPError(Exception):
    """Ends a request with an error response in OpenAI's shape."""

    def __init__(self, error: WireError):
        super().__init__(error.message)
        self.error = error

    @classmethod
    def from_failure(cls, exc: RequestFailed) -> _HTTPError:
        return cls(WireError.from_failure(exc))


def _error(
    status: int,
    message: str,
    *,
    kind: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> _HTTPError:
    category = "local_capacity" if status == 503 else "bad_request"
    return _HTTPError(
        WireError(
            status=status,
            kind=kind,
            category=category,
            code=code,
            message=message,
            field=param,
            headers=tuple(headers or ()),
        )
    )


class _Disconnected(Exception):
    """The client went away while its request body was read."""


class OpenAIApp:
    """An ASGI application serving the OpenAI-compatible API from one supervisor.

    Args:
        sup: the supervisor that serves the requests.
        settings: tokens and ``max_body_bytes`` are used.
        gate: the gate of the surrounding ``serve`` (requests in flight, shutdown).
        encode_json: writes every JSON body and event but the content chunks.
    """

    def __init__(
        self,
        sup: Supervisor,
        settings: ServerSettings,
        gate: Gate,
        *,
        encode_json: Callable[[Any], str] = dumps,
        operations: Operations | None = None,
    ):
        self.sup = sup
        self._probes = Probes(sup, gate)
        self._admin = AdminAPI(sup, settings, gate, operations or Operations())
        self.settings = settings
        self.gate = gate
        self.encode_json = encode_json
        # The upstream model each provider is asked for (``None``: the route's name is passed
        # through). Chunks before the last carry it; the last one carries what the provider
        # reported.
        self._models = {p.name: p.model for p in sup.config.providers}
        self._messages = MessagesEndpoint(
            sup, gate, read_json=self._read_json, encode_json=encode_json, models=self._models
        )
        self._routes: dict[str, tuple[str, Callable[[Scope, Receive, Send], Awaitable[None]]]] = {
            "/v1/chat/completions": ("POST", self._chat_completions),
            "/v1/embeddings": ("POST", embeddings_route(self)),
            "/v1/messages": ("POST", self._messages.handle),
            "/v1/models": ("GET", self._models_list),
            "/healthz": ("GET", self._healthz),
            "/livez": ("GET", self._probes.livez),
            "/readyz": ("GET", self._probes.readyz),
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            # A websocket upgrade on the HTTP port: the websocket endpoint has its own port.
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope.get("http_version") not in ("1.0", "1.1"):
            # We serve and test HTTP/1.1 only: the server hands a prior-knowledge HTTP/2
            # connection here as version "2" (an h2c upgrade header is ignored: HTTP/1.1 goes on).
            await self._send_json(
                send, 505, _error(505, "only HTTP/1.1 is served", code="http_version").error
            )
            return
        tracked = TrackedSend(send)
        try:
            await self._route(scope, receive, tracked)
        except _HTTPError as exc:
            if scope["path"].rstrip("/") == MESSAGES_PATH:  # a 401/405 there: Anthropic's shape
                await self._messages.send_error(tracked, exc.error)
            else:
                await self._send_json(tracked, exc.error.status, exc.error)
        except _Disconnected:
            pass
        except Exception:
            # A fault of this request ends it, answered, and nothing else: a 500, or an error
            # event (never ``[DONE]``) if the stream had begun.
            log.exception("HTTP request %s %s failed", scope.get("method"), scope.get("path"))
            error = WireError.internal()
            try:
                if tracked.started:
                    await _send_event(send, safe_dumps(error.http_body()), more=False)
                else:
                    await self._send_json(send, 500, error)
            except Exception:
                log.debug("the error response could not be sent either", exc_info=True)

    async def _send_json(
        self,
        send: Send,
        status: int,
        body: dict[str, Any] | WireError,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        if isinstance(body, WireError):
            headers = [*body.headers, *(headers or [])]
            body = body.http_body()
        text = self.encode_json(body)
        data = (text if encodable(text) else safe_dumps(body)).encode()
        await send_whole(send, status, data, headers or ())

    def _event(self, body: dict[str, Any]) -> str:
        text = self.encode_json(body)
        return text if encodable(text) else safe_dumps(body)

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        routes = self._routes
        key = path.rstrip("/") or "/"
        if key.startswith("/admin/"):  # its own tokens, methods and errors
            await self._admin(scope, receive, send)
            return
        found = routes.get(key)
        if found is None and path.startswith(MODEL_PATH) and len(path) > len(MODEL_PATH):
            found = ("GET", self._models_retrieve)
        if found is None:
            raise _error(404, f"unknown path {path[:200]!r}", code="unknown_url")
        probe = key in ("/livez", "/readyz")  # a load balancer's: no token
        if not probe and not authorized(self.settings.tokens, scope["headers"]):
            raise _error(
                401,
                "missing or invalid bearer token",
                kind="authentication_error",
                code="invalid_api_key",
                headers=[(b"www-authenticate", b'Bearer realm="relayrace"')],
            )
        allowed, handler = found
        if method != allowed:
            raise _error(
                405,
                f"{method} is not allowed on {path}; use {allowed}",
                code="method_not_allowed",
                headers=[(b"allow", allowed.encode())],
            )
        await handler(scope, receive, send)

    # --- GET /v1/models and /healthz ----------------------------------------------------------

    async def _models_list(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._send_json(send, 200, {"object": "list", "data": model_objects(self.sup)})

    async def _models_retrieve(self, scope: Scope, receive: Receive, send: Send) -> None:
        model_id = scope["path"].removeprefix(MODEL_PATH)
        found = model_object(self.sup, model_id)
        if found is None:
            raise _error(
                404,
                f"The model {model_id[:200]!r} does not exist",
                param="model",
                code="model_not_found",
            )
        await self._send_json(send, 200, found)

    async def _healthz(self, scope: Scope, receive: Receive, send: Send) -> None:
        health = self.sup.health()
        states = [snapshot.state for snapshot in health.values()]
        if self.gate.closed:
            status = "shutting_down"
        elif all(state is State.OK for state in states):
            status = "ok"
        elif any(snapshot.serving for snapshot in health.values()):
            status = "degraded"
        else:
            status = "unavailable"
        body = {
            "status": status,
            "actors": {name: snapshot.to_dict() for name, snapshot in health.items()},
            "in_flight": len(self.gate),
        }
        # 503 only while shutting down, so that a load balancer stops sending traffic; a
        # degraded or benched supervisor still answers (terminus, all-benched policy).
        await self._send_json(send, 503 if self.gate.closed else 200, body)

    # --- POST /v1/chat/completions ------------------------------------------------------------

    async def _chat_completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await self._read_json(scope, receive)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise _error(400, "'stream' must be true or false", param="stream")
        options = body.get("stream_options")
        if options is not None and (not stream or not isinstance(options, dict)):
            raise _error(
                400,
                "'stream_options' is an object, allowed only with stream",
                param="stream_options",
            )
        include_usage = bool(options and options.get("include_usage"))
        try:
            request = Request(
                body.get("model"),  # type: ignore[arg-type]  # Request checks it
                body.get("messages"),  # type: ignore[arg-type]
                # OpenAI reads a null parameter as "not given"; so do we.
                params={k: v for k, v in body.items() if k not in _NOT_PARAMS and v is not None},
                metadata=affinity_headers(scope["headers"]),  # for ``header:NAME`` affinity
            )
        except BadRequest as exc:
            # Generation parameters sit at the top of an OpenAI body, not under `params`.
            field = exc.field.removeprefix("params.")
            message = f"{field}: {exc.problem}"
            raise _error(400, message, param=field, code="invalid_request") from None
        try:
            ticket = self.gate.issue()
        except ShuttingDown:
            raise _error(
                503,
                "the server is shutting down",
                kind="service_unavailable_error",
                code="server_shutdown",
            ) from None
        try:
            with CancelOnDisconnect(scope, ticket):
                if stream:
                    await self._stream(request, include_usage, ticket, send)
                else:
                    await self._complete(request, ticket, send)
        finally:
            self.gate.release(ticket)

    async def _read_json(self, scope: Scope, receive: Receive) -> dict[str, Any]:
        limit = self.settings.max_body_bytes
        too_large = _error(
            413, f"the request body exceeds {limit} bytes", code="request_too_large"
        )
        for name, value in scope["headers"]:
            if name.lower() == b"content-length" and value.isdigit() and int(value) > limit:
                raise too_large
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        raw = b"".join(chunks)
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise _error(
                400, f"the body is not valid JSON: {exc}", code="invalid_json"
            ) from None
        except RecursionError:
            # JSON nested deeper than the decoder's recursion limit is not a ValueError: without
            # this it escaped the app and the client got a bare 500 instead of a clear 400.
            raise _error(
                400, "the body is JSON nested too deeply", code="invalid_json"
            ) from None
        if not isinstance(body, dict):
            raise _error(400, "the body must be a JSON object", code="invalid_json")
        bad = unencodable_field(raw, body)
        if bad is not None:
            # A lone surrogate (``"\ud800"``) is valid JSON but cannot be written back out.
            raise _error(
                400, f"{bad}: not valid Unicode (a lone surrogate)", param=bad, code="invalid_text"
            )
        return body

    def _no_route(self, exc: BadRequest) -> _HTTPError:
        """An unknown route (404), or a request no provider of its route can serve (400,
        naming the field and each provider's reason)."""
        if exc.field == "model":
            return _error(404, str(exc), param=exc.field, code="model_not_found")
        field = exc.field.removeprefix("params.")
        return _error(400, f"{field}: {exc.problem}", param=field, code="invalid_request")

    def _shutdown_error(self) -> _HTTPError:
        return _error(
            503, Stop.SHUTDOWN.value, kind="service_unavailable_error", code="server_shutdown"
        )

    async def _complete(self, request: Request, ticket: Ticket, send: Send) -> None:
        reply: Reply | None = None
        with ticket.scope:
            try:
                reply = await self.sup.complete(request, surface="http")
            except BadRequest as exc:
                raise self._no_route(exc) from None
            except RequestFailed as exc:
                raise _HTTPError.from_failure(exc) from None
        if reply is None:
            if ticket.stop is Stop.SHUTDOWN:
                raise self._shutdown_error()
            return  # the client is gone: nobody to answer
        logprobs = reply.logprobs
        body = openai.completion(
            id=_completion_id(),
            created=int(time.time()),
            model=reply.model,
            text=reply.text,
            finish_reason=reply.finish_reason or "stop",
            usage=reply.usage,
            tool_calls=reply.tool_calls,
            refusal=reply.refusal,
            logprobs=None if logprobs is None else logprobs.get("content", []),
            choices=reply.choices[1:],
        )
        body["relayrace"] = reply_trace(reply)
        await self._send_json(send, 200, body, [(b"x-relayrace-provider", reply.provider.encode())])

    async def _stream(
        self,
        request: Request,
        include_usage: bool,
        ticket: Ticket,
        send: Send,
    ) -> None:
        try:
            stream = self.sup.stream(request, surface="http")
        except BadRequest as exc:
            raise self._no_route(exc) from None
        started = False
        async def start(provider: str) -> None:
            nonlocal started
            started = True
            await start_event_stream(send, provider)

        reply: Reply | None = None
        failure: RequestFailed | None = None
        encoder = openai.StreamEncoder(_completion_id(), int(time.time()), include_usage)
        models = self._models
        body = Body(send)
        with ticket.scope:
            try:
                async with stream:
                    async for delta in stream:
                        model = models.get(delta.provider) or request.model
                        first = not started
                        if first:
                            await start(delta.provider)
                        if delta.text or not delta.tool_calls:
                            await body.put(encoder.content(model, delta.text, first=first))
                            first = False
                        if delta.tool_calls:
                            fragments = [f.to_dict() for f in delta.tool_calls]
                            tools = encoder.chunk(model, {"tool_calls": fragments}, None)
                            if first:
                                tools["choices"][0]["delta"]["role"] = "assistant"
                            await body.put(f"data: {self._event(tools)}\n\n".encode())
                reply = stream.reply
            except RequestFailed as exc:
                failure = exc
        if reply is None and failure is None and ticket.stop is not Stop.SHUTDOWN:
            return  # the client is gone: nobody to answer
        if reply is None and failure is None:
            if not started:
                raise self._shutdown_error()
            error = self._shutdown_error()
            await _send_event(send, self._event(error.error.http_body()), more=False)
            return
        if failure is not None:
            error = _HTTPError.from_failure(failure)
            if not started:
                raise error
            # The answer is cut short: say so, and never send `[DONE]`, so that no client takes
            # a truncated answer for a whole one.
            await _send_event(send, self._event(error.error.http_body()), more=False)
            return
        assert reply is not None
        # The end of the stream goes out in one body message: the last chunk, the usage chunk
        # and `[DONE]` (the same bytes as one message each, for a fraction of the cost).
        if not started:
            await start(reply.provider)
        events = _ending(encoder, reply, started)
        tail = "".join([f"data: {self._event(event)}\n\n" for event in events])
        tail += "data: [DONE]\n\n"
        await body.end(tail.encode())


def _ending(
    encoder: openai.StreamEncoder, reply: Reply, started: bool
) -> list[dict[str, Any]]:
    """The chunks that end a stream: what the deltas did not carry (the opening if none was
    sent, the refusal, the other choices of ``n > 1`` whole), the finish reason with the
    answer's log probabilities and the ``relayrace`` object, and the usage if asked for."""
    model = reply.model
    events: list[dict[str, Any]] = []
    if not started:
        events.append(encoder.chunk(model, {"role": "assistant", "content": ""}, None))
    if reply.refusal:
        events.append(encoder.chunk(model, {"refusal": reply.refusal}, None))
    for choice in reply.choices[1:]:
        delta: dict[str, Any] = {"role": "assistant", "content": choice.text}
        if choice.tool_calls:
            delta["tool_calls"] = [
                ToolCallDelta(c.index, c.id, c.name, c.arguments).to_dict()
                for c in choice.tool_calls
            ]
        event = encoder.chunk(model, delta, choice.finish_reason or "stop")
        event["choices"][0].update(index=choice.index, logprobs=choice.logprobs)
        events.append(event)
    last = encoder.chunk(model, {}, reply.finish_reason or "stop")
    # The deltas carry no log probabilities: the answer's, merged, come with its end.
    last["choices"][0]["logprobs"] = reply.logprobs
    last["relayrace"] = reply_trace(reply)
    events.append(last)
    if encoder.include_usage:
        events.append(encoder.usage_chunk(model, reply.usage))
    return events


def _completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _send_event(send: Send, data: str, *, more: bool = True) -> None:
    await send(
        {"type": "http.response.body", "body": f"data: {data}\n\n".encode(), "more_body": more}
    )
