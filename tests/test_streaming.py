"""Streaming: invisible failover before the first delta, the mid-stream modes after it, and
never a truncated answer reported as complete."""

from __future__ import annotations

import pytest

from relayrace import (
    Category,
    MidStream,
    Policies,
    RequestFailed,
    RetryPolicy,
    StreamPolicy,
    open_supervisor,
)
from relayrace.testing import SCRIPTED_ANSWER, Answer, Fail, Hang

from .support import client, config, request, scripted_provider

C = Category


def policies(mode: MidStream) -> Policies:
    return Policies(retry=RetryPolicy(max_attempts=1), stream=StreamPolicy(mid_stream=mode))


def cut(after: int) -> Fail:
    return Fail(category=C.STREAM_ERROR, code="stream_cut", after_chunks=after, chunks=10)


async def collect(sup, req=None):
    async with sup.stream(req or request()) as s:
        deltas = [d async for d in s]
    return deltas, s.reply


async def test_a_failure_before_the_first_delta_fails_over_invisibly(autojump_clock):
    cfg = config(
        scripted_provider("a", Fail(category=C.PROVIDER_5XX, status=502)),
        scripted_provider("b", Answer(chunks=5)),
    )
    async with open_supervisor(cfg) as sup:
        deltas, reply = await collect(sup)
    assert "".join(d.text for d in deltas) == SCRIPTED_ANSWER
    assert [d.seq for d in deltas] == list(range(5))
    assert {d.provider for d in deltas} == {"b"}
    assert reply.provider == "b" and reply.text == SCRIPTED_ANSWER


async def test_mid_stream_error_is_the_default_and_never_looks_complete(autojump_clock):
    cfg = config(scripted_provider("a", cut(3)), scripted_provider("b"))
    async with open_supervisor(cfg) as sup:
        async with sup.stream(request()) as s:
            got = []
            with pytest.raises(RequestFailed) as info:
                async for d in s:
                    got.append(d.text)
            with pytest.raises(RequestFailed):
                s.reply  # noqa: B018 - a broken stream has no reply: it raises its error
    assert len(got) == 3
    failure = info.value.failure
    assert failure.category is C.STREAM_ERROR and failure.provider == "a"
    assert client(cfg, "b").calls == []  # error mode: no failover after the first delta


async def test_mid_stream_restart_never_repeats_what_the_caller_has(autojump_clock):
    cfg = config(
        scripted_provider("a", cut(4)),
        scripted_provider("b", Answer(chunks=7)),
        policies=policies(MidStream.RESTART),
    )
    async with open_supervisor(cfg) as sup:
        deltas, reply = await collect(sup)
    assert "".join(d.text for d in deltas) == SCRIPTED_ANSWER
    assert [d.seq for d in deltas] == list(range(len(deltas)))
    assert reply.text == SCRIPTED_ANSWER and reply.provider == "b"
    # b was asked for the whole answer again, from scratch.
    assert client(cfg, "b").calls[0].prefill is None


async def test_mid_stream_continue_sends_a_prefill_to_actors_that_accept_it(autojump_clock):
    cfg = config(
        scripted_provider("a", cut(4)),
        scripted_provider("no", accepts_continuation=False),
        scripted_provider("yes", Answer(chunks=3), accepts_continuation=True),
        policies=policies(MidStream.CONTINUE),
    )
    async with open_supervisor(cfg) as sup:
        deltas, reply = await collect(sup)
    text = "".join(d.text for d in deltas)
    assert text == SCRIPTED_ANSWER and reply.text == SCRIPTED_ANSWER
    assert client(cfg, "no").calls == []
    skipped = [d for d in reply.decisions if d.actor == "no"]
    assert skipped and skipped[0].reason == "cannot continue a partial answer"
    prefill = client(cfg, "yes").calls[0].prefill
    assert prefill and SCRIPTED_ANSWER.startswith(prefill) and len(prefill) < len(SCRIPTED_ANSWER)


async def test_a_rejected_continuation_keeps_the_original_failure(autojump_clock):
    cfg = config(
        scripted_provider("a", cut(2)),
        scripted_provider("b", Fail(category=C.BAD_REQUEST, status=400), accepts_continuation=True),
        policies=policies(MidStream.CONTINUE),
    )
    async with open_supervisor(cfg) as sup:
        with pytest.raises(RequestFailed) as info:
            await collect(sup)
    assert info.value.failure.category is C.STREAM_ERROR
    assert info.value.failure.provider == "a"


