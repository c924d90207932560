"""What both surfaces share: bearer-token checks, the JSON shapes of replies and failures, and
the gate that tracks requests in flight for a graceful shutdown."""

from __future__ import annotations

import enum
import hmac
import json
from collections.abc import Callable, Iterable
from typing import Any

import trio

from .. import Reply, RequestFailed


def authorized(tokens: frozenset[str], headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether the ``Authorization: Bearer …`` header (or, without one, ``x-api-key``) carries
    one of ``tokens`` (an empty set lets everyone in).

    Every token is compared in constant time, so the answer's timing says nothing about how
    close a guess was.
    """
    if not tokens:
        return True
    presented: bytes | None = None
    api_key: bytes | None = None
    for name, value in headers:
        name = name.lower()
        if name == b"authorization":
            presented = value
            break
        if name == b"x-api-key":  # what Anthropic's SDKs send
            api_key = value
    if presented is not None:
        scheme, _, credential = presented.strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return False
    elif api_key is not None:
        credential = api_key
    else:
        return False
    credential = credential.strip()
    ok = False
    for token in tokens:
        ok |= hmac.compare_digest(credential, token.encode())
    return ok


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


#: ``dumps`` of a string (the C encoder ``json.dumps`` itself uses with ``ensure_ascii=False``),
#: for frames formatted around a JSON string rather than built as a dict per delta.
dumps_str: Callable[[str], str] = json.encoder.encode_basestring


def reply_trace(reply: Reply) -> dict[str, Any]:
    """Who served a reply and why: provider, attempts and decisions, as JSON-ready values."""
    return {
        "provider": reply.provider,
        "request_id": reply.request_id,
        "attempts": [a.to_dict() for a in reply.attempts],
        "decisions": [d.to_dict() for d in reply.decisions],
    }


def failure_trace(exc: RequestFailed) -> dict[str, Any]:
    """Why a request failed: category, provider, attempts and decisions, as JSON-ready values."""
    return {
        "category": exc.failure.category.value,
        "provider": exc.failure.provider,
        "request_id": exc.request_id,
        "attempts": [a.to_dict() for a in exc.attempts],
        "decisions": [d.to_dict() for d in exc.decisions],
    }


class Stop(enum.Enum):
    """Why a request was cancelled by the server side rather than ended by the supervisor."""

    CLIENT_CANCELLED = "cancelled by the client"
    CLIENT_GONE = "the client went away"
    SHUTDOWN = "the server shut down before the request finished"


class Ticket:
    """One request in flight. ``scope`` wraps the request's call into the supervisor;
    ``cancel`` ends that call at once and remembers why."""

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.stop: Stop | None = None

    def cancel(self, why: Stop) -> None:
        if self.stop is None:
            self.stop = why
        self.scope.cancel()


class ShuttingDown(Exception):
    """The gate is closed: the server is shutting down and takes no new requests."""


class Gate:
    """Counts the requests in flight on every surface of one ``serve``.

    Once ``close`` is called no new ticket is issued; ``wait_idle`` returns when every ticket is
    returned, and ``cancel_all`` cancels the requests still running (the end of the grace).
    """

    def __init__(self) -> None:
        self.closed = False
        self._tickets: set[Ticket] = set()
        self._idle = trio.Event()
        self._idle.set()

    def __len__(self) -> int:
        return len(self._tickets)

    def issue(self) -> Ticket:
        """A ticket for a new request; give it back with ``release``.

        Raises:
            ShuttingDown: the gate is closed.
        """
        if self.closed:
            raise ShuttingDown
        ticket = Ticket()
        if not self._tickets:
            self._idle = trio.Event()
        self._tickets.add(ticket)
        return ticket

    def release(self, ticket: Ticket) -> None:
        self._tickets.discard(ticket)
        if not self._tickets:
            self._idle.set()

    def close(self) -> None:
        self.closed = True

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def cancel_all(self, why: Stop) -> None:
        for ticket in list(self._tickets):
            ticket.cancel(why)


def affinity_headers(headers: Iterable[tuple[bytes, bytes]]) -> dict[str, Any] | None:
    """``{"headers": {...}}``: a request's ``x-session-id`` and ``x-relayrace-*`` headers, for
    ``Request.metadata`` (what a route's ``header:NAME`` affinity reads; never sent upstream),
    or ``None`` without any."""
    found = {
        k.decode("latin-1"): v.decode("latin-1")
        for k, v in headers
        if k == b"x-session-id" or k.startswith(b"x-relayrace-")
    }
    return {"headers": found} if found else None
