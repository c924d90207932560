"""What the HTTP provider clients share: an incremental SSE parser, the construction of the
``httpx.AsyncClient``, the one place where foreign exceptions become ``ProviderError``, and the
request/response loop of one attempt.

The flow of one attempt (``HTTPProviderClient.call``)::

    payload ──POST──▶ status not 2xx ────────────▶ UpstreamStatus ─┐
                      2xx, streamed ──SSE events──▶ Reader ───────▶ │ sink.delta(text)
                      2xx, whole ──JSON──▶ Reader ────────────────▶ │
                                                                   ▼
                      httpx / JSON / SSE / our own stream errors ──▶ map_provider_errors
                                                                       └─▶ ProviderError(Failure)

Time budgets are not here: the actor runs ``call`` inside trio cancel scopes. The only
timeouts given to httpx are for connecting and for a socket that will not drain a write.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import attrs
import httpx
import trio

from .._errors import ConfigError, ProviderError
from .._failure import Category, Failure, classify
from .._redact import redact
from .._table import Table
from .._values import Usage
from ._client import ClientCall, Completion, Sink

USER_AGENT = "relayrace/0.1"

# After a stream's terminator ([DONE], message_stop) the body normally ends at once; reading that
# end lets the connection go back to the pool. A server that stalls after its terminator must not
# cost the caller anything, so the wait is short.
_DRAIN_GRACE = 1.0

# After the finish reason only bookkeeping is left (OpenAI's usage chunk and [DONE], Anthropic's
# message_stop, the end of a Gemini body). A server that stalls there must not turn a whole
# answer into an idle timeout: after this long the answer is returned as it is.
_TAIL_GRACE = 2.0

# The write timeout guards against a socket that never drains; requests are small.
_MIN_WRITE_TIMEOUT = 10.0

# An error body is read up to this many bytes; an error text longer than the message limit is
# cut anyway, and a misbehaving server must not make us buffer without a bound.
_MAX_ERROR_BODY = 64 * 1024

# Header names whose configured values are secrets (masked in every message, like the key).
_SECRET_HEADER_WORDS = ("key", "auth", "token", "secret", "cookie")


# --- server-sent events -------------------------------------------------------------------------


class ServerSentEvent(NamedTuple):
    """One dispatched server-sent event: its ``event`` name (``message`` when unnamed) and its
    ``data`` (the ``data:`` lines joined by newlines)."""

    event: str
    data: str


class SSEDecoder:
    """An incremental parser of ``text/event-stream`` bytes.

    Feed it the body's bytes as they arrive, in chunks of any size; it returns the events
    completed by each chunk. It follows the WHATWG rules that matter to LLM APIs: ``\\n``,
    ``\\r\\n`` and ``\\r`` line ends (also split across chunks), multi-line ``data``, ``event``
    names, comments (``:`` lines, used as keep-alives) and a blank line dispatching an event.
    ``id`` and ``retry`` are ignored. When the body ends, ``close`` returns an event whose lines
    were complete but which no blank line dispatched (a lenient reading of servers that end
    their last event early); a half-received line is discarded.

    Raises:
        UnicodeDecodeError: a line is not valid UTF-8.
    """

    __slots__ = ("_buffer", "_event", "_data", "_skip_lf")

    def __init__(self) -> None:
        self._buffer = b""
        self._event = ""
        self._data: list[str] = []
        self._skip_lf = False

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        """Parse one chunk; return the events it completed (often none, often one)."""
        if not chunk:
            return []  # and a "\r" that ended the previous chunk still waits for its "\n"
        if self._skip_lf:
            # The previous chunk ended in "\r": a "\n" starting this one belongs to that line end.
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        buffer = self._buffer + chunk if self._buffer else chunk
        end = max(buffer.rfind(b"\n"), buffer.rfind(b"\r"))
        if end < 0:
            self._buffer = buffer
            return []
        if end == len(buffer) - 1:
            self._buffer = b""
            self._skip_lf = buffer[end] == 0x0D
        else:
            self._buffer = buffer[end + 1 :]
        events: list[ServerSentEvent] = []
        for line in buffer[: end + 1].splitlines():
            self._line(line, events)
        return events

    def close(self) -> list[ServerSentEvent]:
        """The body ended: return the last event if its lines were whole but undispatched."""
        self._buffer = b""
        events: list[ServerSentEvent] = []
        self._line(b"", events)
        return events

    def _line(self, line: bytes, events: list[ServerSentEvent]) -> None:
        if not line:
            if self._data:
                events.append(ServerSentEvent(self._event or "message", "\n".join(self._data)))
                self._data = []
            self._event = ""
        elif line.startswith(b"data: "):
            self._data.append(line[6:].decode())
        elif line[0] == 0x3A:  # ":" starts a comment
            return
        else:
            field, colon, value = line.partition(b":")
            if colon and value[:1] == b" ":
                value = value[1:]
            if field == b"data":
                self._data.append(value.decode())
            elif field == b"event":
                self._event = value.decode()


# --- errors -------------------------------------------------------------------------------------


class UpstreamStatus(Exception):
    """The provider answered with a status other than 2xx (mapped by ``map_provider_errors``)."""

    def __init__(self, status: int, content: bytes, headers: Mapping[str, str]):
        super().__init__(status)
        self.status = status
        self.content = content
        self.headers = headers


class UpstreamErrorBody(Exception):
    """An error inside a 200 response: an SSE ``error`` event, an ``{"error": …}`` chunk, a
    safety block or a content-filter finish (mapped by ``map_provider_errors``).

    ``body`` is given to ``classify`` as the error body.
    """

    def __init__(self, body: Any):
        super().__init__("error inside the response")
        self.body = body


class MalformedStream(Exception):
    """The response cannot be read: an SSE event that is not JSON, a body that ends before its
    finish reason, or data of the wrong shape (mapped by ``map_provider_errors``)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@attrs.define
