"""The HTTP provider clients (OpenAI, Anthropic, Gemini) against ``httpx.MockTransport``:
SSE parsing, payload translation, error mapping, usage, finish reasons, stream terminators and
the redaction of keys."""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

import relayrace.actors
from relayrace import (
    Budgets,
    Category,
    Config,
    ConfigError,
    Policies,
    ProviderConfig,
    ProviderError,
    Request,
    RequestFailed,
    RetryPolicy,
    ToolCallDelta,
    Usage,
    load_config,
    open_supervisor,
)
from relayrace.actors import (
    POOL_SHARD,
    AnthropicClient,
    ClientCall,
    Completion,
    GeminiClient,
    OpenAIClient,
    ShardedTransport,
    sharded_transport,
)
from relayrace.providers import ServerSentEvent, SSEDecoder
from relayrace.testing import serve_mock_provider

C = Category
KEY = "test-key-0123456789-abcdef"  # not shaped like any known key: only the client can mask it

# --- fakes ------------------------------------------------------------------------------------


class Body(httpx.AsyncByteStream):
    """A response body: ``chunks``, then the end, a hang (``"hang"``) or an exception."""

    def __init__(self, chunks: list[bytes], end: Any = None):
        self._chunks = list(chunks)
        self._end = end
        self.closed = False

    def __aiter__(self):  # type: ignore[override]
        return self

    async def __anext__(self) -> bytes:
        await trio.lowlevel.checkpoint()
        if self._chunks:
            return self._chunks.pop(0)
        if self._end == "hang":
            await trio.sleep_forever()
        if isinstance(self._end, BaseException):
            raise self._end
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self.closed = True


class Sink:
    def __init__(self) -> None:
        self.deltas: list[str] = []
        self.tools: list[ToolCallDelta] = []
        self.progressed = 0

    async def delta(self, text: str) -> None:
        self.deltas.append(text)

    async def tool_calls(self, fragments: Sequence[ToolCallDelta]) -> None:
        self.tools.extend(fragments)

    def progress(self) -> None:
        self.progressed += 1

    @property
    def text(self) -> str:
        return "".join(self.deltas)


class Server:
    """A ``MockTransport`` handler that records requests and answers with ``respond``."""

    def __init__(self, respond: Callable[[httpx.Request], httpx.Response]):
        self.respond = respond
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.respond(request)

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)

    @property
    def body(self) -> dict[str, Any]:
        return json.loads(self.requests[-1].content)


def sse(*events: Any, event_names: bool = False, newline: str = "\n") -> bytes:
    """Events as an SSE body: dicts become JSON data; ``(name, data)`` pairs are named."""
    out = []
    for item in events:
        name, data = item if isinstance(item, tuple) else (None, item)
        text = data if isinstance(data, str) else json.dumps(data)
        lines = ([f"event: {name}"] if name else []) + [f"data: {text}", "", ""]
        out.append(newline.join(lines[:-1]) + newline)
    return "".join(out).encode()


def streamed(*chunks: bytes, end: Any = None, status: int = 200, headers: Any = None) -> Any:
    body = Body(list(chunks), end)

    def respond(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            status,
            headers={"content-type": "text/event-stream", **(headers or {})},
            stream=body,
        )

    respond.body = body  # type: ignore[attr-defined]
    return respond


def answer(data: Any, status: int = 200, headers: Any = None) -> Any:
    def respond(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json=data, headers=headers)

    return respond


def call(
    text: str = "hi",
    *,
    stream: bool = True,
    prefill: str | None = None,
    model: str | None = "up-model",
    messages: Any = None,
    **params: Any,
) -> ClientCall:
    request = Request("route", messages or [{"role": "user", "content": text}], params=params)
    return ClientCall(request=request, model=model, stream=stream, prefill=prefill, actor="p1")


async def run(client: Any, c: ClientCall) -> tuple[Completion, Sink]:
    sink = Sink()
    try:
        completion = await client.call(c, sink)
    finally:
        await client.aclose()
    return completion, sink


async def fail(client: Any, c: ClientCall) -> Any:
    with pytest.raises(ProviderError) as info:
        await run(client, c)
    failure = info.value.failure
    assert failure.provider == "p1"
    return failure


def openai(respond: Any, **kwargs: Any) -> tuple[OpenAIClient, Server]:
    server = Server(respond)
    return OpenAIClient(api_key=KEY, transport=server.transport, **kwargs), server


def anthropic(respond: Any, **kwargs: Any) -> tuple[AnthropicClient, Server]:
    server = Server(respond)
    return AnthropicClient(api_key=KEY, transport=server.transport, **kwargs), server


def gemini(respond: Any, **kwargs: Any) -> tuple[GeminiClient, Server]:
    server = Server(respond)
    return GeminiClient(api_key=KEY, transport=server.transport, **kwargs), server


