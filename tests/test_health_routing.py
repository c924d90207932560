"""Health as routing sees it: benches, probes, manual benches, exempt actors, the terminus,
the all-benched policy and demotion, through a real supervisor with scripted providers."""

from __future__ import annotations

import math

import pytest
import trio

from relayrace import (
    Action,
    AllBenched,
    Category,
    HealthPolicy,
    Match,
    Policies,
    RequestFailed,
    RetryPolicy,
)
from relayrace import open_supervisor as open_sup
from relayrace.actors import State
from relayrace.testing import Answer, Fail, Hang

from .support import client, config, request, scripted_provider

C = Category
NO_RETRY = RetryPolicy(max_attempts=1)


def five_xx() -> Fail:
    return Fail(category=C.PROVIDER_5XX, status=500)


async def test_threshold_benches_with_exponential_capped_cooldown(autojump_clock):
    policies = Policies(
        retry=NO_RETRY,
        health=HealthPolicy(
            failure_threshold=2, cooldown_base=4.0, cooldown_cap=10.0, probe_interval=10.0
        ),
    )
    cfg = config(scripted_provider("a", five_xx()), scripted_provider("b"), policies=policies)
    async with open_sup(cfg) as sup:
        await sup.complete(request())
        assert sup.health()["a"].state is State.OK
        assert sup.health()["a"].consecutive_failures == 1
        start = trio.current_time()
        await sup.complete(request())  # the second failure in a row: benched for the base
        snap = sup.health()["a"]
        assert snap.state is State.BENCHED
        assert snap.benched_until == pytest.approx(start + 4.0)
        # While benched, a is skipped with a decision that says so, and not called.
        reply = await sup.complete(request())
        assert reply.decisions[0].action is Action.SKIP and reply.decisions[0].actor == "a"
        assert len(client(cfg, "a").calls) == 2
        # The bench ends: the next request is the probe; it fails: benched twice as long.
        await trio.sleep(4.0)
        assert sup.health()["a"].state is State.PROBING
        now = trio.current_time()
        await sup.complete(request())
        assert sup.health()["a"].benched_until == pytest.approx(now + 8.0)
        await trio.sleep(8.0)
        now = trio.current_time()
        await sup.complete(request())
        assert sup.health()["a"].benched_until == pytest.approx(now + 10.0)  # capped


async def test_auth_and_quota_bench_at_once_for_the_long_bench(autojump_clock):
    policies = Policies(health=HealthPolicy(long_bench=600.0))
    cfg = config(
        scripted_provider("a", Fail(category=C.AUTH, status=401)),
        scripted_provider("q", Fail(category=C.QUOTA_EXHAUSTED, status=429)),
        scripted_provider("b"),
        policies=policies,
    )
    async with open_sup(cfg) as sup:
        now = trio.current_time()
        reply = await sup.complete(request())
        assert reply.provider == "b"
        for name in ("a", "q"):
            assert sup.health()[name].state is State.BENCHED
            assert sup.health()[name].benched_until == pytest.approx(now + 600.0)
            assert len(client(cfg, name).calls) == 1  # never retried


async def test_success_resets_the_failure_count(autojump_clock):
    policies = Policies(retry=NO_RETRY, health=HealthPolicy(failure_threshold=2))
    cfg = config(
        scripted_provider("a", five_xx(), Answer(), five_xx()),
        scripted_provider("b"),
        policies=policies,
    )
    async with open_sup(cfg) as sup:
        for _ in range(3):
            await sup.complete(request())
        assert [c.outcome for c in client(cfg, "a").calls] == ["failed", "ok", "failed"]
        assert sup.health()["a"].state is State.OK
        assert sup.health()["a"].consecutive_failures == 1


async def test_half_open_sends_one_probe_at_a_time(autojump_clock):
    policies = Policies(retry=NO_RETRY, health=HealthPolicy(failure_threshold=1, cooldown_base=5))
    cfg = config(
        scripted_provider("a", five_xx(), Answer(first_delay=2.0)),
        scripted_provider("b"),
        policies=policies,
    )
    async with open_sup(cfg) as sup:
        await sup.complete(request())
        await trio.sleep(5.0)
        replies = []

        async def one() -> None:
            replies.append(await sup.complete(request()))

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(one)
        assert sorted(r.provider for r in replies) == ["a", "b", "b", "b", "b"]
        assert len(client(cfg, "a").calls) == 2
        assert sup.health()["a"].state is State.OK
        assert sup.health()["a"].consecutive_failures == 0


