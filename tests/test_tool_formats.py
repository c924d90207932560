"""Tool calls through the wire formats: an OpenAI tool-calling conversation translated to
Anthropic and Gemini, their replies (written by our encoders) read back to OpenAI's shape,
streamed arguments reassembled whatever the split, upstream indexes reassigned, malformed
arguments refused."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayrace import Request, ToolCall, ToolCallDelta, Usage
from relayrace._values import tool_calls_of
from relayrace.providers import (
    AnthropicReader,
    GeminiReader,
    MalformedStream,
    OpenAIReader,
    Reader,
    SSEDecoder,
    anthropic,
    gemini,
    openai,
)

NAMES = st.sampled_from(["get_weather", "search", "add", "f_2"])
VALUES = st.one_of(st.integers(-100, 100), st.text(max_size=8), st.booleans(), st.none())
ARGUMENTS = st.dictionaries(st.text(min_size=1, max_size=6), VALUES, max_size=3).map(json.dumps)
IDS = st.from_regex(r"call_[A-Za-z0-9]{1,12}", fullmatch=True)
CUTS = st.lists(st.integers(1, 40), max_size=30)


@st.composite
def calls(draw: st.DrawFn, *, min_size: int = 1) -> list[ToolCall]:
    ids = draw(st.lists(IDS, min_size=min_size, max_size=4, unique=True))
    return [ToolCall(i, call_id, draw(NAMES), draw(ARGUMENTS)) for i, call_id in enumerate(ids)]


def tools_param() -> list[dict[str, Any]]:
    return [
        {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
        for name in ("get_weather", "search", "add", "f_2")
    ]


def conversation(turns: list[list[ToolCall]]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "go"}]
    for turn in turns:
        messages.append(
            {"role": "assistant", "content": None, "tool_calls": [c.to_dict() for c in turn]}
        )
        for call in turn:
            messages.append(
                {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"ok": call.name})}
            )
    return messages


def split(text: str, cuts: list[int]) -> list[str]:
    pieces, rest = [], text
    for size in cuts:
        if not rest:
            break
        pieces.append(rest[:size])
        rest = rest[size:]
    return [*pieces, rest] if rest else pieces


def read_stream(reader: Reader, body: bytes, cuts: list[int]) -> list[ToolCallDelta]:
    decoder = SSEDecoder()
    fragments: list[ToolCallDelta] = []
    for chunk in split(body.decode(), cuts) or [""]:
        for event in decoder.feed(chunk.encode()):
            reader.event(event)
            fragments.extend(reader.tools.take())
    for event in decoder.close():
        reader.event(event)
        fragments.extend(reader.tools.take())
    return fragments


def same_calls(got: tuple[ToolCall, ...], want: list[ToolCall], *, ids: bool = True) -> None:
    assert [c.index for c in got] == list(range(len(want)))
    assert [c.name for c in got] == [c.name for c in want]
    assert [json.loads(c.arguments) for c in got] == [json.loads(c.arguments) for c in want]
    if ids:
        assert [c.id for c in got] == [c.id for c in want]


@given(st.lists(calls(), min_size=1, max_size=3))
def test_a_tool_conversation_translates_to_anthropic_blocks(turns: list[list[ToolCall]]) -> None:
    request = Request("m", conversation(turns), params={"tools": tools_param()})
    body = anthropic.payload(request, model="claude", stream=False)
    uses = [
        block
        for message in body["messages"]
        if message["role"] == "assistant"
        for block in message["content"]
        if block["type"] == "tool_use"
    ]
    results = [
        block
        for message in body["messages"]
        if message["role"] == "user" and isinstance(message["content"], list)
        for block in message["content"]
        if block["type"] == "tool_result"
    ]
    flat = [call for turn in turns for call in turn]
    assert [(u["id"], u["name"], u["input"]) for u in uses] == [
        (c.id, c.name, json.loads(c.arguments)) for c in flat
    ]
    assert [r["tool_use_id"] for r in results] == [c.id for c in flat]
    # Turns alternate (Anthropic's rule): parallel results share one user turn.
    roles = [m["role"] for m in body["messages"]]
    assert all(a != b for a, b in zip(roles, roles[1:], strict=False))
    assert [t["name"] for t in body["tools"]] == ["get_weather", "search", "add", "f_2"]


@given(st.lists(calls(), min_size=1, max_size=3))
def test_a_tool_conversation_translates_to_gemini_parts(turns: list[list[ToolCall]]) -> None:
    request = Request("m", conversation(turns), params={"tools": tools_param()})
    body = gemini.payload(request)
    parts = [part for content in body["contents"] for part in content["parts"]]
    flat = [call for turn in turns for call in turn]
    assert [p["functionCall"] for p in parts if "functionCall" in p] == [
        {"name": c.name, "args": json.loads(c.arguments)} for c in flat
    ]
    # Each result is named by the call it answers (Gemini has no ids).
    assert [p["functionResponse"] for p in parts if "functionResponse" in p] == [
        {"name": c.name, "response": {"ok": c.name}} for c in flat
    ]
    declared = body["tools"][0]["functionDeclarations"]
    assert [d["name"] for d in declared] == ["get_weather", "search", "add", "f_2"]


@given(calls())
def test_an_anthropic_whole_reply_reads_back_as_openai_calls(want: list[ToolCall]) -> None:
    reader = AnthropicReader("m")
    text = reader.whole(
        anthropic.message(
            id="msg_1",
            model="m",
            text="",
            finish_reason="tool_calls",
            usage=Usage(prompt_tokens=1, completion_tokens=1),
            tool_calls=want,
        )
    )
    assert text == ""
    assert reader.finish_reason == "tool_calls"
    same_calls(tool_calls_of(reader.tools.take()), want)


@given(calls(), CUTS, st.lists(st.integers(1, 7), max_size=10))
def test_anthropic_streamed_arguments_reassemble_whatever_the_split(
    want: list[ToolCall], cuts: list[int], fragment_cuts: list[int]
) -> None:
    body = anthropic.opening(id="msg_1", model="m", prompt_tokens=3)
    for call in want:
        block = call.index + 1  # block 0 is the opening's text block
        body += anthropic.tool_use_start(block, call.id, call.name)
        for piece in split(call.arguments, fragment_cuts):
            body += anthropic.input_json_delta(block, piece)
    body += anthropic.closing("tool_calls", 5, last_block=len(want))
    reader = AnthropicReader("m")
    got = tool_calls_of(read_stream(reader, body, cuts))
    assert reader.finish_reason == "tool_calls"
    same_calls(got, want)
    assert [c.arguments for c in got] == [c.arguments for c in want]  # the very text


@given(calls())
def test_a_gemini_reply_reads_back_with_ids_of_ours(want: list[ToolCall]) -> None:
    answer = gemini.response(
        id="r", model="m", text="", finish_reason="tool_calls", tool_calls=want
    )
    reader = GeminiReader("m")
    reader.whole(answer)
    got = tool_calls_of(reader.tools.take())
    same_calls(got, want, ids=False)
    assert reader.finish_reason == "tool_calls"
    # Made deterministically: the same answer gives the same ids (a restart keeps them).
    again = GeminiReader("m")
    again.whole(answer)
    assert tool_calls_of(again.tools.take()) == got
    assert len({c.id for c in got}) == len(got)


@given(calls(min_size=2), CUTS, st.lists(st.integers(1, 7), max_size=10))
def test_openai_calls_that_reuse_upstream_index_0_stay_separate(
    want: list[ToolCall], cuts: list[int], fragment_cuts: list[int]
) -> None:
    encoder = openai.StreamEncoder("chatcmpl-1", 0, False)
    body = encoder.opening("m")
    for call in want:
        pieces = split(call.arguments, fragment_cuts) or [""]
        first = ToolCallDelta(call.index, call.id, call.name, pieces[0])
        body += encoder.tool_calls("m", [first], upstream_index=lambda _: 0)
        for piece in pieces[1:]:
            body += encoder.tool_calls(
                "m", [ToolCallDelta(call.index, arguments=piece)], upstream_index=lambda _: 0
            )
    body += encoder.closing("m", "tool_calls", None)
    reader = OpenAIReader("m")
    got = tool_calls_of(read_stream(reader, body, cuts))
    same_calls(got, want)
    assert [c.arguments for c in got] == [c.arguments for c in want]


@given(calls())
def test_an_openai_whole_reply_round_trips(want: list[ToolCall]) -> None:
    reader = OpenAIReader("m")
    body = openai.completion(
        id="x", created=0, model="m", text="", finish_reason="tool_calls", tool_calls=want
    )
    reader.whole(body)
    assert tool_calls_of(reader.tools.take()) == tuple(want)


def test_malformed_arguments_in_a_whole_reply_are_a_stream_error() -> None:
    bad = ToolCall(0, "call_1", "f", "{nope")
    body = openai.completion(
        id="x", created=0, model="m", text="", finish_reason="tool_calls", tool_calls=[bad]
    )
    with pytest.raises(MalformedStream) as info:
        OpenAIReader("m").whole(body)
    assert info.value.code == "malformed_tool_call"


def test_streamed_arguments_that_do_not_parse_at_the_end_are_a_stream_error() -> None:
    encoder = openai.StreamEncoder("chatcmpl-1", 0, False)
    body = encoder.tool_calls("m", [ToolCallDelta(0, "call_1", "f", '{"a": ')])
    body += encoder.tool_calls("m", [ToolCallDelta(0, arguments="1")])  # no closing brace
    body += encoder.closing("m", "tool_calls", None)
    with pytest.raises(MalformedStream) as info:
        read_stream(OpenAIReader("m"), body, [])
    assert info.value.code == "malformed_tool_call"
    body = anthropic.opening(id="m1", model="m", prompt_tokens=1)
    body += anthropic.tool_use_start(1, "toolu_1", "f") + anthropic.input_json_delta(1, '{"a"')
    body += anthropic.closing("tool_calls", 1, last_block=1)
    with pytest.raises(MalformedStream) as info:
        read_stream(AnthropicReader("m"), body, [])
    assert info.value.code == "malformed_tool_call"


def test_anthropic_tool_choice_and_parallel_calls_translate() -> None:
    def body(**params: Any) -> dict[str, Any]:
        request = Request("m", [{"role": "user", "content": "x"}], params=params)
        return anthropic.payload(request, model="c", stream=False)

    tools = tools_param()
    assert body(tools=tools, tool_choice="required")["tool_choice"] == {"type": "any"}
    assert body(tools=tools, tool_choice="none")["tool_choice"] == {"type": "none"}
    named = {"type": "function", "function": {"name": "add"}}
    assert body(tools=tools, tool_choice=named)["tool_choice"] == {"type": "tool", "name": "add"}
    assert body(tools=tools, parallel_tool_calls=False)["tool_choice"] == {
        "type": "auto",
        "disable_parallel_tool_use": True,
    }
    assert body(tools=tools)["tools"][0]["input_schema"] == {"type": "object"}
    assert "tool_choice" not in body(tools=tools)


def test_gemini_tool_config_and_json_schema_translate() -> None:
    def body(**params: Any) -> dict[str, Any]:
        request = Request("m", [{"role": "user", "content": "x"}], params=params)
        return gemini.payload(request)

    tools = tools_param()
    named = {"type": "function", "function": {"name": "add"}}
    assert body(tools=tools, tool_choice=named)["toolConfig"] == {
        "functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["add"]}
    }
    assert body(tools=tools, tool_choice="none")["toolConfig"] == {
        "functionCallingConfig": {"mode": "NONE"}
    }
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    config = body(
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    )["generationConfig"]
    assert config == {"responseMimeType": "application/json", "responseSchema": schema}


def test_usage_details_are_read_from_every_format() -> None:
    reader = OpenAIReader("m")
    reader.whole(
        {
            "choices": [{"index": 0, "message": {"content": "a"}, "finish_reason": "stop"}],
            "usage": {
                "prompt_tokens": 10,
                "completion_tokens": 4,
                "prompt_tokens_details": {"cached_tokens": 6},
                "completion_tokens_details": {"reasoning_tokens": 3},
            },
        }
    )
    assert reader.usage == Usage(
        prompt_tokens=10, completion_tokens=4, cached_tokens=6, reasoning_tokens=3
    )
    usage = Usage(prompt_tokens=20, completion_tokens=5, cached_tokens=8, cache_creation_tokens=2)
    reader = AnthropicReader("m")
    reader.whole(anthropic.message(id="a", model="m", text="x", usage=usage))
    assert reader.usage == usage
    usage = Usage(prompt_tokens=20, completion_tokens=5, cached_tokens=8, reasoning_tokens=2)
    reader = GeminiReader("m")
    reader.whole(gemini.response(id="g", model="m", text="x", finish_reason="stop", usage=usage))
    assert reader.usage == usage


def test_openai_logprobs_and_refusal_are_read_whole_and_streamed() -> None:
    items = [{"token": "a", "logprob": -0.1, "top_logprobs": []}]
    reader = OpenAIReader("m")
    reader.whole(openai.completion(id="x", created=0, model="m", text="a", logprobs=items))
    assert reader.logprobs == items
    encoder = openai.StreamEncoder("c", 0, False)
    body = encoder.logprobs("m", "a", items) + encoder.logprobs("m", "b", items)
    body += encoder.refusal("m", "I can") + encoder.refusal("m", "not.")
    body += encoder.closing("m", "stop", None)
    reader = OpenAIReader("m")
    read_stream(reader, body, [])
    assert reader.logprobs == items * 2
    assert reader.refusal == "I cannot."


def test_openai_other_choices_are_read_apart_whole_and_streamed() -> None:
    from relayrace import Choice

    call = ToolCall(0, "call_9", "add", '{"a": 1}')
    others = [
        Choice(index=1, text="b", finish_reason="stop"),
        Choice(index=2, text="", tool_calls=(call,), finish_reason="tool_calls"),
    ]
    reader = OpenAIReader("m")
    assert (
        reader.whole(openai.completion(id="x", created=0, model="m", text="a", choices=others))
        == "a"
    )
    assert reader.other_choices() == others
    encoder = openai.StreamEncoder("c", 0, False)
    body = encoder.content("m", "a") + encoder.other_choice("m", 1, "b", None)
    body += encoder.other_choice("m", 1, "", "stop") + encoder.closing("m", "stop", None)
    reader = OpenAIReader("m")
    read_stream(reader, body, [])
    assert reader.other_choices() == [Choice(index=1, text="b", finish_reason="stop")]
    assert reader.tools.take() == []  # choice 1 never mixes into the answer's own calls
