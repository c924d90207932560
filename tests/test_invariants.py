"""Every request ends with exactly one reply or one error, whatever the providers do; and what
the replies and errors say about attempts agrees with what the providers saw."""

from __future__ import annotations

import collections

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relayrace import (
    Budgets,
    Category,
    Config,
    HealthPolicy,
    MidStream,
    Outcome,
    Policies,
    ProviderConfig,
    RequestFailed,
    RetryPolicy,
    Route,
    StreamPolicy,
    open_supervisor,
)
from relayrace.testing import SCRIPTED_ANSWER, Answer, Crash, Fail, Hang, ScriptedClient

from .support import request

# Attempts that ended before they reached the provider's client.
NEVER_CALLED = {
    "inbox_full",
    "actor_gone",
    "probe_in_flight",
    "benched",
    "actor_restarting",
    "actor_gave_up",
}

categories = st.sampled_from(
    [c for c in Category if c not in (Category.CANCELLED, Category.LOCAL_CAPACITY)]
)
steps = st.one_of(
    st.builds(Answer, chunks=st.integers(1, 6), delay=st.sampled_from([0.0, 0.5])),
    st.builds(
        Fail,
        category=categories,
        retry_after=st.sampled_from([None, 0.5, 3.0]),
        after_chunks=st.integers(0, 3),
    ),
    st.builds(Hang, after_chunks=st.integers(0, 2)),
    st.just(Crash()),
)
providers = st.lists(
    st.tuples(
        st.lists(steps, min_size=1, max_size=4),
        st.integers(-2, 2),  # priority
        st.booleans(),  # terminus
        st.booleans(),  # accepts continuation
    ),
    min_size=1,
    max_size=4,
)
scenarios = st.fixed_dictionaries(
    {
        "providers": providers,
        "strategy": st.sampled_from(["priority", "round_robin", "least_busy", "weighted"]),
        "mode": st.sampled_from(list(MidStream)),
        "max_attempts": st.integers(1, 3),
        "threshold": st.integers(1, 3),
        "requests": st.lists(st.booleans(), min_size=1, max_size=8),  # stream?
        "seed": st.integers(0, 2**16),
    }
)


def build(scenario: dict) -> Config:
    provider_configs = []
    for i, (script, priority, terminus, continues) in enumerate(scenario["providers"]):
        provider_configs.append(
            ProviderConfig(
                name=f"p{i}",
                client=ScriptedClient(script, accepts_continuation=continues),
                priority=priority,
                terminus=terminus,
                max_concurrency=2,
                inbox_size=4,
                budgets=Budgets(first_token=2.0, idle=2.0, attempt=30.0),
            )
        )
    return Config(
        providers=provider_configs,
        routes=[
            Route(
                model="m",
                chain=[p.name for p in provider_configs],
                strategy=scenario["strategy"],
            )
        ],
        policies=Policies(
            retry=RetryPolicy(max_attempts=scenario["max_attempts"]),
            health=HealthPolicy(failure_threshold=scenario["threshold"]),
            stream=StreamPolicy(mid_stream=scenario["mode"]),
        ),
        seed=scenario["seed"],
    )


async def drive(scenario: dict) -> None:
    cfg = build(scenario)
    endings: dict[int, list[object]] = collections.defaultdict(list)

    async def one(i: int, streaming: bool) -> None:
        try:
            if streaming:
                async with sup.stream(request()) as s:
                    deltas = [d async for d in s]
                reply = s.reply
                assert "".join(d.text for d in deltas) == reply.text
                assert [d.seq for d in deltas] == list(range(len(deltas)))
            else:
                reply = await sup.complete(request())
            endings[i].append(reply)
        except RequestFailed as exc:
            endings[i].append(exc)

    async with open_supervisor(cfg) as sup:
        async with trio.open_nursery() as nursery:
            for i, streaming in enumerate(scenario["requests"]):
                nursery.start_soon(one, i, streaming)
        await trio.testing.wait_all_tasks_blocked()

    # Exactly one ending per request.
    assert sorted(endings) == list(range(len(scenario["requests"])))
    assert all(len(e) == 1 for e in endings.values())

    seen: collections.Counter[str] = collections.Counter()
    for (ending,) in endings.values():
        attempts = ending.attempts
        if isinstance(ending, RequestFailed):
            assert attempts or ending.decisions
        else:
            # Never a truncated answer reported as complete.
            assert ending.text == SCRIPTED_ANSWER
            assert attempts[-1].outcome is Outcome.OK and attempts[-1].actor == ending.provider
            assert all(a.outcome is not Outcome.OK for a in attempts[:-1])
        for a in attempts:
            if a.failure is None or a.failure.code not in NEVER_CALLED:
                seen[a.actor] += 1
    called = collections.Counter(
        {p.name: len(p.client.calls) for p in cfg.providers if p.client.calls}
    )
    assert seen == called


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(scenario=scenarios)
def test_every_request_ends_exactly_once(scenario: dict) -> None:
    trio.run(drive, scenario, clock=trio.testing.MockClock(autojump_threshold=0))