async def test_manual_bench_is_never_shortened_by_automatic_logic(autojump_clock):
    policies = Policies(retry=NO_RETRY, health=HealthPolicy(failure_threshold=1, cooldown_base=1))
    cfg = config(scripted_provider("a"), scripted_provider("b"), policies=policies)
    async with open_sup(cfg) as sup:
        sup.bench("a", 100.0)
        sup.bench("a", 10.0)  # a shorter manual bench does not shorten it either
        reply = await sup.complete(request())
        assert reply.provider == "b"
        await trio.sleep(50.0)
        snap = sup.health()["a"]
        assert snap.manual and snap.state is State.BENCHED
        await trio.sleep(50.0)
        assert sup.health()["a"].state is State.OK
        assert (await sup.complete(request())).provider == "a"
        sup.bench("a")  # until unbench
        assert sup.health()["a"].benched_until == math.inf
        await trio.sleep(10_000)
        assert (await sup.complete(request())).provider == "b"
        sup.unbench("a")
        assert (await sup.complete(request())).provider == "a"
        with pytest.raises(KeyError):
            sup.bench("nobody", 1.0)
        with pytest.raises(ValueError):
            sup.bench("a", -1.0)


async def test_exempt_actor_is_never_benched(autojump_clock):
    policies = Policies(retry=NO_RETRY, health=HealthPolicy(failure_threshold=1))
    cfg = config(
        scripted_provider("a", Fail(category=C.AUTH, status=401), exempt=True),
        scripted_provider("b"),
        policies=policies,
    )
    async with open_sup(cfg) as sup:
        for _ in range(3):
            assert (await sup.complete(request())).provider == "b"
        assert sup.health()["a"].state is State.OK
        assert sup.health()["a"].exempt
        assert len(client(cfg, "a").calls) == 3


async def test_terminus_is_tried_last_even_when_benched(autojump_clock):
    policies = Policies(retry=NO_RETRY, health=HealthPolicy(failure_threshold=1))
    cfg = config(
        scripted_provider("last", five_xx(), Answer(), terminus=True, priority=-10),
        scripted_provider("a", five_xx()),
        policies=policies,
    )
    async with open_sup(cfg) as sup:
        with pytest.raises(RequestFailed):
            await sup.complete(request())
        assert [c.model for c in client(cfg, "a").calls] == ["m"]
        assert sup.health()["last"].state is State.BENCHED
        # a is benched too, but the terminus is always tried, and last.
        reply = await sup.complete(request())
        assert reply.provider == "last" and reply.was_terminus


@pytest.mark.parametrize("when", list(AllBenched))
async def test_the_all_benched_policy(autojump_clock, when):
    policies = Policies(
        retry=NO_RETRY,
        health=HealthPolicy(failure_threshold=1, cooldown_base=30, when_all_benched=when),
    )
    cfg = config(
        scripted_provider("a", five_xx(), Answer()),
        scripted_provider("b", five_xx(), Answer()),
        scripted_provider("t", five_xx(), Answer(text="from the terminus"), terminus=True),
        policies=policies,
    )
    async with open_sup(cfg) as sup:
        with pytest.raises(RequestFailed):
            await sup.complete(request())
        await trio.sleep(1.0)
        if when is AllBenched.FAIL:
            with pytest.raises(RequestFailed) as info:
                await sup.complete(request())
            assert info.value.failure.code == "all_benched"
            assert info.value.failure.retry_after == pytest.approx(29.0)
            assert len(client(cfg, "a").calls) == 1
            stop, last = info.value.decisions[-2:]
            assert str(stop.rule) == "config:health.when_all_benched=fail"
            assert last.reason == "no provider left to try"
        elif when is AllBenched.TERMINUS:
            reply = await sup.complete(request())
            assert reply.provider == "t" and reply.text == "from the terminus"
            assert len(client(cfg, "a").calls) == 1
            assert str(reply.decisions[-1].rule) == "config:health.when_all_benched=terminus"
        else:
            reply = await sup.complete(request())
            assert reply.provider == "a"  # tried anyway, soonest back first
            assert str(reply.decisions[-1].rule) == "default:health.when_all_benched=try_anyway"


@pytest.mark.parametrize("category", [C.MODEL_NOT_FOUND, C.CONTEXT_LENGTH])
async def test_advancing_categories_leave_health_untouched(autojump_clock, category):
    policies = Policies(health=HealthPolicy(failure_threshold=1))
    cfg = config(
        scripted_provider("a", Fail(category=category, status=400)),
        scripted_provider("b"),
        policies=policies,
    )
    async with open_sup(cfg) as sup:
        for _ in range(3):
            assert (await sup.complete(request())).provider == "b"
        snap = sup.health()["a"]
        assert snap.state is State.OK and snap.consecutive_failures == 0


