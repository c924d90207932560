"""The streamed reading's fast paths (the OpenAI reader's common chunk, the SSE decoder's data
and end-of-event lines) give what the general paths give, and step aside for everything else."""

from __future__ import annotations

import json
from typing import Any

import pytest

from relayrace import Usage
from relayrace.providers import (
    MalformedStream,
    OpenAIReader,
    ServerSentEvent,
    SSEDecoder,
    UpstreamErrorBody,
)


def _chunk(delta: dict[str, Any] | None = None, **fields: Any) -> ServerSentEvent:
    choice: dict[str, Any] = {"index": 0, "delta": delta or {}, "finish_reason": None}
    choice.update(fields.pop("choice", {}))
    body = {"id": "c", "model": "gpt", "choices": [choice], **fields}
    return ServerSentEvent("message", json.dumps(body))


def test_a_text_chunk_gives_its_text() -> None:
    reader = OpenAIReader("gpt")
    assert reader.event(_chunk({"role": "assistant", "content": ""})) == ""
    assert reader.event(_chunk({"content": "Hello"})) == "Hello"
    assert reader.event(_chunk({"content": None})) == ""
    assert (reader.model, reader.finished, reader.usage) == ("gpt", False, None)


def test_a_chunk_naming_another_model_records_it() -> None:
    reader = OpenAIReader("gpt")
    assert reader.event(_chunk({"content": "a"}, model="gpt-4o-2024")) == "a"
    assert reader.model == "gpt-4o-2024"


def test_a_chunk_without_a_model_keeps_the_one_asked_for() -> None:
    reader = OpenAIReader("gpt")
    assert reader.event(_chunk({"content": "a"}, model=None)) == "a"
    assert reader.model == "gpt"


def test_finish_reason_usage_and_refusal_are_read() -> None:
    reader = OpenAIReader("gpt")
    assert reader.event(_chunk({"content": "end"}, choice={"finish_reason": "stop"})) == "end"
    assert (reader.finished, reader.finish_reason) == (True, "stop")
    usage = {"prompt_tokens": 3, "completion_tokens": 5}
    reader.event(ServerSentEvent("message", json.dumps({"choices": [], "usage": usage})))
    assert reader.usage == Usage(prompt_tokens=3, completion_tokens=5)
    refusing = OpenAIReader("gpt")
    assert refusing.event(_chunk({"refusal": "no"})) == ""
    assert refusing.refusal == "no"


def test_a_tool_call_fragment_is_taken() -> None:
    reader = OpenAIReader("gpt")
    call = {"index": 0, "id": "call_1", "function": {"name": "f", "arguments": "{}"}}
    assert reader.event(_chunk({"tool_calls": [call]})) == ""
    assert [(d.id, d.name, d.arguments) for d in reader.tools.take()] == [("call_1", "f", "{}")]


def test_a_choice_whose_index_is_not_an_int_is_not_the_answer() -> None:
    reader = OpenAIReader("gpt")
    assert reader.event(_chunk({"content": "x"}, choice={"index": False})) == ""


def test_a_content_filter_finish_is_an_upstream_error() -> None:
    reader = OpenAIReader("gpt")
    with pytest.raises(UpstreamErrorBody):
        reader.event(_chunk({"content": "x"}, choice={"finish_reason": "content_filter"}))


def test_done_with_spaces_ends_the_stream() -> None:
    reader = OpenAIReader("gpt")
    assert reader.event(ServerSentEvent("message", " [DONE] ")) is None
    assert reader.terminated


def test_sse_named_events_multi_line_data_and_comments() -> None:
    decoder = SSEDecoder()
    events = decoder.feed(b": hi\nevent: error\ndata: a\ndata: b\n\ndata: c\n\ndata:d\n\n")
    assert events == [
        ServerSentEvent("error", "a\nb"),
        ServerSentEvent("message", "c"),
        ServerSentEvent("message", "d"),
    ]


def test_sse_event_size_limit_holds_on_the_fast_path() -> None:
    decoder = SSEDecoder(max_event_bytes=8)
    assert decoder.feed(b"data: 1234\n") == []
    with pytest.raises(MalformedStream) as caught:
        decoder.feed(b"data: 56789\n\n")
    assert caught.value.code == "event_too_large"
