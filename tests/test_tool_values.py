"""The agent surface of ``Request`` (tools, tool calls, response formats) and the tool-call
values."""

from __future__ import annotations

from typing import Any

import pytest

from relayrace import BadRequest, Request, ToolCallDelta, Usage
from relayrace._values import tool_calls_of

USER = {"role": "user", "content": "weather in Paris?"}
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather of a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}


def conversation() -> list[dict[str, Any]]:
    return [
        USER,
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    ]


def test_a_tool_calling_conversation_is_valid() -> None:
    request = Request(
        "m",
        conversation(),
        params={
            "tools": [TOOL],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "parallel_tool_calls": False,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "w", "schema": {"type": "object"}},
            },
            "logprobs": True,
            "top_logprobs": 2,
        },
    )
    assert request.messages[2]["tool_call_id"] == "call_1"


def bad_tool(**function: Any) -> dict[str, Any]:
    return {"type": "function", "function": {**TOOL["function"], **function}}


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"tools": {"a": 1}}, "params.tools"),
        ({"tools": [{"type": "retrieval"}]}, "params.tools[0]"),
        ({"tools": [TOOL, bad_tool(name="")]}, "params.tools[1].function.name"),
        ({"tools": [TOOL, TOOL]}, "params.tools[1].function.name"),
        (
            {"tools": [bad_tool(parameters={"type": "string"})]},
            "params.tools[0].function.parameters",
        ),
        ({"tools": [bad_tool(parameters=[1])]}, "params.tools[0].function.parameters"),
        ({"tools": [bad_tool(description=3)]}, "params.tools[0].function.description"),
        ({"tools": [TOOL], "tool_choice": "sometimes"}, "params.tool_choice"),
        ({"tool_choice": "required"}, "params.tool_choice"),
        (
            {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "other"}}},
            "params.tool_choice",
        ),
        ({"tools": [TOOL], "parallel_tool_calls": "yes"}, "params.parallel_tool_calls"),
        ({"response_format": {"type": "yaml"}}, "params.response_format.type"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "params.response_format.json_schema.schema",
        ),
        ({"logprobs": "yes"}, "params.logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "params.top_logprobs"),
        ({"top_logprobs": 2}, "params.top_logprobs"),
    ],
)
def test_a_malformed_agent_param_is_refused_naming_its_field(
    params: dict[str, Any], field: str
) -> None:
    with pytest.raises(BadRequest) as info:
        Request("m", [USER], params=params)
    assert info.value.field == field


def call_with(**changes: Any) -> dict[str, Any]:
    return {**CALL, **changes}


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        (
            [USER, {"role": "tool", "tool_call_id": "call_1", "content": "x"}],
            "messages[1].tool_call_id",
        ),
        (
            [*conversation()[:2], {"role": "tool", "tool_call_id": "call_2", "content": "x"}],
            "messages[2].tool_call_id",
        ),
        ([USER, {"role": "tool", "content": "x"}], "messages[1].tool_call_id"),
        (
            [USER, {"role": "assistant", "content": None, "tool_calls": []}],
            "messages[1].tool_calls",
        ),
        (
            [USER, {"role": "assistant", "content": None, "tool_calls": [call_with(id="")]}],
            "messages[1].tool_calls[0].id",
        ),
        (
            [
                USER,
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [call_with(function={"name": "f", "arguments": "{nope"})],
                },
            ],
            "messages[1].tool_calls[0].function.arguments",
        ),
        (
            [
                USER,
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [call_with(function={"arguments": "{}"})],
                },
            ],
            "messages[1].tool_calls[0].function.name",
        ),
    ],
)
def test_a_malformed_tool_call_message_is_refused_naming_its_field(
    messages: list[dict[str, Any]], field: str
) -> None:
    with pytest.raises(BadRequest) as info:
        Request("m", messages)
    assert info.value.field == field


def test_usage_writes_openai_details_only_when_reported() -> None:
    assert "prompt_tokens_details" not in Usage(prompt_tokens=3).to_dict()
    usage = Usage(prompt_tokens=10, completion_tokens=5, cached_tokens=4, reasoning_tokens=2)
    assert usage.to_dict() == {
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "total_tokens": 15,
        "prompt_tokens_details": {"cached_tokens": 4},
        "completion_tokens_details": {"reasoning_tokens": 2},
    }


def test_fragments_assemble_into_whole_calls_by_index() -> None:
    fragments = [
        ToolCallDelta(0, "a", "f", '{"x"'),
        ToolCallDelta(1, "b", "g", ""),
        ToolCallDelta(0, arguments=": 1}"),
        ToolCallDelta(1, arguments="{}"),
    ]
    calls = tool_calls_of(fragments)
    assert [(c.index, c.id, c.name, c.arguments) for c in calls] == [
        (0, "a", "f", '{"x": 1}'),
        (1, "b", "g", "{}"),
    ]
    assert calls[0].to_dict() == {
        "id": "a",
        "type": "function",
        "function": {"name": "f", "arguments": '{"x": 1}'},
    }