class AttemptState:
    """What the error mapping needs to know about the attempt in progress."""

    stream: bool
    response_started: bool = False
    finished: bool = False


@contextlib.contextmanager
def map_provider_errors(
    state: AttemptState, *, label: str, provider: str, secrets: Sequence[str] = ()
) -> Iterator[None]:
    """The one boundary where every foreign failure of an attempt becomes a ``ProviderError``.

    ================================  =================================================
    raised inside                     failure
    ================================  =================================================
    ``UpstreamStatus``                ``classify`` of the status, error body, headers
    ``UpstreamErrorBody``             ``classify`` of the body (an error in a 200)
    ``MalformedStream``               ``stream_error`` with its code (``stream_cut``…)
    ``httpx.TimeoutException``        ``timeout`` (``connect_timeout``…)
    ``httpx.ConnectError``            ``network`` / ``connect_error``
    ``httpx.NetworkError``,           before the response: ``network``; mid-stream:
    ``httpx.RemoteProtocolError``     ``stream_error`` / ``stream_cut``
    ``httpx.DecodingError``, JSON,    ``stream_error`` (``malformed_json``…)
    UTF-8 errors
    other ``httpx`` errors            ``unknown``
    ================================  =================================================

    A transport error after the stream has given its finish reason is not a failure: the answer
    is complete, so the error is swallowed and the caller goes on to return it. ``trio.Cancelled``
    passes through untouched.

    Args:
        state: the attempt's progress (response started, finish reason seen).
        label: the client family (``openai``), used in messages.
        provider: the actor's name, stamped on the failure.
        secrets: strings masked in every message (the API key).

    Raises:
        ProviderError: carrying the classified ``Failure``, chained to the original exception.
    """
    try:
        yield
    except UpstreamStatus as exc:
        failure = classify(
            status=exc.status,
            body=_parse_error_body(exc.content),
            headers=exc.headers,
            provider=provider or None,
            now=time.time(),
            secrets=secrets,
        )
        raise ProviderError(_labelled(failure, label, secrets)) from exc
    except UpstreamErrorBody as exc:
        failure = classify(
            status=None, body=exc.body, provider=provider or None, now=time.time(), secrets=secrets
        )
        raise ProviderError(_labelled(failure, label, secrets)) from exc
    except MalformedStream as exc:
        failure = _failure(Category.STREAM_ERROR, exc.code, exc.message, label, provider, secrets)
        raise ProviderError(failure) from exc
    except httpx.TimeoutException as exc:
        code = {
            httpx.ConnectTimeout: "connect_timeout",
            httpx.WriteTimeout: "write_timeout",
            httpx.PoolTimeout: "pool_timeout",
        }.get(type(exc), "read_timeout")
        failure = _failure(
            Category.TIMEOUT, code, _what("timed out", exc), label, provider, secrets
        )
        raise ProviderError(failure) from exc
    except (httpx.ConnectError, httpx.ProxyError) as exc:
        what = _what("cannot connect", exc)
        failure = _failure(Category.NETWORK, "connect_error", what, label, provider, secrets)
        raise ProviderError(failure) from exc
    except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
        if state.finished:
            # The answer was complete before the connection went: nothing was lost.
            return
        if not state.response_started:
            category, code = Category.NETWORK, "connection_lost"
            what = _what("connection lost before the response", exc)
        elif state.stream:
            category, code = Category.STREAM_ERROR, "stream_cut"
            what = _what("stream cut before its end", exc)
        else:
            category, code = Category.NETWORK, "incomplete_body"
            what = _what("connection lost while reading the response", exc)
        raise ProviderError(_failure(category, code, what, label, provider, secrets)) from exc
    except httpx.DecodingError as exc:
        what = _what("cannot decode the body", exc)
        failure = _failure(Category.STREAM_ERROR, "decoding_error", what, label, provider, secrets)
        raise ProviderError(failure) from exc
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        what = _what("HTTP error", exc)
        failure = _failure(Category.UNKNOWN, type(exc).__name__, what, label, provider, secrets)
        raise ProviderError(failure) from exc
    except (ValueError, RecursionError) as exc:
        # json.JSONDecodeError and UnicodeDecodeError are ValueErrors; RecursionError is JSON
        # nested beyond reason. The request is encoded before this block is entered.
        code = "malformed_text" if isinstance(exc, UnicodeDecodeError) else "malformed_json"
        what = _what("malformed response", exc)
        failure = _failure(Category.STREAM_ERROR, code, what, label, provider, secrets)
        raise ProviderError(failure) from exc


