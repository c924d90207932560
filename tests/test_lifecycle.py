"""Cancellation, shutdown, backpressure and crashing actors."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from relayrace import (
    Budgets,
    Category,
    EventKind,
    HealthPolicy,
    Policies,
    ProviderConfig,
    RequestFailed,
    RetryPolicy,
    open_supervisor,
)
from relayrace.actors import ClientCall, Completion, Sink, State
from relayrace.supervisor import MAX_RESTARTS, STREAM_BUFFER
from relayrace.testing import SCRIPTED_ANSWER, Answer, Crash, Hang

from .reliability import live_tasks
from .support import client, config, request, scripted_provider


async def test_caller_cancelling_mid_stream_stops_the_attempt_at_once(autojump_clock):
    cfg = config(scripted_provider("a", Answer(chunks=10, delay=1.0)), scripted_provider("b"))
    async with open_supervisor(cfg) as sup:
        got = []
        async with sup.stream(request()) as s:
            async for d in s:
                got.append(d)
                if len(got) == 3:
                    left_at = trio.current_time()
                    break
        await trio.testing.wait_all_tasks_blocked()  # let the actor see it
        calls = client(cfg, "a").calls
        assert [c.outcome for c in calls] == ["cancelled"]
        assert calls[0].ended_at == left_at  # at once: no time passed
        assert client(cfg, "b").calls == []  # no failover for a caller that left
        snap = sup.health()["a"]
        assert snap.state is State.OK and snap.consecutive_failures == 0 and snap.in_flight == 0


async def test_cancelling_a_complete_call_cancels_the_upstream_call(autojump_clock):
    cfg = config(scripted_provider("a", Hang()))
    async with open_supervisor(cfg) as sup:
        with trio.move_on_after(2.0):
            await sup.complete(request())
        await trio.testing.wait_all_tasks_blocked()
        assert client(cfg, "a").outcomes == ["cancelled"]
        assert sup.health()["a"].consecutive_failures == 0
        assert sup.statistics().in_flight == 0


async def test_shutdown_fails_requests_in_flight_and_leaves_no_task(autojump_clock):
    before = live_tasks()
    cfg = config(scripted_provider("a", Hang()))
    errors: list[RequestFailed] = []

    async def caller(sup) -> None:
        try:
            await sup.complete(request())
        except RequestFailed as exc:
            errors.append(exc)

    async with trio.open_nursery() as callers:
        async with open_supervisor(cfg) as sup:
            for _ in range(3):
                callers.start_soon(caller, sup)
            await trio.sleep(1.0)
            assert len(live_tasks()) > len(before)
    # Each caller got exactly one error; nothing survived the block.
    assert len(errors) == 3
    assert client(cfg, "a").closed
    assert client(cfg, "a").outcomes == ["cancelled"] * 3
    assert live_tasks() == before


async def test_drain_lets_requests_finish_and_refuses_new_ones(autojump_clock):
    cfg = config(scripted_provider("a", Answer(first_delay=5.0)))
    replies = []
    async with open_supervisor(cfg) as sup:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: _append(replies, sup.complete(request())))
            await trio.sleep(1.0)
            await sup.drain()
            assert len(replies) == 1
        with pytest.raises(RequestFailed) as info:
            await sup.complete(request())
        assert info.value.failure.code == "supervisor_closed"


async def _append(out, awaitable) -> None:
    out.append(await awaitable)


class Firehose:
    """A client that pushes deltas as fast as it is let, counting them (a unit-test double)."""

    accepts_continuation = False

    def __init__(self) -> None:
        self.pushed = 0

    async def call(self, call: ClientCall, sink: Sink) -> Completion:
        for _ in range(1_000):
            await sink.delta("x")
            self.pushed += 1
        return Completion(model="fire")

    async def aclose(self) -> None:
        pass


async def test_a_slow_consumer_slows_the_producer(autojump_clock):
    hose = Firehose()
    cfg = config(ProviderConfig(name="fire", client=hose, budgets=Budgets(idle=0.5)))
    async with open_supervisor(cfg) as sup:
        async with sup.stream(request()) as s:
            seen = 0
            async for _ in s:
                seen += 1
                if seen % 10 == 0:
                    await trio.sleep(1.0)  # beyond the idle budget: not the provider's fault
                    # The producer is never more than the stream's buffer ahead of the consumer
                    # (and it did fill it: it is not slowed down for nothing).
                    assert hose.pushed - seen <= STREAM_BUFFER + 1
                    assert hose.pushed - seen >= min(STREAM_BUFFER, 1_000 - seen)
        assert s.reply.text == "x" * 1_000
        assert sup.health()["fire"].consecutive_failures == 0


async def test_a_crashing_actor_is_restarted_and_its_jobs_fail_over(autojump_clock):
    cfg = config(
        scripted_provider("a", Crash(), Answer(text="after the restart")),
        scripted_provider("b"),
    )
    async with open_supervisor(cfg) as sup:
        async with sup.subscribe() as events:
            reply = await sup.complete(request())
            assert reply.provider == "b"
            assert reply.attempts[0].failure.code == "actor_crashed"
            await trio.sleep(5.0)  # the restart backoff
            again = await sup.complete(request())
            kinds = []
            while True:
                try:
                    kinds.append(events.receive_nowait().kind)
                except trio.WouldBlock:
                    break
        assert again.provider == "a" and again.text == "after the restart"
        assert EventKind.ACTOR_RESTARTED in kinds
        assert sup.statistics().restarts == 1


async def test_an_actor_that_keeps_crashing_is_given_up_and_the_supervisor_serves_on(
    autojump_clock,
):
    cfg = config(
        scripted_provider("a", Crash()),
        scripted_provider("b"),
        policies=Policies(retry=RetryPolicy(max_attempts=1)),
    )
    async with open_supervisor(cfg) as sup:
        for _ in range(MAX_RESTARTS + 3):
            reply = await sup.complete(request())
            assert reply.provider == "b" and reply.text == SCRIPTED_ANSWER
            await trio.sleep(1.0)
        crashes = client(cfg, "a").outcomes.count("crashed")
        assert crashes == MAX_RESTARTS + 1
        reply = await sup.complete(request())
        assert reply.decisions[0].reason == "the actor gave up after repeated crashes"


async def test_local_capacity_refuses_fast_when_every_inbox_is_full(autojump_clock):
    cfg = config(scripted_provider("a", Hang(), max_concurrency=1, inbox_size=1))
    errors = []

    async def caller(sup) -> None:
        try:
            await sup.complete(request())
        except RequestFailed as exc:
            errors.append((trio.current_time(), exc.failure))

    async with open_supervisor(cfg) as sup:
        with trio.move_on_after(1.0):
            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    nursery.start_soon(caller, sup)
    refused = [f for _, f in errors if f.category is Category.LOCAL_CAPACITY]
    # One runs, one waits in the inbox, three are refused at once.
    assert len(refused) == 3
    assert all(t == 0 for t, f in errors if f.category is Category.LOCAL_CAPACITY)


async def test_a_caller_that_leaves_while_queued_gives_its_place_back(autojump_clock):
    cfg = config(
        scripted_provider(
            "a", Answer(first_delay=2.0), Answer(), max_concurrency=1, inbox_size=2
        )
    )
    replies: dict[str, object] = {}

    async def caller(name: str, leave_at: float | None = None) -> None:
        with trio.move_on_at(leave_at if leave_at is not None else float("inf")):
            replies[name] = await sup.complete(request())

    async with open_supervisor(cfg) as sup:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller, "first")
            await trio.sleep(0.1)
            nursery.start_soon(caller, "leaves", 1.0)  # queued, gives up at t=1
            nursery.start_soon(caller, "third")  # queued behind it
            await trio.sleep(0.5)
            assert sup.health()["a"].in_flight == 1
        assert sorted(replies) == ["first", "third"]
        assert sup.health()["a"].in_flight == 0
        # The one that left was never sent; the third ran when the first ended, at t=2.
        calls = client(cfg, "a").calls
        assert [c.started_at for c in calls] == [0.0, 2.0]
        # The slot is free again: a new request runs at once.
        started = trio.current_time()
        await sup.complete(request())
        assert client(cfg, "a").calls[-1].started_at == started


async def test_a_crash_interrupts_the_actors_other_attempts_and_they_fail_over(autojump_clock):
    cfg = config(
        scripted_provider("a", Answer(first_delay=5.0), Crash(), max_concurrency=2),
        scripted_provider("b"),
    )
    replies = []

    async def caller() -> None:
        replies.append(await sup.complete(request()))

    async with open_supervisor(cfg) as sup:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller)  # a's slow answer
            await trio.sleep(1.0)
            nursery.start_soon(caller)  # a crashes on this one
    assert [r.provider for r in replies] == ["b", "b"]
    codes = sorted(r.attempts[0].failure.code for r in replies)
    assert codes == ["actor_crashed", "actor_crashed"]
    assert all(r.attempts[0].ended_at == 1.0 for r in replies)  # interrupted at the crash
    assert sorted(client(cfg, "a").outcomes) == ["cancelled", "crashed"]


# --- a bounded wait for a slot ------------------------------------------------------------------


async def test_a_job_waits_for_a_slot_at_most_the_queue_budget_then_fails_over(autojump_clock):
    cfg = config(
        scripted_provider(
            "a", Hang(), max_concurrency=1, inbox_size=4, budgets=Budgets(queue=3.0)
        ),
        scripted_provider("b"),
        policies=Policies(retry=RetryPolicy(max_attempts=1)),
    )
    async with open_supervisor(cfg) as sup, trio.open_nursery() as nursery:
        nursery.start_soon(sup.complete, request())  # holds a's only slot
        await trio.sleep(1.0)
        start = trio.current_time()
        reply = await sup.complete(request())
        assert trio.current_time() - start == pytest.approx(3.0)
        assert reply.provider == "b"
        first = reply.attempts[0]
        assert first.actor == "a" and first.failure is not None
        assert (first.failure.category, first.failure.code) == (
            Category.LOCAL_CAPACITY,
            "queue_timeout",
        )
        health = sup.health()["a"]
        assert health.consecutive_failures == 0 and health.state is State.OK
        assert health.in_flight == 1  # the job that left the inbox took no slot
        nursery.cancel_scope.cancel()


async def test_a_job_granted_a_slot_within_the_queue_budget_runs(autojump_clock):
    cfg = config(
        scripted_provider(
            "a", Answer(first_delay=2.0), max_concurrency=1, budgets=Budgets(queue=3.0)
        ),
        scripted_provider("b"),
    )
    async with open_supervisor(cfg) as sup, trio.open_nursery() as nursery:
        nursery.start_soon(sup.complete, request())
        await trio.sleep(0.5)
        start = trio.current_time()
        reply = await sup.complete(request())  # waits 1.5 s for the slot, then 2 s to answer
        assert trio.current_time() - start == pytest.approx(3.5)
        assert reply.provider == "a" and len(reply.attempts) == 1


# --- an actor that gave up is retried after a cool-off ------------------------------------------


async def test_an_actor_that_gave_up_is_skipped_then_restarted_afresh_after_the_cool_off(
    autojump_clock,
):
    cfg = config(
        scripted_provider("a", *[Crash()] * (MAX_RESTARTS + 1), Answer(text="back")),
        scripted_provider("b"),
        policies=Policies(
            retry=RetryPolicy(max_attempts=1), health=HealthPolicy(restart_cool_off=30.0)
        ),
    )
    async with open_supervisor(cfg) as sup, sup.subscribe() as events:
        for _ in range(MAX_RESTARTS + 1):
            assert (await sup.complete(request())).provider == "b"
            await trio.sleep(6.0)  # longer than any restart backoff (at most 5 s)
        kinds = []
        while True:
            try:
                event = events.receive_nowait()
            except trio.WouldBlock:
                break
            if event.kind in (EventKind.ACTOR_GAVE_UP, EventKind.ACTOR_RESTARTED):
                kinds.append(event)
        gave_up = kinds[-1]
        assert [e.kind for e in kinds] == [EventKind.ACTOR_RESTARTED] * MAX_RESTARTS + [
            EventKind.ACTOR_GAVE_UP
        ]
        assert gave_up.until == gave_up.time + 30.0
        health = sup.health()["a"]
        assert health.state is State.GAVE_UP and health.gave_up_until == gave_up.until
        assert health.to_dict()["state"] == "gave_up"
        assert health.to_dict()["gave_up_until"] == gave_up.until

        await trio.sleep(gave_up.until - trio.current_time() - 0.001)
        reply = await sup.complete(request())
        assert reply.provider == "b"
        assert str(reply.decisions[0].rule) == "default:health.state=gave_up"
        assert len(client(cfg, "a").calls) == MAX_RESTARTS + 1  # skipped: not called

        await trio.sleep(0.001)
        restarted = await events.receive()
        while restarted.actor != "a":  # the request's own events
            restarted = await events.receive()
        assert restarted.kind is EventKind.ACTOR_RESTARTED
        assert restarted.time == pytest.approx(gave_up.until) and "cool-off" in (restarted.detail or "")
        assert sup.health()["a"].state is State.OK and sup.health()["a"].gave_up_until is None
        reply = await sup.complete(request())
        assert reply.provider == "a" and reply.text == "back"
