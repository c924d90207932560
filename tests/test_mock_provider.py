"""The mock provider: a real loopback HTTP server driven with plain ``httpx.AsyncClient``."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio
from trio.testing import wait_all_tasks_blocked

import relayrace.testing
from relayrace import Category, classify
from relayrace.testing import (
    MOCK_SCENARIOS,
    SCRIPTED_ANSWER,
    MockProvider,
    MockScenario,
    mock_model,
    serve_mock_provider,
)

OPENAI = "/v1/chat/completions"
ANTHROPIC = "/v1/messages"
FORMATS = ("openai", "anthropic", "gemini")


# --- helpers -----------------------------------------------------------------------------------


@pytest.fixture
async def mock() -> AsyncIterator[MockProvider]:
    async with serve_mock_provider() as provider:
        yield provider
        # Every test closes its client first: nothing may be left open, and nothing may crash.
        await wait_all_tasks_blocked()
        assert provider.open_connections == 0
        assert provider.errors == []


@pytest.fixture
async def client(mock: MockProvider) -> AsyncIterator[httpx.AsyncClient]:
    # No httpx timeouts: trio cancel scopes (and the mock clock) own every wait.
    async with httpx.AsyncClient(base_url=mock.base_url, timeout=httpx.Timeout(None)) as c:
        yield c


def path_for(fmt: str, model: str, stream: bool = False, sse: bool = True) -> str:
    if fmt == "openai":
        return OPENAI
    if fmt == "anthropic":
        return ANTHROPIC
    action = "streamGenerateContent" if stream else "generateContent"
    return f"/v1beta/models/{model}:{action}" + ("?alt=sse" if stream and sse else "")


def body_for(
    fmt: str, model: str, stream: bool = False, text: str = "hello there", prefill: bool = False
) -> dict[str, Any]:
    if fmt == "gemini":
        contents = [{"role": "user", "parts": [{"text": text}]}]
        if prefill:
            contents.append({"role": "model", "parts": [{"text": "The quick"}]})
        return {"contents": contents}
    messages: list[dict[str, Any]] = [{"role": "user", "content": text}]
    if prefill:
        messages.append({"role": "assistant", "content": "The quick"})
    body: dict[str, Any] = {"model": model, "messages": messages}
    if stream:
        body["stream"] = True
    if fmt == "anthropic":
        body["max_tokens"] = 100
    return body


async def post(
    client: httpx.AsyncClient, fmt: str, model: str, stream: bool = False, **kwargs: Any
) -> httpx.Response:
    return await client.post(
        path_for(fmt, model, stream), json=body_for(fmt, model, stream, **kwargs)
    )


def sse_events(raw: bytes) -> list[tuple[str, str]]:
    """(event, data) for each event in an SSE body (LF or CRLF line ends)."""
    events = []
    for block in raw.replace(b"\r\n", b"\n").decode().split("\n\n"):
        if not block.strip():
            continue
        name, data = "message", []
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
        events.append((name, "\n".join(data)))
    return events


def stream_text(fmt: str, events: list[tuple[str, str]]) -> str:
    """The answer text carried by a stream's events (unparseable events skipped)."""
    parts = []
    for _, data in events:
        try:
            chunk = json.loads(data)
        except ValueError:
            continue
        if fmt == "openai":
            for choice in chunk.get("choices", []):
                parts.append(choice["delta"].get("content") or "")
        elif fmt == "anthropic":
            if chunk.get("type") == "content_block_delta":
                parts.append(chunk["delta"]["text"])
        else:
            for candidate in chunk.get("candidates", []):
                parts.extend(p["text"] for p in candidate["content"]["parts"])
    return "".join(parts)


async def read_stream(
    client: httpx.AsyncClient, fmt: str, model: str, **kwargs: Any
) -> tuple[httpx.Response, bytes]:
    request = client.build_request(
        "POST", path_for(fmt, model, True), json=body_for(fmt, model, True, **kwargs)
    )
    response = await client.send(request, stream=True)
    try:
        return response, await response.aread()
    finally:
        await response.aclose()


def category_of(response: httpx.Response) -> Category:
    return classify(
        status=response.status_code, body=response.json(), headers=response.headers
    ).category


async def settled(mock: MockProvider) -> None:
    """Let the server notice every close the client has made."""
    await wait_all_tasks_blocked()


# --- the public face ---------------------------------------------------------------------------


