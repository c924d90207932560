"""The base of the HTTP provider clients and the loop of one attempt.

The flow of one attempt (``HTTPProviderClient.call``)::

    payload ──POST──▶ status not 2xx ────────────▶ UpstreamStatus ─┐
                      2xx, streamed ──SSE events──▶ Reader ───────▶ │ sink.delta(text)
                      2xx, whole ──JSON──▶ Reader ────────────────▶ │
                                                                   ▼
                      httpx / JSON / SSE / our own stream errors ──▶ map_provider_errors
                                                                       └─▶ ProviderError(Failure)

A subclass says where to send (``endpoint``), what to send (``payload``) and which reader
reads the answer (``reader``): the payloads and readers are the wire formats of
``relayrace.providers``. Time budgets are not here: the actor runs ``call`` inside trio cancel
scopes.
"""

from __future__ import annotations

import json
import logging
import math
import ssl
from collections.abc import Mapping
from typing import Any, ClassVar

import httpx
import trio

from .._client import PROBE_MODES, Capabilities, ClientCall, Completion, ProbeMode, Sink
from .._errors import ProviderError
from .._failure import Category
from .._ratelimit import read_rate_limits
from .._redact import SecretFilter, redact, secret_forms
from .._values import ToolCallDelta
from ..providers import (
    MAX_EVENT_BYTES,
    MAX_SSE_LINE_BYTES,
    MalformedStream,
    Reader,
    ServerSentEvent,
    SSEDecoder,
    check_text,
    embeddings,
)
from ._body import (
    MAX_BODY_BYTES,
    abandon,
    chunks_of,
    inflater_for,
    pieces_of,
    read_at_most,
    read_whole,
)
from ._boundary import AttemptState, UpstreamStatus, attempt_failure, describe, map_provider_errors
from ._job import JobSink
from ._options import ClientOptions as ClientOptions
from ._options import options_from_table as options_from_table
from ._probe import DISCARD, completion_probe, get_ok
from ._transport import TRANSPORTS, make_http_client, tls_context

# After a stream's terminator ([DONE], message_stop) the body normally ends at once; reading that
# end lets the connection go back to the pool. A server that stalls after its terminator must not
# cost the caller anything, so the wait is short.
_DRAIN_GRACE = 1.0

# After the finish reason only bookkeeping is left (OpenAI's usage chunk and [DONE], Anthropic's
# message_stop, the end of a Gemini body). A server that stalls there must not turn a whole
# answer into an idle timeout: after this long the answer is returned as it is.
_TAIL_GRACE = 2.0

# An error body is read up to this many bytes; an error text longer than the message limit is
# cut anyway, and a misbehaving server must not make us buffer without a bound.
_MAX_ERROR_BODY = 64 * 1024

# Header names whose configured values are secrets (masked in every message, like the key).
_SECRET_HEADER_WORDS = ("key", "auth", "token", "secret", "cookie")


