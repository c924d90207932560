"""The agent surface of the OpenAI-compatible endpoint through the official ``openai`` SDK, run
unchanged against ``relayrace.server.serve``, in front of the mock provider speaking each wire
format over real HTTP.

These run on the real clock: the SDK looks up the platform in a worker thread, and a mock clock
would jump while it runs. Nothing here waits on time.
"""

from __future__ import annotations

import gc
import json
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import openai
import pytest
import trio
import trio.testing

from relayrace import Budgets, Config, open_supervisor
from relayrace.server import ServerSettings, serve
from relayrace.testing import MockProvider, mock_model, serve_mock_provider

from .support import mock_config

FORMATS = ("openai", "anthropic", "gemini")
KEY = "sk-mock-0123456789abcdef"
TOKEN = "sdk-s3cret-token"
BUDGETS = Budgets(connect=5.0, first_token=10.0, idle=10.0, attempt=30.0)
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather of a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    },
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
]
ASK: list[Any] = [{"role": "user", "content": "weather and time?"}]


@pytest.fixture
async def mock() -> AsyncIterator[MockProvider]:
    async with serve_mock_provider() as provider:
        yield provider
        assert provider.errors == []


def config(mock: MockProvider, *providers: tuple[str, str, str]) -> Config:
    """Providers ``(name, format, mock model)``, one route ``m`` over them in order."""
    return mock_config(mock, *providers, budgets=BUDGETS)


@asynccontextmanager
async def sdk(cfg: Config) -> AsyncIterator[openai.AsyncOpenAI]:
    """The gateway for ``cfg`` on a free loopback port and the official SDK pointed at it."""
    with warnings.catch_warnings():
        # The SDK stops reading a stream at ``[DONE]``, leaving httpx's inner async generators
        # for the garbage collector: collected here, where that is expected.
        warnings.simplefilter("ignore", ResourceWarning)
        async with open_supervisor(cfg) as sup, trio.open_nursery() as nursery:
            settings = ServerSettings(http_port=0, ws_port=None, tokens=[TOKEN])
            server = await nursery.start(serve, sup, settings)
            async with httpx.AsyncClient(timeout=None) as http_client:
                yield openai.AsyncOpenAI(
                    base_url=f"{server.http_url}/v1",
                    api_key=TOKEN,
                    http_client=http_client,
                    max_retries=0,
                )
            nursery.cancel_scope.cancel()
        gc.collect()
        await trio.testing.wait_all_tasks_blocked()


async def turn(
    ai: openai.AsyncOpenAI, messages: list[Any], stream: bool, **params: Any
) -> tuple[Any, list[Any]]:
    """One chat turn: the whole completion (a stream's, as the SDK's own helper assembles it
    from the chunks) and the chunks (none when whole)."""
    if not stream:
        completion = await ai.chat.completions.create(model="m", messages=messages, **params)
        return completion, []
    chunks = []
    async with ai.chat.completions.stream(model="m", messages=messages, **params) as s:
        async for event in s:
            if event.type == "chunk":
                chunks.append(event.chunk)
        completion = await s.get_final_completion()
    return completion, chunks


def trace_of(completion: Any, chunks: list[Any]) -> Any:
    """The ``relayrace`` object: of the whole completion, or of the stream's last chunk that
    has a choice (the SDK's helper does not carry it into the final completion)."""
    if not chunks:
        return completion.model_extra["relayrace"]
    return next(c.model_extra["relayrace"] for c in chunks if "relayrace" in c.model_extra)


def tool_fragments(chunks: list[Any]) -> list[Any]:
    return [
        call
        for chunk in chunks
        for choice in chunk.choices
        for call in (choice.delta.tool_calls or [])
    ]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("fmt", FORMATS)