async def test_priority_demotion_until_the_next_success(autojump_clock):
    policies = Policies(retry=NO_RETRY, demote=Match(statuses=[500]))
    cfg = config(
        scripted_provider("a", five_xx(), Answer(), priority=0),
        scripted_provider("b", five_xx(), Answer(), Answer(), priority=1),
        scripted_provider("c", priority=5),
        policies=policies,
    )
    async with open_sup(cfg) as sup:
        # a and b fail and are each demoted a step: c answers.
        assert (await sup.complete(request())).provider == "c"
        # b (1 + 1 = 2) now comes after a (0 + 1 = 1); a answers and its demotion ends.
        reply = await sup.complete(request())
        assert reply.provider == "a"
        assert [c.outcome for c in client(cfg, "b").calls] == ["failed"]
        assert (await sup.complete(request())).provider == "a"


async def test_benched_share_cap_keeps_actors_in_service(autojump_clock):
    policies = Policies(
        retry=NO_RETRY, health=HealthPolicy(failure_threshold=1, max_benched_share=0.5)
    )
    cfg = config(
        scripted_provider("a", five_xx()),
        scripted_provider("b", five_xx()),
        scripted_provider("c", five_xx()),
        scripted_provider("d"),
        policies=policies,
    )
    async with open_sup(cfg) as sup:
        assert (await sup.complete(request())).provider == "d"
        snaps = sup.health()
        # Two of four may be benched; the third failing actor is counted but kept in service.
        assert snaps["a"].state is State.BENCHED and snaps["b"].state is State.BENCHED
        assert snaps["c"].state is State.OK and snaps["c"].consecutive_failures == 1
        sup.bench("d", 5.0)  # a manual bench is the operator's call: always honoured
        assert sup.health()["d"].state is State.BENCHED


async def test_a_hanging_probe_is_cut_at_its_own_deadline_and_rebenches(autojump_clock):
    policies = Policies(
        retry=NO_RETRY,
        health=HealthPolicy(failure_threshold=1, cooldown_base=5, probe_timeout=3.0),
    )
    cfg = config(scripted_provider("a", five_xx(), Hang()), scripted_provider("b"), policies=policies)
    async with open_sup(cfg) as sup:
        await sup.complete(request())
        await trio.sleep(5.0)
        start = trio.current_time()
        reply = await sup.complete(request())
        assert reply.provider == "b"
        probe = reply.attempts[0]
        assert probe.actor == "a" and probe.probe
        assert probe.failure.code == "probe_timeout"
        assert trio.current_time() - start == pytest.approx(3.0)  # not the 30 s first-token budget
        # Re-benched for the next cooldown: 10 s, capped by probe_interval (4 s).
        assert sup.health()["a"].benched_until == pytest.approx(start + 3.0 + 4.0)


# --- a wait the provider sends is capped by cooldown_cap, for the bench and the caller ----------


@pytest.mark.parametrize(
    ("sent", "told"), [(99_999_999.0, 120.0), (120.0, 120.0), (7.5, 7.5), (math.nan, None), (0.0, None), (-3.0, None)]
)
async def test_the_wait_a_caller_is_told_is_the_providers_capped_by_cooldown_cap(
    autojump_clock, sent, told
):
    policies = Policies(retry=NO_RETRY, health=HealthPolicy(cooldown_cap=120.0))
    cfg = config(
        scripted_provider("a", Fail(category=C.RATE_LIMIT, status=429, retry_after=sent)),
        policies=policies,
    )
    async with open_sup(cfg) as sup:
        start = trio.current_time()
        with pytest.raises(RequestFailed) as info:
            await sup.complete(request())
        assert trio.current_time() == start  # nothing was waited for
        assert info.value.failure.retry_after == told
        assert info.value.attempts[0].failure.retry_after == told
        benched = sup.health()["a"]
        if told is None:
            assert benched.state is State.OK
        else:
            assert benched.state is State.BENCHED and benched.benched_until == start + told


async def test_all_benched_tells_the_caller_at_most_cooldown_cap(autojump_clock):
    policies = Policies(
        health=HealthPolicy(cooldown_cap=50.0, when_all_benched=AllBenched.FAIL)
    )
    cfg = config(scripted_provider("a"), policies=policies)
    async with open_sup(cfg) as sup:
        sup.bench("a", 3600.0)
        with pytest.raises(RequestFailed) as info:
            await sup.complete(request())
        assert info.value.failure.code == "all_benched"
        assert info.value.failure.retry_after == 50.0
        await trio.sleep(3600.0 - 20.0)
        with pytest.raises(RequestFailed) as info:
            await sup.complete(request())
        assert info.value.failure.retry_after == 20.0