def test_the_testing_exports_are_pinned() -> None:
    assert {
        "MOCK_SCENARIOS",
        "MockAttempt",
        "MockProvider",
        "MockScenario",
        "mock_model",
        "serve_mock_provider",
    } <= set(relayrace.testing.__all__)
    for name in relayrace.testing.__all__:
        assert hasattr(relayrace.testing, name)


def test_the_scenario_grammar() -> None:
    sc = MockScenario.parse("ok, chunks=20,delay=0.01")
    assert (sc.name, sc.kind, sc.chunks, sc.delay) == ("ok", "ok", 20, 0.01)
    flaky = MockScenario.parse("flaky,tag=east")
    assert (flaky.kind, flaky.times, flaky.tag) == ("server-error", 1, "east")
    assert MockScenario.parse("flaky,times=3").times == 3
    assert MockScenario.parse("slow").first_delay == 30.0
    assert mock_model("rate-limit", retry_after=2, clean=True) == "rate-limit,retry_after=2,clean=1"
    assert MockScenario.parse(mock_model("cut", after=1, clean=True)).clean is True
    with pytest.raises(LookupError, match="unknown mock scenario 'gpt-4o'"):
        MockScenario.parse("gpt-4o")
    for bad, message in [
        ("ok,chunks=0", "chunks=.*1 or more"),
        ("ok,delay=-1", "delay"),
        ("ok,speed=2", "keys: chunks"),
        ("ok,chunks", "expected key=value"),
        ("ok,chunks=2,chunks=3", "given twice"),
        ("stream-error,error=prefill", "expected one of"),
        ("rate-limit,status=700", "HTTP status"),
    ]:
        with pytest.raises(ValueError, match=message):
            MockScenario.parse(bad)
    assert "flapping" in MOCK_SCENARIOS and "ok" in MOCK_SCENARIOS


# --- healthy answers ---------------------------------------------------------------------------


async def test_openai_json_answer(mock: MockProvider, client: httpx.AsyncClient) -> None:
    response = await post(client, "openai", "ok", text="one two three")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "ok"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": SCRIPTED_ANSWER, "refusal": None}
    assert choice["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12}
    [attempt] = mock.log
    assert (attempt.format, attempt.model, attempt.scenario, attempt.attempt) == (
        "openai",
        "ok",
        "ok",
        1,
    )
    assert (attempt.outcome, attempt.status, attempt.stream, attempt.chunks) == (
        "ok",
        200,
        False,
        1,
    )
    assert attempt.request["messages"][0]["content"] == "one two three"
    assert attempt.client_closed_at is None


async def test_openai_stream_with_usage_and_chunk_delays(
    autojump_clock: trio.abc.Clock, mock: MockProvider, client: httpx.AsyncClient
) -> None:
    model = "ok,chunks=4,delay=0.5,first_delay=2"
    body = body_for("openai", model, stream=True)
    body["stream_options"] = {"include_usage": True}
    start = trio.current_time()
    arrivals: list[float] = []
    chunks: list[bytes] = []
    async with client.stream("POST", OPENAI, json=body) as response:
        assert trio.current_time() == start  # the headers come at once
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for chunk in response.aiter_bytes():
            arrivals.append(trio.current_time() - start)
            chunks.append(chunk)
    events = sse_events(b"".join(chunks))
    assert events[-1] == ("message", "[DONE]")
    parsed = [json.loads(data) for _, data in events[:-1]]
    assert all(p["object"] == "chat.completion.chunk" and p["model"] == model for p in parsed)
    assert parsed[0]["choices"][0]["delta"]["role"] == "assistant"
    assert stream_text("openai", events) == SCRIPTED_ANSWER
    finish, usage = parsed[-2], parsed[-1]
    assert finish["choices"][0]["finish_reason"] == "stop"
    assert all(p["usage"] is None for p in parsed[:-1])
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 2, "completion_tokens": 9, "total_tokens": 11}
    # The first token after 2 s, then one every 0.5 s.
    assert sorted(set(arrivals)) == [2.0, 2.5, 3.0, 3.5]
    [attempt] = mock.log
    assert attempt.ended_at is not None
    assert attempt.ended_at - attempt.started_at == 3.5
    assert (attempt.outcome, attempt.chunks, attempt.stream) == ("ok", 4, True)


