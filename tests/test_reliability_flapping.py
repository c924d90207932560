"""Health under flapping: a primary that is down for a while, then healthy again.

During the outage every request is served by the backup; the primary is checked by one probe at
a time, at the first request after each bench (5 s, then 4 s each: past the first, a bench lasts
at most ``probe_interval``); and traffic returns to it within one interval (and a request) of its
recovery. Checked against the mock's log, attempt by attempt.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import trio
import trio.testing

from relayrace import (
    Budgets,
    Category,
    Config,
    EventKind,
    HealthPolicy,
    Outcome,
    Policies,
    ProviderConfig,
    Reply,
    Request,
    RequestFailed,
    RetryPolicy,
    Route,
    State,
    open_supervisor,
)
from relayrace.actors import OpenAIClient
from relayrace.testing import Fail, MockAttempt, serve_mock_provider

from .reliability import MESSAGES, live_tasks, open_sockets
from .support import client, config, request, scripted_provider

DOWN = 30.0  # the primary answers 503 for its first 30 s
PRIMARY = f"flapping,down={DOWN:g},tag=primary"
BACKUP = "ok,tag=backup"
CLIENTS = 4
EVERY = 0.5
UNTIL = 80.0


def overlapping(attempts: list[MockAttempt]) -> bool:
    spans = sorted((a.started_at, a.ended_at or 0.0) for a in attempts)
    return any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:], strict=False))


async def test_flapping_primary_is_probed_one_at_a_time_and_gets_its_traffic_back(
    autojump_clock,
):
    tasks, sockets = live_tasks(), open_sockets()
    served: list[tuple[float, str]] = []
    benches: list[tuple[float, float]] = []
    async with serve_mock_provider() as mock:
        config = Config(
            providers=[
                ProviderConfig(
                    name=name,
                    client=OpenAIClient(base_url=f"{mock.base_url}/v1", max_connections=8),
                    model=model,
                    budgets=Budgets(first_token=5.0, idle=5.0),
                )
                for name, model in (("primary", PRIMARY), ("backup", BACKUP))
            ],
            routes=[Route(model="chat", chain=["primary", "backup"])],
            policies=Policies(retry=RetryPolicy(max_attempts=1)),
        )
        async with open_supervisor(config) as sup:
            mock.reset()  # the outage starts now

            async def watch() -> None:
                async with sup.subscribe() as events:
                    async for event in events:
                        if event.kind is EventKind.ACTOR_BENCHED and event.actor == "primary":
                            assert event.until is not None
                            benches.append((event.time, event.until))

            async def client() -> None:
                while trio.current_time() < UNTIL:
                    reply = await sup.complete(Request("chat", MESSAGES))  # never fails
                    served.append((trio.current_time(), reply.provider))
                    await trio.sleep(EVERY)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                async with trio.open_nursery() as clients:
                    for _ in range(CLIENTS):
                        clients.start_soon(client)
                nursery.cancel_scope.cancel()
            snap = sup.health()["primary"]
            assert snap.state is State.OK and snap.consecutive_failures == 0
        await trio.testing.wait_all_tasks_blocked()
        assert mock.open_connections == 0
        primary = mock.attempts(PRIMARY)
        backup = mock.attempts(BACKUP)
    assert live_tasks() == tasks and open_sockets() == sockets

    # The outage: 503s until DOWN, then answers.
    assert all(a.outcome == "error" and a.status == 503 for a in primary if a.started_at < DOWN)
    assert all(a.outcome == "ok" for a in primary if a.started_at >= DOWN)
    assert all(a.outcome == "ok" for a in backup)
    recovered_at = min(a.started_at for a in primary if a.outcome == "ok")

    # Benched after the threshold (3 failures) at once, for 5 s, then re-benched by each failed
    # probe for the probe interval (4 s), which stops the doubling.
    policy = HealthPolicy()
    assert [until - at for at, until in benches] == [
        policy.cooldown_base,
        *[policy.probe_interval] * (len(benches) - 1),
    ]
    assert benches[0][0] == 0.0
    # During the outage, after the first burst (the requests in flight when it began), the
    # primary only saw the probes, one at a time: each the first request after a bench ended
    # (the mock's model list, the actor's own probe, answers while the model is down), and
    # each starting the next bench.
    probes = [a for a in primary if a.started_at > 0]
    failed = [a.started_at for a in probes if a.started_at < recovered_at]
    assert failed == [at for at, _ in benches[1:]]
    assert all(0 <= at - end <= EVERY for at, (_, end) in zip(failed, benches, strict=False))
    assert not overlapping(probes)
    # Traffic came back at the first request after the bench that was running when the
    # primary recovered: within one interval and one request of the recovery.
    bench_at_recovery = [(at, until) for at, until in benches if at <= DOWN < until]
    ((_, bench_end),) = bench_at_recovery
    assert 0 <= recovered_at - bench_end <= EVERY
    assert recovered_at - DOWN <= policy.probe_interval + EVERY

    # Every request was served: by the backup while the primary was out, by the primary after.
    assert len(served) == len(primary) + len(backup) - sum(a.outcome != "ok" for a in primary)
    assert all(provider == "backup" for at, provider in served if at < recovered_at)
    assert all(provider == "primary" for at, provider in served if at > recovered_at)
    assert all(a.started_at <= recovered_at for a in backup)


async def test_a_job_that_waited_for_a_slot_does_not_reach_a_provider_benched_meanwhile(
    autojump_clock,
):
    """Found by the test above (now and then, by scheduling): a request is routed to a healthy
    actor whose only slot is taken, and waits in its inbox; the attempt holding the slot fails
    and benches the actor; the waiting request must then fail over, not be sent."""
    cfg = config(
        scripted_provider(
            "a", Fail(category=Category.PROVIDER_5XX, status=503, delay=1.0), max_concurrency=1
        ),
        scripted_provider("b"),
        policies=Policies(
            retry=RetryPolicy(max_attempts=1), health=HealthPolicy(failure_threshold=1)
        ),
    )
    async with open_supervisor(cfg) as sup:
        replies = []
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(lambda: _append(replies, sup.complete(request())))
        assert [r.provider for r in replies] == ["b", "b"]
        assert sup.health()["a"].state is State.BENCHED
    assert [c.started_at for c in client(cfg, "a").calls] == [0.0]  # the first request only
    refused = [a for r in replies for a in r.attempts if a.failure and a.failure.code == "benched"]
    assert [(a.actor, a.outcome, a.started_at) for a in refused] == [("a", Outcome.FAILED, 1.0)]


async def test_a_probe_is_marked_before_the_next_request_is_routed(autojump_clock):
    """Two requests reach an actor whose bench has just ended at the same instant: the first
    is its probe, and the second is routed around it (never queued behind the probe)."""
    cfg = config(
        scripted_provider("a", Fail(category=Category.PROVIDER_5XX, status=503), max_concurrency=1),
        scripted_provider("b"),
        policies=Policies(
            retry=RetryPolicy(max_attempts=1), health=HealthPolicy(failure_threshold=1)
        ),
    )
    async with open_supervisor(cfg) as sup:
        assert (await sup.complete(request())).provider == "b"  # a fails: benched for 5 s
        await trio.sleep(5.0)
        replies = []
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(lambda: _append(replies, sup.complete(request())))
        assert [r.provider for r in replies] == ["b", "b"]
        assert sup.health()["a"].state is State.BENCHED
    assert [c.started_at for c in client(cfg, "a").calls] == [0.0, 5.0]  # the probe only
    tried = sorted(len(r.attempts) for r in replies)
    assert tried == [1, 2]  # the probe's request failed over; the other went to b at once


async def test_a_failing_model_behind_a_passthrough_route_does_not_affect_the_others(
    autojump_clock,
):
    """The config a new user writes first: one provider without a ``model`` behind ``*``, so
    that each request's model name goes upstream. One model is down for its first 30 s; the
    other is served all along, by the same provider, as if nothing happened (no skip, no
    retry, no failure), while the failing one is benched and probed on its own."""
    tasks, sockets = live_tasks(), open_sockets()
    steady, flapping = "ok,tag=steady", f"flapping,down={DOWN:g},tag=flapping"
    replies: dict[str, list[tuple[float, Any]]] = {steady: [], flapping: []}
    async with serve_mock_provider() as mock:
        cfg = Config(
            providers=[
                ProviderConfig(
                    name="only",
                    client=OpenAIClient(base_url=f"{mock.base_url}/v1", max_connections=8),
                    budgets=Budgets(first_token=5.0, idle=5.0),
                )
            ],
            routes=[Route(model="*", chain=["only"])],
            policies=Policies(retry=RetryPolicy(max_attempts=1)),
        )
        async with open_supervisor(cfg) as sup:
            mock.reset()

            async def client(model: str) -> None:
                while trio.current_time() < UNTIL:
                    try:
                        outcome: Any = await sup.complete(Request(model, MESSAGES))
                    except RequestFailed as exc:
                        outcome = exc
                    replies[model].append((trio.current_time(), outcome))
                    await trio.sleep(EVERY)

            async with trio.open_nursery() as nursery:
                for model in (steady, flapping) * 2:
                    nursery.start_soon(client, model)
            health = sup.health()["only"]
        await trio.testing.wait_all_tasks_blocked()
        assert mock.open_connections == 0
        steady_log, flapping_log = mock.attempts(steady), mock.attempts(flapping)
    assert live_tasks() == tasks and open_sockets() == sockets

    # The steady model: every request answered by its one attempt, routed as healthy.
    assert len(replies[steady]) >= 2 * UNTIL / EVERY - 2
    for _, reply in replies[steady]:
        assert isinstance(reply, Reply), reply
        assert reply.provider == "only" and reply.decisions == () and len(reply.attempts) == 1
    assert len(steady_log) == len(replies[steady])
    assert all(a.outcome == "ok" for a in steady_log)
    # The flapping model failed while down and was benched (its deployment alone), then
    # recovered: served again within one probe interval (and a request) of coming back.
    failed = [(at, r.failure) for at, r in replies[flapping] if isinstance(r, RequestFailed)]
    assert any(f.status == 503 for _, f in failed)
    # Past the outage only refusals: the deployment's probe was in flight (no call made).
    assert all(f.code == "probe_in_flight" for at, f in failed if at >= DOWN)
    assert any(
        d.rule.rule == "when_all_benched"
        for _, r in replies[flapping] if isinstance(r, RequestFailed) for d in r.decisions
    )
    within = HealthPolicy().probe_interval + 2 * EVERY
    back = min(at for at, r in replies[flapping] if isinstance(r, Reply))
    assert DOWN <= back <= DOWN + within
    assert all(isinstance(r, Reply) for at, r in replies[flapping] if at > DOWN + within)
    assert any(a.outcome == "error" for a in flapping_log)
    assert health.state is State.OK
    assert set(health.deployments) == {steady, flapping}
    assert health.deployments[steady].consecutive_failures == 0


async def _append(out: list[Any], awaitable: Awaitable[Any]) -> None:
    out.append(await awaitable)