async def test_idle_stall_mid_stream_becomes_a_stream_failure_not_a_short_answer(autojump_clock):
    cfg = config(
        scripted_provider("a", Hang(after_chunks=2)),
        scripted_provider("b"),
    )
    async with open_supervisor(cfg) as sup:
        with pytest.raises(RequestFailed) as info:
            await collect(sup)
    assert info.value.failure.category is C.STREAM_ERROR
    assert "timeout" in info.value.failure.message


async def test_complete_never_returns_part_of_an_answer(autojump_clock):
    # Non-streamed callers see nothing until the end, so failover after a cut is invisible.
    cfg = config(scripted_provider("a", cut(3)), scripted_provider("b"))
    async with open_supervisor(cfg) as sup:
        reply = await sup.complete(request())
    assert reply.text == SCRIPTED_ANSWER and reply.provider == "b"


# --- bounded memory: the text passed on is kept only up to StreamPolicy.keep_text -------------


def keeping(keep_text: int, mode: MidStream = MidStream.ERROR) -> Policies:
    return Policies(
        retry=RetryPolicy(max_attempts=1),
        stream=StreamPolicy(mid_stream=mode, keep_text=keep_text),
    )


@pytest.mark.parametrize("keep_text", [len(SCRIPTED_ANSWER), 10 * len(SCRIPTED_ANSWER)])
async def test_a_stream_within_keep_text_keeps_its_whole_text(autojump_clock, keep_text):
    cfg = config(scripted_provider("a", Answer(chunks=9)), policies=keeping(keep_text))
    async with open_supervisor(cfg) as sup:
        deltas, reply = await collect(sup)
    assert "".join(d.text for d in deltas) == SCRIPTED_ANSWER
    assert reply.text == SCRIPTED_ANSWER and reply.text_kept


@pytest.mark.parametrize("keep_text", [0, 1, len(SCRIPTED_ANSWER) - 1])
async def test_a_stream_past_keep_text_passes_it_on_and_says_it_was_not_kept(
    autojump_clock, keep_text
):
    cfg = config(scripted_provider("a", Answer(chunks=9)), policies=keeping(keep_text))
    async with open_supervisor(cfg) as sup:
        deltas, reply = await collect(sup)
        whole = await sup.complete(request())  # complete() always returns the whole text
    assert "".join(d.text for d in deltas) == SCRIPTED_ANSWER
    assert reply.text == "" and not reply.text_kept  # never a truncated text
    assert whole.text == SCRIPTED_ANSWER and whole.text_kept


async def test_restart_past_keep_text_still_skips_exactly_what_the_caller_has(autojump_clock):
    cfg = config(
        scripted_provider("a", cut(4)),
        scripted_provider("b", Answer(chunks=7)),
        policies=keeping(0, MidStream.RESTART),
    )
    async with open_supervisor(cfg) as sup:
        deltas, reply = await collect(sup)
    assert "".join(d.text for d in deltas) == SCRIPTED_ANSWER
    assert reply.provider == "b" and not reply.text_kept and reply.text == ""


async def test_continue_past_keep_text_is_not_attempted_and_a_decision_says_so(autojump_clock):
    cfg = config(
        scripted_provider("a", cut(4)),
        scripted_provider("yes", Answer(chunks=3), accepts_continuation=True),
        policies=keeping(3, MidStream.CONTINUE),
    )
    async with open_supervisor(cfg) as sup:
        with pytest.raises(RequestFailed) as info:
            await collect(sup)
    assert client(cfg, "yes").calls == []
    failure = info.value.failure
    assert failure.category is C.STREAM_ERROR and failure.provider == "a"
    stop = info.value.decisions[-1]
    assert str(stop.rule) == "config:stream.keep_text=3"
    assert "cannot be continued" in stop.reason


async def test_continue_within_keep_text_still_sends_the_prefill(autojump_clock):
    cfg = config(
        scripted_provider("a", cut(4)),
        scripted_provider("yes", Answer(chunks=3), accepts_continuation=True),
        policies=keeping(len(SCRIPTED_ANSWER), MidStream.CONTINUE),
    )
    async with open_supervisor(cfg) as sup:
        deltas, reply = await collect(sup)
    assert reply.text == SCRIPTED_ANSWER == "".join(d.text for d in deltas)
    prefill = client(cfg, "yes").calls[0].prefill
    assert prefill and SCRIPTED_ANSWER.startswith(prefill)