async def test_openai_stream_without_include_usage_has_no_usage(
    client: httpx.AsyncClient,
) -> None:
    _, raw = await read_stream(client, "openai", "ok,chunks=2")
    events = sse_events(raw)
    parsed = [json.loads(data) for _, data in events[:-1]]
    assert all("usage" not in p for p in parsed)
    assert parsed[-1]["choices"][0]["finish_reason"] == "stop"
    assert events[-1][1] == "[DONE]"


async def test_the_short_openai_path_works(client: httpx.AsyncClient) -> None:
    response = await client.post("/chat/completions", json=body_for("openai", "ok"))
    assert response.json()["choices"][0]["message"]["content"] == SCRIPTED_ANSWER


async def test_anthropic_json_and_stream(mock: MockProvider, client: httpx.AsyncClient) -> None:
    response = await post(client, "anthropic", "ok", text="a b c d")
    body = response.json()
    assert body["type"] == "message" and body["role"] == "assistant"
    assert body["model"] == "ok"
    assert body["content"] == [{"type": "text", "text": SCRIPTED_ANSWER}]
    assert body["stop_reason"] == "end_turn"
    assert body["usage"] == {"input_tokens": 4, "output_tokens": 9}

    response, raw = await read_stream(client, "anthropic", "ok,chunks=3", text="a b c d")
    events = sse_events(raw)
    names = [name for name, _ in events]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    data = [json.loads(d) for _, d in events]
    assert all(d["type"] == name for d, name in zip(data, names, strict=True))
    assert data[0]["message"]["model"] == "ok,chunks=3"
    assert data[0]["message"]["usage"]["input_tokens"] == 4
    assert data[3]["delta"]["type"] == "text_delta"
    assert stream_text("anthropic", events) == SCRIPTED_ANSWER
    assert data[-2]["delta"]["stop_reason"] == "end_turn"
    assert data[-2]["usage"] == {"output_tokens": 9}
    assert [a.format for a in mock.log] == ["anthropic", "anthropic"]


async def test_gemini_json_sse_and_json_array(
    mock: MockProvider, client: httpx.AsyncClient
) -> None:
    response = await post(client, "gemini", "ok", text="a b")
    body = response.json()
    [candidate] = body["candidates"]
    assert candidate["content"] == {"parts": [{"text": SCRIPTED_ANSWER}], "role": "model"}
    assert candidate["finishReason"] == "STOP"
    assert body["usageMetadata"] == {
        "promptTokenCount": 2,
        "candidatesTokenCount": 9,
        "totalTokenCount": 11,
    }
    assert body["modelVersion"] == "ok"

    response, raw = await read_stream(client, "gemini", "ok,chunks=3", text="a b")
    assert response.headers["content-type"] == "text/event-stream"
    assert b"\r\n\r\n" in raw
    events = sse_events(raw)
    assert stream_text("gemini", events) == SCRIPTED_ANSWER
    last = json.loads(events[-1][1])
    assert last["candidates"][0]["finishReason"] == "STOP"
    assert last["usageMetadata"]["candidatesTokenCount"] == 9
    assert all(json.loads(d)["modelVersion"] == "ok,chunks=3" for _, d in events)

    # Without alt=sse Gemini streams a JSON array.
    response = await client.post(
        path_for("gemini", "ok,chunks=3", stream=True, sse=False), json=body_for("gemini", "x")
    )
    array = response.json()
    assert len(array) == 4
    assert (
        "".join(c["candidates"][0]["content"]["parts"][0]["text"] for c in array) == SCRIPTED_ANSWER
    )
    assert [a.stream for a in mock.log] == [False, True, True]


async def test_a_percent_encoded_gemini_model_is_decoded(
    mock: MockProvider, client: httpx.AsyncClient
) -> None:
    response = await client.post(
        "/v1beta/models/ok%2Cchunks%3D2:generateContent", json=body_for("gemini", "")
    )
    assert response.json()["modelVersion"] == "ok,chunks=2"
    assert mock.log[0].model == "ok,chunks=2"


async def test_repeat_makes_a_longer_answer(client: httpx.AsyncClient) -> None:
    body = (await post(client, "openai", "ok,repeat=3")).json()
    assert body["choices"][0]["message"]["content"] == " ".join([SCRIPTED_ANSWER] * 3)
    assert body["usage"]["completion_tokens"] == 27