def chunk(content: str | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    delta = {} if content is None else {"content": content}
    return {
        "object": "chat.completion.chunk",
        "model": "gpt-real-0613",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }


USAGE_CHUNK = {
    "model": "gpt-real-0613",
    "choices": [],
    "usage": {"prompt_tokens": 7, "completion_tokens": 3},
}


# --- SSE --------------------------------------------------------------------------------------

SAMPLE = (
    b": keep-alive comment\n"
    b"event: message_start\n"
    b'data: {"a": 1}\n'
    b"\n"
    b"data: line one\r\n"
    b"data: line two\r\n"
    b"data:no-space\r\n"
    b"\r\n"
    b"id: 7\rretry: 100\rdata: cr only\r\r"
    b"data\n\n"
    b"event: lonely\n\n"
    b"data: caf\xc3\xa9\n\n"
)
SAMPLE_EVENTS = [
    ServerSentEvent("message_start", '{"a": 1}'),
    ServerSentEvent("message", "line one\nline two\nno-space"),
    ServerSentEvent("message", "cr only"),
    ServerSentEvent("message", ""),
    ServerSentEvent("message", "café"),
]


def test_sse_whole_body() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(SAMPLE) + decoder.close() == SAMPLE_EVENTS


def test_sse_one_byte_at_a_time() -> None:
    decoder = SSEDecoder()
    events = []
    for i in range(len(SAMPLE)):
        events += decoder.feed(SAMPLE[i : i + 1])
    assert events + decoder.close() == SAMPLE_EVENTS


@given(st.lists(st.integers(min_value=0, max_value=len(SAMPLE)), max_size=12))
def test_sse_any_chunk_boundaries(cuts: list[int]) -> None:
    decoder = SSEDecoder()
    bounds = [0, *sorted(cuts), len(SAMPLE)]
    events = []
    for start, end in zip(bounds, bounds[1:], strict=False):
        events += decoder.feed(SAMPLE[start:end])
    assert events + decoder.close() == SAMPLE_EVENTS


def test_sse_crlf_split_between_chunks_is_one_line_end() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    # The "\n" completes the "\r" line end; the next "\r\n" is the blank line.
    assert decoder.feed(b"\n\r\n") == [ServerSentEvent("message", "a")]


def test_sse_close_keeps_whole_lines_and_drops_a_half_line() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: [DONE]\n") == []
    assert decoder.close() == [ServerSentEvent("message", "[DONE]")]
    decoder = SSEDecoder()
    assert decoder.feed(b'data: {"cut mid') == []
    assert decoder.close() == []


def test_sse_invalid_utf8_raises() -> None:
    with pytest.raises(UnicodeDecodeError):
        SSEDecoder().feed(b"data: \xff\n\n")


# --- OpenAI: payload --------------------------------------------------------------------------


async def test_openai_streamed_payload_and_headers() -> None:
    client, server = openai(streamed(sse(chunk("x", "stop"), "[DONE]")), max_tokens=99)
    await run(client, call(temperature=0.5, stop=["END"], seed=3))
    request = server.requests[0]
    assert str(request.url) == "https://api.openai.com/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["accept"] == "text/event-stream"
    assert request.headers["user-agent"].startswith("relayrace/")
    assert server.body == {
        "model": "up-model",
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0.5,
        "stop": ["END"],
        "seed": 3,
        "max_tokens": 99,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def test_openai_request_limit_wins_and_model_passes_through() -> None:
    client, server = openai(answer({"choices": []}), max_tokens=99)
    with pytest.raises(ProviderError):
        await run(client, call(stream=False, model=None, max_completion_tokens=5))
    body = server.body
    assert body["model"] == "route"
    assert body["max_completion_tokens"] == 5
    assert "max_tokens" not in body
    assert body["stream"] is False
    assert "stream_options" not in body


async def test_openai_azure_style_api_key_header_and_query() -> None:
    client, server = openai(
        streamed(sse(chunk("x", "stop"), "[DONE]")),
        base_url="https://res.openai.azure.com/openai/deployments/gpt4o/",
        auth="api-key",
        query={"api-version": "2024-10-21"},
        headers={"x-ms-client": "relayrace"},
        stream_usage=False,
    )
    await run(client, call())
    request = server.requests[0]
    assert str(request.url) == (
        "https://res.openai.azure.com/openai/deployments/gpt4o/chat/completions"
        "?api-version=2024-10-21"
    )
    assert request.headers["api-key"] == KEY
    assert "authorization" not in request.headers
    assert request.headers["x-ms-client"] == "relayrace"
    assert "stream_options" not in server.body


async def test_openai_without_a_key_sends_no_auth() -> None:
    server = Server(streamed(sse(chunk("x", "stop"), "[DONE]")))
    client = OpenAIClient(base_url="http://localhost:11434/v1", transport=server.transport)
    await run(client, call())
    assert "authorization" not in server.requests[0].headers
    assert str(server.requests[0].url) == "http://localhost:11434/v1/chat/completions"


async def test_openai_prefill_is_a_trailing_assistant_message() -> None:
    client, server = openai(streamed(sse(chunk(" dog.", "stop"), "[DONE]")))
    assert client.accepts_continuation is False
    completion, sink = await run(client, call(prefill="The lazy"))
    assert server.body["messages"][-1] == {"role": "assistant", "content": "The lazy"}
    assert sink.text == " dog."


# --- OpenAI: answers --------------------------------------------------------------------------


async def test_openai_stream_deltas_usage_model_and_finish() -> None:
    body = sse(
        {"model": "", "choices": [], "prompt_filter_results": []},  # Azure's first chunk
        chunk("", None),
        chunk("Hel"),
        chunk("lo", None),
        chunk(None, "stop"),
        USAGE_CHUNK,
        "[DONE]",
    )
    client, _ = openai(streamed(body))
    completion, sink = await run(client, call())
    assert sink.deltas == ["Hel", "lo"]
    assert sink.progressed == 0
    assert completion == Completion(
        model="gpt-real-0613",
        usage=Usage(prompt_tokens=7, completion_tokens=3),
        finish_reason="stop",
    )


async def test_openai_stream_split_across_chunks_and_sse_comments() -> None:
    body = b": OPENROUTER PROCESSING\n\n" + sse(chunk("a"), chunk("b", "length"), "[DONE]")
    pieces = [body[i : i + 7] for i in range(0, len(body), 7)]
    client, _ = openai(streamed(*pieces))
    completion, sink = await run(client, call())
    assert sink.text == "ab"
    assert completion.finish_reason == "length"


async def test_openai_whole_answer_reports_progress_before_the_text() -> None:
    client, server = openai(
        answer(
            {
                "model": "gpt-real",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "Hi!"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6},
            }
        )
    )
    completion, sink = await run(client, call(stream=False))
    assert server.requests[0].headers["accept"] == "application/json"
    assert sink.progressed == 1
    assert sink.deltas == ["Hi!"]
    assert completion == Completion(
        model="gpt-real", usage=Usage(prompt_tokens=4, completion_tokens=2), finish_reason="stop"
    )


async def test_openai_stream_answered_with_a_whole_body_is_read_whole() -> None:
    client, _ = openai(
        answer(
            {"choices": [{"index": 0, "message": {"content": "whole"}, "finish_reason": "stop"}]}
        )
    )
    completion, sink = await run(client, call(stream=True))
    assert sink.text == "whole"
    assert completion.model == "up-model"  # the provider did not say: the model asked for


async def test_openai_stream_without_done_after_the_finish_reason_is_complete() -> None:
    client, _ = openai(streamed(sse(chunk("a"), chunk(None, "stop"))))
    completion, sink = await run(client, call())
    assert sink.text == "a"
    assert completion.finish_reason == "stop"


async def test_openai_stream_cut_after_the_finish_reason_is_complete() -> None:
    client, _ = openai(
        streamed(sse(chunk("a", "stop")), end=httpx.RemoteProtocolError("peer closed"))
    )
    completion, sink = await run(client, call())
    assert (sink.text, completion.finish_reason) == ("a", "stop")


async def test_openai_stream_that_stalls_after_the_finish_reason_ends_after_a_grace(
    autojump_clock,
) -> None:
    client, _ = openai(streamed(sse(chunk("a", "stop")), end="hang"))
    start = trio.current_time()
    completion, sink = await run(client, call())
    assert trio.current_time() - start == pytest.approx(2.0)
    assert (sink.text, completion.finish_reason, completion.usage) == ("a", "stop", None)


async def test_openai_stream_that_stalls_after_done_is_not_waited_for(autojump_clock) -> None:
    respond = streamed(sse(chunk("a", "stop"), USAGE_CHUNK, "[DONE]"), end="hang")
    client, _ = openai(respond)
    start = trio.current_time()
    completion, _ = await run(client, call())
    assert trio.current_time() - start == pytest.approx(1.0)
    assert completion.usage == Usage(prompt_tokens=7, completion_tokens=3)
    assert respond.body.closed


@pytest.mark.parametrize(
    "end",
    [
        None,
        httpx.ReadError("connection reset"),
        httpx.RemoteProtocolError("incomplete chunked read"),
    ],
)
async def test_openai_stream_cut_before_the_finish_reason(end: Any) -> None:
    client, _ = openai(streamed(sse(chunk("half an ans")) + b'data: {"cho', end=end))
    failure = await fail(client, call())
    assert (failure.category, failure.code) == (C.STREAM_ERROR, "stream_cut")
    assert failure.message.startswith("openai: ")


async def test_openai_error_chunk_inside_the_stream_is_classified() -> None:
    error = {"error": {"message": "The server had an error", "type": "server_error", "code": None}}
    client, _ = openai(streamed(sse(chunk("a"), error)))
    failure = await fail(client, call())
    assert failure.category is C.PROVIDER_5XX
    assert failure.code == "server_error"
    assert failure.status is None
    assert failure.message == "openai: The server had an error"


async def test_openrouter_error_finish_is_a_stream_error() -> None:
    bad = {"choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}]}
    client, _ = openai(streamed(sse(chunk("a"), bad)))
    failure = await fail(client, call())
    assert failure.category is C.STREAM_ERROR


@pytest.mark.parametrize("stream", [True, False])
async def test_openai_content_filter_finish_is_content_policy(stream: bool) -> None:
    if stream:
        respond = streamed(sse(chunk("some"), chunk(None, "content_filter"), "[DONE]"))
    else:
        respond = answer(
            {
                "choices": [
                    {"index": 0, "message": {"content": ""}, "finish_reason": "content_filter"}
                ]
            }
        )
    client, _ = openai(respond)
    failure = await fail(client, call(stream=stream))
    assert (failure.category, failure.code) == (C.CONTENT_POLICY, "content_filter")


async def test_openai_malformed_event_is_a_stream_error() -> None:
    client, _ = openai(streamed(b"data: {not json}\n\n"))
    failure = await fail(client, call())
    assert (failure.category, failure.code) == (C.STREAM_ERROR, "malformed_json")


async def test_openai_event_that_is_not_an_object_is_a_stream_error() -> None:
    client, _ = openai(streamed(sse([1, 2])))
    failure = await fail(client, call())
    assert (failure.category, failure.code) == (C.STREAM_ERROR, "malformed_event")


async def test_openai_whole_body_that_is_not_json_is_a_stream_error() -> None:
    client, _ = openai(lambda request: httpx.Response(200, text="<html>proxy</html>"))
    failure = await fail(client, call(stream=False))
    assert (failure.category, failure.code) == (C.STREAM_ERROR, "malformed_json")


def http_date(seconds_from_now: float) -> str:
    return email.utils.formatdate(time.time() + seconds_from_now, usegmt=True)


@pytest.mark.parametrize(
    ("status", "body", "headers", "category", "code", "retry_after"),
    [
        (
            429,
            {
                "error": {
                    "message": "Rate limit reached",
                    "type": "requests",
                    "code": "rate_limit_exceeded",
                }
            },
            {"retry-after": "7"},
            C.RATE_LIMIT,
            "rate_limit_exceeded",
            7.0,
        ),
        (
            429,
            {"error": {"message": "slow down", "type": "rate_limit_error"}},
            {"retry-after-ms": "1500", "retry-after": "9"},
            C.RATE_LIMIT,
            "rate_limit_error",
            1.5,
        ),
        (
            429,
            {
                "error": {
                    "message": "You exceeded your current quota",
                    "type": "insufficient_quota",
                    "code": "insufficient_quota",
                }
            },
            {},
            C.QUOTA_EXHAUSTED,
            "insufficient_quota",
            None,
        ),
        (
            400,
            {
                "error": {
                    "message": "maximum context length is 8192 tokens",
                    "type": "invalid_request_error",
                    "code": "context_length_exceeded",
                }
            },
            {},
            C.CONTEXT_LENGTH,
            "context_length_exceeded",
            None,
        ),
        (
            400,
            {"error": {"message": "'messages' must be non-empty", "type": "invalid_request_error"}},
            {},
            C.BAD_REQUEST,
            "invalid_request_error",
            None,
        ),
        (
            401,
            {"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}},
            {},
            C.AUTH,
            "invalid_api_key",
            None,
        ),
        (
            404,
            {"error": {"message": "The model does not exist", "code": "model_not_found"}},
            {},
            C.MODEL_NOT_FOUND,
            "model_not_found",
            None,
        ),
        (502, "<html>Bad Gateway</html>", {}, C.PROVIDER_5XX, None, None),
        (
            503,
            {"error": {"message": "The engine is currently overloaded"}},
            {},
            C.OVERLOADED,
            None,
            None,
        ),
    ],
)
async def test_openai_error_statuses(status, body, headers, category, code, retry_after) -> None:
    def respond(request: httpx.Request) -> httpx.Response:
        if isinstance(body, str):
            return httpx.Response(status, text=body, headers=headers)
        return httpx.Response(status, json=body, headers=headers)

    client, _ = openai(respond)
    failure = await fail(client, call())
    assert (failure.category, failure.code, failure.status) == (category, code, status)
    assert failure.retry_after == retry_after
    assert failure.message.startswith("openai: ")


async def test_retry_after_as_an_http_date() -> None:
    client, _ = openai(
        answer({"error": {"message": "busy"}}, status=429, headers={"retry-after": http_date(30)})
    )
    failure = await fail(client, call())
    assert failure.category is C.RATE_LIMIT
    assert 25 <= failure.retry_after <= 31


async def test_x_should_retry_is_kept() -> None:
    client, _ = openai(
        answer({"error": {"message": "no"}}, status=500, headers={"x-should-retry": "false"})
    )
    failure = await fail(client, call())
    assert failure.should_retry is False


async def test_an_endless_error_body_is_read_only_in_part() -> None:
    respond = streamed(b"x" * 40_000, b"y" * 40_000, end="hang", status=500)
    client, _ = openai(respond)
    failure = await fail(client, call())
    assert failure.category is C.PROVIDER_5XX
    assert len(failure.message) <= 520
    assert respond.body.closed


@pytest.mark.parametrize(
    ("exc", "category", "code"),
    [
        (httpx.ConnectError("[Errno 111] Connection refused"), C.NETWORK, "connect_error"),
        (httpx.ConnectTimeout("timed out"), C.TIMEOUT, "connect_timeout"),
        (httpx.ReadError("reset by peer"), C.NETWORK, "connection_lost"),
        (
            httpx.RemoteProtocolError("Server disconnected without sending a response."),
            C.NETWORK,
            "connection_lost",
        ),
    ],
)
async def test_transport_failures(exc, category, code) -> None:
    def respond(request: httpx.Request) -> httpx.Response:
        raise exc

    client, _ = openai(respond)
    failure = await fail(client, call())
    assert (failure.category, failure.code, failure.status) == (category, code, None)
    assert failure.message.startswith("openai: ")


async def test_a_whole_body_cut_midway_is_a_network_failure() -> None:
    respond = streamed(b'{"choices": [', end=httpx.ReadError("reset"))
    client, _ = openai(respond)
    failure = await fail(client, call(stream=False))
    assert (failure.category, failure.code) == (C.NETWORK, "incomplete_body")


async def test_params_that_are_not_json_are_a_bad_request_not_a_crash() -> None:
    client, server = openai(answer({}))
    failure = await fail(client, call(logit_bias={"1": float("nan")}))
    assert (failure.category, failure.code) == (C.BAD_REQUEST, "unserializable_request")
    failure = await fail(client, call(extra=object()))
    assert (failure.category, failure.code) == (C.BAD_REQUEST, "unserializable_request")
    assert server.requests == []


# --- secrets ----------------------------------------------------------------------------------


async def test_the_key_never_appears_in_a_failure_or_a_repr() -> None:
    echo = {"error": {"message": f"Incorrect API key provided: {KEY}. Header was Bearer {KEY}"}}
    client, _ = openai(answer(echo, status=401))
    assert KEY not in repr(client)
    with pytest.raises(ProviderError) as info:
        await run(client, call())
    failure = info.value.failure
    assert failure.category is C.AUTH
    for text in (failure.message, str(info.value), repr(failure), str(failure.to_dict())):
        assert KEY not in text
    assert "[REDACTED]" in failure.message


async def test_a_key_cut_by_the_message_limit_is_still_masked() -> None:
    # classify cuts long messages; the key must be masked before the cut, not after.
    message = "x" * 480 + KEY
    client, _ = anthropic(
        answer({"type": "error", "error": {"type": "api_error", "message": message}}, status=500)
    )
    failure = await fail(client, call())
    assert KEY[:10] not in failure.message


async def test_a_key_in_a_configured_header_is_masked_too() -> None:
    secret = "hdr-secret-value-987654"
    echo = {"error": {"message": f"proxy refused token {secret}"}}
    server = Server(answer(echo, status=403))
    client = OpenAIClient(headers={"X-Proxy-Token": secret}, transport=server.transport)
    failure = await fail(client, call())
    assert secret not in failure.message


async def test_a_transport_error_naming_the_key_is_masked() -> None:
    def respond(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"cannot reach proxy with key={KEY}")

    client, _ = gemini(respond)
    failure = await fail(client, call())
    assert KEY not in failure.message


# --- the connection pool ----------------------------------------------------------------------


async def test_one_pool_per_client_sized_and_timed_from_the_actor() -> None:
    respond = streamed(sse(chunk("a", "stop"), "[DONE]"))
    server = Server(lambda r: streamed(sse(chunk("a", "stop"), "[DONE]"))(r))
    client = OpenAIClient(max_connections=3, connect_timeout=1.5, transport=server.transport)
    http = client._client()
    assert http is client._client()  # reused, not one per call
    assert http.timeout == httpx.Timeout(connect=1.5, read=None, write=10.0, pool=None)
    await client.call(call(), Sink())
    await client.call(call(), Sink())
    assert client._http is http
    await client.aclose()
    assert http.is_closed
    # Closed for good by one supervisor, a later one can still use the client.
    await client.call(call(), Sink())
    assert client._http is not http
    await client.aclose()
    del respond


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError, match="base_url"):
        OpenAIClient(base_url="api.openai.com")
    with pytest.raises(ValueError, match="auth"):
        OpenAIClient(auth="basic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_connections"):
        GeminiClient(max_connections=0)
    with pytest.raises(ValueError, match="max_tokens"):
        AnthropicClient(max_tokens=0)


# --- Anthropic --------------------------------------------------------------------------------


def anthropic_stream(*texts: str, stop: str = "end_turn", terminate: bool = True) -> bytes:
    events: list[Any] = [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_1",
                    "type": "message",
                    "role": "assistant",
                    "content": [],
                    "model": "claude-real-20250101",
                    "stop_reason": None,
                    "usage": {"input_tokens": 25, "cache_read_input_tokens": 5, "output_tokens": 1},
                },
            },
        ),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        ("ping", {"type": "ping"}),
    ]
    for text in texts:
        events.append(
            (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": text},
                },
            )
        )
    events.append(("content_block_stop", {"type": "content_block_stop", "index": 0}))
    events.append(
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": None},
                "usage": {"output_tokens": 15},
            },
        )
    )
    if terminate:
        events.append(("message_stop", {"type": "message_stop"}))
    return sse(*events)


