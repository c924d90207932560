"""``POST /v1/embeddings``: OpenAI's embeddings endpoint, served by ``Supervisor.embed`` with
failover across the route's providers that declare ``embeddings``.

The request is OpenAI's (``model`` = a route, ``input`` a string or a list of strings,
``dimensions``, ``encoding_format`` ``float`` / ``base64``, ``user``); the reply is OpenAI's
(``object: list``, ``data``, ``model``, ``usage``) plus the ``relayrace`` object saying who
served it and why. Bad input is a 400 naming the field before any provider is called; a
failure is written by ``WireError`` like a chat completion's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Protocol

from .. import BadRequest, EmbeddingsReply, EmbedRequest, RequestFailed, Supervisor
from ..providers import embeddings
from ._asgi import CancelOnDisconnect
from ._common import Gate, ShuttingDown, Stop, Ticket
from ._wire import WireError

# ASGI's types, as ``_http`` spells them (not imported from it: it imports this module).
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Handler = Callable[[Scope, Receive, Send], Awaitable[None]]


class OpenAIApp(Protocol):
    """What the endpoint uses of ``OpenAIApp``: its supervisor and gate, and how it reads a
    JSON body (its limits and 400s) and writes one."""

    sup: Supervisor
    gate: Gate

    async def _read_json(self, scope: Scope, receive: Receive) -> dict[str, Any]: ...

    async def _send_json(
        self,
        send: Send,
        status: int,
        body: dict[str, Any] | WireError,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None: ...

#: the keys of OpenAI's request body; any other is refused (naming it), never dropped.
_KEYS = frozenset({"model", "input", "dimensions", "encoding_format", "user"})


def embeddings_route(app: OpenAIApp) -> Handler:
    """The handler of ``POST /v1/embeddings`` for ``app``'s route dict."""

    async def handler(scope: Scope, receive: Receive, send: Send) -> None:
        await serve_embeddings(app, scope, receive, send)

    return handler


async def serve_embeddings(app: OpenAIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer one ``POST /v1/embeddings``."""
    body = await app._read_json(scope, receive)
    error = _checked(body)
    if isinstance(error, WireError):
        await app._send_json(send, error.status, error)
        return
    request = error
    try:
        ticket = app.gate.issue()
    except ShuttingDown:
        error = WireError.unavailable("server_shutdown", "the server is shutting down")
        await app._send_json(send, 503, error)
        return
    reply: EmbeddingsReply | WireError | None = None
    try:
        with CancelOnDisconnect(scope, ticket):
            reply = await _embed(app, request, ticket)
    finally:
        app.gate.release(ticket)
    if reply is None:
        if ticket.stop is Stop.SHUTDOWN:
            reply = WireError.stopped(Stop.SHUTDOWN)
        else:
            return  # the client is gone: nobody to answer
    if isinstance(reply, WireError):
        await app._send_json(send, reply.status, reply)
        return
    out = embeddings.openai_embeddings(
        reply.vectors,
        model=reply.model,
        usage=reply.usage,
        encoding_format=request.encoding_format,
    )
    out["relayrace"] = {
        "provider": reply.provider,
        "request_id": reply.request_id,
        "attempts": [a.to_dict() for a in reply.attempts],
        "decisions": [d.to_dict() for d in reply.decisions],
    }
    await app._send_json(send, 200, out, [(b"x-relayrace-provider", reply.provider.encode())])


def _checked(body: dict[str, Any]) -> EmbedRequest | WireError:
    """The request of an embeddings body, or the 400 that names what is wrong with it."""
    for key in body:
        if key not in _KEYS:
            return WireError.bad_request(
                "invalid_request", f"{key}: not a field of an embeddings request", field=key
            )
    try:
        return EmbedRequest(
            body.get("model"),  # type: ignore[arg-type]  # EmbedRequest checks them
            body.get("input"),  # type: ignore[arg-type]
            dimensions=body.get("dimensions"),
            encoding_format=body.get("encoding_format") or "float",
        )
    except BadRequest as exc:
        return WireError.bad_request(
            "invalid_request", f"{exc.field}: {exc.problem}", field=exc.field
        )


async def _embed(
    app: OpenAIApp, request: EmbedRequest, ticket: Ticket
) -> EmbeddingsReply | WireError | None:
    """The supervisor's answer, its error, or ``None`` when the request was cancelled."""
    with ticket.scope:
        try:
            return await app.sup.embed(request, surface="http")
        except BadRequest as exc:
            routes = app.sup.routes
            if request.model not in routes and "*" not in routes:
                return WireError.bad_request(
                    "model_not_found", str(exc), field=exc.field, status=404
                )
            # The route exists but none of its providers declares embeddings.
            return WireError.bad_request("model_not_supported", str(exc), field=exc.field)
        except RequestFailed as exc:
            return WireError.from_failure(exc)
    return None