async def test_keep_alive_serves_many_requests_on_one_connection(
    mock: MockProvider, client: httpx.AsyncClient
) -> None:
    for _ in range(20):
        assert (await post(client, "openai", "ok")).status_code == 200
        await read_stream(client, "anthropic", "ok")
    assert mock.accepted == 1
    assert {a.connection for a in mock.log} == {1}
    assert [a.attempt for a in mock.attempts("ok")] == list(range(1, 41))


async def test_the_scenario_header_overrides_the_model(
    mock: MockProvider, client: httpx.AsyncClient
) -> None:
    response = await client.post(
        OPENAI,
        json=body_for("openai", "gpt-4o"),
        headers={"x-mock-scenario": "rate-limit,retry_after=3"},
    )
    assert response.status_code == 429
    assert response.headers["retry-after"] == "3"
    assert (mock.log[0].model, mock.log[0].scenario) == ("gpt-4o", "rate-limit")
    ok = await client.post(
        OPENAI, json=body_for("openai", "gpt-4o"), headers={"x-mock-scenario": "ok"}
    )
    assert ok.json()["model"] == "gpt-4o"


# --- HTTP errors -------------------------------------------------------------------------------

ERROR_CASES = [
    ("rate-limit", {"openai": 429, "anthropic": 429, "gemini": 429}, Category.RATE_LIMIT),
    ("quota", {"openai": 429, "anthropic": 429, "gemini": 429}, Category.QUOTA_EXHAUSTED),
    ("server-error", {"openai": 500, "anthropic": 500, "gemini": 500}, Category.PROVIDER_5XX),
    ("unavailable", {"openai": 503, "anthropic": 503, "gemini": 503}, Category.PROVIDER_5XX),
    ("overloaded", {"openai": 503, "anthropic": 529, "gemini": 503}, Category.OVERLOADED),
    ("unauthorized", {"openai": 401, "anthropic": 401, "gemini": 401}, Category.AUTH),
    ("forbidden", {"openai": 403, "anthropic": 403, "gemini": 403}, Category.AUTH),
    ("not-found", {"openai": 404, "anthropic": 404, "gemini": 404}, Category.MODEL_NOT_FOUND),
    ("context-length", {"openai": 400, "anthropic": 400, "gemini": 400}, Category.CONTEXT_LENGTH),
    ("content-policy", {"openai": 400, "anthropic": 400}, Category.CONTENT_POLICY),
]


def assert_error_shape(fmt: str, body: Any, status: int) -> None:
    if fmt == "openai":
        assert set(body["error"]) == {"message", "type", "param", "code"}
    elif fmt == "anthropic":
        assert body["type"] == "error"
        assert {"type", "message"} <= set(body["error"])
    else:
        assert {"code", "message", "status"} <= set(body["error"])
        assert body["error"]["code"] == status


@pytest.mark.parametrize(
    ("fmt", "scenario", "status", "category"),
    [
        (fmt, scenario, statuses[fmt], category)
        for scenario, statuses, category in ERROR_CASES
        for fmt in FORMATS
        if fmt in statuses  # Gemini's content policy answers with a 200, tested below
    ],
)
async def test_error_scenarios_speak_each_format(
    mock: MockProvider,
    client: httpx.AsyncClient,
    fmt: str,
    scenario: str,
    status: int,
    category: Category,
) -> None:
    for stream in (False, True):
        response = await post(client, fmt, scenario, stream=stream)
        assert response.status_code == status
        assert response.headers["content-type"] == "application/json"
        assert "retry-after" not in response.headers
        assert_error_shape(fmt, response.json(), status)
        # The errors are the ones relayrace's classifier is built for.
        assert category_of(response) is category
    assert [(a.outcome, a.status, a.attempt) for a in mock.log] == [
        ("error", status, 1),
        ("error", status, 2),
    ]


async def test_specific_error_codes(client: httpx.AsyncClient) -> None:
    quota = (await post(client, "openai", "quota")).json()["error"]
    assert quota["code"] == quota["type"] == "insufficient_quota"
    context = (await post(client, "openai", "context-length")).json()["error"]
    assert (context["code"], context["param"]) == ("context_length_exceeded", "messages")
    overloaded = (await post(client, "anthropic", "overloaded")).json()["error"]
    assert overloaded == {"type": "overloaded_error", "message": "Overloaded"}
    not_found = (await post(client, "openai", "not-found")).json()["error"]
    assert not_found["code"] == "model_not_found" and "not-found" in not_found["message"]