async def test_anthropic_payload_translation() -> None:
    client, server = anthropic(streamed(anthropic_stream("ok")))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "second"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ],
        },
        {"role": "assistant", "content": "answer"},
        {"role": "developer", "content": [{"type": "text", "text": "Use French."}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
        {"role": "user", "content": "and?"},
    ]
    await run(
        client,
        call(
            messages=messages,
            temperature=1.7,
            top_p=0.9,
            stop="STOP",
            seed=1,
            n=1,
            presence_penalty=0.5,
            top_k=40,
            user="u-1",
        ),
    )
    request = server.requests[0]
    assert str(request.url) == "https://api.anthropic.com/v1/messages"
    assert request.headers["x-api-key"] == KEY
    assert request.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in request.headers
    assert server.body == {
        "model": "up-model",
        "max_tokens": 4096,
        "system": "Be brief.\n\nUse French.",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "first"},
                    {"type": "text", "text": "second"},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"},
                    },
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "answer"},
                    {"type": "tool_use", "id": "c1", "name": "f", "input": {}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "c1", "content": "42"},
                    {"type": "text", "text": "and?"},
                ],
            },
        ],
        "temperature": 1.0,
        "top_p": 0.9,
        "top_k": 40,
        "stop_sequences": ["STOP"],
        "metadata": {"user_id": "u-1"},
        "stream": True,
    }


