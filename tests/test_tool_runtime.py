"""Tool calls through the supervisor: fragments as deltas, whole calls in the reply, and the
failover rules (a tool call is output; a restart never re-emits one; continue never follows
one)."""

from __future__ import annotations

from typing import Any

import pytest

from relayrace import (
    Action,
    Category,
    MidStream,
    Policies,
    RequestFailed,
    RetryPolicy,
    StreamPolicy,
    ToolCall,
    ToolCallDelta,
    open_supervisor,
)
from relayrace._values import tool_calls_of
from relayrace.testing import Answer, Fail

from .support import client, config, request, scripted_provider

C = Category
CALLS = (
    ToolCall(0, "call_a", "get_weather", '{"city": "Paris"}'),
    ToolCall(1, "call_b", "get_time", '{"zone": "CET"}'),
)
CALL_ANSWER = Answer(text="", tool_calls=CALLS, finish_reason="tool_calls")


def policies(mode: MidStream) -> Policies:
    return Policies(retry=RetryPolicy(max_attempts=1), stream=StreamPolicy(mid_stream=mode))


def broken_after_calls(*calls: ToolCall, after: int = 0) -> Fail:
    return Fail(category=C.STREAM_ERROR, code="stream_cut", after_chunks=after, tool_calls=calls)


async def collect(sup: Any) -> tuple[list[Any], Any]:
    async with sup.stream(request()) as s:
        deltas = [d async for d in s]
    return deltas, s.reply


async def test_complete_returns_whole_tool_calls(autojump_clock: Any) -> None:
    cfg = config(scripted_provider("a", CALL_ANSWER))
    async with open_supervisor(cfg) as sup:
        reply = await sup.complete(request())
    assert reply.tool_calls == CALLS
    assert reply.text == "" and reply.finish_reason == "tool_calls"


async def test_a_stream_carries_fragments_and_the_reply_assembles_them(autojump_clock: Any) -> None:
    cfg = config(scripted_provider("a", CALL_ANSWER))
    async with open_supervisor(cfg) as sup:
        deltas, reply = await collect(sup)
    fragments = [f for d in deltas for f in d.tool_calls]
    assert fragments[0] == ToolCallDelta(0, "call_a", "get_weather", '{"city":')
    assert len(fragments) == 4 and all(d.text == "" for d in deltas)
    assert [d.seq for d in deltas] == list(range(len(deltas)))
    assert tool_calls_of(fragments) == CALLS == reply.tool_calls


async def test_failover_before_the_first_tool_call_fragment_is_invisible(
    autojump_clock: Any,
) -> None:
    cfg = config(
        scripted_provider("a", Fail(category=C.PROVIDER_5XX, status=502)),
        scripted_provider("b", CALL_ANSWER),
    )
    async with open_supervisor(cfg) as sup:
        deltas, reply = await collect(sup)
    assert {d.provider for d in deltas} == {"b"}
    assert reply.tool_calls == CALLS and reply.provider == "b"


async def test_a_failed_complete_attempt_leaves_no_tool_call_behind(autojump_clock: Any) -> None:
    cfg = config(
        scripted_provider("a", broken_after_calls(CALLS[1])),
        scripted_provider("b", Answer(text="done")),
    )
    async with open_supervisor(cfg) as sup:
        reply = await sup.complete(request())
    # complete() is not streamed: a scripted Fail sends nothing, and nothing is kept anyway
    assert reply.tool_calls == () and reply.text == "done"


async def test_a_tool_call_fragment_is_first_output_for_the_mid_stream_policy(
    autojump_clock: Any,
) -> None:
    cfg = config(
        scripted_provider("a", broken_after_calls(CALLS[0])),
        scripted_provider("b", CALL_ANSWER),
        policies=policies(MidStream.ERROR),
    )
    async with open_supervisor(cfg) as sup:
        with pytest.raises(RequestFailed) as info:
            await collect(sup)
    assert info.value.failure.category is C.STREAM_ERROR
    assert client(cfg, "b").calls == []


async def test_a_restart_never_re_emits_a_tool_call_the_caller_has(autojump_clock: Any) -> None:
    cfg = config(
        scripted_provider("a", broken_after_calls(CALLS[0])),
        scripted_provider("b", CALL_ANSWER),
        policies=policies(MidStream.RESTART),
    )
    async with open_supervisor(cfg) as sup:
        deltas, reply = await collect(sup)
    fragments = [f for d in deltas for f in d.tool_calls]
    # call 0 came whole from a; b's copy of it is skipped; call 1 comes from b.
    assert [f.index for f in fragments].count(0) == 2
    assert [f.id for f in fragments if f.id is not None] == ["call_a", "call_b"]
    assert tool_calls_of(fragments) == CALLS == reply.tool_calls
    assert reply.provider == "b"


async def test_a_restart_whose_tool_call_diverges_is_an_error(autojump_clock: Any) -> None:
    other = (ToolCall(0, "call_x", "get_weather", '{"city": "Rome"}'),)
    cfg = config(
        scripted_provider("a", broken_after_calls(CALLS[0])),
        scripted_provider("b", Answer(text="", tool_calls=other, finish_reason="tool_calls")),
        scripted_provider("c", CALL_ANSWER),
        policies=policies(MidStream.RESTART),
    )
    async with open_supervisor(cfg) as sup:
        with pytest.raises(RequestFailed) as info:
            await collect(sup)
    failure = info.value.failure
    assert (failure.category, failure.code) == (C.STREAM_ERROR, "restart_diverged")
    assert info.value.decisions[-1].action is Action.STOP
    assert client(cfg, "c").calls == []


async def test_a_restart_whose_text_diverges_is_an_error(autojump_clock: Any) -> None:
    cfg = config(
        scripted_provider(
            "a", Fail(category=C.STREAM_ERROR, text="Hello there", chunks=11, after_chunks=3)
        ),
        scripted_provider("b", Answer(text="Goodbye", chunks=2)),
        policies=policies(MidStream.RESTART),
    )
    async with open_supervisor(cfg) as sup:
        with pytest.raises(RequestFailed) as info:
            await collect(sup)
    assert info.value.failure.code == "restart_diverged"


async def test_a_restart_that_drops_a_held_tool_call_is_an_error(autojump_clock: Any) -> None:
    cfg = config(
        scripted_provider("a", broken_after_calls(CALLS[0])),
        scripted_provider("b", Answer(text="no tools now")),
        policies=policies(MidStream.RESTART),
    )
    async with open_supervisor(cfg) as sup:
        with pytest.raises(RequestFailed) as info:
            await collect(sup)
    assert info.value.failure.code == "restart_diverged"


async def test_continue_is_never_used_after_a_tool_call(autojump_clock: Any) -> None:
    cfg = config(
        scripted_provider("a", broken_after_calls(CALLS[0], after=2)),
        scripted_provider("b", CALL_ANSWER, accepts_continuation=True),
        policies=policies(MidStream.CONTINUE),
    )
    async with open_supervisor(cfg) as sup:
        with pytest.raises(RequestFailed) as info:
            await collect(sup)
    stop = info.value.decisions[-1]
    assert stop.action is Action.STOP
    assert str(stop.rule) == "default:stream.mid_stream.continue=tool_call"
    assert client(cfg, "b").calls == []
