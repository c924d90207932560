"""``POST /v1/messages`` over real loopback sockets with the official ``anthropic`` SDK (run
unchanged, as the ``openai`` SDK tests run), served by mock providers of every kind.

These run on the real clock, as the ``openai`` SDK tests do: the SDK looks up the platform in a
worker thread, and a mock clock would jump while it runs. Nothing here waits on time.
"""

from __future__ import annotations

import gc
import json
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anthropic
import httpx
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from relayrace import Budgets, Config, open_supervisor
from relayrace.providers import anthropic as anthropic_format
from relayrace.providers import anthropic_inbound
from relayrace.server import Server, ServerSettings, serve
from relayrace.testing import MockProvider, mock_model

from .support import mock_config

FORMATS = ("openai", "anthropic", "gemini")
KEY = "sk-mock-0123456789abcdef"
TOKEN = "gateway-s3cret-token"
BUDGETS = Budgets(connect=1.0, first_token=3.0, idle=2.0, attempt=30.0)
HI = [{"role": "user", "content": "hi"}]
TOOLS: list[Any] = [
    {
        "name": "get_weather",
        "description": "The weather of a city.",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
    {"name": "get_time", "input_schema": {"type": "object"}},
]


def config(mock: MockProvider, *providers: tuple[str, str, str]) -> Config:
    """Providers ``(name, format, mock model)``, one route ``m`` over them in order."""
    return mock_config(mock, *providers, budgets=BUDGETS)


@asynccontextmanager
async def gateway(cfg: Config) -> AsyncIterator[Server]:
    async with open_supervisor(cfg) as sup, trio.open_nursery() as nursery:
        server = await nursery.start(
            serve, sup, ServerSettings(http_port=0, ws_port=None, tokens=[TOKEN])
        )
        assert server.http_url is not None
        yield server
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def claude(cfg: Config, api_key: str = TOKEN) -> AsyncIterator[anthropic.AsyncAnthropic]:
    """The SDK against the gateway; the SDK leaves a stream's inner async generators to the
    garbage collector (as httpx does for the openai SDK): collect them here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        async with gateway(cfg) as server:
            async with anthropic.AsyncAnthropic(
                base_url=server.http_url, api_key=api_key, max_retries=0
            ) as ai:
                yield ai
        gc.collect()
        await trio.testing.wait_all_tasks_blocked()


async def ask(ai: anthropic.AsyncAnthropic, messages: list[Any], stream: bool, **extra: Any) -> Any:
    if not stream:
        return await ai.messages.create(model="m", max_tokens=256, messages=messages, **extra)
    async with ai.messages.stream(model="m", max_tokens=256, messages=messages, **extra) as s:
        texts = [text async for text in s.text_stream]
        final = await s.get_final_message()
    text = "".join(b.text for b in final.content if b.type == "text")
    assert "".join(texts) == text
    return final


# --- text ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
async def test_a_whole_message(mock: MockProvider, fmt: str) -> None:
    cfg = config(mock, ("p", fmt, mock_model("ok", cached=3)))
    async with claude(cfg) as ai:
        raw = await ai.messages.with_raw_response.create(
            model="m",
            max_tokens=100,
            system="be brief",
            messages=HI,
            extra_body={"temperature": 0.5},
        )
        message = await raw.parse()
    assert raw.headers["x-relayrace-provider"] == "p"
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_")
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].type == "text" and message.content[0].text
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens > 0 and message.usage.cache_read_input_tokens == 3
    trace = (message.model_extra or {})["relayrace"]
    assert [a["actor"] for a in trace["attempts"]] == ["p"]
    # The upstream got the system prompt, the limit and the temperature.
    sent = mock.log[-1].request
    assert sent is not None and "be brief" in json.dumps(sent)
    assert "100" in json.dumps(sent)


@pytest.mark.parametrize("fmt", FORMATS)
async def test_a_streamed_message(mock: MockProvider, fmt: str) -> None:
    cfg = config(mock, ("p", fmt, mock_model("ok", chunks=4, cached=2)))
    async with claude(cfg) as ai:
        final = await ask(ai, HI, stream=True)
    assert final.content[0].text
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens > 0
    assert final.usage.input_tokens > 0
    if fmt != "anthropic":  # the mock's Anthropic stream reports no cached tokens
        assert final.usage.cache_read_input_tokens == 2


async def test_a_stream_is_anthropic_events_in_order(mock: MockProvider) -> None:
    cfg = config(mock, ("p", "openai", mock_model("ok", chunks=3, tools=1)))
    body = {"model": "m", "max_tokens": 50, "messages": HI, "stream": True, "tools": TOOLS}
    async with gateway(cfg) as server, httpx.AsyncClient(timeout=None) as http:
        # The bearer token works as well as x-api-key; anthropic-version is accepted.
        headers = {"authorization": f"Bearer {TOKEN}", "anthropic-version": "2023-06-01"}
        async with http.stream(
            "POST", f"{server.http_url}/v1/messages", json=body, headers=headers
        ) as response:
            assert response.status_code == 200
            names = [
                line.removeprefix("event: ")
                async for line in response.aiter_lines()
                if line.startswith("event: ")
            ]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert names.count("content_block_start") == 2  # the text block and the tool call
    assert names.count("content_block_stop") == 2


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_a_refusal_is_anthropics_refusal(mock: MockProvider, stream: bool) -> None:
    cfg = config(mock, ("p", "openai", mock_model("ok", refusal=True)))
    async with claude(cfg) as ai:
        answer = await ask(ai, HI, stream)
    assert answer.stop_reason == "refusal"
    assert [b.text for b in answer.content] == ["I can't help with that."]


# --- tools ----------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("fmt", FORMATS)
async def test_a_three_turn_agent_loop(mock: MockProvider, fmt: str, stream: bool) -> None:
    cfg = config(mock, ("p", fmt, mock_model("ok", tools=2)))
    messages: list[Any] = [{"role": "user", "content": "weather and time?"}]
    async with claude(cfg) as ai:
        first = await ask(ai, messages, stream, tools=TOOLS, tool_choice={"type": "auto"})
        assert first.stop_reason == "tool_use"
        calls = [b for b in first.content if b.type == "tool_use"]
        # Parallel calls stay separate, in order, with the declared names and their input.
        assert [c.name for c in calls] == ["get_weather", "get_time"]
        assert [c.input for c in calls] == [{"n": 0, "q": "mock"}, {"n": 1, "q": "mock"}]
        assert len({c.id for c in calls}) == 2
        messages.append({"role": "assistant", "content": first.content})
        messages.append(
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": c.id, "content": '{"ok": 1}'}
                    for c in calls
                ],
            }
        )
        second = await ask(ai, messages, stream, tools=TOOLS)
    assert second.stop_reason == "end_turn"
    assert [b.type for b in second.content] == ["text"] and second.content[0].text
    # The upstream got the tool results in its own shape, tied to the calls.
    sent = mock.log[-1].request
    assert sent is not None
    if fmt == "anthropic":
        blocks = sent["messages"][-1]["content"]
        assert [b["tool_use_id"] for b in blocks] == [c.id for c in calls]
    elif fmt == "gemini":
        parts = sent["contents"][-1]["parts"]
        assert [p["functionResponse"]["name"] for p in parts] == ["get_weather", "get_time"]
    else:
        assert [m.get("tool_call_id") for m in sent["messages"][-2:]] == [c.id for c in calls]


async def test_tool_choice_and_stop_sequences_reach_the_upstream(mock: MockProvider) -> None:
    cfg = config(mock, ("p", "openai", mock_model("ok")))
    async with claude(cfg) as ai:
        await ai.messages.create(
            model="m",
            max_tokens=10,
            messages=HI,
            tools=TOOLS,
            tool_choice={"type": "tool", "name": "get_time", "disable_parallel_tool_use": True},
            stop_sequences=["END"],
            metadata={"user_id": "u-1"},
        )
    sent = mock.log[-1].request
    assert sent is not None
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_time"}}
    assert sent["parallel_tool_calls"] is False
    assert sent["stop"] == ["END"] and sent["user"] == "u-1" and sent["max_tokens"] == 10
    assert sent["tools"][0]["function"]["parameters"] == TOOLS[0]["input_schema"]


# --- failover and errors ------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_failover_before_the_first_event_is_invisible(mock: MockProvider, stream: bool) -> None:
    cfg = config(
        mock,
        ("down", "gemini", mock_model("server-error")),
        ("up", "anthropic", mock_model("ok", tools=1)),
    )
    async with claude(cfg) as ai:
        answer = await ask(ai, HI, stream, tools=TOOLS)
    assert [b.type for b in answer.content if b.type == "tool_use"] == ["tool_use"]
    assert answer.stop_reason == "tool_use"
    assert [a.outcome for a in mock.log] == ["error", "ok"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize(
    ("scenario", "exception", "status", "kind"),
    [
        ("rate-limit", anthropic.RateLimitError, 429, "rate_limit_error"),
        ("overloaded", anthropic.InternalServerError, 529, "overloaded_error"),
        ("server-error", anthropic.InternalServerError, 500, "api_error"),
        ("context-length", anthropic.BadRequestError, 400, "invalid_request_error"),
    ],
)
async def test_an_error_before_the_first_event_is_the_sdks_typed_exception(
    mock: MockProvider, scenario: str, exception: type, status: int, kind: str, stream: bool
) -> None:
    cfg = config(mock, ("p", "anthropic", mock_model(scenario)))
    async with claude(cfg) as ai:
        with pytest.raises(exception) as caught:
            await ask(ai, HI, stream)
    assert caught.value.status_code == status
    body = caught.value.body
    assert body["type"] == "error" and body["error"]["type"] == kind
    assert body["relayrace"]["attempts"][0]["actor"] == "p"


async def test_an_unknown_route_is_not_found(mock: MockProvider) -> None:
    cfg = config(mock, ("p", "openai", mock_model("ok")))
    async with claude(cfg) as ai:
        with pytest.raises(anthropic.NotFoundError) as caught:
            await ai.messages.create(model="nope", max_tokens=5, messages=HI)
    assert caught.value.body["error"]["type"] == "not_found_error"
    assert mock.log == []


@pytest.mark.parametrize("fmt", FORMATS)
async def test_an_error_after_the_first_event_makes_the_sdk_raise(mock: MockProvider, fmt: str) -> None:
    cfg = config(mock, ("p", fmt, mock_model("cut", chunks=4, after=2)))
    received: list[str] = []
    async with claude(cfg) as ai:
        with pytest.raises(anthropic.APIStatusError) as caught:
            async with ai.messages.stream(model="m", max_tokens=50, messages=HI) as s:
                async for text in s.text_stream:
                    received.append(text)
    assert received  # the stream had begun
    assert caught.value.body["type"] == "error"
    assert caught.value.body["error"]["type"] == "api_error"


async def test_a_broken_stream_ends_with_an_error_event_never_message_stop(mock: MockProvider) -> None:
    cfg = config(mock, ("p", "openai", mock_model("cut", chunks=4, after=2)))
    body = {"model": "m", "max_tokens": 50, "messages": HI, "stream": True}
    async with gateway(cfg) as server, httpx.AsyncClient(timeout=None) as http:
        async with http.stream(
            "POST", f"{server.http_url}/v1/messages", json=body, headers={"x-api-key": TOKEN}
        ) as response:
            lines = [line async for line in response.aiter_lines()]
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    assert names[0] == "message_start" and names[-1] == "error"
    assert "message_stop" not in names
    error = json.loads(lines[lines.index("event: error") + 1].removeprefix("data: "))
    assert error["type"] == "error" and error["relayrace"]["category"] == "stream_error"


# --- bad input and auth -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"tool_choice": {"type": "sometimes"}}, "tool_choice.type"),
        ({"extra_body": {"temperature": 1.5}}, "temperature"),
        ({"output_config": {"effort": "high"}}, "output_config"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0].type"),
        ({"tools": [{"name": "f", "input_schema": "nope"}]}, "tools[0].input_schema"),
        ({"extra_body": {"top_k": 5}}, "top_k"),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"},
                    {
                        "role": "user",
                        "content": [{"type": "tool_result", "tool_use_id": "toolu_x", "content": "1"}],
                    },
                ]
            },
            "messages[2].content[0].tool_use_id",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
            "messages[0].content[0].type",
        ),
        ({"extra_body": {"n": 2}}, "n"),
    ],
)
async def test_bad_input_is_a_400_before_any_provider_call(
    mock: MockProvider, extra: dict[str, Any], field: str
) -> None:
    cfg = config(mock, ("p", "anthropic", mock_model("ok")))
    args: dict[str, Any] = {"model": "m", "max_tokens": 5, "messages": HI, **extra}
    async with claude(cfg) as ai:
        with pytest.raises(anthropic.BadRequestError) as caught:
            await ai.messages.create(**args)
    error = caught.value.body["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith(field + ":"), error["message"]
    assert mock.log == []


async def test_a_wrong_or_missing_key_is_401(mock: MockProvider) -> None:
    cfg = config(mock, ("p", "anthropic", mock_model("ok")))
    async with claude(cfg, api_key="wrong") as ai:
        with pytest.raises(anthropic.AuthenticationError) as caught:
            await ai.messages.create(model="m", max_tokens=5, messages=HI)
    assert caught.value.body["type"] == "error"
    assert caught.value.body["error"]["type"] == "authentication_error"
    assert TOKEN not in str(caught.value.body) and "wrong" not in str(caught.value.body)
    async with gateway(cfg) as server, httpx.AsyncClient(timeout=None) as http:
        response = await http.post(f"{server.http_url}/v1/messages", json={})
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
        response = await http.get(f"{server.http_url}/v1/messages", headers={"x-api-key": TOKEN})
        assert response.status_code == 405
        assert response.json()["error"]["type"] == "invalid_request_error"
    assert mock.log == []


async def test_images_and_tool_errors_are_translated(mock: MockProvider) -> None:
    cfg = config(mock, ("p", "openai", mock_model("ok")))
    image = {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}
    messages: list[Any] = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is it?", "cache_control": {"type": "ephemeral"}},
                {"type": "image", "source": image},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "hm", "signature": "s"},
                {"type": "tool_use", "id": "toolu_1", "name": "get_time", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "down", "is_error": True},
                {"type": "text", "text": "go on"},
            ],
        },
    ]
    async with claude(cfg) as ai:
        await ai.messages.create(model="m", max_tokens=5, messages=messages, tools=TOOLS)
    sent = mock.log[-1].request
    assert sent is not None
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "tool", "user"]
    assert sent["messages"][0]["content"][1] == {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="},
    }
    assert sent["messages"][1]["tool_calls"][0]["function"] == {"name": "get_time", "arguments": "{}"}
    assert sent["messages"][2] == {"role": "tool", "tool_call_id": "toolu_1", "content": "[tool error] down"}


# --- the translation, round trip ----------------------------------------------------------

_words = st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), min_size=1, max_size=8)
_inputs = st.dictionaries(_words, st.integers() | _words, max_size=3)


@st.composite
def conversations(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Agent conversations in the Messages API's shape: a question, then turns of (assistant
    text and tool calls, user tool results)."""
    turns: list[dict[str, Any]] = [{"role": "user", "content": draw(_words)}]
    number = 0
    for _ in range(draw(st.integers(1, 3))):
        calls = []
        for _ in range(draw(st.integers(1, 3))):
            calls.append(
                {
                    "type": "tool_use",
                    "id": f"toolu_{number}",
                    "name": draw(st.sampled_from(["get_weather", "get_time"])),
                    "input": draw(_inputs),
                }
            )
            number += 1
        text = draw(st.none() | _words)
        content = ([{"type": "text", "text": text}] if text else []) + calls
        turns.append({"role": "assistant", "content": content})
        results = [
            {"type": "tool_result", "tool_use_id": call["id"], "content": draw(_words)}
            for call in calls
        ]
        turns.append({"role": "user", "content": results})
    return turns


def _blocks(turn: dict[str, Any]) -> list[Any]:
    content = turn["content"]
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


@given(conversations())
def test_a_conversation_survives_inbound_then_outbound_translation(turns: list[Any]) -> None:
    """Messages request → Request → the Anthropic payload a provider would get: the same turns,
    tool names, ids, inputs and results, in order."""
    body = {"model": "m", "max_tokens": 5, "messages": turns, "tools": TOOLS}
    request, stream = anthropic_inbound.request_of(body)
    assert stream is False
    sent = anthropic_format.payload(request, model="x", stream=False)
    assert [t["role"] for t in sent["messages"]] == [t["role"] for t in turns]
    for original, translated in zip(turns, sent["messages"], strict=True):
        assert _blocks(translated) == _blocks(original)
    assert [t["name"] for t in sent["tools"]] == ["get_weather", "get_time"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_a_client_leaving_cancels_the_upstream_call(mock: MockProvider, stream: bool) -> None:
    cfg = config(mock, ("p", "anthropic", mock_model("hang")))
    data = json.dumps({"model": "m", "max_tokens": 5, "messages": HI, "stream": stream}).encode()
    async with gateway(cfg) as server:
        assert server.http_port is not None
        client = await trio.open_tcp_stream("127.0.0.1", server.http_port)
        await client.send_all(
            b"POST /v1/messages HTTP/1.1\r\nhost: relayrace\r\nx-api-key: %s\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (TOKEN.encode(), len(data), data)
        )
        await trio.testing.wait_all_tasks_blocked(0.05)
        assert [a.outcome for a in mock.log] == ["pending"]
        await client.aclose()
        await trio.testing.wait_all_tasks_blocked(0.05)
        # The gateway closed its upstream connection as soon as its client left.
        assert mock.log[0].client_closed_at is not None