async def test_anthropic_max_tokens_from_the_request_or_the_client() -> None:
    client, server = anthropic(streamed(anthropic_stream("ok")), max_tokens=100)
    await run(client, call())
    assert server.body["max_tokens"] == 100
    client, server = anthropic(streamed(anthropic_stream("ok")), max_tokens=100)
    await run(client, call(max_tokens=7))
    assert server.body["max_tokens"] == 7


async def test_anthropic_stream_events() -> None:
    client, _ = anthropic(streamed(anthropic_stream("Hel", "lo")))
    completion, sink = await run(client, call())
    assert sink.deltas == ["Hel", "lo"]
    assert completion == Completion(
        model="claude-real-20250101",
        usage=Usage(prompt_tokens=30, completion_tokens=15, cached_tokens=5),
        finish_reason="stop",
    )


async def test_anthropic_events_without_event_lines() -> None:
    body = anthropic_stream("a").replace(b"event: ", b": was event ")
    client, _ = anthropic(streamed(body))
    completion, sink = await run(client, call())
    assert (sink.text, completion.finish_reason) == ("a", "stop")


async def test_anthropic_max_tokens_stop_is_length() -> None:
    client, _ = anthropic(streamed(anthropic_stream("a", stop="max_tokens")))
    completion, _ = await run(client, call())
    assert completion.finish_reason == "length"