async def test_rate_limit_headers(client: httpx.AsyncClient) -> None:
    response = await post(client, "openai", "rate-limit,retry_after=2")
    assert response.headers["retry-after"] == "2"
    response = await post(client, "anthropic", "rate-limit,retry_after=1.5,retry_after_ms=1500")
    assert response.headers["retry-after"] == "2"  # whole seconds, rounded up
    assert response.headers["retry-after-ms"] == "1500"
    response = await post(client, "openai", "server-error,should_retry=0,status=502")
    assert response.status_code == 502
    assert response.headers["x-should-retry"] == "false"
    gemini = await post(client, "gemini", "rate-limit,retry_after=7")
    failure = classify(status=429, body=gemini.json(), headers={})  # the body alone says 7 s
    assert failure.retry_after == 7.0
    failure = classify(status=429, body=(await post(client, "openai", "rate-limit")).json())
    assert failure.retry_after is None


async def test_gemini_content_policy_is_a_blocked_200(
    mock: MockProvider, client: httpx.AsyncClient
) -> None:
    response = await post(client, "gemini", "content-policy")
    assert response.status_code == 200
    body = response.json()
    assert body["promptFeedback"]["blockReason"] == "SAFETY"
    assert category_of(response) is Category.CONTENT_POLICY
    response, raw = await read_stream(client, "gemini", "content-policy")
    [(_, data)] = sse_events(raw)
    assert classify(status=200, body=data).category is Category.CONTENT_POLICY
    assert [a.outcome for a in mock.log] == ["blocked", "blocked"]


async def test_flaky_fails_once_per_model_name(
    mock: MockProvider, client: httpx.AsyncClient
) -> None:
    statuses = [(await post(client, "openai", "flaky")).status_code for _ in range(3)]
    assert statuses == [500, 200, 200]
    # Another name has its own counter, whatever the format.
    assert (await post(client, "anthropic", "flaky,tag=b")).status_code == 500
    assert (await post(client, "gemini", "flaky,tag=b")).status_code == 200
    # `times` works on any fault.
    assert (await post(client, "openai", "overloaded,times=2")).status_code == 503
    assert (await post(client, "openai", "overloaded,times=2")).status_code == 503
    assert (await post(client, "openai", "overloaded,times=2")).status_code == 200
    assert [a.outcome for a in mock.attempts("flaky")] == ["error", "ok", "ok"]
    mock.reset()
    assert mock.log == []
    assert (await post(client, "openai", "flaky")).status_code == 500
    assert mock.log[0].seq == 0 and mock.log[0].attempt == 1


@pytest.mark.parametrize("fmt", FORMATS)
async def test_no_prefill_rejects_an_assistant_last_message(
    mock: MockProvider, client: httpx.AsyncClient, fmt: str
) -> None:
    rejected = await post(client, fmt, "no-prefill", prefill=True)
    assert rejected.status_code == 400
    assert_error_shape(fmt, rejected.json(), 400)
    assert category_of(rejected) is Category.BAD_REQUEST
    assert "prefill" in rejected.text or "user turn" in rejected.text
    accepted = await post(client, fmt, "no-prefill")
    assert accepted.status_code == 200
    assert SCRIPTED_ANSWER in accepted.text
    assert [a.outcome for a in mock.log] == ["error", "ok"]


async def test_flapping_is_down_for_the_first_seconds(
    autojump_clock: trio.abc.Clock, mock: MockProvider, client: httpx.AsyncClient
) -> None:
    mock.reset()  # the flapping clock starts now
    assert (await post(client, "openai", "flapping,down=10")).status_code == 503
    await trio.sleep(9.5)
    assert (await post(client, "gemini", "flapping,down=10")).status_code == 503
    await trio.sleep(1)
    assert (await post(client, "openai", "flapping,down=10")).status_code == 200
    # With `up`, down and up alternate.
    mock.reset()
    codes = []
    for _ in range(6):
        codes.append((await post(client, "anthropic", "flapping,down=2,up=1")).status_code)
        await trio.sleep(1)
    assert codes == [503, 503, 200, 503, 503, 200]


# --- connection faults -------------------------------------------------------------------------


