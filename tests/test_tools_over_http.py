"""Tool calling over real HTTP: the real clients against the mock provider, per provider kind,
whole and streamed, through ``open_supervisor``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
from trio.testing import wait_all_tasks_blocked

from relayrace import (
    Action,
    BadRequest,
    Budgets,
    Capabilities,
    Category,
    Config,
    ConfigError,
    MidStream,
    Policies,
    Reply,
    Request,
    RequestFailed,
    RetryPolicy,
    StreamPolicy,
    Supervisor,
    load_config,
    open_supervisor,
)
from relayrace.testing import SCRIPTED_ANSWER, MockProvider, mock_model, serve_mock_provider

from .support import mock_config

FORMATS = ("openai", "anthropic", "gemini")
KEY = "sk-mock-0123456789abcdef"
BUDGETS = Budgets(connect=1.0, first_token=3.0, idle=2.0, attempt=30.0)
TOOLS = [
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


@pytest.fixture
async def mock() -> AsyncIterator[MockProvider]:
    async with serve_mock_provider() as provider:
        yield provider
        await wait_all_tasks_blocked()
        assert provider.open_connections == 0
        assert provider.errors == []


def config(mock: MockProvider, *providers: tuple[str, str, str]) -> Config:
    """Providers ``(name, format, mock model)``, one route ``m`` over them in order."""
    return mock_config(mock, *providers, budgets=BUDGETS)


async def ask(sup: Supervisor, messages: list[dict[str, Any]], stream: bool) -> Reply:
    request = Request("m", messages, params={"tools": TOOLS})
    if not stream:
        return await sup.complete(request)
    async with sup.stream(request) as s:
        fragments = [f async for d in s for f in d.tool_calls]
    reply = s.reply
    # The deltas say what the reply says: indexes 0, 1, … each opened once with its id.
    assert [f.index for f in fragments if f.id is not None] == list(range(len(reply.tool_calls)))
    return reply


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("fmt", FORMATS)
async def test_a_three_turn_agent_loop(mock: MockProvider, fmt: str, stream: bool) -> None:
    cfg = config(mock, ("p", fmt, mock_model("ok", tools=2)))
    messages: list[dict[str, Any]] = [{"role": "user", "content": "weather and time?"}]
    async with open_supervisor(cfg) as sup:
        first = await ask(sup, messages, stream)
        assert first.finish_reason == "tool_calls"
        # Parallel calls stay separate, in order, with the declared names.
        assert [c.name for c in first.tool_calls] == ["get_weather", "get_time"]
        assert [json.loads(c.arguments) for c in first.tool_calls] == [
            {"n": 0, "q": "mock"},
            {"n": 1, "q": "mock"},
        ]
        assert len({c.id for c in first.tool_calls}) == 2
        messages.append(
            {
                "role": "assistant",
                "content": first.text or None,
                "tool_calls": [c.to_dict() for c in first.tool_calls],
            }
        )
        for call in first.tool_calls:
            messages.append({"role": "tool", "tool_call_id": call.id, "content": '{"ok": 1}'})
        second = await ask(sup, messages, stream)
    assert second.tool_calls == () and second.finish_reason == "stop"
    assert second.text
    # The upstream got the tool results in its own shape.
    sent = mock.log[-1].request
    assert sent is not None
    if fmt == "anthropic":
        blocks = sent["messages"][-1]["content"]
        assert [b["tool_use_id"] for b in blocks] == [c.id for c in first.tool_calls]
    elif fmt == "gemini":
        parts = sent["contents"][-1]["parts"]
        assert [p["functionResponse"]["name"] for p in parts] == ["get_weather", "get_time"]
    else:
        assert [m["role"] for m in sent["messages"][-2:]] == ["tool", "tool"]


async def test_calls_reusing_upstream_index_0_stay_separate(mock: MockProvider) -> None:
    cfg = config(mock, ("p", "openai", mock_model("ok", tools=3, reuse_index=True)))
    async with open_supervisor(cfg) as sup:
        reply = await ask(sup, [{"role": "user", "content": "go"}], True)
    assert [c.index for c in reply.tool_calls] == [0, 1, 2]
    assert [json.loads(c.arguments)["n"] for c in reply.tool_calls] == [0, 1, 2]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_malformed_tool_arguments_fail_over_as_a_stream_error(
    mock: MockProvider, stream: bool
) -> None:
    cfg = config(
        mock,
        ("bad", "openai", mock_model("ok", tools=1, bad_args=True)),
        ("good", "anthropic", mock_model("ok", tools=1)),
    )
    async with open_supervisor(cfg) as sup:
        if stream:
            # The bad fragments reached the caller: the stream fails (mid_stream = error).
            with pytest.raises(RequestFailed) as info:
                await ask(sup, [{"role": "user", "content": "go"}], True)
            failure = info.value.failure
            assert failure.category is Category.STREAM_ERROR
            assert info.value.attempts[0].failure is not None
            assert info.value.attempts[0].failure.code == "malformed_tool_call"
        else:
            reply = await ask(sup, [{"role": "user", "content": "go"}], False)
            assert reply.provider == "good"
            assert reply.attempts[0].failure is not None
            assert reply.attempts[0].failure.code == "malformed_tool_call"


async def test_failover_before_the_first_tool_call_is_invisible(mock: MockProvider) -> None:
    cfg = config(
        mock,
        ("down", "gemini", mock_model("server-error")),
        ("up", "anthropic", mock_model("ok", tools=1)),
    )
    async with open_supervisor(cfg) as sup:
        request = Request("m", [{"role": "user", "content": "go"}], params={"tools": TOOLS})
        async with sup.stream(request) as s:
            deltas = [d async for d in s]
    assert {d.provider for d in deltas} == {"up"}
    assert s.reply.tool_calls[0].name == "get_weather"


@pytest.mark.parametrize("fmt", FORMATS)
async def test_cached_tokens_are_reported(mock: MockProvider, fmt: str) -> None:
    cfg = config(mock, ("p", fmt, mock_model("ok", cached=4)))
    async with open_supervisor(cfg) as sup:
        reply = await sup.complete(Request("m", [{"role": "user", "content": "a b c"}]))
    assert reply.usage is not None
    assert reply.usage.cached_tokens == 4
    assert reply.usage.prompt_tokens == 3 + 4


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_logprobs_and_refusal_come_back(mock: MockProvider, stream: bool) -> None:
    cfg = config(
        mock,
        ("lp", "openai", mock_model("ok", logprobs=True, chunks=3)),
    )
    request = Request("m", [{"role": "user", "content": "x"}], params={"logprobs": True})
    async with open_supervisor(cfg) as sup:
        if stream:
            async with sup.stream(request) as s:
                text = "".join([d.text async for d in s])
            reply = s.reply
        else:
            reply = await sup.complete(request)
            text = reply.text
        assert reply.logprobs is not None
        assert "".join(item["token"] for item in reply.logprobs["content"]) == text
    cfg = config(mock, ("no", "openai", mock_model("ok", refusal=True)))
    async with open_supervisor(cfg) as sup:
        reply = await sup.complete(Request("m", [{"role": "user", "content": "x"}]))
    assert reply.refusal == "I can't help with that." and reply.text == ""


# --- capabilities -----------------------------------------------------------------------------


async def test_a_provider_lacking_a_capability_is_skipped_without_a_call(
    mock: MockProvider,
) -> None:
    cfg = config(
        mock,
        ("claude", "anthropic", mock_model("ok")),
        ("gpt", "openai", mock_model("ok", logprobs=True)),
    )
    request = Request("m", [{"role": "user", "content": "x"}], params={"logprobs": True})
    async with open_supervisor(cfg) as sup:
        reply = await sup.complete(request)
    assert reply.provider == "gpt"
    skip = reply.decisions[0]
    assert skip.action is Action.SKIP and skip.actor == "claude"
    assert str(skip.rule) == "default:capabilities.logprobs=false"
    assert [a.model for a in mock.log] == [mock_model("ok", logprobs=True) + ",tag=gpt"]


async def test_a_configured_capability_names_the_config_in_its_rule(mock: MockProvider) -> None:
    cfg = config(mock, ("a", "openai", mock_model("ok")), ("b", "gemini", mock_model("ok")))
    no_tools = attrs.evolve(
        cfg.providers[0],
        capabilities=Capabilities(tools=False, n=False, configured=frozenset({"tools"})),
    )
    cfg = attrs.evolve(cfg, providers=[no_tools, cfg.providers[1]])
    async with open_supervisor(cfg) as sup:
        reply = await sup.complete(
            Request("m", [{"role": "user", "content": "x"}], params={"tools": TOOLS})
        )
    assert reply.provider == "b"
    assert str(reply.decisions[0].rule) == "config:capabilities.tools=false"


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (
            {"response_format": {"type": "json_object"}},
            "params.response_format",
        ),
        ({"n": 2}, "params.n"),
        ({"logprobs": True}, "params.logprobs"),
    ],
)
async def test_a_request_no_provider_can_serve_is_a_bad_request_before_any_call(
    mock: MockProvider, params: dict[str, Any], field: str
) -> None:
    cfg = config(mock, ("claude", "anthropic", mock_model("ok")))
    async with open_supervisor(cfg) as sup:
        with pytest.raises(BadRequest) as info:
            await sup.complete(Request("m", [{"role": "user", "content": "x"}], params=params))
        with pytest.raises(BadRequest):
            sup.stream(Request("m", [{"role": "user", "content": "x"}], params=params))
    assert info.value.field == field
    assert "claude: default:capabilities." in info.value.problem
    assert mock.log == []


async def test_a_prompt_over_a_declared_context_skips_the_provider(mock: MockProvider) -> None:
    cfg = config(mock, ("small", "openai", mock_model("ok")), ("big", "openai", mock_model("ok")))
    small = attrs.evolve(
        cfg.providers[0],
        capabilities=Capabilities(
            n=False, max_context_tokens=10, configured=frozenset({"max_context_tokens"})
        ),
    )
    cfg = attrs.evolve(cfg, providers=[small, cfg.providers[1]])
    async with open_supervisor(cfg) as sup:
        short = await sup.complete(Request("m", [{"role": "user", "content": "hi"}]))
        long = await sup.complete(Request("m", [{"role": "user", "content": "word " * 20}]))
    assert short.provider == "small"
    assert long.provider == "big"
    assert str(long.decisions[0].rule) == "config:capabilities.max_context_tokens=10"


def test_capabilities_are_read_from_the_toml_over_the_kind_defaults() -> None:
    cfg = load_config(
        {
            "providers": [
                {
                    "name": "a",
                    "kind": "anthropic",
                    "base_url": "http://localhost:1",
                    "capabilities": {"json_schema": True, "max_context_tokens": 1000},
                },
                {"name": "b", "kind": "anthropic", "base_url": "http://localhost:1"},
            ]
        }
    )
    a, b = (p.effective_capabilities for p in cfg.providers)
    assert a.json_schema and a.tools and not a.logprobs and a.max_context_tokens == 1000
    assert a.source("json_schema") == "config" and a.source("logprobs") == "default"
    assert not b.json_schema and b.configured == frozenset()
    with pytest.raises(ConfigError):
        load_config(
            {
                "providers": [
                    {"name": "a", "kind": "openai", "capabilities": {"tool": True}},
                ]
            }
        )


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_n_choices_are_served_by_the_openai_kind(mock: MockProvider, stream: bool) -> None:
    cfg = config(
        mock,
        ("claude", "anthropic", mock_model("ok")),
        ("gpt", "openai", mock_model("ok", chunks=3)),
    )
    request = Request("m", [{"role": "user", "content": "x"}], params={"n": 3})
    async with open_supervisor(cfg) as sup:
        if stream:
            async with sup.stream(request) as s:
                text = "".join([d.text async for d in s])
            reply = s.reply
        else:
            reply = await sup.complete(request)
            text = reply.text
    assert str(reply.decisions[0].rule) == "default:capabilities.n=false"
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert reply.choices[0].text == text == reply.text
    assert {c.text for c in reply.choices} == {text}
    assert all(c.finish_reason == "stop" for c in reply.choices)


# --- failover after a tool call -----------------------------------------------------------------


def after_a_call(mock: MockProvider, fmt: str, mode: MidStream, then: str) -> Config:
    """Provider ``a`` breaks its stream right after its tool call; ``b`` answers ``then``."""
    cfg = config(
        mock,
        ("a", fmt, mock_model("cut", tools=1, chunks=2, after=2)),
        ("b", fmt, then),
    )
    policies = Policies(retry=RetryPolicy(max_attempts=1), stream=StreamPolicy(mid_stream=mode))
    return attrs.evolve(cfg, policies=policies)


async def stream_of(sup: Supervisor) -> tuple[list[Any], Any]:
    request = Request("m", [{"role": "user", "content": "go"}], params={"tools": TOOLS})
    async with sup.stream(request) as s:
        deltas = [d async for d in s]
    return deltas, s.reply


@pytest.mark.parametrize("fmt", FORMATS)
async def test_a_restart_after_a_tool_call_gives_it_once(mock: MockProvider, fmt: str) -> None:
    cfg = after_a_call(mock, fmt, MidStream.RESTART, mock_model("ok", tools=1, chunks=3))
    async with open_supervisor(cfg) as sup:
        deltas, reply = await stream_of(sup)
    fragments = [f for d in deltas for f in d.tool_calls]
    opened = [f for f in fragments if f.id is not None]
    assert len(opened) == 1 and opened[0].id == reply.tool_calls[0].id
    assert [c.name for c in reply.tool_calls] == ["get_weather"]
    assert json.loads(reply.tool_calls[0].arguments) == {"n": 0, "q": "mock"}
    assert reply.provider == "b" and reply.text == SCRIPTED_ANSWER
    assert {d.provider for d in deltas if d.tool_calls} == {"a"}


async def test_a_restart_whose_tool_calls_differ_is_an_error(mock: MockProvider) -> None:
    cfg = after_a_call(mock, "openai", MidStream.RESTART, mock_model("ok", tools=0))
    async with open_supervisor(cfg) as sup:
        with pytest.raises(RequestFailed) as info:
            await stream_of(sup)
    assert info.value.failure.code == "restart_diverged"


async def test_after_a_tool_call_the_default_is_a_stream_error(mock: MockProvider) -> None:
    cfg = after_a_call(mock, "anthropic", MidStream.ERROR, mock_model("ok", tools=1))
    async with open_supervisor(cfg) as sup:
        with pytest.raises(RequestFailed) as info:
            await stream_of(sup)
    assert info.value.failure.category is Category.STREAM_ERROR
    assert [a.model for a in mock.log] == [mock_model("cut", tools=1, chunks=2, after=2) + ",tag=a"]


async def test_continue_is_never_used_after_a_tool_call(mock: MockProvider) -> None:
    cfg = after_a_call(mock, "openai", MidStream.CONTINUE, mock_model("ok", tools=1))
    cfg = attrs.evolve(
        cfg, providers=[attrs.evolve(p, accepts_continuation=True) for p in cfg.providers]
    )
    async with open_supervisor(cfg) as sup:
        with pytest.raises(RequestFailed) as info:
            await stream_of(sup)
    assert str(info.value.decisions[-1].rule) == "default:stream.mid_stream.continue=tool_call"
    assert len(mock.log) == 1