async def test_anthropic_prefill_without_trailing_whitespace() -> None:
    client, server = anthropic(streamed(anthropic_stream(" ", " brown", " fox")))
    assert client.accepts_continuation is True
    completion, sink = await run(client, call(prefill="The quick \n"))
    assert server.body["messages"][-1] == {"role": "assistant", "content": "The quick"}
    # The caller already has "The quick \n": the whitespace the model repeats is dropped.
    assert sink.text == "brown fox"


async def test_anthropic_prefill_extends_the_callers_own_assistant_turn() -> None:
    client, server = anthropic(streamed(anthropic_stream("!")))
    messages = [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "Hi"}]
    _, sink = await run(client, call(messages=messages, prefill=" there"))
    assert server.body["messages"] == [
        {"role": "user", "content": "say hi"},
        {"role": "assistant", "content": "Hi there"},
    ]
    assert sink.text == "!"


async def test_anthropic_overloaded_error_event_mid_stream() -> None:
    error = (
        "error",
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
    )
    body = anthropic_stream("par", terminate=False).split(b"event: message_delta")[0] + sse(error)
    client, _ = anthropic(streamed(body))
    failure = await fail(client, call())
    assert (failure.category, failure.code, failure.status) == (
        C.OVERLOADED,
        "overloaded_error",
        None,
    )
    assert failure.message == "anthropic: Overloaded"


@pytest.mark.parametrize(
    ("status", "error_type", "category", "headers", "retry_after"),
    [
        (529, "overloaded_error", C.OVERLOADED, {}, None),
        (429, "rate_limit_error", C.RATE_LIMIT, {"retry-after": "12"}, 12.0),
        (401, "authentication_error", C.AUTH, {}, None),
        (403, "permission_error", C.AUTH, {}, None),
        (404, "not_found_error", C.MODEL_NOT_FOUND, {}, None),
        (500, "api_error", C.PROVIDER_5XX, {}, None),
        (400, "invalid_request_error", C.BAD_REQUEST, {}, None),
    ],
)
async def test_anthropic_error_statuses(status, error_type, category, headers, retry_after) -> None:
    body = {
        "type": "error",
        "error": {"type": error_type, "message": "nope"},
        "request_id": "req_1",
    }
    client, _ = anthropic(answer(body, status=status, headers=headers))
    failure = await fail(client, call())
    assert (failure.category, failure.code, failure.status) == (category, error_type, status)
    assert failure.retry_after == retry_after


async def test_anthropic_prompt_too_long_is_context_length() -> None:
    body = {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "prompt is too long: 210000 tokens > 200000 maximum",
        },
    }
    client, _ = anthropic(answer(body, status=400))
    failure = await fail(client, call())
    assert failure.category is C.CONTEXT_LENGTH


async def test_anthropic_whole_message() -> None:
    message = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-real",
        "content": [
            {"type": "thinking", "thinking": "hmm"},
            {"type": "text", "text": "Hi"},
            {"type": "text", "text": "!"},
        ],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 3, "output_tokens": 2},
    }
    client, server = anthropic(answer(message))
    completion, sink = await run(client, call(stream=False))
    assert server.body["stream"] is False
    assert sink.progressed == 1
    assert sink.text == "Hi!"
    assert completion == Completion(
        model="claude-real", usage=Usage(prompt_tokens=3, completion_tokens=2), finish_reason="stop"
    )


async def test_anthropic_refusal_is_content_policy() -> None:
    client, _ = anthropic(streamed(anthropic_stream("I", stop="refusal")))
    failure = await fail(client, call())
    assert failure.category is C.CONTENT_POLICY


async def test_anthropic_stream_without_message_stop_after_the_stop_reason_is_complete() -> None:
    client, _ = anthropic(streamed(anthropic_stream("a", terminate=False)))
    completion, sink = await run(client, call())
    assert (sink.text, completion.finish_reason) == ("a", "stop")