async def test_reset_before_headers(mock: MockProvider, client: httpx.AsyncClient) -> None:
    with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
        await post(client, "openai", "reset")
    await settled(mock)
    assert mock.open_connections == 0
    [attempt] = mock.log
    assert (attempt.outcome, attempt.status) == ("reset", None)
    # `times` makes it a one-off; the client reconnects.
    with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
        await post(client, "anthropic", "reset,times=1")
    assert (await post(client, "anthropic", "reset,times=1")).status_code == 200
    assert mock.accepted == 3


async def test_hang_never_answers_until_the_client_gives_up(
    autojump_clock: trio.abc.Clock, mock: MockProvider, client: httpx.AsyncClient
) -> None:
    start = trio.current_time()
    with trio.move_on_after(60) as scope:
        await post(client, "anthropic", "hang")
    assert scope.cancelled_caught
    await settled(mock)
    [attempt] = mock.log
    assert attempt.outcome == "hang"
    assert attempt.status is None
    assert attempt.started_at == start
    assert attempt.client_closed_at == start + 60
    assert mock.open_connections == 0


async def test_a_pending_attempt_is_in_the_log(
    autojump_clock: trio.abc.Clock, mock: MockProvider, client: httpx.AsyncClient
) -> None:
    async with trio.open_nursery() as nursery:

        async def hang() -> None:
            with trio.move_on_after(10):
                await post(client, "openai", "hang,tag=pending")

        nursery.start_soon(hang)
        await trio.sleep(1)
        [attempt] = mock.log
        assert (attempt.outcome, attempt.ended_at, attempt.scenario) == ("pending", None, "hang")
    await settled(mock)
    assert mock.log[0].outcome == "hang"


async def test_slow_sends_headers_then_waits_for_the_first_token(
    autojump_clock: trio.abc.Clock, client: httpx.AsyncClient
) -> None:
    start = trio.current_time()
    body = body_for("openai", "slow,first_delay=20", stream=True)
    async with client.stream("POST", OPENAI, json=body) as response:
        assert trio.current_time() == start
        async with contextlib.aclosing(response.aiter_bytes()) as chunks:
            first = await anext(chunks)
            assert trio.current_time() - start == 20
            assert b'"role":"assistant"' in first
            rest = b"".join([chunk async for chunk in chunks])
    assert (first + rest).endswith(b"data: [DONE]\n\n")
    start = trio.current_time()
    assert (await post(client, "gemini", "slow,first_delay=20")).status_code == 200
    assert trio.current_time() - start == 20


async def test_head_delay_holds_everything(
    autojump_clock: trio.abc.Clock, client: httpx.AsyncClient
) -> None:
    start = trio.current_time()
    response = await post(client, "openai", "rate-limit,head_delay=4")
    assert response.status_code == 429
    assert trio.current_time() - start == 4


# --- stream faults -----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
async def test_cut_closes_the_connection_mid_stream(
    mock: MockProvider, client: httpx.AsyncClient, fmt: str
) -> None:
    received = bytearray()
    with pytest.raises(httpx.RemoteProtocolError):
        async with client.stream(
            "POST",
            path_for(fmt, "cut,after=2,chunks=5", True),
            json=body_for(fmt, "cut,after=2,chunks=5", True),
        ) as response:
            assert response.status_code == 200
            async for chunk in response.aiter_bytes():
                received += chunk
    events = sse_events(bytes(received))
    assert stream_text(fmt, events) == "".join(relayrace.testing.split_text(SCRIPTED_ANSWER, 5)[:2])
    [attempt] = mock.log
    assert (attempt.outcome, attempt.chunks, attempt.status) == ("cut", 2, 200)


async def test_a_clean_cut_ends_the_body_without_a_terminator(
    mock: MockProvider, client: httpx.AsyncClient
) -> None:
    _, raw = await read_stream(client, "openai", "cut,after=1,clean=1")
    events = sse_events(raw)
    assert all(data != "[DONE]" for _, data in events)
    assert all(json.loads(d)["choices"][0]["finish_reason"] is None for _, d in events)
    _, raw = await read_stream(client, "anthropic", "cut,after=1,clean=1")
    assert "message_stop" not in [name for name, _ in sse_events(raw)]
    assert [a.outcome for a in mock.log] == ["cut", "cut"]
    assert mock.accepted == 1  # the connection stays usable


async def test_cut_without_a_stream(mock: MockProvider, client: httpx.AsyncClient) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        await post(client, "openai", "cut")
    response = await post(client, "anthropic", "malformed")
    assert response.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        response.json()
    assert [a.outcome for a in mock.log] == ["cut", "malformed"]