async def test_a_three_turn_agent_loop(mock: MockProvider, fmt: str, stream: bool) -> None:
    cfg = config(mock, ("p", fmt, mock_model("ok", tools=2)))
    messages = list(ASK)
    async with sdk(cfg) as ai:
        first, chunks = await turn(ai, messages, stream, tools=TOOLS)
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls"
        calls = choice.message.tool_calls
        # Parallel calls stay separate, in order, with the declared names and their own ids.
        assert [c.function.name for c in calls] == ["get_weather", "get_time"]
        assert [json.loads(c.function.arguments) for c in calls] == [
            {"n": 0, "q": "mock"},
            {"n": 1, "q": "mock"},
        ]
        assert len({c.id for c in calls}) == 2
        if stream:
            fragments = tool_fragments(chunks)
            opened = [f for f in fragments if f.id is not None]
            assert [(f.index, f.id, f.function.name) for f in opened] == [
                (0, calls[0].id, "get_weather"),
                (1, calls[1].id, "get_time"),
            ]
            assert all(f.function.name is None for f in fragments if f.id is None)
        messages.append(choice.message.model_dump(exclude_none=True, exclude={"parsed"}))
        for call in calls:
            messages.append({"role": "tool", "tool_call_id": call.id, "content": '{"ok": 1}'})
        second, _ = await turn(ai, messages, stream, tools=TOOLS)
    answer = second.choices[0]
    assert answer.finish_reason == "stop"
    assert not answer.message.tool_calls
    assert answer.message.content
    # The upstream got the whole conversation, the tool results in its own shape.
    sent = mock.log[-1].request
    assert sent is not None
    if fmt == "anthropic":
        blocks = sent["messages"][-1]["content"]
        assert [b["tool_use_id"] for b in blocks] == [c.id for c in calls]
    elif fmt == "gemini":
        parts = sent["contents"][-1]["parts"]
        assert [p["functionResponse"]["name"] for p in parts] == ["get_weather", "get_time"]
    else:
        assert [m["role"] for m in sent["messages"][-3:]] == ["assistant", "tool", "tool"]


async def test_calls_under_one_upstream_index_stay_separate(mock: MockProvider) -> None:
    cfg = config(mock, ("p", "openai", mock_model("ok", tools=3, reuse_index=True)))
    async with sdk(cfg) as ai:
        completion, chunks = await turn(ai, ASK, True, tools=TOOLS)
    calls = completion.choices[0].message.tool_calls
    assert [json.loads(c.function.arguments)["n"] for c in calls] == [0, 1, 2]
    assert sorted({f.index for f in tool_fragments(chunks)}) == [0, 1, 2]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_failover_before_the_first_tool_call_is_invisible(
    mock: MockProvider, stream: bool
) -> None:
    cfg = config(
        mock,
        ("down", "gemini", mock_model("server-error")),
        ("up", "anthropic", mock_model("ok", tools=1)),
    )
    async with sdk(cfg) as ai:
        completion, chunks = await turn(ai, ASK, stream, tools=TOOLS)
    assert [c.function.name for c in completion.choices[0].message.tool_calls] == ["get_weather"]
    trace = trace_of(completion, chunks)
    assert [(a["actor"], a["outcome"]) for a in trace["attempts"]] == [
        ("down", "failed"),
        ("up", "ok"),
    ]
    assert len(mock.log) == 2


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_logprobs_come_back(mock: MockProvider, stream: bool) -> None:
    cfg = config(mock, ("lp", "openai", mock_model("ok", logprobs=True, chunks=3)))
    async with sdk(cfg) as ai:
        completion, _ = await turn(ai, ASK, stream, logprobs=True, top_logprobs=2)
    choice = completion.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    assert "".join(item.token for item in choice.logprobs.content) == choice.message.content


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_a_refusal_comes_back_as_one(mock: MockProvider, stream: bool) -> None:
    cfg = config(mock, ("no", "openai", mock_model("ok", refusal=True)))
    async with sdk(cfg) as ai:
        completion, _ = await turn(ai, ASK, stream)
    message = completion.choices[0].message
    assert message.refusal == "I can't help with that."
    assert not message.content


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_n_choices(mock: MockProvider, stream: bool) -> None:
    cfg = config(mock, ("claude", "anthropic", mock_model("ok")), ("gpt", "openai", mock_model("ok")))
    async with sdk(cfg) as ai:
        completion, _ = await turn(ai, ASK, stream, n=2)
    assert [c.index for c in completion.choices] == [0, 1]
    assert completion.choices[0].message.content
    assert {c.message.content for c in completion.choices} == {completion.choices[0].message.content}
    assert all(c.finish_reason == "stop" for c in completion.choices)
    # Only the provider that can serve n was asked.
    assert [entry.model for entry in mock.log] == [mock_model("ok") + ",tag=gpt"]