async def test_anthropic_stream_cut_before_the_stop_reason() -> None:
    body = anthropic_stream("a").split(b"event: content_block_stop")[0]
    client, _ = anthropic(streamed(body))
    failure = await fail(client, call())
    assert (failure.category, failure.code) == (C.STREAM_ERROR, "stream_cut")


# --- Gemini -----------------------------------------------------------------------------------


def gemini_chunk(
    text: str | None = None, finish: str | None = None, usage: bool = True
) -> dict[str, Any]:
    candidate: dict[str, Any] = {"index": 0}
    if text is not None:
        candidate["content"] = {"role": "model", "parts": [{"text": text}]}
    if finish:
        candidate["finishReason"] = finish
    data: dict[str, Any] = {"candidates": [candidate], "modelVersion": "gemini-real-001"}
    if usage:
        data["usageMetadata"] = {
            "promptTokenCount": 8,
            "candidatesTokenCount": 4,
            "thoughtsTokenCount": 2,
            "totalTokenCount": 14,
        }
    return data


async def test_gemini_urls_and_key_header() -> None:
    client, server = gemini(streamed(sse(gemini_chunk("a", "STOP"))))
    await run(client, call(model="models/gemini-2.0-flash"))
    request = server.requests[0]
    assert str(request.url) == (
        "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse"
    )
    assert request.headers["x-goog-api-key"] == KEY
    assert KEY not in str(request.url)
    client, server = gemini(
        answer({"candidates": [gemini_chunk("a", "STOP")["candidates"][0]]}), query={"x": "1"}
    )
    await run(client, call(stream=False, model="gemini-2.0-flash"))
    assert str(server.requests[0].url) == (
        "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.0-flash:generateContent?x=1"
    )


async def test_gemini_payload_translation() -> None:
    client, server = gemini(streamed(sse(gemini_chunk("a", "STOP"))), max_tokens=256)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "one"},
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "https://x.test/cat.png"}}],
        },
        {
            "role": "assistant",
            "content": "two",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "three"},
    ]
    await run(
        client,
        call(
            messages=messages,
            prefill="four",
            temperature=0.2,
            top_p=0.5,
            stop=["X"],
            seed=9,
            response_format={"type": "json_object"},
        ),
    )
    assert server.body == {
        "contents": [
            {
                "role": "user",
                "parts": [
                    {"text": "one"},
                    {"fileData": {"fileUri": "https://x.test/cat.png", "mimeType": "image/png"}},
                ],
            },
            {"role": "model", "parts": [{"text": "two"}, {"functionCall": {"name": "f", "args": {}}}]},
            {
                "role": "user",
                "parts": [{"functionResponse": {"name": "f", "response": {"result": "three"}}}],
            },
            {"role": "model", "parts": [{"text": "four"}]},
        ],
        "systemInstruction": {"parts": [{"text": "Be brief."}]},
        "generationConfig": {
            "temperature": 0.2,
            "topP": 0.5,
            "seed": 9,
            "maxOutputTokens": 256,
            "stopSequences": ["X"],
            "responseMimeType": "application/json",
        },
    }


async def test_gemini_stream_with_crlf_usage_model_and_finish() -> None:
    body = sse(
        gemini_chunk("Hel", usage=False),
        gemini_chunk("lo"),
        gemini_chunk("", "STOP"),
        newline="\r\n",
    )
    client, _ = gemini(streamed(*[body[i : i + 5] for i in range(0, len(body), 5)]))
    completion, sink = await run(client, call())
    assert sink.text == "Hello"
    assert completion == Completion(
        model="gemini-real-001",
        usage=Usage(prompt_tokens=8, completion_tokens=6, reasoning_tokens=2),
        finish_reason="stop",
    )


async def test_gemini_thought_parts_are_not_the_answer() -> None:
    data = gemini_chunk("answer", "MAX_TOKENS")
    data["candidates"][0]["content"]["parts"].insert(0, {"text": "thinking...", "thought": True})
    client, _ = gemini(streamed(sse(data)))
    completion, sink = await run(client, call())
    assert (sink.text, completion.finish_reason) == ("answer", "length")


async def test_gemini_whole_answer() -> None:
    client, _ = gemini(answer(gemini_chunk("Hi", "STOP")))
    completion, sink = await run(client, call(stream=False))
    assert (sink.text, sink.progressed, completion.model) == ("Hi", 1, "gemini-real-001")


async def test_gemini_stream_without_a_finish_reason_was_cut() -> None:
    client, _ = gemini(streamed(sse(gemini_chunk("Hel"))))
    failure = await fail(client, call())
    assert (failure.category, failure.code) == (C.STREAM_ERROR, "stream_cut")


@pytest.mark.parametrize(
    "data",
    [
        gemini_chunk("bad", "SAFETY"),
        {"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}, "modelVersion": "g"},
    ],
)
async def test_gemini_blocks_are_content_policy(data) -> None:
    client, _ = gemini(streamed(sse(data)))
    failure = await fail(client, call())
    assert failure.category is C.CONTENT_POLICY


@pytest.mark.parametrize(
    ("status", "grpc", "message", "details", "category", "retry_after"),
    [
        (
            429,
            "RESOURCE_EXHAUSTED",
            "Resource has been exhausted (e.g. check quota).",
            [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "21s"}],
            C.RATE_LIMIT,
            21.0,
        ),
        (
            503,
            "UNAVAILABLE",
            "The model is overloaded. Please try again later.",
            [],
            C.OVERLOADED,
            None,
        ),
        (500, "INTERNAL", "An internal error has occurred.", [], C.PROVIDER_5XX, None),
        (400, "INVALID_ARGUMENT", "Invalid JSON payload received.", [], C.BAD_REQUEST, None),
        (
            400,
            "INVALID_ARGUMENT",
            "API key not valid. Please pass a valid API key.",
            [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}],
            C.AUTH,
            None,
        ),
        (403, "PERMISSION_DENIED", "Permission denied.", [], C.AUTH, None),
        (
            404,
            "NOT_FOUND",
            "models/gemini-9 is not found for API version v1beta",
            [],
            C.MODEL_NOT_FOUND,
            None,
        ),
    ],
)
async def test_gemini_error_statuses(status, grpc, message, details, category, retry_after) -> None:
    body = [{"error": {"code": status, "message": message, "status": grpc, "details": details}}]
    client, _ = gemini(answer(body, status=status))
    failure = await fail(client, call())
    assert (failure.category, failure.status) == (category, status)
    assert failure.retry_after == retry_after
    assert failure.message.startswith("gemini: ")