async def test_stall_pauses_mid_stream_then_finishes(
    autojump_clock: trio.abc.Clock, mock: MockProvider, client: httpx.AsyncClient
) -> None:
    start = trio.current_time()
    arrivals: list[tuple[float, bytes]] = []
    body = body_for("anthropic", "stall,after=2,stall=15,chunks=4", True)
    async with client.stream("POST", ANTHROPIC, json=body) as response:
        async for chunk in response.aiter_bytes():
            arrivals.append((trio.current_time() - start, chunk))
    events = sse_events(b"".join(chunk for _, chunk in arrivals))
    assert stream_text("anthropic", events) == SCRIPTED_ANSWER
    assert events[-1][0] == "message_stop"
    assert sorted({t for t, _ in arrivals}) == [0, 15]  # two chunks at once, the rest later
    assert mock.log[0].outcome == "ok"
    assert mock.log[0].ended_at == start + 15


@pytest.mark.parametrize("fmt", FORMATS)
async def test_malformed_chunk_mid_stream(
    mock: MockProvider, client: httpx.AsyncClient, fmt: str
) -> None:
    _, raw = await read_stream(client, fmt, "malformed,after=1")
    events = sse_events(raw)
    bad = []
    for _, data in events:
        if data == "[DONE]":
            continue
        try:
            json.loads(data)
        except ValueError:
            bad.append(data)
    assert len(bad) == 1
    assert stream_text(fmt, events) == SCRIPTED_ANSWER  # the rest still arrives
    assert mock.log[0].outcome == "malformed"