class HTTPProviderClient:
    """The base of the HTTP provider clients: connection pool, error boundary, attempt loop.

    The ``httpx.AsyncClient`` is built by ``open`` (the supervisor calls it when it starts, so
    that nothing of it is built on the request path; a call on a client never opened opens it)
    and closed by ``aclose``; a later ``open`` builds a new one, so that one config can serve
    several supervisors in turn. Its TLS context is made on the first open and kept (for an
    ``https://`` base URL only it loads the CA bundle, ~30-100 ms of synchronous work).

    ``probe`` (``PROBE_MODES``) says what an active probe of a benched provider sends:
    ``models`` (default) asks for the model list (``probe_url``): free, and it proves the
    provider answers and the key works, not that the deployment serves, so the next request
    decides; ``completion`` asks the actor's model for one token (billed, proves the
    deployment); ``off`` sends nothing (the next request after a bench is the probe).

    ``accepts_continuation`` is a declaration for the supervisor, which sends a prefill only to
    a provider that declares (or is configured) to accept one; the client sends what it is
    asked.

    Args:
        base_url: the API root (default: the provider's public API, ``default_base_url``).
        api_key: the key, or ``None`` for a server that needs none (sent by ``auth_headers``).
        headers: extra headers on every request.
        query: query parameters on every request (merged into the endpoint's own).
        extra_body: fields added to every request body, under what the request sets.
        accepts_continuation: declare that the model continues a trailing assistant message
            (default: ``default_accepts_continuation``).
        max_connections: the connection pool's size (the actor's ``max_concurrency``).
        connect_timeout: seconds to open a connection (the actor's ``budgets.connect``).
        transport: ``"h11"`` (default: ``H11Transport``, h11 over pooled trio streams),
            ``"httpx"`` (httpx's own transport, in pools of 8), or an ``httpx`` transport
            object to use instead of the network (tests).
        max_body_bytes: the largest whole (non-streamed) body accepted, inflated (default
            16 MiB); past it the attempt fails ``stream_error`` / ``response_too_large``.
        max_sse_line_bytes: the longest line of a stream accepted (default 4 MiB); past it
            ``sse_line_too_long``.
        max_event_bytes: the largest event of a stream accepted (default 4 MiB); past it
            ``event_too_large``. Each limit closes the connection, and the request fails over
            like on any stream error.
        probe: what an active probe sends: ``models``, ``completion`` or ``off`` (above).

    Raises:
        ValueError: an argument is out of range.
    """

    #: the client family, in messages (``openai``).
    label: ClassVar[str] = "http"
    #: the provider's public API root.
    default_base_url: ClassVar[str] = ""
    #: whether the provider continues a trailing assistant message unless configured.
    default_accepts_continuation: ClassVar[bool] = False
    #: what the provider can serve unless configured (``n``: only a kind whose reader gives
    #: the other choices declares it).
    default_capabilities: ClassVar[Capabilities] = Capabilities(n=False)

    def __init__(
        self,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        headers: Mapping[str, str] | None = None,
        query: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        accepts_continuation: bool | None = None,
        max_connections: int = 64,
        connect_timeout: float = 5.0,
        transport: httpx.AsyncBaseTransport | str = "h11",
        max_body_bytes: int = MAX_BODY_BYTES,
        max_sse_line_bytes: int = MAX_SSE_LINE_BYTES,
        max_event_bytes: int = MAX_EVENT_BYTES,
        probe: ProbeMode = "models",
    ):
        if probe not in PROBE_MODES:
            raise ValueError(f"probe: expected one of {', '.join(PROBE_MODES)}")
        self.probe_mode: ProbeMode = probe
        if base_url is None:
            base_url = self.default_base_url
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError("base_url: expected an http:// or https:// URL")
        if isinstance(max_connections, bool) or not isinstance(max_connections, int):
            raise ValueError("max_connections: expected a positive integer")
        if max_connections < 1:
            raise ValueError("max_connections: expected a positive integer")
        if not connect_timeout > 0 or math.isinf(connect_timeout):
            raise ValueError("connect_timeout: expected a positive number of seconds")
        if isinstance(transport, str) and transport not in TRANSPORTS:
            raise ValueError(f"transport: expected one of {', '.join(TRANSPORTS)}")
        for name, size in (
            ("max_body_bytes", max_body_bytes),
            ("max_sse_line_bytes", max_sse_line_bytes),
            ("max_event_bytes", max_event_bytes),
        ):
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"{name}: expected a positive number of bytes")
        self.max_body_bytes = max_body_bytes
        self.max_sse_line_bytes = max_sse_line_bytes
        self.max_event_bytes = max_event_bytes
        self.base_url = base_url.rstrip("/")
        self.accepts_continuation = (
            self.default_accepts_continuation
            if accepts_continuation is None
            else accepts_continuation
        )
        self.query: dict[str, str] = dict(query or {})
        self.extra_body: dict[str, Any] = dict(extra_body or {})
        self._headers = {
            **self.fixed_headers(),
            **(headers or {}),
            **self.auth_headers(api_key),
        }
        # The secrets, and the forms a provider may echo them in (base64, URL-encoded).
        self._secrets = secret_forms(_secrets_of(api_key, self._headers))
        # Each attempt masks its answer with a fresh copy of this one.
        self._mask = SecretFilter(self._secrets) if self._secrets else None
        _quiet_http_loggers()
        self._max_connections = max_connections
        self._connect_timeout = connect_timeout
        self._transport = transport
        self._http: httpx.AsyncClient | None = None
        self._tls: ssl.SSLContext | None = None  # made on the first open, kept for later ones

    def __repr__(self) -> str:
        # Never the key: only where the client points.
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    @property
    def http_client(self) -> httpx.AsyncClient | None:
        """The open ``httpx.AsyncClient`` (``None`` before ``open`` and after ``aclose``)."""
        return self._http

    def open(self) -> None:
        """Build the connection pool (and, the first time, the TLS context) now, off the
        request path. Does nothing if it is open."""
        if self._http is None or self._http.is_closed:
            if self._tls is None:
                self._tls = tls_context(self.base_url)
            self._http = make_http_client(
                tls=self._tls,
                headers=self._headers,
                max_connections=self._max_connections,
                connect_timeout=self._connect_timeout,
                transport=self._transport,
            )

    def _client(self) -> httpx.AsyncClient:
        http = self._http
        if http is None or http.is_closed:
            # Not opened by a supervisor (a client used on its own): open it now.
            self.open()
            http = self._http
            assert http is not None
        return http

    async def aclose(self) -> None:
        """Close every pooled connection."""
        http, self._http = self._http, None
        if http is not None:
            await http.aclose()

    # --- provided by subclasses ---

    def auth_headers(self, api_key: str | None) -> dict[str, str]:
        """The headers that carry the key (none without one)."""
        return {}

    def fixed_headers(self) -> dict[str, str]:
        """Headers the provider requires on every request (``anthropic-version``)."""
        return {}

    def endpoint(self, call: ClientCall) -> str:
        """The URL to POST to (the configured ``query`` is added to it)."""
        raise NotImplementedError

    def payload(self, call: ClientCall) -> dict[str, Any]:
        """The JSON body to send."""
        raise NotImplementedError

    def reader(self, call: ClientCall) -> Reader:
        """A fresh reader of this attempt's response (a ``relayrace.providers`` reader)."""
        raise NotImplementedError

    def embed_request(self, call: ClientCall) -> tuple[str, dict[str, Any]] | None:
        """Where to POST an embeddings call and its JSON body, or ``None`` for a provider
        without an embeddings API."""
        return None

    def embed_reply(self, body: Any, call: ClientCall) -> embeddings.Answer:
        """Read the JSON reply of an embeddings call (a ``relayrace.providers.embeddings``
        reader)."""
        raise NotImplementedError

    def probe_url(self, model: str | None) -> str | None:
        """The URL a ``models`` probe GETs (the configured ``query`` is added), or ``None``
        when the provider has none."""
        return None

    # --- an active probe ---

    def probes(self, model: str | None) -> bool:
        """Whether ``probe`` sends anything for this ``model``: ``off`` never, ``completion``
        only for a known model, ``models`` where the provider has a model list."""
        if self.probe_mode == "completion":
            return model is not None
        return self.probe_mode == "models" and self.probe_url(model) is not None

    async def probe(self, *, model: str | None, actor: str) -> bool | None:
        """Check a benched provider with one cheap request; see ``ProbingClient.probe``.

        Raises:
            ProviderError: the provider failed the probe.
        """
        if self.probe_mode == "completion":
            if model is None:
                return None
            await self.call(completion_probe(model, actor), DISCARD)
            return True
        target = self.probe_url(model) if self.probe_mode == "models" else None
        if target is None:
            return None
        url = httpx.URL(target)
        if self.query:
            url = url.copy_merge_params(self.query)
        await get_ok(
            self._client(),
            url,
            label=self.label,
            actor=actor,
            secrets=self._secrets,
            error_limit=_MAX_ERROR_BODY,
        )
        return False

    # --- one attempt ---

    async def call(self, call: ClientCall, sink: Sink) -> Completion:
        """Run one attempt; see ``relayrace.actors.ProviderClient``.

        Raises:
            ProviderError: the provider failed; ``.failure`` says how. A request whose params
                cannot be sent as JSON fails as ``bad_request`` (code ``unserializable_request``)
                before anything is sent.
        """
        if call.embed is not None:
            return await self.embed(call, sink)
        reader = self.reader(call)
        try:
            return await self._attempt(call, sink, reader)
        except BaseException:  # a failed or cancelled attempt may be billed: say what it cost
            if reader.usage is not None and isinstance(sink, JobSink):
                sink.usage(reader.usage)
            raise

    async def _attempt(self, call: ClientCall, sink: Sink, reader: Reader) -> Completion:
        content = self._encoded(self.payload(call), call)
        state = AttemptState(stream=call.stream)
        # The answer text is masked as it streams (the key echoed, whole or encoded).
        mask = self._mask.fresh() if self._mask is not None else None
        with map_provider_errors(
            state, label=self.label, provider=call.actor, secrets=self._secrets
        ):
            response = await self._post(self.endpoint(call), content, stream=call.stream)
            try:
                state.response_started = True
                if not 200 <= response.status_code < 300:
                    content_bytes = await read_at_most(response, _MAX_ERROR_BODY)
                    raise UpstreamStatus(response.status_code, content_bytes, response.headers)
                state.limits = limits = read_rate_limits(response.headers)  # the admission's
                media_type = response.headers.get("content-type", "").split(";")[0].strip()
                if call.stream and media_type != "application/json":
                    await self._read_stream(response, reader, state, sink, mask)
                else:
                    # A whole body, asked for or not: some servers ignore `stream`, and some
                    # answer a streamed request with a JSON error and a 200.
                    sink.progress()
                    body = json.loads(await read_whole(response, self.max_body_bytes))
                    text = check_text(reader.whole(body), "an answer")
                    state.finished = True
                    if text and mask is not None:
                        text = mask.feed(text)
                    if text:
                        await sink.delta(text)
                    if reader.tools.pending:
                        await sink.tool_calls(_masked(reader.tools.take(), self._secrets))
            finally:
                await response.aclose()
        # The answer is whole (also when the connection failed after its finish reason).
        if mask is not None and (rest := mask.flush()):
            await sink.delta(rest)
        model = redact(reader.model, self._secrets)
        return Completion(
            model=model,
            usage=reader.usage,
            finish_reason=reader.finish_reason,
            refusal=reader.refusal,
            logprobs=None if reader.logprobs is None else {"content": reader.logprobs},
            choices=tuple(reader.other_choices()),
            limits=limits,
        )

    async def embed(self, call: ClientCall, sink: Sink) -> Completion:
        """Run one embeddings attempt (``call.embed``; ``call`` dispatches here): the same
        error boundary and body limit as a whole chat answer; the vectors are in
        ``Completion.embeddings``.

        Raises:
            ProviderError: the provider failed; ``.failure`` says how. A client kind without an
                embeddings API fails as ``bad_request`` (code ``no_embeddings``) before
                anything is sent.
        """
        request = self.embed_request(call)
        if request is None:
            raise ProviderError(
                attempt_failure(
                    Category.BAD_REQUEST,
                    "no_embeddings",
                    f"{self.label} has no embeddings API",
                    self.label,
                    call.actor,
                    self._secrets,
                )
            )
        target, payload = request
        content = self._encoded(payload, call)
        state = AttemptState(stream=False)
        with map_provider_errors(
            state, label=self.label, provider=call.actor, secrets=self._secrets
        ):
            response = await self._post(target, content, stream=False)
            try:
                state.response_started = True
                if not 200 <= response.status_code < 300:
                    content_bytes = await read_at_most(response, _MAX_ERROR_BODY)
                    raise UpstreamStatus(response.status_code, content_bytes, response.headers)
                sink.progress()
                body = json.loads(await read_whole(response, self.max_body_bytes))
                vectors, model, usage = self.embed_reply(body, call)
                state.finished = True
            finally:
                await response.aclose()
        return Completion(
            model=redact(model or call.upstream_model, self._secrets),
            usage=usage,
            embeddings=vectors,
        )

    def _encoded(self, payload: dict[str, Any], call: ClientCall) -> bytes:
        """The JSON body to send.

        Raises:
            ProviderError: ``bad_request`` / ``unserializable_request``: the caller's request
                cannot be sent as JSON.
        """
        try:
            return json.dumps(
                payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False
            ).encode()
        except (TypeError, ValueError, RecursionError) as exc:
            # UnicodeEncodeError is a ValueError: the caller's text, never the provider's fault.
            what = describe("the request cannot be sent as JSON", exc)
            raise ProviderError(
                attempt_failure(
                    Category.BAD_REQUEST,
                    "unserializable_request",
                    what,
                    self.label,
                    call.actor,
                    self._secrets,
                )
            ) from None

    async def _post(self, target: str, content: bytes, *, stream: bool) -> httpx.Response:
        """Send a JSON body to ``target`` (with the configured ``query``); the response is
        read by the caller, inside its error boundary."""
        http = self._client()
        url = httpx.URL(target)
        if self.query:
            # Merged, not passed as `params`, which would replace the endpoint's own query.
            url = url.copy_merge_params(self.query)
        request = http.build_request(
            "POST",
            url,
            content=content,
            headers={
                "content-type": "application/json",
                "accept": "text/event-stream" if stream else "application/json",
            },
        )
        return await http.send(request, stream=True)

    async def _read_stream(
        self,
        response: httpx.Response,
        reader: Reader,
        state: AttemptState,
        sink: Sink,
        mask: SecretFilter | None,
    ) -> None:
        decoder = SSEDecoder(
            max_line_bytes=self.max_sse_line_bytes, max_event_bytes=self.max_event_bytes
        )
        inflater = inflater_for(response)
        tail_deadline = math.inf
        ended = False
        chunks = chunks_of(response, inflater)
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
                    for event in decoder.close():
                        await self._event(event, reader, state, sink, mask)
                else:
                    # Piece by piece: an inflated chunk is never held whole.
                    for piece in pieces_of(chunk, inflater):
                        for event in decoder.feed(piece):
                            await self._event(event, reader, state, sink, mask)
                            if reader.terminated:
                                break
                        if reader.terminated:
                            break
                if ended:
                    break
                if reader.finished and tail_deadline == math.inf:
                    tail_deadline = trio.current_time() + _TAIL_GRACE
            if reader.terminated and not ended:
                # Read the end (the connection is then pooled), never long: the answer is whole.
                with trio.move_on_after(_DRAIN_GRACE):
                    async for _ in chunks:
                        pass
                    ended = True  # read to its end: nothing to unwind
        finally:
            if not ended:  # an exhausted body has nothing to unwind
                await abandon(chunks)
        if not (reader.finished or reader.terminated):
            raise MalformedStream("stream_cut", "the stream ended before its finish reason")

    async def _event(
        self,
        event: ServerSentEvent,
        reader: Reader,
        state: AttemptState,
        sink: Sink,
        mask: SecretFilter | None,
    ) -> None:
        secrets = self._secrets
        text = reader.event(event)
        state.finished = reader.finished or reader.terminated
        if reader.tools.pending:
            # Text first: an event that carries both is one piece of the answer in that order.
            if text:
                check_text(text, "a delta")
                if mask is not None:
                    text = mask.feed(text)
                if text:
                    await sink.delta(text)
            await sink.tool_calls(_masked(reader.tools.take(), secrets))
            return
        if text:
            # Encoding a delta (~40 ns) beats seeking a surrogate's escape; models: the reader.
            check_text(text, "a delta")
            if mask is not None:
                text = mask.feed(text)
                if not text:
                    return
            await sink.delta(text)


def _masked(fragments: list[ToolCallDelta], secrets: tuple[str, ...]) -> list[ToolCallDelta]:
    """Tool-call fragments with the key (as configured, whole) masked in their text. Only the
    exact secret forms: the key-shaped patterns ``redact`` also masks could be a tool's own
    arguments. (A key split across two fragments is not caught.)"""
    if not secrets:
        return fragments
    out = []
    for fragment in fragments:
        fields = (fragment.id, fragment.name, fragment.arguments)
        if any(field and secret in field for field in fields for secret in secrets):
            fragment = ToolCallDelta(
                fragment.index,
                _mask(fragment.id, secrets),
                _mask(fragment.name, secrets),
                _mask(fragment.arguments, secrets) or "",
            )
        out.append(fragment)
    return out


def _mask(text: str | None, secrets: tuple[str, ...]) -> str | None:
    if text is None:
        return None
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "[REDACTED]")
    return text


def _quiet_http_loggers() -> None:
    # httpx and httpcore log requests and response headers at DEBUG and INFO (a provider may
    # echo the key in a header): unless the user chose a level for them, keep them at WARNING.
    for name in ("httpx", "httpcore"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)


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