async def test_gemini_error_inside_the_stream() -> None:
    error = {"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}}
    client, _ = gemini(streamed(sse(gemini_chunk("a"), error)))
    failure = await fail(client, call())
    assert failure.category is C.OVERLOADED


# --- config -----------------------------------------------------------------------------------


def provider_config(kind: str, **client: Any) -> Config:
    return load_config(
        {
            "providers": [
                {
                    "name": "p",
                    "kind": kind,
                    "max_concurrency": 3,
                    "budgets": {"connect": 2.5},
                    **client,
                }
            ]
        }
    )


@pytest.mark.parametrize(
    ("kind", "cls", "extra", "header", "value"),
    [
        (
            "openai",
            OpenAIClient,
            {
                "auth": "api-key",
                "query": {"api-version": "v"},
                "stream_usage": False,
                "max_tokens": 9,
            },
            "api-key",
            KEY,
        ),
        (
            "anthropic",
            AnthropicClient,
            {"version": "2024-01-01", "max_tokens": 9},
            "x-api-key",
            KEY,
        ),
        ("gemini", GeminiClient, {"api_version": "v1", "max_tokens": 9}, "x-goog-api-key", KEY),
    ],
)
def test_client_kinds_from_config(monkeypatch, kind, cls, extra, header, value) -> None:
    monkeypatch.setenv("RELAYRACE_TEST_KEY", KEY)
    cfg = provider_config(
        kind,
        base_url="https://llm.test/api",
        api_key_env="RELAYRACE_TEST_KEY",
        headers={"x-extra": "1"},
        extra_body={"foo": "bar"},
        **extra,
    )
    client = cfg.providers[0].client
    assert isinstance(client, cls)
    assert client.base_url == "https://llm.test/api"
    assert client.extra_body == {"foo": "bar"}
    assert client.max_tokens == 9
    http = client._client()
    assert http.headers[header] == value
    assert http.headers["x-extra"] == "1"
    assert http.timeout.connect == 2.5
    assert KEY not in repr(cfg)


def test_client_kinds_have_defaults(monkeypatch) -> None:
    assert provider_config("openai").providers[0].client.base_url == "https://api.openai.com/v1"
    assert provider_config("anthropic").providers[0].client.base_url == "https://api.anthropic.com"
    gemini_client = provider_config("gemini").providers[0].client
    assert gemini_client.base_url == "https://generativelanguage.googleapis.com"
    assert provider_config("anthropic").providers[0].continues is True
    assert provider_config("openai").providers[0].continues is False
    assert provider_config("openai", accepts_continuation=True).providers[0].continues is True


@pytest.mark.parametrize(
    ("client", "path"),
    [
        ({"api_key_env": "RELAYRACE_SURELY_UNSET"}, "providers[0].api_key_env"),
        ({"base_url": "ftp://x"}, "providers[0].base_url"),
        ({"headers": {"a": 1}}, "providers[0].headers.a"),
        ({"headers": "x"}, "providers[0].headers"),
        ({"extra_body": [1]}, "providers[0].extra_body"),
        ({"max_tokens": 0}, "providers[0].max_tokens"),
        ({"auth": "basic"}, "providers[0].auth"),
        ({"api_key": "inline"}, "providers[0].api_key"),
    ],
)
def test_client_config_mistakes_name_their_path(monkeypatch, client, path) -> None:
    monkeypatch.delenv("RELAYRACE_SURELY_UNSET", raising=False)
    with pytest.raises(ConfigError) as info:
        provider_config("openai", **client)
    assert info.value.path == path


def test_the_clients_are_exported() -> None:
    for name in ("OpenAIClient", "AnthropicClient", "GeminiClient"):
        assert name in relayrace.actors.__all__
        assert isinstance(getattr(relayrace.actors, name)(), relayrace.actors.ProviderClient)


# --- through a supervisor ---------------------------------------------------------------------


async def test_a_streamed_answer_through_the_supervisor(autojump_clock) -> None:
    body = sse(chunk("Hel"), chunk("lo", "stop"), USAGE_CHUNK, "[DONE]")
    server = Server(lambda request: streamed(body)(request))
    cfg = Config(
        providers=[
            ProviderConfig(
                name="oa", client=OpenAIClient(transport=server.transport), model="gpt-x"
            )
        ]
    )
    async with open_supervisor(cfg) as sup:
        async with sup.stream(Request("any", [{"role": "user", "content": "hi"}])) as s:
            deltas = [d.text async for d in s]
        reply = s.reply
    assert deltas == ["Hel", "lo"]
    assert (reply.text, reply.model, reply.finish_reason) == ("Hello", "gpt-real-0613", "stop")
    assert reply.usage == Usage(prompt_tokens=7, completion_tokens=3)
    assert json.loads(server.requests[0].content)["model"] == "gpt-x"


def one_provider(client: Any, **budgets: float) -> Config:
    return Config(
        providers=[ProviderConfig(name="slow", client=client, budgets=Budgets(**budgets))],
        policies=Policies(retry=RetryPolicy(max_attempts=1)),
    )


async def test_a_provider_that_never_answers_times_out_on_the_first_token_budget(
    autojump_clock,
) -> None:
    async def never(request: httpx.Request) -> httpx.Response:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    client = AnthropicClient(transport=httpx.MockTransport(never))
    async with open_supervisor(one_provider(client, first_token=4.0)) as sup:
        start = trio.current_time()
        with pytest.raises(RequestFailed) as info:
            await sup.complete(Request("any", [{"role": "user", "content": "hi"}]))
        assert trio.current_time() - start == pytest.approx(4.0)
    assert (info.value.failure.category, info.value.failure.code) == (
        C.TIMEOUT,
        "first_token_timeout",
    )


async def test_a_silent_stream_times_out_on_the_first_token_budget(autojump_clock) -> None:
    respond = streamed(b": keep-alive\n\n", end="hang")
    client = OpenAIClient(transport=httpx.MockTransport(respond))
    async with open_supervisor(one_provider(client, first_token=4.0, idle=50.0)) as sup:
        start = trio.current_time()
        with pytest.raises(RequestFailed) as info:
            async with sup.stream(Request("any", [{"role": "user", "content": "hi"}])) as s:
                async for _ in s:
                    pass
        assert trio.current_time() - start == pytest.approx(4.0)
    assert (info.value.failure.category, info.value.failure.code) == (
        C.TIMEOUT,
        "first_token_timeout",
    )
    assert respond.body.closed  # the upstream response was closed, not left hanging


async def test_a_whole_answer_switches_to_the_idle_budget_once_headers_arrive(
    autojump_clock,
) -> None:
    client = OpenAIClient(transport=httpx.MockTransport(streamed(end="hang")))
    async with open_supervisor(one_provider(client, first_token=4.0, idle=9.0)) as sup:
        start = trio.current_time()
        with pytest.raises(RequestFailed) as info:
            await sup.complete(Request("any", [{"role": "user", "content": "hi"}]))
        assert trio.current_time() - start == pytest.approx(9.0)
    assert info.value.failure.category is C.TIMEOUT


# --- connection pools: sharding -----------------------------------------------------------------


async def _held_connections(connections: int, requests: int, transport: str = "h11") -> int:
    """Send ``requests`` requests the mock never answers through an ``OpenAIClient`` of
    ``connections`` connections; return how many connections the mock sees open once every
    request is sent or waiting for a connection."""
    async with serve_mock_provider() as mock, trio.open_nursery() as nursery:
        client = OpenAIClient(
            base_url=f"{mock.base_url}/v1", max_connections=connections, transport=transport
        )
        for _ in range(requests):
            nursery.start_soon(client.call, call(model="hang"), Sink())
        for _ in range(100):  # until the pools are full (real sockets: a few loop turns)
            await trio.sleep(0.01)
        seen = mock.open_connections
        nursery.cancel_scope.cancel()
    await client.aclose()
    return seen


@pytest.mark.parametrize("transport", ["h11", "httpx"])
async def test_a_client_holds_at_most_its_pool_size_in_connections(
    autojump_clock, transport: str
) -> None:
    assert await _held_connections(3, 5, transport) == 3
    assert await _held_connections(20, 25, transport) == (20 if transport == "h11" else 21)


async def test_a_client_with_many_connections_spreads_them_over_small_pools(
    autojump_clock,
) -> None:
    transport = sharded_transport(2 * POOL_SHARD)
    assert len(transport.shards) == 2 and transport.per_shard == POOL_SHARD
    await transport.aclose()
    # The pools together hold the connections asked for (rounded up to whole pools).
    assert await _held_connections(2 * POOL_SHARD, 2 * POOL_SHARD + 3, "httpx") == 2 * POOL_SHARD
    assert await _held_connections(20, 25, "httpx") == 21  # 3 pools of 7 ≥ 20


class _Body(httpx.AsyncByteStream):  # a body read off the wire, as a real transport gives
    async def __aiter__(self) -> Any:
        yield b"ok"


def _shard(index: int, hits: list[int], refuse: int = 0) -> httpx.MockTransport:
    """A pool that records its ``index`` in ``hits`` and refuses its first ``refuse`` requests."""

    def handle(request: httpx.Request) -> httpx.Response:
        hits.append(index)
        if len(hits) <= refuse:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, stream=_Body())

    return httpx.MockTransport(handle)