async def test_no_done_finishes_without_the_terminator(
    mock: MockProvider, client: httpx.AsyncClient
) -> None:
    _, raw = await read_stream(client, "openai", "no-done")
    events = sse_events(raw)
    assert events[-1][1] != "[DONE]"
    assert json.loads(events[-1][1])["choices"][0]["finish_reason"] == "stop"
    assert stream_text("openai", events) == SCRIPTED_ANSWER
    _, raw = await read_stream(client, "anthropic", "no-done")
    names = [name for name, _ in sse_events(raw)]
    assert names[-1] == "message_delta" and "message_stop" not in names
    assert [a.outcome for a in mock.log] == ["no-done", "no-done"]
    # Not streamed, it is a normal answer.
    assert (await post(client, "openai", "no-done")).json()["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("fmt", FORMATS)
async def test_stream_error_inside_a_200(
    mock: MockProvider, client: httpx.AsyncClient, fmt: str
) -> None:
    response, raw = await read_stream(client, fmt, "stream-error,after=1")
    assert response.status_code == 200
    events = sse_events(raw)
    name, data = events[-1]
    if fmt == "anthropic":
        assert name == "error"
        assert json.loads(data) == {
            "type": "error",
            "error": {"type": "overloaded_error", "message": "Overloaded"},
        }
    else:
        assert "error" in json.loads(data)
    assert all(d != "[DONE]" for _, d in events)
    assert classify(status=None, body=data).category is Category.OVERLOADED
    assert len(stream_text(fmt, events[:-1])) > 0
    assert (mock.log[0].outcome, mock.log[0].chunks) == ("stream-error", 1)

    _, raw = await read_stream(client, fmt, "stream-error,after=0,error=rate_limit")
    assert classify(status=None, body=sse_events(raw)[-1][1]).category is Category.RATE_LIMIT
    # Not streamed, the error is an HTTP status.
    response = await post(client, fmt, "stream-error,error=server")
    assert response.status_code == 500


async def test_the_client_closing_mid_answer_is_logged(
    autojump_clock: trio.abc.Clock, mock: MockProvider, client: httpx.AsyncClient
) -> None:
    start = trio.current_time()
    body = body_for("openai", "ok,chunks=5,delay=1", True)
    async with client.stream("POST", OPENAI, json=body) as response:
        # A deadline, not `break`: the exception unwinds httpx's nested generators cleanly.
        with trio.move_on_after(2.5):
            async for _ in response.aiter_bytes():
                pass
    await settled(mock)
    [attempt] = mock.log
    assert attempt.outcome == "cancelled"
    assert attempt.client_closed_at == start + 2.5
    assert attempt.chunks == 3  # at 0, 1 and 2 s
    assert mock.open_connections == 0


# --- requests the mock must survive ------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
async def test_bad_json_is_a_400_in_the_format(
    mock: MockProvider, client: httpx.AsyncClient, fmt: str
) -> None:
    for content in (b"{not json", b"\xff\xfe", b"[1, 2]", b'{"model": 3}'):
        response = await client.post(path_for(fmt, "ok"), content=content)
        assert response.status_code == 400
        assert_error_shape(fmt, response.json(), 400)
        assert category_of(response) is Category.BAD_REQUEST
    assert [a.outcome for a in mock.log] == ["error"] * 4
    assert (await post(client, fmt, "ok")).status_code == 200


async def test_unknown_scenarios_paths_and_methods(
    mock: MockProvider, client: httpx.AsyncClient
) -> None:
    response = await post(client, "openai", "gpt-4o")
    assert response.status_code == 404
    assert "unknown mock scenario" in response.json()["error"]["message"]
    response = await post(client, "gemini", "ok,speed=3")
    assert response.status_code == 400 and "speed" in response.json()["error"]["message"]
    response = await client.post("/v2/whatever", json={})
    assert response.status_code == 404
    response = await client.get(OPENAI)
    assert response.status_code == 405
    response = await client.get("/v1/models")
    assert {m["id"] for m in response.json()["data"]} == set(MOCK_SCENARIOS)
    assert (await client.get("/health")).json() == {"status": "ok"}
    assert [(a.format, a.status) for a in mock.log] == [
        ("openai", 404),
        ("gemini", 400),
        ("other", 404),
        ("openai", 405),
    ]


async def test_garbage_on_the_wire_gets_a_400_and_the_server_lives_on(
    mock: MockProvider, client: httpx.AsyncClient
) -> None:
    host, port = mock.base_url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")
        reply = b""
        while chunk := await stream.receive_some():
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 400 ")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(
            b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{"
        )
    assert (await post(client, "openai", "ok")).status_code == 200
    await settled(mock)
    assert [(a.outcome, a.status) for a in mock.log] == [
        ("error", 400),
        ("cancelled", None),  # the client closed in the middle of its body
        ("ok", 200),
    ]


async def test_head_and_http_1_0(mock: MockProvider, client: httpx.AsyncClient) -> None:
    assert (await client.head(OPENAI)).status_code == 405
    host, port = mock.base_url.removeprefix("http://").split(":")
    body = json.dumps(body_for("openai", "ok,chunks=3", stream=True)).encode()
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        head = f"POST {OPENAI} HTTP/1.0\r\nContent-Length: {len(body)}\r\n\r\n"
        await stream.send_all(head.encode() + body)
        reply = b""
        while chunk := await stream.receive_some():
            reply += chunk
    # HTTP/1.0 has no chunked encoding: the stream is delimited by the close.
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert reply.endswith(b"data: [DONE]\n\n")
    await settled(mock)
    assert [a.outcome for a in mock.log] == ["ok"]


async def test_shutting_down_closes_every_connection(autojump_clock: trio.abc.Clock) -> None:
    errors: list[Exception] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(None)) as client:
        async with trio.open_nursery() as nursery:
            async with serve_mock_provider() as mock:
                url = mock.base_url

                async def waiting() -> None:
                    try:
                        await client.post(
                            url + OPENAI, json=body_for("openai", "slow,first_delay=100")
                        )
                    except httpx.HTTPError as exc:
                        errors.append(exc)

                nursery.start_soon(waiting)
                await trio.sleep(1)
                assert mock.open_connections == 1
    assert [type(e) for e in errors] == [httpx.RemoteProtocolError]
    assert mock.open_connections == 0
    assert (mock.log[0].outcome, mock.log[0].ended_at) == ("aborted", mock.log[0].started_at + 1)
    with pytest.raises(RuntimeError, match="not serving"):
        mock.base_url  # noqa: B018


def test_main_runs_as_a_process_and_prints_its_url() -> None:
    code = "import sys; from relayrace.testing._mock_provider import main; sys.exit(main(sys.argv[1:]))"
    process = subprocess.Popen(
        [sys.executable, "-c", code, "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        with httpx.Client(base_url=url, timeout=10) as client:
            response = client.post(OPENAI, json=body_for("openai", "ok"))
        assert response.json()["choices"][0]["message"]["content"] == SCRIPTED_ANSWER
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