def _parse_error_body(content: bytes) -> Any:
    text = content.decode("utf-8", "replace")
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def _what(what: str, exc: BaseException) -> str:
    detail = str(exc) or type(exc).__name__
    return f"{what} ({type(exc).__name__}: {detail})"


def _failure(
    category: Category,
    code: str,
    message: str,
    label: str,
    provider: str,
    secrets: Sequence[str],
) -> Failure:
    return Failure(
        category=category,
        code=code,
        message=redact(f"{label}: {message}", secrets),
        provider=provider or None,
    )


def _labelled(failure: Failure, label: str, secrets: Sequence[str]) -> Failure:
    message = failure.message or (f"HTTP {failure.status}" if failure.status else "error")
    return attrs.evolve(failure, message=redact(f"{label}: {message}", secrets))


# --- the shared client --------------------------------------------------------------------------

#: Connections per connection pool. httpcore re-plans its whole pool on every request and every
#: response close, at a cost that grows with the connections times the idle ones (1.0.9:
#: ``_assign_requests_to_connections``): at 50 requests in flight one pool costs ~4× the CPU
#: per request of pools of 8 (benchmarks/README.md). A provider client with more connections
#: spreads them over several pools.
POOL_SHARD = 8


def sharded_transport(connections: int, shard: int = POOL_SHARD) -> ShardedTransport:
    """``connections`` spread over pools of at most ``shard`` connections, sharing one TLS
    context (building one per pool would load the CA bundle each time)."""
    count = -(-connections // shard)
    per = -(-connections // count)
    limits = httpx.Limits(max_connections=per, max_keepalive_connections=per)
    tls = httpx.create_ssl_context()
    return ShardedTransport(
        [httpx.AsyncHTTPTransport(limits=limits, verify=tls) for _ in range(count)], per
    )


class ShardedTransport(httpx.AsyncBaseTransport):
    """Several transports (connection pools) behind one. Each request goes to the first pool
    with fewer than ``per_shard`` requests in flight (the least busy if none has), and counts
    there until its response is closed: requests one after another reuse the first pool's
    connections, and pools fill in order under load."""

    def __init__(self, shards: Sequence[httpx.AsyncBaseTransport], per_shard: int):
        if not shards:
            raise ValueError("shards: expected at least one transport")
        self.shards = list(shards)
        self.per_shard = per_shard
        self._busy = [0] * len(self.shards)
        self._low = 0  # no pool before this one has room

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        busy = self._busy
        per = self.per_shard
        i = self._low
        while i < len(busy) and busy[i] >= per:
            i += 1
        self._low = i
        if i == len(busy):
            i = min(range(len(busy)), key=busy.__getitem__)
        busy[i] += 1
        try:
            response = await self.shards[i].handle_async_request(request)
        except BaseException:
            self._release(i)
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _Released(response.stream, self, i)
        return response

    def _release(self, i: int) -> None:
        self._busy[i] -= 1
        if i < self._low:
            self._low = i

    async def aclose(self) -> None:
        for shard in self.shards:
            await shard.aclose()


class _Released(httpx.AsyncByteStream):
    """A response body that frees its place in its pool's count when closed."""

    __slots__ = ("_stream", "_owner", "_index")

    def __init__(self, stream: httpx.AsyncByteStream, owner: ShardedTransport, index: int):
        self._stream = stream
        self._owner: ShardedTransport | None = owner
        self._index = index

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            if self._owner is not None:
                self._owner._release(self._index)
                self._owner = None


class _NoCookies(httpx.Cookies):
    """A cookie jar that keeps nothing and sends nothing (one instance serves every client)."""

    def extract_cookies(self, response: httpx.Response) -> None:
        pass

    def set_cookie_header(self, request: httpx.Request) -> None:
        pass

    def set(self, name: str, value: str, domain: str = "", path: str = "/") -> None:
        pass

    def update(self, cookies: Any = None) -> None:  # type: ignore[override]
        pass

    def __setitem__(self, name: str, value: str) -> None:
        pass


class _ProviderHTTPClient(httpx.AsyncClient):
    """An ``httpx.AsyncClient`` that keeps no cookies.

    Provider APIs authenticate with keys, not cookies, and one client serves every caller of
    the gateway, so a cookie set by a provider must not ride along on other callers' requests.
    It also saves httpx's cookie handling on every response (~25 µs: it wraps the response and
    the request in ``urllib`` objects for ``http.cookiejar``, even when there is no cookie).
    """

    _no_cookies = _NoCookies()

    @property
    def cookies(self) -> httpx.Cookies:
        return self._no_cookies

    @cookies.setter
    def cookies(self, cookies: Any) -> None:
        pass  # httpx sets the (empty) jar it was given at construction: keep none


def make_http_client(
    *,
    headers: Mapping[str, str],
    max_connections: int,
    connect_timeout: float,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """The ``httpx.AsyncClient`` of one provider client.

    Only connecting and writing have httpx timeouts; reading and waiting for a pooled connection
    are bounded by the actor's cancel scopes (time to first token, idle, attempt). The pool
    holds as many connections as the actor runs attempts, and keeps them all alive between
    attempts; above ``POOL_SHARD`` connections they are spread over several pools.
    """
    if transport is None and max_connections > POOL_SHARD:
        transport = sharded_transport(max_connections)
    timeout = httpx.Timeout(
        connect=connect_timeout,
        read=None,
        write=max(_MIN_WRITE_TIMEOUT, connect_timeout),
        pool=None,
    )
    limits = httpx.Limits(
        max_connections=max_connections, max_keepalive_connections=max_connections
    )
    return _ProviderHTTPClient(
        headers={"user-agent": USER_AGENT, **headers},
        timeout=timeout,
        limits=limits,
        transport=transport,
        follow_redirects=False,
    )


class Reader:
    """Reads one attempt's response in one wire format.

    A subclass turns each SSE event (``event``) or the whole JSON body (``whole``) into the text
    to pass on, and records the finish reason, usage and answering model on the way. It raises
    ``UpstreamErrorBody`` for an error inside the response and ``MalformedStream`` for data it
    cannot read; it never raises anything else, whatever the provider sends.
    """

    def __init__(self, call: ClientCall):
        self.model = call.upstream_model
        self.usage: Usage | None = None
        self.finish_reason: str | None = None
        #: a finish reason (or its equivalent) arrived: the answer is whole.
        self.finished = False
        #: the stream's own terminator arrived (``[DONE]``, ``message_stop``).
        self.terminated = False

    def event(self, event: ServerSentEvent) -> str | None:
        """Read one SSE event; return the text it adds to the answer."""
        raise NotImplementedError

    def whole(self, body: Any) -> str:
        """Read a whole (non-streamed) JSON body; return the answer's text."""
        raise NotImplementedError

    def completion(self) -> Completion:
        return Completion(model=self.model, usage=self.usage, finish_reason=self.finish_reason)

    def answered_by(self, model: Any) -> None:
        """Record the model the provider says answered (ignored unless a non-empty string)."""
        if isinstance(model, str) and model:
            self.model = model


class HTTPProviderClient:
    """The base of the HTTP provider clients: connection pool, error boundary, attempt loop.

    Subclasses say where to send the request (``endpoint``), what to send (``payload``) and how
    to read the answer (``reader``).

    The ``httpx.AsyncClient`` is opened on the first call and closed by ``aclose``; a later call
    opens a new one, so that one config can serve several supervisors in turn.

    ``accepts_continuation`` is a declaration for the supervisor, which sends a prefill only to
    a provider that declares (or is configured) to accept one; the client sends what it is
    asked.
    """

    #: the client family, in messages (``openai``).
    label: ClassVar[str] = "http"

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str | None,
        auth_headers: Mapping[str, str],
        default_headers: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        query: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        accepts_continuation: bool,
        max_connections: int = 64,
        connect_timeout: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError("base_url: expected an http:// or https:// URL")
        if isinstance(max_connections, bool) or not isinstance(max_connections, int):
            raise ValueError("max_connections: expected a positive integer")
        if max_connections < 1:
            raise ValueError("max_connections: expected a positive integer")
        if not connect_timeout > 0 or math.isinf(connect_timeout):
            raise ValueError("connect_timeout: expected a positive number of seconds")
        self.base_url = base_url.rstrip("/")
        self.accepts_continuation = accepts_continuation
        self.query: dict[str, str] = dict(query or {})
        self.extra_body: dict[str, Any] = dict(extra_body or {})
        self._headers = {**(default_headers or {}), **(headers or {}), **auth_headers}
        self._secrets = _secrets_of(api_key, self._headers)
        self._max_connections = max_connections
        self._connect_timeout = connect_timeout
        self._transport = transport
        self._http: httpx.AsyncClient | None = None

    def __repr__(self) -> str:
        # Never the key: only where the client points.
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    def _client(self) -> httpx.AsyncClient:
        if self._http is None or self._http.is_closed:
            self._http = make_http_client(
                headers=self._headers,
                max_connections=self._max_connections,
                connect_timeout=self._connect_timeout,
                transport=self._transport,
            )
        return self._http

    async def aclose(self) -> None:
        """Close every pooled connection."""
        http, self._http = self._http, None
        if http is not None:
            await http.aclose()

    # --- provided by subclasses ---

    def endpoint(self, call: ClientCall) -> str:
        """The URL to POST to (the configured ``query`` is added to it)."""
        raise NotImplementedError

    def payload(self, call: ClientCall) -> dict[str, Any]:
        """The JSON body to send."""
        raise NotImplementedError

    def reader(self, call: ClientCall) -> Reader:
        """A fresh reader of this attempt's response."""
        raise NotImplementedError

    # --- one attempt ---

    async def call(self, call: ClientCall, sink: Sink) -> Completion:
        """Run one attempt; see ``relayrace.actors.ProviderClient``.

        Raises:
            ProviderError: the provider failed; ``.failure`` says how. A request whose params
                cannot be sent as JSON fails as ``bad_request`` (code ``unserializable_request``)
                before anything is sent.
        """
        reader = self.reader(call)
        try:
            content = json.dumps(
                self.payload(call), separators=(",", ":"), ensure_ascii=False, allow_nan=False
            )
        except (TypeError, ValueError, RecursionError) as exc:
            what = _what("the request cannot be sent as JSON", exc)
            raise ProviderError(
                _failure(
                    Category.BAD_REQUEST,
                    "unserializable_request",
                    what,
                    self.label,
                    call.actor,
                    self._secrets,
                )
            ) from None
        state = AttemptState(stream=call.stream)
        with map_provider_errors(
            state, label=self.label, provider=call.actor, secrets=self._secrets
        ):
            http = self._client()
            url = httpx.URL(self.endpoint(call))
            if self.query:
                # Merged, not passed as `params`, which would replace the endpoint's own query.
                url = url.copy_merge_params(self.query)
            request = http.build_request(
                "POST",
                url,
                content=content.encode(),
                headers={
                    "content-type": "application/json",
                    "accept": "text/event-stream" if call.stream else "application/json",
                },
            )
            response = await http.send(request, stream=True)
            try:
                state.response_started = True
                if not 200 <= response.status_code < 300:
                    content_bytes = await _read_at_most(response, _MAX_ERROR_BODY)
                    raise UpstreamStatus(response.status_code, content_bytes, response.headers)
                media_type = response.headers.get("content-type", "").split(";")[0].strip()
                if call.stream and media_type != "application/json":
                    await self._read_stream(response, reader, state, sink)
                else:
                    # A whole body, asked for or not: some servers ignore `stream`, and some
                    # answer a streamed request with a JSON error and a 200.
                    sink.progress()
                    body = json.loads(await response.aread())
                    text = reader.whole(body)
                    state.finished = True
                    if text:
                        await sink.delta(text)
            finally:
                await response.aclose()
        return reader.completion()

    async def _read_stream(
        self, response: httpx.Response, reader: Reader, state: AttemptState, sink: Sink
    ) -> None:
        decoder = SSEDecoder()
        tail_deadline = math.inf
        ended = False
        chunks = response.aiter_bytes()
        try:
            while not reader.terminated:
                chunk: bytes | None = None
                if tail_deadline == math.inf:
                    chunk = await anext(chunks, None)
                else:
                    with trio.move_on_at(tail_deadline) as tail:
                        chunk = await anext(chunks, None)
                    if tail.cancelled_caught:
                        return  # the finish reason came, the rest did not: the answer is whole
                if chunk is None:
                    ended = True
                    events = decoder.close()
                else:
                    events = decoder.feed(chunk)
                for event in events:
                    await self._event(event, reader, state, sink)
                    if reader.terminated:
                        break
                if ended:
                    break
                if reader.finished and tail_deadline == math.inf:
                    tail_deadline = trio.current_time() + _TAIL_GRACE
            if reader.terminated and not ended:
                # Read the end of the body so that the connection can be reused, but never wait
                # long for it: the answer is already whole.
                with trio.move_on_after(_DRAIN_GRACE):
                    async for _ in chunks:
                        pass
        finally:
            await _abandon(chunks)
        if not (reader.finished or reader.terminated):
            raise MalformedStream("stream_cut", "the stream ended before its finish reason")

    @staticmethod
    async def _event(
        event: ServerSentEvent, reader: Reader, state: AttemptState, sink: Sink
    ) -> None:
        text = reader.event(event)
        state.finished = reader.finished or reader.terminated
        if text:
            await sink.delta(text)


async def _read_at_most(response: httpx.Response, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    chunks = response.aiter_bytes()
    try:
        async for chunk in chunks:
            parts.append(chunk)
            size += len(chunk)
            if size >= limit:
                break
    finally:
        await _abandon(chunks)
    return b"".join(parts)[:limit]


async def _abandon(chunks: AsyncIterator[bytes]) -> None:
    """Unwind an httpx body iterator that will not be read to its end.

    httpx's body iterators are async generators nested several deep: closing the outer one
    leaves the inner ones to the garbage collector, and trio warns about each. A read that is
    cancelled at once unwinds the whole chain instead (an exhausted one is left as it is). The
    connection is then closed rather than pooled.
    """
    with trio.CancelScope() as scope:
        scope.cancel()
        async for _ in chunks:
            pass


def _secrets_of(api_key: str | None, headers: Mapping[str, str]) -> tuple[str, ...]:
    secrets = [api_key] if api_key else []
    for name, value in headers.items():
        if any(word in name.lower() for word in _SECRET_HEADER_WORDS):
            secrets.append(value)
            # "Bearer sk-…": the token alone must go too.
            scheme, _, token = value.partition(" ")
            if token and scheme.isalpha():
                secrets.append(token)
    return tuple(secrets)


# --- helpers for the readers and payloads -------------------------------------------------------


def get(obj: Any, *path: str | int) -> Any:
    """``obj[p0][p1]…`` or ``None`` when any step is missing or of the wrong type."""
    for key in path:
        if isinstance(key, int):
            if not isinstance(obj, list) or not -len(obj) <= key < len(obj):
                return None
            obj = obj[key]
        else:
            if not isinstance(obj, dict):
                return None
            obj = obj.get(key)
    return obj


def load_event(event: ServerSentEvent) -> dict[str, Any]:
    """The JSON object in an event's data.

    Raises:
        json.JSONDecodeError: the data is not JSON (mapped to ``stream_error``).
        MalformedStream: the data is JSON but not an object.
    """
    return expect_object(json.loads(event.data), "event")


def expect_object(value: Any, where: str) -> dict[str, Any]:
    """``value`` if it is a JSON object.

    Raises:
        MalformedStream: it is not (code ``malformed_event`` / ``malformed_response``).
    """
    if not isinstance(value, dict):
        code = "malformed_event" if where == "event" else "malformed_response"
        raise MalformedStream(
            code, f"expected a JSON object in the {where}, got {type(value).__name__}"
        )
    return value


def as_int(value: Any) -> int:
    """A token count: a non-negative integer, or 0 for anything else."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def text_of(content: Any) -> str:
    """The text of an OpenAI-style message content: a string or a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, Mapping) and isinstance(part.get("text"), str)
        )
    return ""


def stop_sequences(value: Any) -> list[str] | None:
    """OpenAI's ``stop`` (a string or a list of strings) as a list, or ``None``."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        stops = [s for s in value if isinstance(s, str)]
        return stops or None
    return None


def max_tokens_of(params: Mapping[str, Any], default: int | None) -> int | None:
    """The request's output-token limit (``max_completion_tokens`` or ``max_tokens``)."""
    for key in ("max_completion_tokens", "max_tokens"):
        value = params.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return default


def parse_data_url(url: str) -> tuple[str, str] | None:
    """``(media_type, base64 data)`` of a ``data:…;base64,…`` URL, or ``None``."""
    if not url.startswith("data:"):
        return None
    header, comma, data = url[5:].partition(",")
    media_type, _, encoding = header.partition(";")
    if not comma or encoding != "base64" or not media_type:
        return None
    return media_type, data


# --- reading a client's config table ------------------------------------------------------------


def options_from_table(
    table: Table, *, base_url: str, max_connections: int, connect_timeout: float
) -> dict[str, Any]:
    """The constructor options every HTTP client reads from its provider's config table.

    Reads ``base_url`` (defaults to the provider's public API), ``api_key_env`` (the NAME of
    the environment variable that holds the key), ``headers`` and ``query`` (tables of strings)
    and ``extra_body`` (a table merged into every request body, under what the request sets).
    The pool size and connect timeout come from the provider's ``max_concurrency`` and
    ``budgets.connect``, read by the config before the client's own keys.

    Raises:
        ConfigError: a key has the wrong type, or the named environment variable is unset.
    """
    url = table.text("base_url", base_url)
    if not url.startswith(("http://", "https://")):
        raise ConfigError(_at(table, "base_url"), "an http:// or https:// URL", url)
    extra_body = table.raw("extra_body", None)
    if extra_body is not None and not isinstance(extra_body, Mapping):
        raise ConfigError(_at(table, "extra_body"), "a table", extra_body)
    return {
        "base_url": url,
        "api_key": table.env("api_key_env"),
        "headers": _string_table(table, "headers"),
        "query": _string_table(table, "query"),
        "extra_body": extra_body,
        "max_connections": max_connections,
        "connect_timeout": connect_timeout,
    }


def _string_table(table: Table, key: str) -> dict[str, str] | None:
    value = table.raw(key, None)
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ConfigError(_at(table, key), "a table of strings", value)
    for name, item in value.items():
        if not isinstance(item, str):
            raise ConfigError(f"{_at(table, key)}.{name}", "a string", item)
    return dict(value)


def _at(table: Table, key: str) -> str:
    return f"{table.path}.{key}" if table.path else key