async def test_sharded_pools_fill_in_order_and_free_a_place_when_a_response_closes() -> None:
    hits: list[int] = []
    transport = ShardedTransport([_shard(i, hits) for i in range(3)], per_shard=2)
    async with httpx.AsyncClient(transport=transport) as client:
        # One after another: always the first pool (its connections are reused).
        for _ in range(3):
            await client.get("http://x/")
        assert hits == [0, 0, 0]
        hits.clear()
        # Held open together: the first pool takes two, then the next, in order.
        responses = []
        for _ in range(5):
            responses.append(await client.send(client.build_request("GET", "http://x/"), stream=True))
        assert hits == [0, 0, 1, 1, 2]
        # Every pool is full: the least busy takes the next.
        responses.append(await client.send(client.build_request("GET", "http://x/"), stream=True))
        assert hits[-1] == 2
        # Closing a response frees its place: the first pool has room again.
        await responses[0].aclose()
        await client.get("http://x/")
        assert hits[-1] == 0
        for response in responses[1:]:
            await response.aclose()
        # Every place is free again: requests held together fill the pools from the first.
        hits.clear()
        held = [
            await client.send(client.build_request("GET", "http://x/"), stream=True)
            for _ in range(3)
        ]
        assert hits == [0, 0, 1]
        for response in held:
            await response.aclose()


async def test_a_failed_request_frees_its_place_in_a_sharded_pool() -> None:
    hits: list[int] = []
    transport = ShardedTransport([_shard(0, hits, refuse=3), _shard(1, hits)], per_shard=1)
    async with httpx.AsyncClient(transport=transport) as client:
        for _ in range(3):
            with pytest.raises(httpx.ConnectError):
                await client.get("http://x/")
        response = await client.send(client.build_request("GET", "http://x/"), stream=True)
        await response.aclose()
    # Had a failed request kept its place, the one-place first pool would be full.
    assert hits == [0, 0, 0, 0]


async def test_a_cookie_a_provider_sets_never_rides_on_the_next_request() -> None:
    whole = {
        "model": "m",
        "choices": [{"message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    }
    client, server = openai(answer(whole, headers={"set-cookie": "session=abc; Path=/"}))
    sink = Sink()
    try:
        for _ in range(2):
            await client.call(call(stream=False), sink)
        assert client._client().cookies.jar is not None and not client._client().cookies
    finally:
        await client.aclose()
    assert [r.headers.get("cookie") for r in server.requests] == [None, None]


async def test_tool_calls_have_the_key_masked_and_keep_the_text_of_their_event() -> None:
    chunk = {
        "choices": [
            {
                "index": 0,
                "delta": {
                    "content": "calling",
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_1",
                            "function": {"name": "f", "arguments": json.dumps({"k": KEY})},
                        }
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ]
    }
    client, _ = openai(streamed(sse(chunk, "[DONE]")))
    completion, sink = await run(client, call())
    assert sink.text == "calling"
    assert completion.finish_reason == "tool_calls"
    assert [(f.id, f.name) for f in sink.tools] == [("call_1", "f")]
    assert KEY not in sink.tools[0].arguments
    assert json.loads(sink.tools[0].arguments) == {"k": "[REDACTED]"}