async def test_n_where_no_provider_serves_it_is_a_400_naming_the_provider(
    mock: MockProvider,
) -> None:
    cfg = config(mock, ("claude", "anthropic", mock_model("ok")))
    async with sdk(cfg) as ai:
        with pytest.raises(openai.BadRequestError) as caught:
            await ai.chat.completions.create(model="m", messages=ASK, n=2)
    assert caught.value.param == "n"
    assert "claude: default:capabilities.n=false" in caught.value.message
    assert mock.log == []


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_cached_token_usage(mock: MockProvider, fmt: str, stream: bool) -> None:
    cfg = config(mock, ("p", fmt, mock_model("ok", cached=4)))
    params: dict[str, Any] = {"stream_options": {"include_usage": True}} if stream else {}
    async with sdk(cfg) as ai:
        completion, chunks = await turn(ai, [{"role": "user", "content": "a b c"}], stream, **params)
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 4
    assert usage.prompt_tokens == 3 + 4
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    if stream:
        assert chunks[-1].choices == [] and chunks[-1].usage == usage


async def test_include_usage_is_always_honoured(mock: MockProvider) -> None:
    cfg = config(mock, ("p", "anthropic", mock_model("ok", chunks=3)))
    async with sdk(cfg) as ai:
        for include in (True, False):
            stream = await ai.chat.completions.create(
                model="m", messages=ASK, stream=True, stream_options={"include_usage": include}
            )
            chunks = [chunk async for chunk in stream]
            with_usage = [c for c in chunks if c.usage is not None]
            if include:
                assert with_usage == [chunks[-1]] and chunks[-1].choices == []
                assert chunks[-1].usage.completion_tokens > 0
            else:
                assert with_usage == []


async def test_usage_is_listed_per_attempt_a_failed_one_included(mock: MockProvider) -> None:
    # Anthropic reports the prompt's tokens when its stream opens: a stream that fails before its
    # first delta still cost them, and the failed attempt says so.
    cfg = config(
        mock,
        ("broken", "anthropic", mock_model("stream-error", chunks=4, after=0)),
        ("ok", "openai", mock_model("ok")),
    )
    async with sdk(cfg) as ai:
        completion, chunks = await turn(ai, ASK, True)
    trace = trace_of(completion, chunks)
    failed, served = trace["attempts"]
    assert (failed["actor"], failed["outcome"]) == ("broken", "failed")
    assert failed["usage"] is not None and failed["usage"]["prompt_tokens"] > 0
    assert served["usage"]["completion_tokens"] > 0
    assert completion.choices[0].message.content


async def test_models_retrieve(mock: MockProvider) -> None:
    cfg = config(mock, ("p", "openai", mock_model("ok")))
    async with sdk(cfg) as ai:
        model = await ai.models.retrieve("m")
        with pytest.raises(openai.NotFoundError) as caught:
            await ai.models.retrieve("nope")
    assert (model.id, model.object, model.owned_by) == ("m", "model", "relayrace")
    assert (model.model_extra or {})["chain"] == ["p"]
    assert caught.value.code == "model_not_found"


BAD_INPUT = [
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": "nope"}}]},
        "tools[0].function.parameters",
    ),
    (
        {
            "messages": [
                *ASK,
                {"role": "tool", "tool_call_id": "call_missing", "content": "{}"},
            ]
        },
        "messages[1].tool_call_id",
    ),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize(("params", "field"), BAD_INPUT, ids=["schema", "tool_call_id", "choice"])
async def test_bad_agent_input_is_a_400_naming_the_field_before_any_call(
    mock: MockProvider, params: dict[str, Any], field: str, stream: bool
) -> None:
    cfg = config(mock, ("p", "openai", mock_model("ok", tools=1)))
    request = {"model": "m", "messages": ASK, **params}
    async with sdk(cfg) as ai:
        with pytest.raises(openai.BadRequestError) as caught:
            await ai.chat.completions.create(**request, stream=stream)
    assert caught.value.param == field
    assert field in caught.value.message
    assert mock.log == []
